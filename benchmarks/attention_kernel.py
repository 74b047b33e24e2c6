"""Time the Triton bidirectional attention kernel against PyTorch and FlashAttention.

GPU only. For each batch size, sequences cycle through ``--lens`` (default
128, 256) and q/k/v are views of one packed qkv tensor, as in the model.
Compared (median of ``triton.testing.do_bench``):

  triton        bidirectional_attention_triton: one launch for all sequences
  sdpa-loop     F.scaled_dot_product_attention per sequence (Python loop)
  sdpa-padded   one SDPA call on [B, H, Lmax, D] with a key-padding mask
                (tensors padded beforehand; padding/unpadding not timed)
  fa-varlen     vLLM's flash_attn_varlen_func (causal=False), if importable

TFLOP/s counts the real work only: 4 * sum(Lq * Lk) * H * D.

``--cached`` times the dual-cache decoding shape instead: each sequence has a
query block of ``--block`` tokens (default 32; q a view of the block's packed
qkv) attending to ``--kv-lens`` keys (default 384: the whole canvas, cached
prefix/suffix plus the block's fresh keys, already concatenated into
contiguous k and v), i.e. bidirectional_attention_triton with a kv_batch;
sdpa-padded pads keys only, fa-varlen gets separate cu_seqlens_q/k.

``--prefix-lens`` (with ``--cached``) also gives every sequence that many
keys in a paged KV cache (vLLM's layout, 16-row pages in shuffled order), read
by the kernel first (its paged prefix), one table row per prefix length: the
block steps of the KV-cached modes. The other methods get each sequence's
prefix and local keys gathered into contiguous k and v beforehand (not timed).

``--splits`` lists the kernel's key splits per tile to time, one triton column
each: ``auto`` (the kernel's choice, ``splits_of``; the chosen count is
printed) or a count (1: the unsplit kernel). A split launch is two kernels
and a few host calls: ``--graph`` times replays of a CUDA graph of the calls
instead (``do_bench_cudagraph``: no host launch cost, as in the engine's
graphs, but no L2 flush between calls either), so that host time does not
hide the kernels' time.

``--sweep`` times the kernel at each (BLOCK_M, BLOCK_N, num_warps, num_stages)
of ``SWEEP`` instead of the built-in choice (the table behind ``_config`` and
``LONG_CONFIGS``), next to fa-varlen.

    python benchmarks/attention_kernel.py --batches 1,8,32,64 --lens 128,256
    python benchmarks/attention_kernel.py --cached --block 32 --kv-lens 384
    # Issue 16: LLaDA-8B's batch-1 block step, split keys against unsplit
    python benchmarks/attention_kernel.py --cached --batches 1 --block 32 --kv-lens 32 \
        --prefix-lens 128,1024,3072 --splits auto,1,2,4,8,16 [--graph]
    # Qwen-Image's joint attention at 1024x1024 (4096 image + 128 text tokens),
    # cond + uncond per request: 2 and 8 sequences
    python benchmarks/attention_kernel.py --heads 24 --lens 4224 --batches 2,8 --sweep
"""

import argparse
import functools
import itertools

import torch
import torch.nn.functional as F
import triton

from vllm_omni.kernels.paged_kv import PagedPrefix
from vllm_omni.kernels.reference import (
    SequenceBatch, bidirectional_attention_reference, long_tiles)
from vllm_omni.kernels.triton_attention import (
    bidirectional_attention_triton, block_m_of, splits_of)
