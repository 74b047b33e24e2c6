"""Triton bidirectional attention kernel vs the PyTorch reference.

With CUDA the kernel runs natively, in this process, on small and larger
shapes. Without CUDA it runs under Triton's interpreter (TRITON_INTERPRET=1)
on small shapes. Whether @triton.jit builds an interpreted function is decided
from the environment when the kernel module is first imported, so setting the
variable here would be too late whenever another test module imported it (or
triton) first. The interpreter cases therefore run in one child process
(this file run as a script with ``--interpret``, the variable set in its
environment), which prints one JSON result per case; the tests read those.

Cases with ``prefix_lens`` also give each sequence a prefix of keys in a
paged KV cache (vLLM's layout, ``[pages, kv_heads, page_size, 2 * head_dim]``,
optionally a strided view of a page-major buffer as on the GPU), on pages in
shuffled order, every slot no sequence owns NaN-poisoned.

Cases with ``splits`` split each tile's keys into that many chunks (default:
the kernel's own choice, ``splits_of``), merged by ``triton_split``'s kernel;
``expect_splits`` checks the choice.

Cases with ``kv_lens`` give keys their own layout (``kv_batch``), as in the
KV-cached denoising modes: q rows packed by ``lens``, k/v rows of sequence i
``kv_lens[i]`` long, packed in order or (``kv_shuffled``) in reverse order
with NaN rows between sequences, so reading any row outside a sequence's keys
poisons the output.

The ``rope`` cases check ``triton_rope.py`` (RoPE fused with the key arena's
write) against its reference, vLLM's ``forward_native`` and, on CUDA, vLLM's
own kernel; ``_plan_forward`` runs it inside an arena plan.

The interpreter cannot run ``tl.dot`` on bfloat16 (it keeps bf16 as uint16 and
multiplies the bit patterns; Triton's debugging guide lists bf16 as
unsupported, triton-lang/triton#11584), and it truncates fp32 -> bf16 casts
where the GPU rounds to nearest even. The child process patches both: dot
widens bf16 operands to fp32 first (what the tensor cores compute: exact
products, fp32 accumulation) and the cast rounds to nearest even.
"""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from vllm_omni.kernels.paged_kv import PagedPrefix, page_rows_of, slots_of, write_pages
from vllm_omni.kernels.reference import (
    SequenceBatch, bidirectional_attention_reference, long_tiles)

ON_CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _case(name, lens, heads, kv_heads, head_dim, dtype, packed=False,
          kv_lens=None, kv_shuffled=False, explicit_kv=False,
          prefix_lens=None, page_size=16, token_major_pages=False, splits=None,
          expect_splits=None):
    """packed: q, k, v are strided views (of one qkv tensor when kv_lens is
    None, else q of a wider tensor and k, v of one kv tensor). explicit_kv:
    also check that kv_batch=batch gives the kv_batch=None output bit for bit.
    prefix_lens: paged prefix keys per sequence (pages of page_size rows;
    token_major_pages: the cache is a head/token-transposed view)."""
    assert kv_lens is None or len(kv_lens) == len(lens)
    assert prefix_lens is None or (kv_lens is not None and len(prefix_lens) == len(lens))
    return dict(name=name, lens=lens, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, dtype=dtype, packed=packed, kv_lens=kv_lens,
                kv_shuffled=kv_shuffled, explicit_kv=explicit_kv,
                prefix_lens=prefix_lens, page_size=page_size,
                token_major_pages=token_major_pages, splits=splits, expect_splits=expect_splits)


