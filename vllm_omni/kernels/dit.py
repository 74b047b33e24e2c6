"""The DiT block's memory-bound steps, each one pass over its rows
(``docs/architecture/images.md``, "The hot loop").

``modulated_norm``: adaLN with the residual add before it,
    x' = x + gate[seq] * y        (x itself when y is None)
    h  = LayerNorm(x') * (1 + scale[seq]) + shift[seq]
where row r belongs to sequence seq[r] and shift/scale/gate hold one row per
sequence (LayerNorm without affine). Returns (x', h).

``qk_norm_rope``: a stream's fused qkv projection [tokens, 3 * heads *
head_dim] into the joint attention's q, k, v [joint rows, heads, head_dim]:
q and k per-head RMSNorm (with weight), then rotated by complex RoPE factors
freqs [tokens, head_dim / 2] (channel pairs (2j, 2j+1)); token t goes to joint
row rows[t]. v is copied as is.

CUDA tensors run the Triton kernels of ``triton_dit.py`` (one program per
row, arithmetic in float32, one rounding at the store); anything else runs
the PyTorch references below, which are also what the kernels are tested
against (tests/test_dit_kernels.py).
"""

import torch
import torch.nn.functional as F


def modulated_norm_reference(x, shift, scale, seq, y=None, gate=None, eps=1e-6):
    if y is not None:
        x = x + gate[seq] * y
    h = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return x, h * (1 + scale[seq]) + shift[seq]


def rms_norm_reference(x, weight, eps):
    """vLLM's ``RMSNorm.forward_native``: normalise in float32, round to the
    input's dtype, then the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def apply_rope_reference(x, freqs):
    """Rotate x [tokens, heads, head_dim]'s channel pairs by freqs [tokens,
    head_dim / 2] (complex), in float32, as diffusers' ``apply_rotary_emb_qwen``."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(1)).flatten(-2).type_as(x)


def qk_norm_rope_reference(qkv, q_weight, k_weight, eps, freqs, rows, q_out, k_out, v_out):
    heads, head_dim = q_out.shape[1], q_out.shape[2]
    q, k, v = (t.reshape(-1, heads, head_dim) for t in qkv.chunk(3, dim=-1))
    q_out[rows] = apply_rope_reference(rms_norm_reference(q, q_weight, eps), freqs)
    k_out[rows] = apply_rope_reference(rms_norm_reference(k, k_weight, eps), freqs)
    v_out[rows] = v


def modulated_norm(x, shift, scale, seq, y=None, gate=None, eps=1e-6):
    if x.is_cuda:
        from vllm_omni.kernels.triton_dit import modulated_norm_triton

        return modulated_norm_triton(x, shift, scale, seq, y, gate, eps)
    return modulated_norm_reference(x, shift, scale, seq, y, gate, eps)


def qk_norm_rope(qkv, q_weight, k_weight, eps, freqs, rows, q_out, k_out, v_out):
    if qkv.is_cuda:
        from vllm_omni.kernels.triton_dit import qk_norm_rope_triton

        return qk_norm_rope_triton(qkv, q_weight, k_weight, eps, freqs, rows, q_out, k_out,
                                   v_out)
    return qk_norm_rope_reference(qkv, q_weight, k_weight, eps, freqs, rows, q_out, k_out,
                                  v_out)
