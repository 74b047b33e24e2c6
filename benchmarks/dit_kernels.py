"""Time the DiT block's fused kernels (vllm_omni/kernels/triton_dit.py) against
their PyTorch references on the GPU, at Qwen-Image's 1024x1024 shape with CFG
(2 x 4096 image tokens, dim 3072, 24 heads x 128), and give each its memory
throughput (bytes it must read and write / time).

    python benchmarks/dit_kernels.py [--tokens 8192]
"""

import argparse

import torch
import triton

from vllm_omni.kernels.dit import (modulated_norm_reference, qk_norm_rope_reference)
from vllm_omni.kernels.triton_dit import modulated_norm_triton, qk_norm_rope_triton


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    n, heads, hd = args.tokens, args.heads, args.head_dim
    dim = heads * hd
    dev, dt = "cuda", torch.bfloat16
    x, y = (torch.randn(n, dim, device=dev, dtype=dt) for _ in range(2))
    mod = torch.randn(2, 6 * dim, device=dev, dtype=dt)
    shift, scale, gate = mod[:, :dim], mod[:, dim:2 * dim], mod[:, 2 * dim:3 * dim]
    seq = torch.arange(n, device=dev) * 2 // n
    qkv = torch.randn(n, 3 * dim, device=dev, dtype=dt)
    w = torch.rand(hd, device=dev, dtype=dt)
    angles = torch.randn(n, hd // 2, device=dev)
    freqs = torch.polar(torch.ones_like(angles), angles)
    rows = torch.randperm(n + 100, device=dev)[:n]
    joint = [torch.empty(n + 100, heads, hd, device=dev, dtype=dt) for _ in range(3)]
    size = x.numel() * x.element_size()
    cases = {
        "modulated_norm (residual)": (4 * size, lambda f: f(x, shift, scale, seq, y, gate),
                                      modulated_norm_triton, modulated_norm_reference),
        "modulated_norm": (2 * size, lambda f: f(x, shift, scale, seq),
                           modulated_norm_triton, modulated_norm_reference),
        "qk_norm_rope": (6 * size, lambda f: f(qkv, w, w, 1e-6, freqs, rows, *joint),
                         qk_norm_rope_triton, qk_norm_rope_reference),
    }
    print(f"{torch.cuda.get_device_name()}: {n} tokens, {heads} heads x {hd}, bf16")
    for name, (nbytes, call, fused, ref) in cases.items():
        cells = []
        for label, fn in (("triton", fused), ("torch", ref)):
            ms = triton.testing.do_bench(lambda: call(fn), rep=50, return_mode="median")
            cells.append(f"{label} {ms * 1e3:8.1f} us {nbytes / ms / 1e6:7.0f} GB/s")
        print(f"{name:28s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
