"""Triton bidirectional attention kernel vs the PyTorch reference.

With CUDA the kernel runs natively, in this process, on small and larger
shapes. Without CUDA it runs under Triton's interpreter (TRITON_INTERPRET=1)
on small shapes. Whether @triton.jit builds an interpreted function is decided
from the environment when the kernel module is first imported, so setting the
variable here would be too late whenever another test module imported it (or
triton) first. The interpreter cases therefore run in one child process
(this file run as a script with ``--interpret``, the variable set in its
environment), which prints one JSON result per case; the tests read those.

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

from vllm_omni.kernels.reference import SequenceBatch, bidirectional_attention_reference

ON_CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _case(name, lens, heads, kv_heads, head_dim, dtype, packed=False):
    return dict(name=name, lens=lens, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, dtype=dtype, packed=packed)


# Small enough for the interpreter (the whole file takes seconds on CPU).
SMALL = [
    _case("one-seq-70-fp32-d64", [70], 2, 2, 64, "fp32"),
    _case("one-token-fp32-d128", [1], 2, 1, 128, "fp32"),
    _case("many-gqa4-fp32-d64", [1, 7, 33, 70], 4, 1, 64, "fp32"),
    _case("many-gqa2x2-fp32-d64", [70, 7, 1, 33], 4, 2, 64, "fp32"),
    _case("many-packed-fp32-d128", [33, 1, 70, 7], 2, 2, 128, "fp32", packed=True),
    _case("zero-len-seq-fp32-d64", [5, 0, 33], 2, 2, 64, "fp32"),
    _case("many-gqa4-bf16-d64", [1, 7, 33, 70], 4, 1, 64, "bf16"),
    _case("many-packed-bf16-d128", [70, 1, 33], 2, 2, 128, "bf16", packed=True),
    _case("one-seq-bf16-d128", [129], 2, 2, 128, "bf16"),
    _case("many-packed-gqa4-fp16-d64", [7, 70, 1, 33], 4, 1, 64, "fp16", packed=True),
    _case("many-fp16-d128", [33, 7], 2, 2, 128, "fp16"),
    _case("d16-fp32", [17, 3], 2, 1, 16, "fp32"),
]
LARGE = [
    _case("gpu-8x300-600-bf16-d128", [300, 412, 517, 600, 333, 450, 599, 301], 32, 32, 128, "bf16"),
    _case("gpu-8-packed-gqa-bf16-d128", [300, 412, 517, 600, 333, 450, 599, 301], 32, 8, 128, "bf16", True),
    _case("gpu-fp16-d64-many", [1, 2, 63, 64, 65, 127, 128, 129, 1000], 16, 4, 64, "fp16"),
    _case("gpu-fp32-d128", [1, 70, 300, 513], 8, 2, 128, "fp32", True),
    _case("gpu-fp32-d64-one", [1500], 4, 4, 64, "fp32"),
    _case("gpu-bf16-d256", [5, 200, 333], 8, 2, 256, "bf16"),
    _case("gpu-64-seqs-bf16-d128", [128, 256] * 32, 32, 8, 128, "bf16", True),
]
CASES = SMALL + (LARGE if ON_CUDA else [])


def _inputs(case, device):
    """Fresh random q, k, v (seeded per case); packed: views of one qkv tensor."""
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    dtype = DTYPES[case["dtype"]]
    tokens = sum(case["lens"])
    h, kh, d = case["heads"], case["kv_heads"], case["head_dim"]
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
    from vllm_omni.kernels.triton_attention import bidirectional_attention_triton

    q, k, v = _inputs(case, device)
    batch = SequenceBatch.from_lengths(case["lens"])
    tokens, h, d = q.shape
    scale = d**-0.5
    # Output goes into a NaN-poisoned strided window of a larger buffer, so
    # unwritten rows and writes outside the window are both caught.
    buf = torch.full((tokens + 2, h, d + 16), float("nan"), dtype=q.dtype, device=device)
    out = buf[1 : tokens + 1, :, :d]
    ret = bidirectional_attention_triton(q, k, v, batch, scale, out=out)
    assert ret.data_ptr() == out.data_ptr()
    written = torch.zeros(buf.shape, dtype=torch.bool, device=device)
    written[1 : tokens + 1, :, :d] = True
    # Sequences of length 0 own no rows; every row here belongs to one.
    ref = bidirectional_attention_reference(q.double(), k.double(), v.double(), batch, scale)
    err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
    return dict(
        rel_err=err,
        all_finite=bool(torch.isfinite(out).all()),
        outside_untouched=bool(buf[~written].isnan().all()),
        dtype_ok=out.dtype == q.dtype,
    )


def _check(case, res):
    assert res["all_finite"], "unwritten (NaN) output rows"
    assert res["outside_untouched"], "kernel wrote outside the output view"
    assert res["dtype_ok"], "output dtype differs from q"
    assert res["rel_err"] < TOL[DTYPES[case["dtype"]]], res


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
def test_batched_launch_equals_per_sequence_launches():
    from vllm_omni.kernels.triton_attention import bidirectional_attention_triton

    case = LARGE[1]
    q, k, v = _inputs(case, "cuda")
    batch = SequenceBatch.from_lengths(case["lens"])
    whole = bidirectional_attention_triton(q, k, v, batch, 0.1)
    for s, n in zip(batch.starts, batch.lens):
        rows = slice(s, s + n)
        one = bidirectional_attention_triton(q[rows], k[rows], v[rows],
                                             SequenceBatch.from_lengths([n]), 0.1)
        assert torch.equal(one, whole[rows])


def test_dispatch():
    from vllm_omni.kernels import bidirectional_attention

    device = "cuda" if ON_CUDA else "cpu"
    q, k, v = _inputs(SMALL[2], device)
    batch = SequenceBatch.from_lengths(SMALL[2]["lens"])
    got = bidirectional_attention(q, k, v, batch, 0.125)
    if ON_CUDA:
        from vllm_omni.kernels.triton_attention import bidirectional_attention_triton

        assert torch.equal(got, bidirectional_attention_triton(q, k, v, batch, 0.125))
    else:
        assert torch.equal(got, bidirectional_attention_reference(q, k, v, batch, 0.125))


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
    print(json.dumps(results))
