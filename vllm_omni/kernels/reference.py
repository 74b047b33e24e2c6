"""Plain PyTorch reference for bidirectional attention over packed sequences."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def check_kv_batch(batch: SequenceBatch, kv_batch: SequenceBatch) -> None:
    """Both batches list the same sequences; a sequence with queries has keys."""
    if len(kv_batch.lens) != len(batch.lens):
        raise ValueError(f"batch has {len(batch.lens)} sequences, kv_batch {len(kv_batch.lens)}")
    for i, (nq, nk) in enumerate(zip(batch.lens, kv_batch.lens)):
        if nq > 0 and nk <= 0:
            raise ValueError(f"sequence {i} has {nq} queries but no keys")


def bidirectional_attention_reference(
    q: torch.Tensor,  # [q_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [kv_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [kv_tokens, num_kv_heads, head_dim]
    batch: SequenceBatch,
    scale: float,
    kv_batch: SequenceBatch | None = None,
) -> torch.Tensor:
    """Sequence i: q rows ``batch.starts[i]:+batch.lens[i]`` attend to all k/v
    rows ``kv_batch.starts[i]:+kv_batch.lens[i]`` (``kv_batch`` None: the
    same rows as ``batch``). Output rows of no sequence are left unset."""
    if kv_batch is None:
        kv_batch = batch
    else:
        check_kv_batch(batch, kv_batch)
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for start, n, kv_start, kv_n in zip(batch.starts, batch.lens, kv_batch.starts, kv_batch.lens):
        rows = slice(start, start + n)
        kv_rows = slice(kv_start, kv_start + kv_n)
        qi = q[rows].transpose(0, 1)
        ki = k[kv_rows].transpose(0, 1).repeat_interleave(group, dim=0)
        vi = v[kv_rows].transpose(0, 1).repeat_interleave(group, dim=0)
        out[rows] = F.scaled_dot_product_attention(qi, ki, vi, scale=scale).transpose(0, 1)
    return out