# Small enough for the interpreter (the whole file takes seconds on CPU).
SMALL = [
    _case("one-seq-70-fp32-d64", [70], 2, 2, 64, "fp32", explicit_kv=True),
    _case("one-token-fp32-d128", [1], 2, 1, 128, "fp32"),
    _case("many-gqa4-fp32-d64", [1, 7, 33, 70], 4, 1, 64, "fp32"),
    _case("many-gqa2x2-fp32-d64", [70, 7, 1, 33], 4, 2, 64, "fp32"),
    _case("many-packed-fp32-d128", [33, 1, 70, 7], 2, 2, 128, "fp32", packed=True),
    _case("zero-len-seq-fp32-d64", [5, 0, 33], 2, 2, 64, "fp32"),
    _case("many-gqa4-bf16-d64", [1, 7, 33, 70], 4, 1, 64, "bf16", explicit_kv=True),
    _case("many-packed-bf16-d128", [70, 1, 33], 2, 2, 128, "bf16", packed=True),
    _case("one-seq-bf16-d128", [129], 2, 2, 128, "bf16"),
    _case("many-packed-gqa4-fp16-d64", [7, 70, 1, 33], 4, 1, 64, "fp16", packed=True),
    _case("many-fp16-d128", [33, 7], 2, 2, 128, "fp16"),
    _case("d16-fp32", [17, 3], 2, 1, 16, "fp32"),
    # Keys laid out apart from queries (kv_batch).
    _case("kv-3seq-fp32-d64", [8, 1, 33], 2, 2, 64, "fp32", True, kv_lens=[40, 17, 70]),
    _case("kv-3seq-gqa4-fp16-d64", [8, 1, 33], 4, 1, 64, "fp16", True,
          kv_lens=[40, 17, 70], kv_shuffled=True),
    _case("kv-equal-lens-gqa2-fp32-d128", [33, 7, 1], 4, 2, 128, "fp32", True,
          kv_lens=[33, 7, 1], kv_shuffled=True),
    _case("kv-zero-queries-gqa2-fp32-d64", [5, 0, 0, 32], 4, 2, 64, "fp32",
          kv_lens=[40, 17, 0, 70], kv_shuffled=True),
    _case("kv-more-queries-than-keys-fp32-d64", [70, 3], 2, 1, 64, "fp32", True, kv_lens=[9, 1]),
    _case("kv-block32-bf16-d128", [32, 32, 32], 2, 1, 128, "bf16", True,
          kv_lens=[384, 200, 97], kv_shuffled=True),
    # Paged prefix keys: partial last pages, page-aligned, none, prefix only.
    _case("paged-3seq-fp32-d64", [8, 1, 33], 2, 2, 64, "fp32", True,
          kv_lens=[8, 1, 33], prefix_lens=[40, 17, 0]),
    _case("paged-prefix-only-gqa4-fp16-d64", [32, 5], 4, 1, 64, "fp16",
          kv_lens=[0, 3], kv_shuffled=True, prefix_lens=[64, 1]),
    _case("paged-token-major-bf16-d128", [32, 32], 2, 1, 128, "bf16", True,
          kv_lens=[32, 300], prefix_lens=[128, 95], page_size=32, token_major_pages=True),
    _case("paged-1-token-fp32-d128", [1], 2, 2, 128, "fp32",
          kv_lens=[1], prefix_lens=[383], token_major_pages=True),
    # Long on average (LONG_CONFIGS; fp16: the interpreter's dots are exact);
    # unsplit (its 17 programs would split).
    _case("long-fp16-d64", [1100, 1030], 1, 1, 64, "fp16", packed=True, splits=1),
    # Split keys. The chunks (key blocks of BLOCK_N, prefix first) are noted:
    # splits past the last block have no keys.
    _case("split-paged-only-fp32-d64", [32], 2, 2, 64, "fp32", kv_lens=[0],
          kv_shuffled=True, prefix_lens=[300], splits=4),  # 2,2,1,0 prefix blocks
    _case("split-local-only-gqa4-fp32-d64", [32], 4, 1, 64, "fp32", True, kv_lens=[200],
          kv_shuffled=True, splits=3),  # packed, 8 tiles; 3,3,1 local blocks
    # Sequence 0: the prefix block and local block 0, then local block 1 and the tail.
    _case("split-both-gqa2-bf16-d128", [32, 5], 4, 2, 128, "bf16", True, kv_lens=[150, 3],
          prefix_lens=[50, 64], token_major_pages=True, splits=2),
    _case("split-gqa3-unpacked-fp32-d128", [7], 6, 2, 128, "fp32", kv_lens=[33],
          prefix_lens=[70], splits=8),  # 5 blocks: 1 each, 3 empty splits
    _case("split-1-token-fp32-d128", [1], 2, 2, 128, "fp32", kv_lens=[1], prefix_lens=[383],
          token_major_pages=True, splits=4),
    _case("split-short-seqs-fp32-d64", [5, 0, 1], 2, 2, 64, "fp32", kv_lens=[3, 0, 1],
          kv_shuffled=True, prefix_lens=[10, 0, 0], splits=4),  # 2 and 1 blocks
    _case("split-self-keys-gqa2-fp32-d64", [70, 1], 4, 2, 64, "fp32", True, splits=2),
    _case("split-auto-fp32-d64", [4], 2, 2, 64, "fp32", kv_lens=[8], prefix_lens=[600],
          expect_splits=2),  # 2 programs, 608 keys
]
LARGE = [
    _case("gpu-8x300-600-bf16-d128", [300, 412, 517, 600, 333, 450, 599, 301], 32, 32, 128, "bf16"),
    _case("gpu-8-packed-gqa-bf16-d128", [300, 412, 517, 600, 333, 450, 599, 301], 32, 8, 128, "bf16", True),
    _case("gpu-fp16-d64-many", [1, 2, 63, 64, 65, 127, 128, 129, 1000], 16, 4, 64, "fp16"),
    _case("gpu-fp32-d128", [1, 70, 300, 513], 8, 2, 128, "fp32", True),
    _case("gpu-fp32-d64-one", [1500], 4, 4, 64, "fp32"),
    _case("gpu-bf16-d256", [5, 200, 333], 8, 2, 256, "bf16"),
    _case("gpu-64-seqs-bf16-d128", [128, 256] * 32, 32, 8, 128, "bf16", True),
    _case("gpu-kv-dual-cache-bf16-d128", [32] * 16, 32, 8, 128, "bf16", True,
          kv_lens=[384, 400, 256, 512] * 4, kv_shuffled=True),
    _case("gpu-kv-fp16-d64-mixed", [1, 0, 64, 65, 200, 32], 16, 4, 64, "fp16", True,
          kv_lens=[300, 5, 64, 1000, 200, 384]),
    _case("gpu-paged-dual-bf16-d128", [32] * 16, 32, 8, 128, "bf16", True,
          kv_lens=[32, 256, 100, 32] * 4, prefix_lens=[128, 129, 300, 1] * 4,
          token_major_pages=True),
    _case("gpu-paged-prefix-fp32-d64", [1, 300, 65, 0], 8, 2, 64, "fp32", True,
          kv_lens=[1, 300, 65, 0], prefix_lens=[17, 512, 0, 40]),
    # Image joint attention (long sequences: LONG_CONFIGS), Qwen-Image's heads.
    _case("gpu-long-joint-bf16-d128", [4224, 4224, 1100], 24, 24, 128, "bf16", True),
    _case("gpu-long-joint-fp16-d64", [2000, 1031], 8, 8, 64, "fp16"),
    # Batch 1 block steps of LLaDA-8B's shape over a long prefix: split (the
    # count hangs on the SM count, except where the keys bound it).
    _case("gpu-split-block-bf16-d128", [32], 32, 32, 128, "bf16", True, kv_lens=[512],
          prefix_lens=[3072], page_size=16, token_major_pages=True),
    _case("gpu-split-block-fp32-d128", [32], 32, 32, 128, "fp32", True, kv_lens=[32],
          prefix_lens=[1500], expect_splits=4),
    _case("gpu-split-sdar-gqa4-bf16-d128", [4, 4, 4], 32, 8, 128, "bf16", True,
          kv_lens=[4, 4, 4], prefix_lens=[4000, 700, 1], token_major_pages=True,
          expect_splits=8),
]
CASES = SMALL + (LARGE if ON_CUDA else [])


