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

    @property
    def num_tokens(self) -> int:
        return sum(self.lens)


def bidirectional_attention_reference(
    q: torch.Tensor,  # [tokens, num_heads, head_dim]
    k: torch.Tensor,  # [tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [tokens, num_kv_heads, head_dim]
    batch: SequenceBatch,
    scale: float,
) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for start, n in zip(batch.starts, batch.lens):
        rows = slice(start, start + n)
        qi = q[rows].transpose(0, 1)
        ki = k[rows].transpose(0, 1).repeat_interleave(group, dim=0)
        vi = v[rows].transpose(0, 1).repeat_interleave(group, dim=0)
        out[rows] = F.scaled_dot_product_attention(qi, ki, vi, scale=scale).transpose(0, 1)
    return out