from vllm_omni.kernels.triton_split import max_keys

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SWEEP = [(64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
         (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (256, 64, 8, 3)]


def make_inputs(lens, heads, kv_heads, head_dim, dtype, kv_lens=None, device="cuda"):
    """q, k, v as views of one packed qkv tensor; with kv_lens, k and v are
    instead contiguous [sum(kv_lens), kv_heads, head_dim] tensors (the cached
    keys concatenated with the block's own, as the dual-cache caller does)."""
    tokens = sum(lens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim),
               v.view(tokens, kv_heads, head_dim))
    if kv_lens is not None:
        kv_tokens = sum(kv_lens)
        k, v = (torch.randn(kv_tokens, kv_heads, head_dim, device=device, dtype=dtype)
                for _ in range(2))
    return q, k, v


def make_prefix(num_seqs, prefix_len, kv_heads, head_dim, dtype, page_size=16, device="cuda"):
    """Every sequence's first ``prefix_len`` keys in a paged KV cache (vLLM's
    logical layout over a page-major buffer, as on the GPU), pages shuffled."""
    per_seq = -(-prefix_len // page_size)
    pages = torch.randperm(num_seqs * per_seq + 1, device=device)[: num_seqs * per_seq]
    cache = torch.randn(num_seqs * per_seq + 1, page_size, kv_heads, 2 * head_dim,
                        device=device, dtype=dtype).transpose(1, 2)
    table = pages.view(num_seqs, per_seq).to(torch.int32).contiguous()
    return PagedPrefix(cache, table, (prefix_len,) * num_seqs)


def gathered(k, v, kv_batch, prefix):
    """(k, v, key counts): each sequence's prefix keys then its local ones, contiguous."""
    ks, vs, lens = [], [], []
    for i, (s, n) in enumerate(zip(kv_batch.starts, kv_batch.lens)):
        pk, pv = prefix.gather(i)
        ks += [pk, k[s : s + n]]
        vs += [pv, v[s : s + n]]
        lens.append(prefix.lens[i] + n)
    return torch.cat(ks), torch.cat(vs), lens


def check_correctness(args, dtype):
    if args.cached:
        lens, kv_lens = [1, 7, 32, 0, 33], [5, 100, 384, 17, 400]
    else:
        lens, kv_lens = [1, 7, 127, 128, 129, 300, 513], None
    cases = [(lens, kv_lens, None, None)]
    prefix_len = max(args.prefix_lens)
    if args.cached and prefix_len:  # the timed shape at its longest prefix
        cases += [([args.block], [args.kv_lens[0]], prefix_len, s) for s in args.splits]
    for lens, kv_lens, prefix_len, splits in cases:
        q, k, v = make_inputs(lens, args.heads, args.kv_heads, args.head_dim, dtype, kv_lens)
        batch, scale = SequenceBatch.from_lengths(lens), args.head_dim**-0.5
        kv_batch = SequenceBatch.from_lengths(kv_lens) if kv_lens else None
        prefix = prefix_len and make_prefix(len(lens), prefix_len, args.kv_heads,
                                            args.head_dim, dtype, device=q.device)
        out = bidirectional_attention_triton(q, k, v, batch, scale, kv_batch, prefix=prefix,
                                             splits=None if splits == "auto" else splits)
        ref_prefix = prefix and PagedPrefix(prefix.kv_cache.float(), prefix.block_table,
                                            prefix.lens)
        ref = bidirectional_attention_reference(q.float(), k.float(), v.float(), batch, scale,
                                                kv_batch, ref_prefix)
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        print(f"correctness: lens={lens} kv_lens={kv_lens} prefix={prefix_len} splits={splits}"
              f" max rel err {err:.2e} (tol {tol:g})")
        if not err < tol:
            raise SystemExit("triton kernel disagrees with the reference")


def load_fa_varlen():
    """vLLM's varlen FlashAttention at the version its FlashAttention backend
    picks for this GPU (FA3 on Hopper: the GPU bundle ships no FA2)."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        version = get_flash_attn_version()
    except Exception as e:  # vLLM or its FA build missing
        print(f"fa-varlen skipped: {type(e).__name__}: {e}")
        return None
    print(f"fa-varlen: FlashAttention {version}")
    return functools.partial(flash_attn_varlen_func, fa_version=version)


def triton_name(splits) -> str:
    return "triton" if splits == "auto" else f"triton-s{splits}"


def methods(lens, q, k, v, scale, fa_varlen, kv_lens=None, sweep=False, prefix=None,
            splits=("auto",)):
    """Callables computing the same attention; kv_lens: keys laid out apart
    (packed by kv_lens) from the queries (packed by lens); prefix: paged keys
    before them (the other methods get both gathered). sweep: one triton
    entry per SWEEP config, and no SDPA. splits: the triton entries' key splits."""
    batch = SequenceBatch.from_lengths(lens)
    kv_batch = SequenceBatch.from_lengths(kv_lens) if kv_lens is not None else None
    kv_lens = list(lens) if kv_lens is None else list(kv_lens)
    gqa = q.shape[1] != k.shape[1]
    fns = {triton_name(s): functools.partial(
        bidirectional_attention_triton, q, k, v, batch, scale, kv_batch, prefix=prefix,
        splits=None if s == "auto" else s) for s in splits}
    if sweep:
        fns = {"x".join(map(str, c)): functools.partial(
            bidirectional_attention_triton, q, k, v, batch, scale, kv_batch, config=c,
            prefix=prefix) for c in SWEEP}
    if prefix is not None:  # the rest read contiguous keys
        k, v, kv_lens = gathered(k, v, kv_batch, prefix)

    rows = [slice(s, s + n) for s, n in zip(batch.starts, batch.lens)]
    kv_rows = [slice(s, s + n) for s, n in zip(SequenceBatch.from_lengths(kv_lens).starts,
                                               kv_lens)]

    def sdpa_loop():
        out = torch.empty_like(q)
        for r, kr in zip(rows, kv_rows):
            out[r] = F.scaled_dot_product_attention(
                q[r].transpose(0, 1), k[kr].transpose(0, 1), v[kr].transpose(0, 1),
                scale=scale, enable_gqa=gqa).transpose(0, 1)
        return out

    if not sweep:
        fns["sdpa-loop"] = sdpa_loop

    lmax, kv_lmax, b = max(lens), max(kv_lens), len(lens)
    pad = [torch.zeros(b, t.shape[1], n, t.shape[2], device=t.device, dtype=t.dtype)
           for t, n in ((q, lmax), (k, kv_lmax), (v, kv_lmax))]
    for i, (r, kr) in enumerate(zip(rows, kv_rows)):
        for p, t, rr in zip(pad, (q, k, v), (r, kr, kr)):
            p[i, :, : rr.stop - rr.start] = t[rr].transpose(0, 1)
    keep = (torch.arange(kv_lmax, device=q.device)[None, :]
            < torch.tensor(kv_lens, device=q.device)[:, None])
    mask = keep[:, None, None, :] if min(kv_lens) < kv_lmax else None
    if not sweep:
        fns["sdpa-padded"] = lambda: F.scaled_dot_product_attention(
            *pad, attn_mask=mask, scale=scale, enable_gqa=gqa)

    if fa_varlen is not None:
        def cu_seqlens(ns):
            return torch.tensor([0, *torch.tensor(ns).cumsum(0).tolist()], device=q.device,
                                dtype=torch.int32)

        cu_q, cu_k = cu_seqlens(lens), cu_seqlens(kv_lens)
        fns["fa-varlen"] = lambda: fa_varlen(
            q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=lmax,
            max_seqlen_k=kv_lmax, softmax_scale=scale, causal=False)
    return fns


def auto_splits(lens, kv_lens, prefix, q, k) -> int:
    """The key splits the kernel picks for this launch on its own."""
    batch = SequenceBatch.from_lengths(lens)
    kv_batch = SequenceBatch.from_lengths(kv_lens) if kv_lens is not None else None
    long = prefix is None and kv_batch is None and long_tiles(sum(lens), len(lens))
    block_m = block_m_of(q.shape[2], q.dtype, long, q.shape[1] // k.shape[1])
    tiles = sum(-(-n // block_m) for n in lens)
    return splits_of(tiles, q.shape[1], k.shape[1],
                     max_keys(batch, kv_batch, prefix.lens if prefix else None), q.device, long)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32,64", help="numbers of sequences")
    ap.add_argument("--lens", default="128,256", help="sequence lengths, cycled over the batch")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    ap.add_argument("--cached", action="store_true",
                    help="dual-cache shape: --block queries per sequence over --kv-lens keys")
    ap.add_argument("--block", type=int, default=32, help="--cached: queries per sequence")
    ap.add_argument("--kv-lens", default="384",
                    help="--cached: key counts (whole canvas), cycled over the batch")
    ap.add_argument("--prefix-lens", default="0",
                    help="--cached: paged prefix keys per sequence, one table row each")
    ap.add_argument("--splits", default="auto",
                    help="key splits per tile, one triton column each: auto or a count")
    ap.add_argument("--sweep", action="store_true", help="time every SWEEP config")
    ap.add_argument("--graph", action="store_true", help="time CUDA graph replays")
    args = ap.parse_args()
    args.kv_heads = args.kv_heads or args.heads
    args.kv_lens = [int(x) for x in args.kv_lens.split(",")]
    args.prefix_lens = [int(x) for x in args.prefix_lens.split(",")] if args.cached else [0]
    args.splits = [s if s == "auto" else int(s) for s in args.splits.split(",")]
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"heads={args.heads} kv_heads={args.kv_heads} head_dim={args.head_dim} dtype={args.dtype}")
    if args.cached:
        print(f"cached: {args.block} queries per sequence, keys {args.kv_lens}")
    check_correctness(args, dtype)
    fa_varlen = load_fa_varlen()

    base_lens = [int(x) for x in args.lens.split(",")]
    names = ["x".join(map(str, c)) for c in SWEEP] if args.sweep else [
        *map(triton_name, args.splits), "sdpa-loop", "sdpa-padded"]
    names += ["fa-varlen"] if fa_varlen else []
    print(f"{'seqs':>5} {'tokens':>7} {'prefix':>6} {'keys':>7} {'S':>3} "
          + " ".join(f"{n + ' ms':>15} {'TF/s':>6}" for n in names))
    for prefix_len, b in itertools.product(args.prefix_lens,
                                           (int(x) for x in args.batches.split(","))):
        if args.cached:
            lens = [args.block] * b
            kv_lens = [args.kv_lens[i % len(args.kv_lens)] for i in range(b)]
        else:
            lens = [base_lens[i % len(base_lens)] for i in range(b)]
            kv_lens = None
        q, k, v = make_inputs(lens, args.heads, args.kv_heads, args.head_dim, dtype, kv_lens)
        prefix = (make_prefix(b, prefix_len, args.kv_heads, args.head_dim, dtype)
                  if prefix_len else None)
        keys = [n + prefix_len for n in (lens if kv_lens is None else kv_lens)]
        flops = 4 * sum(n * kn for n, kn in zip(lens, keys)) * args.heads * args.head_dim
        auto = auto_splits(lens, kv_lens, prefix, q, k)
        fns = methods(lens, q, k, v, args.head_dim**-0.5, fa_varlen, kv_lens, args.sweep,
                      prefix, args.splits)
        cells = []
        for name in names:
            try:
                ms = (triton.testing.do_bench_cudagraph if args.graph else
                      triton.testing.do_bench)(fns[name], rep=args.rep, return_mode="median")
            except Exception as e:  # a sweep config that does not fit (shared memory)
                print(f"{name}: {type(e).__name__}: {str(e)[:120]}")
                cells.append(f"{'-':>15} {'-':>6}")
                continue
            cells.append(f"{ms:>15.4f} {flops / ms / 1e9:>6.1f}")
        print(f"{b:>5} {sum(lens):>7} {prefix_len:>6} {sum(keys):>7} {auto:>3} "
              + " ".join(cells))


if __name__ == "__main__":
    main()