def _batches(case):
    """(batch, kv_batch) of a case; kv_batch None when keys share q's rows."""
    batch = SequenceBatch.from_lengths(case["lens"])
    kv_lens = case["kv_lens"]
    if kv_lens is None:
        return batch, None
    if not case["kv_shuffled"]:
        return batch, SequenceBatch.from_lengths(kv_lens)
    starts, pos = [0] * len(kv_lens), 2  # reverse order, 2 NaN rows around each
    for i in reversed(range(len(kv_lens))):
        starts[i] = pos
        pos += kv_lens[i] + 2
    return batch, SequenceBatch(tuple(starts), tuple(kv_lens))


def _kv_rows(kv_batch):
    return max(s + n for s, n in zip(kv_batch.starts, kv_batch.lens)) + 2


def _prefix(case, device):
    """The case's paged prefix (or None): each sequence's pages in shuffled
    order, every slot no sequence owns NaN."""
    if case["prefix_lens"] is None:
        return None
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()) + 1)
    page, kh, d = case["page_size"], case["kv_heads"], case["head_dim"]
    need = [-(-n // page) for n in case["prefix_lens"]]
    num_pages = sum(need) + 2
    order = torch.randperm(num_pages, generator=gen).tolist()
    if case["token_major_pages"]:  # physical [pages, page_size, heads, 2d], as on the GPU
        cache = torch.full((num_pages, page, kh, 2 * d), float("nan")).transpose(1, 2)
    else:
        cache = torch.full((num_pages, kh, page, 2 * d), float("nan"))
    table = torch.full((len(need), max(need + [1])), -1, dtype=torch.int32)
    for i, n in enumerate(case["prefix_lens"]):
        pages = [order.pop() for _ in range(need[i])]
        table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        for p in range(n):
            cache[pages[p // page], :, p % page] = torch.randn(kh, 2 * d, generator=gen)
    dtype = DTYPES[case["dtype"]]
    return PagedPrefix(cache.to(device, dtype), table.to(device), tuple(case["prefix_lens"]))


def _inputs(case, device):
    """Fresh random q, k, v (seeded per case); packed: views of one qkv tensor
    (or with kv_lens: q a view of a wider tensor, k, v views of one kv tensor)."""
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    dtype = DTYPES[case["dtype"]]
    tokens = sum(case["lens"])
    h, kh, d = case["heads"], case["kv_heads"], case["head_dim"]
    _, kv_batch = _batches(case)
    if kv_batch is not None:
        kv_tokens = _kv_rows(kv_batch)
        if case["packed"]:
            q = torch.randn(tokens, (h + 1) * d, generator=gen).to(device, dtype)
            q = q[:, : h * d].view(tokens, h, d)
            kv = torch.randn(kv_tokens, 2 * kh * d, generator=gen).to(device, dtype)
            k, v = (t.view(kv_tokens, kh, d) for t in kv.split(kh * d, dim=-1))
            assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
        else:
            q = torch.randn(tokens, h, d, generator=gen).to(device, dtype)
            k, v = (torch.randn(kv_tokens, kh, d, generator=gen).to(device, dtype)
                    for _ in range(2))
        # Rows of no sequence are NaN: the kernel must never read them.
        used = torch.zeros(kv_tokens, dtype=torch.bool)
        for s, n in zip(kv_batch.starts, kv_batch.lens):
            used[s : s + n] = True
        k[~used.to(device)] = float("nan")
        v[~used.to(device)] = float("nan")
        return q, k, v
    if case["packed"]:
        qkv = torch.randn(tokens, (h + 2 * kh) * d, generator=gen).to(device, dtype)
        q = qkv[:, : h * d].view(tokens, h, d)
        k = qkv[:, h * d : (h + kh) * d].view(tokens, kh, d)
        v = qkv[:, (h + kh) * d :].view(tokens, kh, d)
        assert not q.is_contiguous() and q.stride(0) == (h + 2 * kh) * d
    else:
        q, k, v = (torch.randn(tokens, n, d, generator=gen).to(device, dtype) for n in (h, kh, kh))
    return q, k, v


def run_case(case, device):
    from vllm_omni.kernels.triton_attention import (
        _kv_tile_table, _tile_table, block_m_of, bidirectional_attention_triton, splits_of)
    from vllm_omni.kernels.triton_split import max_keys

    q, k, v = _inputs(case, device)
    batch, kv_batch = _batches(case)
    prefix = _prefix(case, device)
    tokens, h, d = q.shape
    scale = d**-0.5
    # Output goes into a NaN-poisoned strided window of a larger buffer, so
    # unwritten rows and writes outside the window are both caught.
    buf = torch.full((tokens + 2, h, d + 16), float("nan"), dtype=q.dtype, device=device)
    out = buf[1 : tokens + 1, :, :d]
    ret = bidirectional_attention_triton(q, k, v, batch, scale, kv_batch, out=out, prefix=prefix,
                                         splits=case["splits"])
    assert ret.data_ptr() == out.data_ptr()
    splits = case["splits"]
    if splits is None:  # what the launch chose
        long = kv_batch is None and long_tiles(tokens, len(batch.lens))
        block_m = block_m_of(d, q.dtype, long, h // k.shape[1])
        lens = prefix.lens if prefix else None
        tiles = (_tile_table(batch, block_m, q.device) if kv_batch is None else
                 _kv_tile_table(batch, kv_batch, lens, block_m, q.device)[0])
        splits = splits_of(len(tiles), h, k.shape[1], max_keys(batch, kv_batch, lens), q.device,
                           long)
    written = torch.zeros(buf.shape, dtype=torch.bool, device=device)
    written[1 : tokens + 1, :, :d] = True
    # Sequences of length 0 own no rows; every row here belongs to one.
    ref_prefix = prefix and PagedPrefix(prefix.kv_cache.double(), prefix.block_table, prefix.lens)
    ref = bidirectional_attention_reference(q.double(), k.double(), v.double(), batch, scale,
                                            kv_batch, ref_prefix)
    err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
    res = dict(
        rel_err=err,
        all_finite=bool(torch.isfinite(out).all()),
        outside_untouched=bool(buf[~written].isnan().all()),
        dtype_ok=out.dtype == q.dtype,
        splits=splits,
    )
    if case["explicit_kv"]:  # the kv-table kernel variant, given q's own layout
        explicit = bidirectional_attention_triton(q, k, v, batch, scale, batch)
        res["explicit_kv_equal"] = bool(torch.equal(explicit, out))
    return res


def _check(case, res):
    assert res["all_finite"], "unwritten (NaN) output rows"
    assert res["outside_untouched"], "kernel wrote outside the output view"
    assert res["dtype_ok"], "output dtype differs from q"
    assert res["rel_err"] < TOL[DTYPES[case["dtype"]]], res
    assert res.get("explicit_kv_equal", True), "kv_batch=batch differs from kv_batch=None"
    if case["expect_splits"] is not None:
        assert res["splits"] == case["expect_splits"], res


@pytest.fixture(scope="module")
def interpreted():
    """Run every small case under TRITON_INTERPRET=1 in one child process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "--interpret"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_kernel_matches_reference(case, request):
    if ON_CUDA:
        res = run_case(case, "cuda")
    else:
        res = request.getfixturevalue("interpreted")[case["name"]]
        assert "error" not in res, res.get("error")
    _check(case, res)


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", ["gpu-8-packed-gqa-bf16-d128", "gpu-kv-dual-cache-bf16-d128"])
def test_batched_launch_equals_per_sequence_launches(name):
    from vllm_omni.kernels.triton_attention import bidirectional_attention_triton

    case = next(c for c in LARGE if c["name"] == name)
    q, k, v = _inputs(case, "cuda")
    batch, kv_batch = _batches(case)
    # Unsplit both ways: a sequence launched alone has few programs, so the
    # automatic choice would split its keys (same sums, another order).
    whole = bidirectional_attention_triton(q, k, v, batch, 0.1, kv_batch, splits=1)
    for i, (s, n) in enumerate(zip(batch.starts, batch.lens)):
        rows = slice(s, s + n)
        if kv_batch is None:
            one = bidirectional_attention_triton(q[rows], k[rows], v[rows],
                                                 SequenceBatch.from_lengths([n]), 0.1, splits=1)
        else:
            kn = kv_batch.lens[i]
            kv_rows = slice(kv_batch.starts[i], kv_batch.starts[i] + kn)
            one = bidirectional_attention_triton(
                q[rows], k[kv_rows], v[kv_rows], SequenceBatch.from_lengths([n]), 0.1,
                SequenceBatch.from_lengths([kn]), splits=1)
        assert torch.equal(one, whole[rows])


def _naive_attention(q, k, v, batch, scale, kv_batch):
    """softmax(q k^T * scale) v per sequence, written out (float64)."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q, dtype=torch.float64)
    for s, n, ks, kn in zip(batch.starts, batch.lens, kv_batch.starts, kv_batch.lens):
        qi = q[s : s + n].double()
        ki = k[ks : ks + kn].double().repeat_interleave(group, dim=1)
        vi = v[ks : ks + kn].double().repeat_interleave(group, dim=1)
        p = torch.einsum("qhd,khd->hqk", qi, ki).mul(scale).softmax(-1)
        out[s : s + n] = torch.einsum("hqk,khd->qhd", p, vi)
    return out


@pytest.mark.parametrize("name", ["kv-3seq-gqa4-fp16-d64", "kv-zero-queries-gqa2-fp32-d64"])
def test_reference_with_kv_batch(name):
    case = next(c for c in SMALL if c["name"] == name)
    q, k, v = (t.double() for t in _inputs(case, "cpu"))
    batch, kv_batch = _batches(case)
    ref = bidirectional_attention_reference(q, k, v, batch, 0.2, kv_batch)
    torch.testing.assert_close(ref, _naive_attention(q, k, v, batch, 0.2, kv_batch))
    # kv_batch=None means kv_batch=batch, bit for bit.
    q, k, v = _inputs(SMALL[2], "cpu")
    batch = SequenceBatch.from_lengths(SMALL[2]["lens"])
    assert torch.equal(bidirectional_attention_reference(q, k, v, batch, 0.2),
                       bidirectional_attention_reference(q, k, v, batch, 0.2, batch))


def test_kv_batch_validation():
    q = torch.randn(6, 2, 16)
    kv = torch.randn(10, 2, 16)
    batch = SequenceBatch.from_lengths([3, 3])
    with pytest.raises(ValueError, match="sequences"):
        bidirectional_attention_reference(q, kv, kv, batch, 1.0, SequenceBatch.from_lengths([10]))
    with pytest.raises(ValueError, match="no keys"):
        bidirectional_attention_reference(q, kv, kv, batch, 1.0,
                                          SequenceBatch.from_lengths([10, 0]))
    # No queries needs no keys.
    ok = SequenceBatch.from_lengths([6, 0])
    bidirectional_attention_reference(q, kv, kv, ok, 1.0, SequenceBatch.from_lengths([10, 0]))


@pytest.mark.parametrize("name", ["many-gqa4-fp32-d64", "kv-3seq-gqa4-fp16-d64"])
def test_dispatch(name):
    from vllm_omni.kernels import bidirectional_attention

    device = "cuda" if ON_CUDA else "cpu"
    case = next(c for c in SMALL if c["name"] == name)
    q, k, v = _inputs(case, device)
    batch, kv_batch = _batches(case)
    got = bidirectional_attention(q, k, v, batch, 0.125, kv_batch)
    if ON_CUDA:
        from vllm_omni.kernels.triton_attention import bidirectional_attention_triton

        want = bidirectional_attention_triton(q, k, v, batch, 0.125, kv_batch)
    else:
        want = bidirectional_attention_reference(q, k, v, batch, 0.125, kv_batch)
    assert torch.equal(got, want)


def _kernel_validation(device):
    """Messages of the errors the kernel raises on bad kv layouts (in order)."""
    from vllm_omni.kernels.triton_attention import bidirectional_attention_triton

    q = torch.randn(6, 2, 16, device=device)
    kv = torch.randn(10, 2, 16, device=device)
    batch = SequenceBatch.from_lengths([3, 3])
    bad = [SequenceBatch.from_lengths([10]),  # wrong number of sequences
           SequenceBatch.from_lengths([10, 0]),  # queries without keys
           SequenceBatch((0, 5), (5, 6)),  # rows past the end of k/v
           None]  # no kv_batch: k/v must have q's rows
    msgs = []
    for kv_batch in bad:
        try:
            bidirectional_attention_triton(q, kv, kv, batch, 1.0, kv_batch)
            msgs.append(None)
        except (ValueError, AssertionError) as e:
            msgs.append(str(e))
    return msgs


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
def test_kernel_validation_cuda():
    _check_validation(_kernel_validation("cuda"))


@pytest.mark.skipif(ON_CUDA, reason="checked natively")
def test_kernel_validation_interpreted(request):
    _check_validation(request.getfixturevalue("interpreted")["kv-validation"])


def _check_validation(msgs):
    assert len(msgs) == 4 and None not in msgs, msgs
    assert "sequences" in msgs[0] and "no keys" in msgs[1]
    assert "k/v rows" in msgs[2] and "q's rows" in msgs[3]


@pytest.mark.parametrize("token_major", [False, True])
def test_write_pages_then_gather_round_trip(token_major):
    """Rows written at a request's slots come back, in position order, through
    its block table; other pages stay untouched."""
    page, kh, d, length = 16, 2, 8, 37
    shape = (6, page, kh, 2 * d) if token_major else (6, kh, page, 2 * d)
    cache = torch.full(shape, float("nan"))
    if token_major:
        cache = cache.transpose(1, 2)
    pages = [4, 1, 3]  # positions 0-15, 16-31, 32-36
    k, v = torch.randn(length, kh, d), torch.randn(length, kh, d)
    write_pages(cache, page_rows_of(slots_of(pages, page, length), page), k, v)
    table = torch.tensor([pages], dtype=torch.int32)
    gk, gv = PagedPrefix(cache, table, (length,)).gather(0)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    assert cache[[0, 2, 5]].isnan().all()
    assert cache[3, :, length - 32 :].isnan().all()  # the last page's unused rows


def test_reference_paged_prefix_equals_contiguous_keys():
    """A paged prefix gives what the same keys placed before the local keys do."""
    case = next(c for c in SMALL if c["name"] == "paged-3seq-fp32-d64")
    q, k, v = (t.double() for t in _inputs(case, "cpu"))
    batch, kv_batch = _batches(case)
    prefix = _prefix(case, "cpu")
    prefix = PagedPrefix(prefix.kv_cache.double(), prefix.block_table, prefix.lens)
    keys, values, lens = [], [], []
    for i, (s, n) in enumerate(zip(kv_batch.starts, kv_batch.lens)):
        pk, pv = prefix.gather(i)
        keys += [pk, k[s : s + n]]
        values += [pv, v[s : s + n]]
        lens.append(prefix.lens[i] + n)
    joined = SequenceBatch.from_lengths(lens)
    want = _naive_attention(q, torch.cat(keys), torch.cat(values), batch, 0.3, joined)
    got = bidirectional_attention_reference(q, k, v, batch, 0.3, kv_batch, prefix)
    torch.testing.assert_close(got, want)


# (case, key splits) of the prebuilt-tiles checks: unsplit, then split
# (GQA-packed and not).
PREBUILT = {"prebuilt-tiles": ("paged-3seq-fp32-d64", 1),
            "prebuilt-tiles-split": ("split-gqa3-unpacked-fp32-d128", 8),
            "prebuilt-tiles-split-packed": ("split-both-gqa2-bf16-d128", 2)}


def _prebuilt_tiles(device, name):
    """A CUDA graph's launch: tile rows built ahead (``tile_rows``) plus
    no-query padding rows, through ``paged_attention_with_tiles`` with the
    given key splits; returns the largest difference from the ordinary launch
    with the same splits on the real rows."""
    from vllm_omni.kernels.triton_attention import (
        bidirectional_attention_triton, block_m_of, paged_attention_with_tiles)
    from vllm_omni.kernels.reference import tile_rows

    case_name, splits = PREBUILT[name]
    case = next(c for c in SMALL if c["name"] == case_name)
    q, k, v = _inputs(case, device)
    batch, kv_batch = _batches(case)
    prefix = _prefix(case, device)
    want = bidirectional_attention_triton(q, k, v, batch, 0.125, kv_batch, prefix=prefix,
                                          splits=splits)
    group = q.shape[1] // k.shape[1]
    rows = tile_rows(batch, kv_batch, prefix.lens, block_m_of(q.shape[2], q.dtype, group=group))
    tiles = torch.tensor(rows + [(0,) * 7] * 3, dtype=torch.int32, device=device)
    got = paged_attention_with_tiles(q, k, v, tiles, 0.125, prefix.kv_cache, prefix.block_table,
                                     splits=splits)
    real = torch.cat([torch.arange(s, s + n) for s, n in zip(batch.starts, batch.lens)])
    return (got[real] - want[real]).abs().max().item()


def test_tiles_reference_matches_reference_with_padding():
    """The plain reference of the prebuilt-tiles launch (what the CUDA graphs'
    forward runs off the GPU) gives the ordinary reference's rows, padding
    rows and small tiles included."""
    from vllm_omni.kernels.reference import attention_with_tiles_reference, tile_rows

    case = next(c for c in SMALL if c["name"] == "paged-3seq-fp32-d64")
    q, k, v = _inputs(case, "cpu")
    batch, kv_batch = _batches(case)
    prefix = _prefix(case, "cpu")
    want = bidirectional_attention_reference(q, k, v, batch, 0.125, kv_batch, prefix)
    rows = tile_rows(batch, kv_batch, prefix.lens, 16)
    tiles = torch.tensor(rows + [(0,) * 7] * 3, dtype=torch.int32)
    got = attention_with_tiles_reference(q, k, v, tiles, 0.125, prefix.kv_cache,
                                         prefix.block_table)
    for start, n in zip(batch.starts, batch.lens):
        torch.testing.assert_close(got[start : start + n], want[start : start + n])


def test_graph_shape_carries_key_splits():
    """A CUDA graph decides its key splits from its padded tile count and the
    plan's most keys (of sequences with queries), and its static inputs hand
    them to the kernel; the eager plan takes them as given."""
    from vllm_omni.diffusion.cuda_graphs import GraphShape, StaticInputs
    from vllm_omni.models.attention_plan import AttentionPlan, SequencePlan

    pages = list(range(1, 41))  # 640 positions of 16
    seqs = [SequencePlan(640, 600, 632, pages=pages, write=(600, 632)),  # 600 paged + 32 keys
            SequencePlan(640, 100, 110, pages=pages),  # 110 keys
            SequencePlan(640, 640, 640, pages=pages)]  # no queries, 640 keys
    plan = AttentionPlan(seqs, 16, torch.device("cpu"))
    assert plan.max_keys == 632
    calls = []
    shape = GraphShape.of(plan, 16, splits=lambda *a: calls.append(a) or 4)
    assert calls == [(4, 632, False)] and shape.splits == 4  # 3 tiles, padded to 4
    assert GraphShape.of(plan, 16).splits == 1
    inputs = StaticInputs(8, 2, 64, 0, 16, torch.device("cpu"))
    assert inputs.tensors(shape, None).splits == 4
    assert plan.tensors(16, 2).splits == 2 and plan.tensors(16).splits == 1


@pytest.mark.skipif(not ON_CUDA, reason="checked interpreted otherwise")
@pytest.mark.parametrize("name", PREBUILT)
def test_prebuilt_tiles_with_padding_match_cuda(name):
    assert _prebuilt_tiles("cuda", name) == 0.0


@pytest.mark.skipif(ON_CUDA, reason="checked natively")
@pytest.mark.parametrize("name", PREBUILT)
def test_prebuilt_tiles_with_padding_match_interpreted(request, name):
    assert request.getfixturevalue("interpreted")[name] == 0.0


def test_split_count():
    """Few programs split, more the more keys allow; many programs or short
    keys keep the unsplit kernel."""
    from vllm_omni.kernels.triton_split import split_count

    assert split_count(1, 32, 3584, sms=132) == 8  # LLaDA-8B, batch 1: 256 programs
    assert split_count(1, 32, 3584, sms=114) == 4
    assert split_count(2, 32, 3584, sms=132) == 4
    assert split_count(1, 32, 600, sms=132) == 2  # the keys bound it
    assert split_count(1, 32, 511, sms=132) == 1
    assert split_count(1, 8, 100_000, sms=132) == 16  # at most MAX_SPLITS
    assert split_count(9, 32, 100_000, sms=132) == 1  # 288 programs: enough
    assert split_count(0, 32, 0, sms=132) == 1


@pytest.mark.skipif(not ON_CUDA, reason="checked interpreted otherwise")
def test_merge_matches_reference_cuda():
    err, untouched = _merge("cuda")
    assert err < 1e-5 and untouched


@pytest.mark.skipif(ON_CUDA, reason="checked natively")
def test_merge_matches_reference_interpreted(request):
    err, untouched = request.getfixturevalue("interpreted")["merge"]
    assert err < 1e-5 and untouched


def _merge(device):
    """The merge kernel on random partials (split 2 of every row empty: m =
    -inf, l = 0), two sequences' tiles into a NaN-poisoned output; returns
    (largest relative difference from ``merge_splits_reference`` on the
    tiles' rows, whether every other row is still NaN)."""
    from vllm_omni.kernels.reference import merge_splits_reference
    from vllm_omni.kernels.triton_split import merge_splits, partials

    gen = torch.Generator().manual_seed(5)
    splits, heads, block_m, d = 3, 2, 16, 32
    tiles = torch.tensor([(1, 20, 0), (1, 20, 16), (30, 3, 0)], dtype=torch.int32)
    ml, acc = partials(splits, len(tiles), heads, block_m, d, torch.device("cpu"))
    ml[0] = torch.randn(ml[0].shape, generator=gen) * 4
    ml[1] = torch.rand(ml[1].shape, generator=gen) * 30 + 1
    acc.copy_(torch.randn(acc.shape, generator=gen) * 30)
    ml[0, 2], ml[1, 2], acc[2] = float("-inf"), 0.0, 0.0
    want = merge_splits_reference(ml[0], ml[1], acc)  # [tiles, heads, block_m, d]
    out = torch.full((40, heads, d), float("nan"), device=device)
    merge_splits(out, tiles.to(device), ml.to(device), acc.to(device), 1, False, 3)
    out = out.cpu()
    written = torch.zeros(40, dtype=torch.bool)
    err = 0.0
    for t, (start, n, off) in enumerate(tiles.tolist()):
        rows = min(block_m, n - off)
        got = out[start + off : start + off + rows].transpose(0, 1)  # [heads, rows, d]
        err = max(err, ((got - want[t, :, :rows]).abs().max() / want.abs().max()).item())
        written[start + off : start + off + rows] = True
    return err, bool(out[~written].isnan().all())



# RoPE fused with the key arena's write (``kernels/triton_rope.py``), against
# its reference and against what it replaces: vLLM's RoPE then two index
# copies. q, k, v are views of one qkv tensor as in the model; the arena's
# rows are NaN but those the tokens write; ``pad`` padding tokens (a CUDA
# graph's: position 0, the arena's spare row) follow the real ones.
def _rope_case(name, tokens, heads, kv_heads, head_dim, rotary_dim, dtype, pad=0):
    return dict(name=name, tokens=tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                rotary_dim=rotary_dim, dtype=dtype, pad=pad)


ROPE_SMALL = [
    _rope_case("rope-mha-fp32-d128", 7, 4, 4, 128, 128, "fp32"),
    _rope_case("rope-gqa4-bf16-d64", 5, 8, 2, 64, 64, "bf16"),
    # LLaDA2: RoPE over half of each head.
    _rope_case("rope-partial-gqa2-fp32-d128", 6, 4, 2, 128, 64, "fp32"),
    _rope_case("rope-partial-bf16-d64", 4, 2, 2, 64, 32, "bf16"),
    # 20 query heads: two head blocks of 16, the second mostly masked.
    _rope_case("rope-padded-gqa5-fp32-d128", 5, 20, 4, 128, 128, "fp32", pad=3),
    _rope_case("rope-padded-partial-bf16-d128", 3, 4, 4, 128, 64, "bf16", pad=2),
    _rope_case("rope-padded-partial-gqa2-fp32-d64", 3, 4, 2, 64, 32, "fp32", pad=1),
    _rope_case("rope-d16-fp32", 3, 2, 1, 16, 16, "fp32"),
]
ROPE_LARGE = [  # LLaDA-8B's heads (a block step, padded as a graph pads); partial RoPE, GQA
    _rope_case("gpu-rope-llada-bf16-d128", 32, 32, 32, 128, 128, "bf16", pad=32),
    _rope_case("gpu-rope-llada-fp32-d128", 32, 32, 32, 128, 128, "fp32", pad=32),
    _rope_case("gpu-rope-llada2-bf16-d128", 200, 16, 4, 128, 64, "bf16", pad=56),
    _rope_case("gpu-rope-llada2-fp32-d128", 200, 16, 4, 128, 64, "fp32"),
]
ROPE_CASES = ROPE_SMALL + (ROPE_LARGE if ON_CUDA else [])
ROPE_MAX_POSITION = 4096


def _rotary_embedding(head_dim, rotary_dim, dtype, base=10000.0):
    """vLLM's RoPE as ``DenoiseAttention`` builds it (``get_rope``: neox,
    cache in the model dtype)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    with set_current_vllm_config(VllmConfig()):
        return RotaryEmbedding(head_dim, rotary_dim, ROPE_MAX_POSITION, base, True, dtype)


def _rope_inputs(case, device):
    """(qkv [tokens + pad, (heads + 2 kv_heads) * head_dim], positions, arena
    rows, arena k, arena v); the arenas' last row is the spare row."""
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    t, pad, kh, d = case["tokens"], case["pad"], case["kv_heads"], case["head_dim"]
    dtype = DTYPES[case["dtype"]]
    width = (case["heads"] + 2 * kh) * d
    qkv = (torch.randn(t + pad, width, generator=gen) * 2).to(device, dtype)
    arena_rows = 3 * t + 5
    rows = torch.cat([torch.randperm(arena_rows, generator=gen)[:t],
                      torch.full((pad,), arena_rows)]).to(device)
    positions = torch.cat([torch.randint(1, ROPE_MAX_POSITION, (t,), generator=gen),
                           torch.zeros(pad, dtype=torch.long)]).to(device)
    arena = torch.full((arena_rows + 1, kh, d), float("nan"), dtype=dtype, device=device)
    return qkv, positions, rows, arena, arena.clone()


def _split_qkv(qkv, case):
    """q, k, v [tokens, heads, head_dim]: strided views of ``qkv``."""
    h, kh, d = case["heads"], case["kv_heads"], case["head_dim"]
    q, k, v = qkv.split([h * d, kh * d, kh * d], dim=-1)
    return q.view(-1, h, d), k.view(-1, kh, d), v.view(-1, kh, d)


def _max_diff(a, b) -> float:
    """Largest |a - b|; inf where only one of them is NaN."""
    a, b = a.double(), b.double()
    if not torch.equal(a.isnan(), b.isnan()):
        return float("inf")
    return (a - b).nan_to_num(0.0).abs().max().item()


def run_rope_case(case, device):
    """The kernel's qkv and arena against the reference's and vLLM's: largest
    differences (the spare row aside: padding tokens race for it) and the
    largest value compared, per path."""
    from vllm_omni.kernels.reference import rope_store_reference
    from vllm_omni.kernels.triton_rope import rope_store_triton

    h, kh, d = case["heads"], case["kv_heads"], case["head_dim"]
    dtype = DTYPES[case["dtype"]]
    rotary = _rotary_embedding(d, case["rotary_dim"], dtype).to(device)
    qkv0, positions, rows, ak0, av0 = _rope_inputs(case, device)

    def fused(fn):
        qkv, ak, av = qkv0.clone(), ak0.clone(), av0.clone()
        fn(positions, *_split_qkv(qkv, case), rotary.cos_sin_cache, rows, ak, av)
        return qkv, ak, av

    def vllm(method):  # vLLM's RoPE on the model's 2-D q and k, then the index copies
        qkv, ak, av = qkv0.clone(), ak0.clone(), av0.clone()
        q, k = qkv[:, : h * d], qkv[:, h * d : (h + kh) * d]
        q2, k2 = method(positions, q, k)
        q.copy_(q2)
        k.copy_(k2)
        _, k3, v3 = _split_qkv(qkv, case)
        ak.index_copy_(0, rows, k3)
        av.index_copy_(0, rows, v3)
        return qkv, ak, av

    got = fused(rope_store_triton)
    others = {"reference": fused(rope_store_reference), "native": vllm(rotary.forward_native)}
    if device == "cuda":  # vLLM's CUDA kernel, what the engine ran before
        others["cuda"] = vllm(rotary.forward_cuda)
    spare = len(ak0) - 1
    res = {"spare_written": bool(case["pad"] == 0 or got[1][spare].isfinite().all())}
    for name, want in others.items():
        res[name] = [(_max_diff(g[:spare] if i else g, w[:spare] if i else w),
                      w[:spare].nan_to_num(0.0).abs().max().item() if i else w.abs().max().item())
                     for i, (g, w) in enumerate(zip(got, want))]
    # Every value the kernel writes moved (RoPE rotated q and k, the arena was NaN).
    res["qkv_changed"] = not torch.equal(got[0], qkv0)
    return res


# Largest difference allowed, in units of the largest value compared: exact
# where the arithmetic is the same (the interpreter has no FMA), else what
# roundings allow (FMA on the GPU: ~1 fp32 ulp; bf16: an ulp of the result;
# forward_native's bf16 products rounded first: two).
def _rope_tolerance(other, dtype, device):
    if device == "cpu":
        return 0.0 if other == "reference" or dtype == "fp32" else 2**-6
    if dtype == "fp32":
        return 0.0 if other == "cuda" else 2**-21
    return 2**-7 if other == "reference" else 2**-6


def _check_rope(case, res, device, others=("reference", "native")):
    assert res["spare_written"], "padding rows left the spare row unwritten"
    assert res["qkv_changed"], "q and k unrotated"
    for other in others:
        tol = _rope_tolerance(other, case["dtype"], device)
        for part, (diff, scale) in zip(("qkv", "arena k", "arena v"), res[other]):
            assert diff <= tol * scale, (other, part, diff, scale)


@pytest.mark.parametrize("case", ROPE_CASES, ids=[c["name"] for c in ROPE_CASES])
def test_rope_store_matches_reference_and_vllm(case, request):
    if ON_CUDA:
        res = run_rope_case(case, "cuda")
    else:
        res = request.getfixturevalue("interpreted")[case["name"]]
        assert "error" not in res, res.get("error")
    _check_rope(case, res, "cuda" if ON_CUDA else "cpu")


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA (vLLM's kernel)")
@pytest.mark.parametrize("case", ROPE_CASES, ids=[c["name"] for c in ROPE_CASES])
def test_rope_store_matches_vllms_cuda_kernel(case):
    """What the engine ran before: float32 bit for bit (the golden runs stay
    token-exact), bf16 within roundings."""
    _check_rope(case, run_rope_case(case, "cuda"), "cuda", others=("cuda",))


def test_rope_store_dispatch():
    """Off CUDA ``kernels.rope_store`` is the reference, bit for bit."""
    from vllm_omni.kernels import rope_store
    from vllm_omni.kernels.reference import rope_store_reference

    case = ROPE_SMALL[4]
    rotary = _rotary_embedding(case["head_dim"], case["rotary_dim"], torch.float32)
    outs = []
    for fn in (rope_store, rope_store_reference):
        qkv, positions, rows, ak, av = _rope_inputs(case, "cpu")
        fn(positions, *_split_qkv(qkv, case), rotary.cos_sin_cache, rows, ak, av)
        outs.append((qkv, ak[:-1], av[:-1]))
    for a, b in zip(*outs):
        assert _max_diff(a, b) == 0.0


def _plan_forward(device, fused: bool):
    """One layer's attention through an arena plan (a dual-cache refresh
    writing its prefix to the pages, and another request's block step over
    its pages and arena rows), RoPE fused into the plan or vLLM's first.
    Returns (output, kv cache, arena k, arena v)."""
    from vllm_omni.models.attention_plan import AttentionPlan, KeyArena, SequencePlan

    h, kh, d, page = 4, 2, 64, 16
    gen = torch.Generator().manual_seed(11)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    arena = KeyArena(2, 128, kh, d, torch.float32, device)
    arena.k.copy_(rand(*arena.k.shape))
    arena.v.copy_(rand(*arena.v.shape))
    kv_cache = rand(8, kh, page, 2 * d)
    seqs = [SequencePlan(48, 0, 48, pages=[1, 2, 3], write=(0, 16), keys_end=48),
            SequencePlan(40, 16, 24, pages=[4, 5, 6], keys_end=40, arena_start=64,
                         keys_start=16)]
    plan = AttentionPlan(seqs, page, torch.device(device), arena=arena)
    positions = torch.cat([torch.arange(48), torch.arange(16, 24)]).to(device)
    qkv = rand(56, (h + 2 * kh) * d)
    q, k, v = qkv.split([h * d, kh * d, kh * d], dim=-1)
    rotary = _rotary_embedding(d, d // 2, torch.float32).to(device)
    assert plan.fuses_rope(q) == (device == "cuda")
    rope = None
    if fused:
        rope = (rotary, positions)
    else:
        q, k = rotary.forward_native(positions, q, k)
    out = plan.attend(1, q.view(-1, h, d), k.view(-1, kh, d), v.view(-1, kh, d), 0.125,
                      kv_cache, rope)
    return out, kv_cache, arena.k, arena.v


def test_plan_with_fused_rope_equals_rope_then_plan():
    """The plan's fused path (the reference off CUDA, the kernel on it) gives
    what vLLM's RoPE before the plan gives: output, page writes (rotated
    keys) and arena, padding of the query rows aside (none here)."""
    device = "cuda" if ON_CUDA else "cpu"
    got, want = _plan_forward(device, True), _plan_forward(device, False)
    tol = 0.0 if device == "cpu" else 1e-5
    for name, a, b in zip(("out", "kv cache", "arena k", "arena v"), got, want):
        assert _max_diff(a, b) <= tol, name
    # The plan without an arena never fuses.
    from vllm_omni.models.attention_plan import AttentionPlan, SequencePlan

    plain = AttentionPlan([SequencePlan(8, 0, 8)], 16, torch.device(device))
    assert not plain.fuses_rope(torch.zeros(1, device=device))


def _patch_interpreter_bf16():
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_dot
    original_trunc = interp.InterpreterBuilder.create_fp_trunc

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = (h.data.astype(np.uint32) << 16).view(np.float32)
        return interp.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widen(a), widen(b), d, *args, **kwargs)

    def create_fp_trunc(self, src, dst_type):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return original_trunc(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
        return interp.TensorHandle(bits.astype(np.uint16), tl.bfloat16)

    interp.InterpreterBuilder.create_dot = create_dot
    interp.InterpreterBuilder.create_fp_trunc = create_fp_trunc


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _patch_interpreter_bf16()
    results = {}
    for c in SMALL:
        try:
            results[c["name"]] = run_case(c, "cpu")
        except Exception as e:  # reported per case by the parent
            results[c["name"]] = {"error": f"{type(e).__name__}: {e}"}
    results["kv-validation"] = _kernel_validation("cpu")
    for name in PREBUILT:
        results[name] = _prebuilt_tiles("cpu", name)
    results["merge"] = _merge("cpu")
    for c in ROPE_SMALL:
        try:
            results[c["name"]] = run_rope_case(c, "cpu")
        except Exception as e:  # reported per case by the parent
            results[c["name"]] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))
