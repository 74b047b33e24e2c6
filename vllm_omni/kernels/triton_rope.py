"""Triton kernel: RoPE on q and k fused with the key arena's write
(``kernels.rope_store``; ``docs/architecture/overview.md``, the key arena).

Same contract as ``rope_store_reference``: q [tokens, heads, head_dim] and k
[tokens, kv_heads, head_dim] are rotated in place by vLLM's neox-style RoPE
(pairs (i, i + rotary_dim / 2) of a head's first rotary_dim dims, cos and sin
of the token's position from vLLM's ``cos_sin_cache`` [max_position,
rotary_dim]: cos in its first half, sin in its second; later dims pass
through), then token t's rotated k and its v go to row ``rows[t]`` of the
layer's arena (``arena_k`` / ``arena_v`` [arena rows, kv_heads, head_dim]).

Arithmetic as vLLM's ``rotary_embedding`` CUDA kernel
(csrc/pos_encoding_kernels.cu): x, y, cos and sin widened to float32,
x cos - y sin and y cos + x sin in that order, one rounding at the store.
Both compilers contract each into one FMA the same way (sm_90 SASS of Triton
3.9 and of nvcc 13.0 on that expression: fma(cos, x, -(sin y)) and
fma(sin, x, cos y)), so float32 matches vLLM's kernel bit for bit; it is
``forward_native``'s arithmetic up to the FMA (the interpreter has none).
For 16-bit inputs ``forward_native`` rounds each product to the input dtype,
so the two differ by rounding. tests/test_attention_kernel.py checks all three.

Grid (tokens, head blocks): a token's query heads in blocks of ``BLOCK_H``,
then its KV heads; a KV block also writes its heads' arena rows (rotated k,
the pass-through dims, v). Padded rows of a CUDA graph (position 0, the
arena's spare row) are rotated and written like any other, as the index
copies they replace wrote them. Inputs may be strided views (q, k, v split
out of one qkv tensor); the last dim must have stride 1.
"""

import triton
import triton.language as tl


@triton.jit
def _rotate(src, s_h, dst, d_h, h, hmask, cos, sin, j, jmask,
            HALF: tl.constexpr, STORE: tl.constexpr):
    """Rotate the pairs (j, HALF + j) of heads h ([BLOCK_H, HALF_P2]) of one
    token at ``src`` in place and, with STORE, also write them at ``dst``."""
    mask = hmask[:, None] & jmask[None, :]
    x_ptrs = src + h[:, None] * s_h + j[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    y = tl.load(x_ptrs + HALF, mask=mask, other=0.0)
    xf, yf = x.to(tl.float32), y.to(tl.float32)
    # vLLM's order of operations (x cos - y sin, y cos + x sin).
    xo = (xf * cos - yf * sin).to(x.dtype)
    yo = (yf * cos + xf * sin).to(x.dtype)
    tl.store(x_ptrs, xo, mask=mask)
    tl.store(x_ptrs + HALF, yo, mask=mask)
    if STORE:
        d_ptrs = dst + h[:, None] * d_h + j[None, :]
        tl.store(d_ptrs, xo.to(dst.dtype.element_ty), mask=mask)
        tl.store(d_ptrs + HALF, yo.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_store_kernel(
    Q, K, V, Pos, Rows, Cache, AK, AV, num_heads, num_kv_heads, q_blocks,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ct, s_akt, s_akh, s_avt, s_avh,
    HEAD_DIM: tl.constexpr, HEAD_P2: tl.constexpr, HALF: tl.constexpr,
    HALF_P2: tl.constexpr, PASS_P2: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    pos = tl.load(Pos + t).to(tl.int64)
    j = tl.arange(0, HALF_P2)
    jmask = j < HALF
    cos = tl.load(Cache + pos * s_ct + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(Cache + pos * s_ct + HALF + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    offs_h = tl.arange(0, BLOCK_H)
    if block < q_blocks:  # query heads: rotated in place only
        h = block * BLOCK_H + offs_h
        _rotate(Q + t * s_qt, s_qh, Q, 0, h, h < num_heads, cos, sin, j, jmask, HALF, False)
    else:  # KV heads: k rotated in place and into the arena, v into the arena
        h = (block - q_blocks) * BLOCK_H + offs_h
        hmask = h < num_kv_heads
        row = tl.load(Rows + t).to(tl.int64)
        ak = AK + row * s_akt
        _rotate(K + t * s_kt, s_kh, ak, s_akh, h, hmask, cos, sin, j, jmask, HALF, True)
        if 2 * HALF < HEAD_DIM:  # partial RoPE: the dims past rotary_dim as they are
            d = 2 * HALF + tl.arange(0, PASS_P2)
            mask = hmask[:, None] & (d < HEAD_DIM)[None, :]
            x = tl.load(K + t * s_kt + h[:, None] * s_kh + d[None, :], mask=mask)
            tl.store(ak + h[:, None] * s_akh + d[None, :], x.to(AK.dtype.element_ty), mask=mask)
        d = tl.arange(0, HEAD_P2)
        mask = hmask[:, None] & (d < HEAD_DIM)[None, :]
        x = tl.load(V + t * s_vt + h[:, None] * s_vh + d[None, :], mask=mask)
        tl.store(AV + row * s_avt + h[:, None] * s_avh + d[None, :], x.to(AV.dtype.element_ty),
                 mask=mask)


def block_heads(head_dim: int, num_heads: int, num_kv_heads: int) -> int:
    """Heads per program: up to 2048 elements (a batch-1 block step of
    LLaDA-8B, 32 heads of 128 dims and 32 KV heads: 32 tokens x (2 + 2)
    programs)."""
    most = triton.next_power_of_2(max(num_heads, num_kv_heads))
    return max(1, min(most, 2048 // head_dim))


def rope_store_triton(positions, q, k, v, cos_sin_cache, rows, arena_k, arena_v) -> None:
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rotary_dim = cos_sin_cache.shape[1]
    assert k.shape == v.shape == (tokens, num_kv_heads, head_dim)
    assert positions.shape == rows.shape == (tokens,)
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim, (rotary_dim, head_dim)
    assert arena_k.shape[1:] == arena_v.shape[1:] == (num_kv_heads, head_dim)
    assert all(t.stride(-1) == 1 for t in (q, k, v, arena_k, arena_v, cos_sin_cache))
    assert q.dtype == k.dtype == v.dtype, "q, k, v must share a dtype"
    if tokens == 0:
        return
    block_h = block_heads(head_dim, num_heads, num_kv_heads)
    q_blocks = triton.cdiv(num_heads, block_h)
    grid = (tokens, q_blocks + triton.cdiv(num_kv_heads, block_h))
    half = rotary_dim // 2
    _rope_store_kernel[grid](
        q, k, v, positions, rows, cos_sin_cache, arena_k, arena_v,
        num_heads, num_kv_heads, q_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0), arena_k.stride(0), arena_k.stride(1),
        arena_v.stride(0), arena_v.stride(1),
        HEAD_DIM=head_dim, HEAD_P2=triton.next_power_of_2(head_dim), HALF=half,
        HALF_P2=triton.next_power_of_2(half),
        PASS_P2=triton.next_power_of_2(max(head_dim - rotary_dim, 1)), BLOCK_H=block_h,
        # FMAs as nvcc contracts vLLM's kernel (Triton's default until 3.10).
        num_warps=4, enable_fp_fusion=True,
    )
