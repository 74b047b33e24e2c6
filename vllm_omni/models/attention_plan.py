"""What one denoising forward attends to, sequence by sequence.

Each sequence (a request's canvas, or one block of it) runs queries for
positions ``[q_start, q_end)`` and attends to:
- ``[0, q_start)``: keys read from vLLM's paged KV cache through the request's
  pages (Fast-dLLM's prefix cache, written by the block's refresh forward; a
  block-causal family's finished blocks; a forward whose queries start at 0
  reads none);
- ``[q_start, q_end)``: the fresh keys of this forward;
- ``[q_end, keys_end)``: (dual cache) keys of the positions after the block,
  kept from the refresh forward in the ``KeyArena``.

A sequence with ``keys_start`` < ``q_start`` (Fast-dLLM v2's block cache,
``diffusion/block_causal.py``) reads the pages only up to ``keys_start`` and
the arena's keys of ``[keys_start, keys_end)``: its queries are a sub-block
inside a block whose other positions keep keys from an earlier forward.

``write`` names the positions whose fresh keys and values this forward puts
into the pages: Fast-dLLM's refresh writes its prefix ``[0, block start)``; a
block-causal store sequence (SDAR, ``diffusion/block_causal.py``) is one
finished block whose queries attend to the pages before it and to itself,
and writes the block ``[q_start, q_end)``. Every layer writes before it reads
(``attend``), so a sequence may read pages that another sequence of the same
forward writes. ``page_writes`` is where every write to vLLM's KV cache is
decided (this plan's, and the CUDA graphs' copy from the arena).

The arena holds keys by position: position p of a sequence sits at arena row
``arena_start + p``. A forward that has any dual-cache sequence writes every
sequence's fresh keys there and reads local keys from it, so a dual refresh
(queries over the whole canvas) leaves the suffix in place for the block's
later steps, and a later step's fresh block lands right before that suffix.
Forwards without dual-cache sequences read the fresh keys as they are.

The plan is built by the denoiser and handed down through the model; each
attention layer calls ``attend`` with its index and its KV cache tensor.
"""

from dataclasses import dataclass

import torch

from vllm_omni.kernels import SequenceBatch, bidirectional_attention
from vllm_omni.kernels.paged_kv import PagedPrefix, page_rows_of, slots_of, write_pages


class KeyArena:
    """Per layer keys and values of ``rows`` canvas positions (plus one spare
    row that padded writes may target), owned by the runner: the dual cache's
    suffix keys live here between a block's steps."""

    def __init__(self, num_layers, rows, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, rows + 1, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.spare_row = rows


@dataclass
class SequencePlan:
    length: int  # the canvas length
    q_start: int
    q_end: int
    pages: list[int] | None = None  # the request's KV-cache pages, in position order
    # Write this forward's keys and values of positions [write[0], write[1])
    # (inside [q_start, q_end)) to the pages.
    write: tuple[int, int] | None = None
    keys_end: int | None = None  # local keys run to here (None: q_end); > q_end: dual cache
    arena_start: int = 0  # the arena row of position 0
    # Local keys start here (None: q_start); the pages hold the keys before
    # it. Below q_start only with the arena (keys_end set).
    keys_start: int | None = None

    @property
    def local_start(self) -> int:
        return self.q_start if self.keys_start is None else self.keys_start

    @property
    def num_queries(self) -> int:
        return self.q_end - self.q_start


def page_writes(seqs: list[SequencePlan], bases, page_size: int, device: torch.device):
    """Where this forward's keys go in vLLM's KV cache: (rows, page_rows) for
    ``write_pages``, the rows of each sequence's ``write`` positions, position
    p of sequence i at row ``bases[i] + p``; None when no sequence writes."""
    rows, slots = [], []
    for s, base in zip(seqs, bases):
        if s.write is not None and s.write[1] > s.write[0]:
            start, end = s.write
            rows.append(torch.arange(base + start, base + end))
            slots.append(slots_of(s.pages, page_size, end, start))
    if not rows:
        return None
    return torch.cat(rows).to(device), page_rows_of(torch.cat(slots).to(device), page_size)


class AttentionPlan:
    def __init__(self, seqs: list[SequencePlan], page_size: int, device: torch.device,
                 arena: KeyArena | None = None):
        self.seqs = seqs
        self.queries = SequenceBatch.from_lengths([s.num_queries for s in seqs])
        # Packed query rows this forward writes to the paged cache (position
        # p of a sequence is packed row p - q_start from its first).
        self.writes = page_writes(
            seqs, [start - s.q_start for s, start in zip(seqs, self.queries.starts)],
            page_size, device)

        # Paged prefixes to read.
        self.prefix_lens = tuple(s.local_start for s in seqs)
        self.block_table = None
        if any(self.prefix_lens):
            width = max(len(s.pages or ()) for s in seqs)
            table = [list(s.pages or ()) + [0] * (width - len(s.pages or ())) for s in seqs]
            self.block_table = torch.tensor(table, dtype=torch.int32).to(device)

        # Local keys: in the arena when any sequence uses the dual cache.
        self.arena = None
        if any(s.keys_end is not None for s in seqs):
            self.arena = arena
            self.fresh_rows = torch.cat(
                [torch.arange(s.arena_start + s.q_start, s.arena_start + s.q_end) for s in seqs]
            ).to(device)
            self.local_keys = SequenceBatch(
                tuple(s.arena_start + s.local_start for s in seqs),
                tuple((s.keys_end or s.q_end) - s.local_start for s in seqs),
            )

    def attend(self, layer: int, q, k, v, scale: float, kv_cache: torch.Tensor) -> torch.Tensor:
        if self.writes is not None:
            rows, page_rows = self.writes
            write_pages(kv_cache, page_rows, k[rows], v[rows])
        prefix = None
        if self.block_table is not None:
            prefix = PagedPrefix(kv_cache, self.block_table, self.prefix_lens)
        if self.arena is None:
            if prefix is None:
                return bidirectional_attention(q, k, v, self.queries, scale)
            return bidirectional_attention(q, k, v, self.queries, scale, self.queries, prefix)
        arena_k, arena_v = self.arena.k[layer], self.arena.v[layer]
        arena_k.index_copy_(0, self.fresh_rows, k)
        arena_v.index_copy_(0, self.fresh_rows, v)
        return bidirectional_attention(q, arena_k, arena_v, self.queries, scale,
                                       self.local_keys, prefix)
