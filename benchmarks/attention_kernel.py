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

``--sweep`` times the kernel at each (BLOCK_M, BLOCK_N, num_warps, num_stages)
of ``SWEEP`` instead of the built-in choice (the table behind ``_config`` and
``LONG_CONFIGS``), next to fa-varlen.

    python benchmarks/attention_kernel.py --batches 1,8,32,64 --lens 128,256
    python benchmarks/attention_kernel.py --cached --block 32 --kv-lens 384
    # Qwen-Image's joint attention at 1024x1024 (4096 image + 128 text tokens),
    # cond + uncond per request: 2 and 8 sequences
    python benchmarks/attention_kernel.py --heads 24 --lens 4224 --batches 2,8 --sweep
"""

import argparse
import functools

import torch
import torch.nn.functional as F
import triton

from vllm_omni.kernels.reference import SequenceBatch, bidirectional_attention_reference
from vllm_omni.kernels.triton_attention import bidirectional_attention_triton

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


def check_correctness(args, dtype):
    if args.cached:
        lens, kv_lens = [1, 7, 32, 0, 33], [5, 100, 384, 17, 400]
    else:
        lens, kv_lens = [1, 7, 127, 128, 129, 300, 513], None
    q, k, v = make_inputs(lens, args.heads, args.kv_heads, args.head_dim, dtype, kv_lens)
    batch, scale = SequenceBatch.from_lengths(lens), args.head_dim**-0.5
    kv_batch = SequenceBatch.from_lengths(kv_lens) if kv_lens else None
    out = bidirectional_attention_triton(q, k, v, batch, scale, kv_batch)
    ref = bidirectional_attention_reference(q.float(), k.float(), v.float(), batch, scale,
                                            kv_batch)
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    print(f"correctness: lens={lens} kv_lens={kv_lens} max rel err {err:.2e} (tol {tol:g})")
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


def methods(lens, q, k, v, scale, fa_varlen, kv_lens=None, sweep=False):
    """Callables computing the same attention; kv_lens: keys laid out apart
    (packed by kv_lens) from the queries (packed by lens). sweep: one triton
    entry per SWEEP config, and no SDPA."""
    batch = SequenceBatch.from_lengths(lens)
    kv_batch = SequenceBatch.from_lengths(kv_lens) if kv_lens is not None else None
    kv_lens = list(lens) if kv_lens is None else list(kv_lens)
    gqa = q.shape[1] != k.shape[1]
    fns = {"triton": lambda: bidirectional_attention_triton(q, k, v, batch, scale, kv_batch)}
    if sweep:
        fns = {"x".join(map(str, c)): functools.partial(
            bidirectional_attention_triton, q, k, v, batch, scale, kv_batch, config=c)
            for c in SWEEP}

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
    ap.add_argument("--sweep", action="store_true", help="time every SWEEP config")
    args = ap.parse_args()
    args.kv_heads = args.kv_heads or args.heads
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
    base_kv_lens = [int(x) for x in args.kv_lens.split(",")]
    names = ["x".join(map(str, c)) for c in SWEEP] if args.sweep else [
        "triton", "sdpa-loop", "sdpa-padded"]
    names += ["fa-varlen"] if fa_varlen else []
    print(f"{'seqs':>5} {'tokens':>7} {'keys':>7} "
          + " ".join(f"{n + ' ms':>15} {'TF/s':>6}" for n in names))
    for b in (int(x) for x in args.batches.split(",")):
        if args.cached:
            lens = [args.block] * b
            kv_lens = [base_kv_lens[i % len(base_kv_lens)] for i in range(b)]
        else:
            lens = [base_lens[i % len(base_lens)] for i in range(b)]
            kv_lens = None
        q, k, v = make_inputs(lens, args.heads, args.kv_heads, args.head_dim, dtype, kv_lens)
        keys = lens if kv_lens is None else kv_lens
        flops = 4 * sum(n * kn for n, kn in zip(lens, keys)) * args.heads * args.head_dim
        fns = methods(lens, q, k, v, args.head_dim**-0.5, fa_varlen, kv_lens, args.sweep)
        cells = []
        for name in names:
            try:
                ms = triton.testing.do_bench(fns[name], rep=args.rep, return_mode="median")
            except Exception as e:  # a sweep config that does not fit (shared memory)
                print(f"{name}: {type(e).__name__}: {str(e)[:120]}")
                cells.append(f"{'-':>15} {'-':>6}")
                continue
            cells.append(f"{ms:>15.4f} {flops / ms / 1e9:>6.1f}")
        print(f"{b:>5} {sum(lens):>7} {sum(keys):>7} " + " ".join(cells))


if __name__ == "__main__":
    main()
