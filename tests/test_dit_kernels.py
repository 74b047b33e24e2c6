"""The DiT block's fused Triton kernels (``vllm_omni/kernels/triton_dit.py``)
against their PyTorch references (``vllm_omni/kernels/dit.py``).

With CUDA the kernels run natively here, in float32 and bfloat16. Without
CUDA they run under Triton's interpreter in a child process (this file as a
script with ``--interpret``; see tests/test_attention_kernel.py for why the
variable cannot be set in this process), float32 only: the interpreter keeps
bf16 as raw bits.

Inputs are laid out as the model lays them out: shift/scale/gate are
strided chunks of one modulation output, a sequence index per row; qkv is one
fused projection, and q/k/v land on a stream's rows of joint buffers whose
other rows are NaN and must stay so.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_omni.kernels.dit import (modulated_norm, modulated_norm_reference, qk_norm_rope,
                                   qk_norm_rope_reference)

ON_CUDA = torch.cuda.is_available()
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

# (name, rows per sequence, dim, residual)
NORM_CASES = [("norm-3seq-d48", [5, 1, 9], 48, False),
              ("norm-residual-3seq-d48", [5, 1, 9], 48, True),
              ("norm-residual-d3072", [3, 2], 3072, True),
              ("norm-one-row-d16", [1], 16, False)]
# (name, tokens, heads, head_dim)
ROPE_CASES = [("rope-3heads-d16", 7, 3, 16), ("rope-24heads-d128", 5, 24, 128),
              ("rope-1head-d64", 1, 1, 64)]
LARGE_NORM = [("gpu-norm-residual-8448x3072", [4224, 4224], 3072, True),
              ("gpu-norm-txt-d3072", [162, 130, 7], 3072, False)]
LARGE_ROPE = [("gpu-rope-4224x24x128", 4224, 24, 128)]


def _norm_inputs(lens, dim, residual, dtype, device):
    g = torch.Generator().manual_seed(dim + len(lens))
    rows = sum(lens)
    x = torch.randn(rows, dim, generator=g) * 3 + 1
    mod = torch.randn(len(lens), 6 * dim, generator=g)  # one Modulation's output
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    y = torch.randn(rows, dim, generator=g) if residual else None
    to = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    mod = to(mod)
    shift, scale, gate = mod[:, :dim], mod[:, dim:2 * dim], mod[:, 2 * dim:3 * dim]
    return to(x), shift, scale, seq.to(device), to(y), gate if residual else None


def _rope_inputs(tokens, heads, head_dim, dtype, device):
    g = torch.Generator().manual_seed(tokens * heads + head_dim)
    qkv = torch.randn(tokens, 3 * heads * head_dim, generator=g) * 2
    wq, wk = (torch.rand(head_dim, generator=g) + 0.5 for _ in range(2))
    angles = torch.randn(tokens, head_dim // 2, generator=g) * 4
    freqs = torch.polar(torch.ones_like(angles), angles)
    joint = 2 * tokens + 3
    rows = torch.randperm(joint, generator=g)[:tokens]  # the stream's joint rows
    return (qkv.to(device, dtype), wq.to(device, dtype), wk.to(device, dtype), freqs.to(device),
            rows.to(device), joint)


def _run(kind, case, dtype, device):
    """Max abs difference of kernel and reference (relative to the output's
    scale), and whether rows outside the stream stayed NaN."""
    if kind == "norm":
        _, lens, dim, residual = case
        args = _norm_inputs(lens, dim, residual, dtype, device)
        got = modulated_norm(*args)
        want = modulated_norm_reference(*(a if a is None or a.dtype == torch.long else a.float()
                                          for a in args))
        return max(((a.float() - b).abs().max() / b.abs().max()).item()
                   for a, b in zip(got, want)), True
    _, tokens, heads, head_dim = case
    qkv, wq, wk, freqs, rows, joint = _rope_inputs(tokens, heads, head_dim, dtype, device)
    outs = []
    for fn, dt, args in ((qk_norm_rope, dtype, (qkv, wq, wk)),
                         (qk_norm_rope_reference, torch.float32,
                          (qkv.float(), wq.float(), wk.float()))):
        bufs = [torch.full((joint, heads, head_dim), float("nan"), device=device, dtype=dt)
                for _ in range(3)]
        fn(*args, 1e-6, freqs, rows, *bufs)
        outs.append(bufs)
    other = torch.ones(joint, dtype=torch.bool, device=device)
    other[rows] = False
    untouched = all(b[other].isnan().all().item() for b in outs[0])
    err = max(((a[rows].float() - b[rows]).abs().max() / b[rows].abs().max()).item()
              for a, b in zip(*outs))
    return err, untouched


def _all_cases(large):
    norm = NORM_CASES + (LARGE_NORM if large else [])
    rope = ROPE_CASES + (LARGE_ROPE if large else [])
    return [("norm", c) for c in norm] + [("rope", c) for c in rope]


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, "--interpret"], env=env,
                          cwd=str(Path(__file__).resolve().parents[1]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind,case", _all_cases(large=False),
                         ids=[c[0] for _, c in _all_cases(large=False)])
def test_kernel_matches_reference_interpreted(kind, case, request):
    if ON_CUDA:
        pytest.skip("runs natively below")
    err, untouched = request.getfixturevalue("interpreted")[case[0]]
    assert untouched, "a row outside the stream was written"
    assert err < TOL[torch.float32], err


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,case", _all_cases(large=True),
                         ids=[c[0] for _, c in _all_cases(large=True)])
def test_kernel_matches_reference_cuda(kind, case, dtype):
    err, untouched = _run(kind, case, dtype, "cuda")
    assert untouched, "a row outside the stream was written"
    assert err < TOL[dtype], err


def test_cpu_path_is_the_reference():
    """Off CUDA the model calls the references themselves (bit for bit)."""
    for kind, case in _all_cases(large=False)[:5]:
        assert _run(kind, case, torch.float32, "cpu") == (0.0, True)


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from vllm_omni.kernels.triton_dit import modulated_norm_triton, qk_norm_rope_triton

    # _run calls these names: the kernels themselves, on CPU tensors.
    modulated_norm, qk_norm_rope = modulated_norm_triton, qk_norm_rope_triton
    print(json.dumps({case[0]: _run(kind, case, torch.float32, "cpu")
                      for kind, case in _all_cases(large=False)}))
