"""Triton kernels for ``dit.py`` (its docstring has the contracts): one
program per token row, float32 arithmetic, one rounding at each store."""

import torch
import triton
import triton.language as tl


@triton.jit
def _modulated_norm_kernel(X, Y, G, SHIFT, SCALE, SEQ, XO, H, dim, eps,
                           s_x, s_y, s_g, s_shift, s_scale, s_xo, s_h,
                           RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    seq = tl.load(SEQ + row).to(tl.int64)
    x = tl.load(X + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        y = tl.load(Y + row * s_y + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + seq * s_g + cols, mask=mask, other=0.0).to(tl.float32)
        # The stream is stored in the model dtype; normalise what is stored.
        x = (x + g * y).to(XO.dtype.element_ty)
        tl.store(XO + row * s_xo + cols, x, mask=mask)
        x = x.to(tl.float32)
    mean = tl.sum(x, 0) / dim
    d = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, 0) / dim + eps)
    shift = tl.load(SHIFT + seq * s_shift + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + seq * s_scale + cols, mask=mask, other=0.0).to(tl.float32)
    h = d * rstd * (1.0 + scale) + shift
    tl.store(H + row * s_h + cols, h.to(H.dtype.element_ty), mask=mask)


def modulated_norm_triton(x, shift, scale, seq, y=None, gate=None, eps=1e-6):
    rows, dim = x.shape
    assert x.stride(-1) == 1 and shift.stride(-1) == 1 and scale.stride(-1) == 1
    assert seq.shape == (rows,)
    residual = y is not None
    if residual:
        assert y.shape == x.shape and y.stride(-1) == 1 and gate.stride(-1) == 1
        x_out = torch.empty_like(x)
    else:
        y, gate, x_out = x, shift, x  # unused pointers: compiled out
    h = torch.empty_like(x)
    if rows:
        _modulated_norm_kernel[(rows,)](
            x, y, gate, shift, scale, seq, x_out, h, dim, eps,
            x.stride(0), y.stride(0), gate.stride(0), shift.stride(0), scale.stride(0),
            x_out.stride(0), h.stride(0),
            RESIDUAL=residual, BLOCK=triton.next_power_of_2(dim),
            num_warps=8 if dim >= 2048 else 4)
    return x_out, h


@triton.jit
def _norm_rope(src, W, dst, s_dh, cos, sin, h, d, hmask, eps, HEAD_DIM: tl.constexpr):
    """RMSNorm of every head of one token ([HEADS_P2, HEAD_DIM], contiguous
    loads), times the weight, each channel pair (2j, 2j+1) rotated by (cos,
    sin) of j, stored. A channel's pair partner is channel d ^ 1, read again
    (from cache) rather than shuffled in registers."""
    x = tl.load(src + h * HEAD_DIM + d, mask=hmask, other=0.0).to(tl.float32)
    partner = tl.load(src + h * HEAD_DIM + (d ^ 1), mask=hmask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)[:, None]
    x = x * rstd * tl.load(W + d).to(tl.float32)
    partner = partner * rstd * tl.load(W + (d ^ 1)).to(tl.float32)
    # even d: x c - x' s; odd d: x c + x' s (x' the partner)
    sign = tl.where(d % 2 == 0, -1.0, 1.0)
    out = x * cos + sign * partner * sin
    tl.store(dst + h * s_dh + d, out.to(dst.dtype.element_ty), mask=hmask)


@triton.jit
def _qk_norm_rope_kernel(QKV, WQ, WK, FREQS, ROWS, QO, KO, VO, heads, eps,
                         s_qkv, s_f, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh,
                         HEAD_DIM: tl.constexpr, HEADS_P2: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    row = tl.load(ROWS + t).to(tl.int64)
    h = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    hmask = h < heads
    # freqs: the complex factors as float32 (real, imag) pairs; channel d
    # rotates by factor d // 2.
    cos = tl.load(FREQS + t * s_f + (d // 2) * 2)
    sin = tl.load(FREQS + t * s_f + (d // 2) * 2 + 1)
    src = QKV + t * s_qkv
    width = heads * HEAD_DIM
    _norm_rope(src, WQ, QO + row * s_qt, s_qh, cos, sin, h, d, hmask, eps, HEAD_DIM)
    _norm_rope(src + width, WK, KO + row * s_kt, s_kh, cos, sin, h, d, hmask, eps, HEAD_DIM)
    v = tl.load(src + 2 * width + h * HEAD_DIM + d, mask=hmask, other=0.0)
    tl.store(VO + row * s_vt + h * s_vh + d, v, mask=hmask)


def qk_norm_rope_triton(qkv, q_weight, k_weight, eps, freqs, rows, q_out, k_out, v_out):
    tokens = qkv.shape[0]
    heads, head_dim = q_out.shape[1], q_out.shape[2]
    assert qkv.shape[1] == 3 * heads * head_dim and qkv.stride(-1) == 1
    assert rows.shape == (tokens,) and freqs.shape == (tokens, head_dim // 2)
    assert all(t.stride(-1) == 1 for t in (q_out, k_out, v_out))
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    f = torch.view_as_real(freqs.to(torch.complex64)).flatten(1)  # [tokens, head_dim]
    if tokens:
        _qk_norm_rope_kernel[(tokens,)](
            qkv, q_weight, k_weight, f, rows, q_out, k_out, v_out, heads, eps,
            qkv.stride(0), f.stride(0), q_out.stride(0), q_out.stride(1),
            k_out.stride(0), k_out.stride(1), v_out.stride(0), v_out.stride(1),
            HEAD_DIM=head_dim, HEADS_P2=triton.next_power_of_2(heads),
            num_warps=8 if heads * head_dim >= 2048 else 4)
