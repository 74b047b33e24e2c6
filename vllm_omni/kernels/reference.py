"""Plain PyTorch reference for bidirectional attention over packed sequences."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_omni.kernels.paged_kv import PagedPrefix, gather_prefix

# Sequences this long on average (an image's joint attention: thousands of
# tokens) take the Triton kernel's bigger query tiles (``triton_attention.py``).
LONG_SEQ = 1024


def long_tiles(num_tokens: int, num_seqs: int) -> bool:
    """Whether sequences without cached keys take the long-sequence tiles."""
    return num_tokens >= LONG_SEQ * max(num_seqs, 1)


@dataclass(frozen=True)
class SequenceBatch:
    """Packed sequences: sequence i owns rows ``starts[i]:starts[i]+lens[i]``."""

    starts: tuple[int, ...]
    lens: tuple[int, ...]

    @classmethod
    def from_lengths(cls, lens: list[int]) -> "SequenceBatch":
        starts, pos = [], 0
        for n in lens:
            starts.append(pos)
            pos += n
        return cls(tuple(starts), tuple(lens))


def check_kv_batch(
    batch: SequenceBatch, kv_batch: SequenceBatch, prefix_lens: tuple[int, ...] | None = None
) -> None:
    """All list the same sequences; a sequence with queries has keys."""
    if len(kv_batch.lens) != len(batch.lens):
        raise ValueError(f"batch has {len(batch.lens)} sequences, kv_batch {len(kv_batch.lens)}")
    if prefix_lens is not None and len(prefix_lens) != len(batch.lens):
        raise ValueError(f"batch has {len(batch.lens)} sequences, prefix {len(prefix_lens)}")
    for i, (nq, nk) in enumerate(zip(batch.lens, kv_batch.lens)):
        if nq > 0 and nk + (prefix_lens[i] if prefix_lens else 0) <= 0:
            raise ValueError(f"sequence {i} has {nq} queries but no keys")


def tile_rows(
    batch: SequenceBatch, kv_batch: SequenceBatch, prefix_lens: tuple[int, ...] | None,
    block_m: int,
) -> list[tuple[int, ...]]:
    """The Triton kernel's tile rows with key columns (and with prefix
    lengths: prefix columns), one per ``block_m`` queries of each sequence:
    (q start, q len, tile offset, kv start, kv len[, prefix len, sequence])."""
    rows = []
    for i, (start, n, kv_start, kv_n) in enumerate(
        zip(batch.starts, batch.lens, kv_batch.starts, kv_batch.lens)
    ):
        extra = () if prefix_lens is None else (prefix_lens[i], i)
        rows += [(start, n, off, kv_start, kv_n, *extra) for off in range(0, n, block_m)]
    return rows


def bidirectional_attention_reference(
    q: torch.Tensor,  # [q_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [kv_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [kv_tokens, num_kv_heads, head_dim]
    batch: SequenceBatch,
    scale: float,
    kv_batch: SequenceBatch | None = None,
    prefix: PagedPrefix | None = None,
) -> torch.Tensor:
    """Sequence i: q rows ``batch.starts[i]:+batch.lens[i]`` attend to all k/v
    rows ``kv_batch.starts[i]:+kv_batch.lens[i]`` (``kv_batch`` None: the
    same rows as ``batch``) and, with a ``prefix``, to its ``prefix.lens[i]``
    paged keys too. Output rows of no sequence are left unset."""
    if kv_batch is None:
        kv_batch = batch
    check_kv_batch(batch, kv_batch, prefix.lens if prefix else None)
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for i, (start, n, kv_start, kv_n) in enumerate(
        zip(batch.starts, batch.lens, kv_batch.starts, kv_batch.lens)
    ):
        if n == 0:
            continue
        rows = slice(start, start + n)
        ki, vi = k[kv_start : kv_start + kv_n], v[kv_start : kv_start + kv_n]
        if prefix is not None and prefix.lens[i]:
            pk, pv = prefix.gather(i)
            ki, vi = torch.cat([pk.to(k.dtype), ki]), torch.cat([pv.to(v.dtype), vi])
        qi = q[rows].transpose(0, 1)
        ki = ki.transpose(0, 1).repeat_interleave(group, dim=0)
        vi = vi.transpose(0, 1).repeat_interleave(group, dim=0)
        out[rows] = F.scaled_dot_product_attention(qi, ki, vi, scale=scale).transpose(0, 1)
    return out


def merge_splits_reference(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """What the split-key kernel's merge (``triton_split.py``) computes from S
    splits' partial results over the same rows: base-2 row maxima ``m`` and
    row sums ``l`` ([S, ..., rows]), unnormalised accumulators ``acc`` ([S,
    ..., rows, head_dim]); a split with no keys has m = -inf, l = 0."""
    weight = torch.exp2(m - m.amax(0))  # [S, ..., rows]
    return (weight[..., None] * acc).sum(0) / (weight * l).sum(0)[..., None]


def attention_with_tiles_reference(q, k, v, tiles, scale, kv_cache, block_table) -> torch.Tensor:
    """What ``paged_attention_with_tiles`` computes, from the same 7-column
    tile table (``tile_rows`` with prefix lengths; rows with no queries are
    padding): each sequence's queries attend to its paged prefix and its
    local keys. Rows of no tile are left unset."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for start, n, offset, kv_start, kv_n, prefix_len, seq in tiles.tolist():
        if n == 0 or offset:  # one pass per sequence, at its first tile
            continue
        ki, vi = k[kv_start : kv_start + kv_n], v[kv_start : kv_start + kv_n]
        if prefix_len:
            pk, pv = gather_prefix(kv_cache, block_table[seq], prefix_len)
            ki, vi = torch.cat([pk.to(k.dtype), ki]), torch.cat([pv.to(v.dtype), vi])
        qi = q[start : start + n].transpose(0, 1)
        ki = ki.transpose(0, 1).repeat_interleave(group, dim=0)
        vi = vi.transpose(0, 1).repeat_interleave(group, dim=0)
        out[start : start + n] = F.scaled_dot_product_attention(qi, ki, vi, scale=scale).transpose(0, 1)
    return out


def rope_store_reference(positions, q, k, v, cos_sin_cache, rows, arena_k, arena_v) -> None:
    """What ``triton_rope``'s kernel computes (its docstring has the
    contract): q and k rotated in place by vLLM's neox RoPE, in float32 with
    one rounding, as vLLM's CUDA kernel; then k and v rows into the arena."""
    half = cos_sin_cache.shape[1] // 2
    cos, sin = cos_sin_cache.index_select(0, positions).float()[:, None].split(half, dim=-1)
    for x in (q, k):
        x1, x2 = x[..., :half].float(), x[..., half : 2 * half].float()
        x[..., : 2 * half] = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
    arena_k.index_copy_(0, rows, k)
    arena_v.index_copy_(0, rows, v)
