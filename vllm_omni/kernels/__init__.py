"""Attention for the denoising forward: packed variable-length sequences,
every query attending to every key of its own sequence (no causal mask).
``batch`` lays out the query rows; ``kv_batch`` (default: ``batch``) lays out
the key/value rows, for KV-cached denoising where a block's queries attend to
a kept suffix plus their own fresh keys; ``prefix`` adds keys read from vLLM's
paged KV cache (``paged_kv.py``).

``bidirectional_attention`` runs the Triton kernel in ``triton_attention.py``
for CUDA tensors and the plain PyTorch reference in ``reference.py``
otherwise; so does ``rope_store`` (``triton_rope.py``: RoPE fused with the
key arena's write). Triton is imported only on the CUDA path, so CPU-only
installs without a working Triton still import this package.
"""

from vllm_omni.kernels.paged_kv import PagedPrefix
from vllm_omni.kernels.reference import (
    SequenceBatch,
    attention_with_tiles_reference,
    bidirectional_attention_reference,
    long_tiles,
    rope_store_reference,
)

__all__ = ["SequenceBatch", "attention_with_tiles", "bidirectional_attention", "long_tiles",
           "rope_store", "tile_block_m", "tile_splits"]


def bidirectional_attention(q, k, v, batch: SequenceBatch, scale: float,
                            kv_batch: SequenceBatch | None = None,
                            prefix: PagedPrefix | None = None):
    if q.is_cuda:
        from vllm_omni.kernels.triton_attention import bidirectional_attention_triton

        return bidirectional_attention_triton(q, k, v, batch, scale, kv_batch, prefix=prefix)
    return bidirectional_attention_reference(q, k, v, batch, scale, kv_batch, prefix)


def attention_with_tiles(q, k, v, tiles, scale: float, kv_cache, block_table,
                         long: bool = False, splits: int = 1):
    """The paged variant on a prebuilt 7-column tile table (``tile_rows`` with
    ``tile_block_m(..., long)`` queries per tile; rows with no queries are
    padding): no host-side work that depends on the data on CUDA, what a CUDA
    graph captures. ``splits``: key splits per tile (``tile_splits``)."""
    if q.is_cuda:
        from vllm_omni.kernels.triton_attention import paged_attention_with_tiles

        return paged_attention_with_tiles(q, k, v, tiles, scale, kv_cache, block_table, long,
                                          splits)
    return attention_with_tiles_reference(q, k, v, tiles, scale, kv_cache, block_table)


def rope_store(positions, q, k, v, cos_sin_cache, rows, arena_k, arena_v) -> None:
    """vLLM's neox RoPE on q [tokens, heads, head_dim] and k in place (the
    first ``cos_sin_cache.shape[1]`` dims of each head, cos and sin of
    ``positions`` from vLLM's ``cos_sin_cache``), then token t's k and v into
    row ``rows[t]`` of ``arena_k`` / ``arena_v``: one kernel on CUDA, where
    it replaces vLLM's RoPE and two index copies per layer
    (``docs/architecture/overview.md``, the key arena)."""
    if q.is_cuda:
        from vllm_omni.kernels.triton_rope import rope_store_triton

        return rope_store_triton(positions, q, k, v, cos_sin_cache, rows, arena_k, arena_v)
    return rope_store_reference(positions, q, k, v, cos_sin_cache, rows, arena_k, arena_v)


def tile_block_m(head_dim: int, dtype, device, long: bool = False, group: int = 1) -> int:
    """Query tokens per tile of a prebuilt tile table (any size serves the
    reference); ``long``: the long-sequence tiles (``long_tiles``); ``group``:
    query heads per KV head (GQA packing, ``triton_attention.packs``)."""
    if device.type != "cuda":
        return 64
    from vllm_omni.kernels.triton_attention import block_m_of

    return block_m_of(head_dim, dtype, long, group)


def tile_splits(num_tiles: int, max_keys: int, num_heads: int, num_kv_heads: int, device,
                long: bool = False) -> int:
    """Key splits per tile for a launch on a prebuilt table of ``num_tiles``
    rows whose sequences have at most ``max_keys`` keys (1 off CUDA: the
    reference does not split); ``triton_attention.py``'s docstring, Split keys."""
    if device.type != "cuda":
        return 1
    from vllm_omni.kernels.triton_attention import splits_of

    return splits_of(num_tiles, num_heads, num_kv_heads, max_keys, device, long)
