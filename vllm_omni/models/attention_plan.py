"""One denoising forward's inputs, built once on the host: ``AttentionPlan``.

Every kind of forward (LLaDA/Dream's exact steps, Fast-dLLM's prefix and dual
caches, a block-causal family's stores and block steps) is a set of
sequences, and one plan turns them into the arrays the forward reads: the
rows its input ids come from, positions, the attention kernel's tile table,
the block table, where keys go in vLLM's KV cache, which rows get logits.
The eager forward reads them through ``tensors``; the CUDA graphs copy the
same arrays into their static buffers (``diffusion/cuda_graphs.py``).
``docs/architecture/overview.md``, "The attention plan", has the whole story.

A sequence (``SequencePlan``) runs queries for positions ``[q_start, q_end)``
of one request's canvas and attends to:
- ``[0, local_start)``: keys read from vLLM's paged KV cache through the
  request's pages (Fast-dLLM's prefix; a block-causal family's finished
  blocks); ``local_start`` is ``keys_start``, else ``q_start``;
- ``[local_start, keys_end)``: its local keys. Without the key arena they are
  this forward's fresh keys. With it (a dual cache's suffix, Fast-dLLM v2's
  block cache) every sequence's fresh keys go to the ``KeyArena`` and the local
  keys are read from there, so keys an earlier forward left there join them.
It writes the fresh keys and values of its ``write`` positions to its pages
(Fast-dLLM's refresh: the prefix; a block-causal store: the finished block).
Every layer writes before it reads, so a sequence may read pages that another
sequence of the same forward writes. ``page_writes`` is where every write to
vLLM's KV cache is decided.

Rows: position p of a sequence is row ``arena_start + p`` of the caller's
token buffer, where its input id is gathered from (so commits that update the
buffer in place need no copy), and, with the arena, of the arena.
``logits_at`` lists the positions whose outputs go through the LM head, in
order (the caller applies a logit shift).

A forward may pack hundreds of sequences, so the plan works on them as
columns (``Columns``, one array entry per sequence): ``Columns.of`` turns
``SequencePlan``s into them; ``diffusion/block_plan.py`` builds them directly.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from itertools import chain

import numpy as np
import torch

from vllm_omni.kernels import (
    attention_with_tiles, long_tiles, rope_store, tile_block_m, tile_splits)
from vllm_omni.kernels.paged_kv import write_pages


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
    arena_start: int = 0  # the token-buffer (and arena) row of position 0
    # Local keys start here (None: q_start); the pages hold the keys before
    # it. Below q_start only with the arena (keys_end set).
    keys_start: int | None = None
    logits_at: Sequence[int] = ()  # positions whose outputs get logits, in order

    @property
    def local_start(self) -> int:
        return self.q_start if self.keys_start is None else self.keys_start

    @property
    def num_queries(self) -> int:
        return self.q_end - self.q_start


def to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device without waiting for the GPU to catch up:
    copied through pinned memory (whose allocator keeps it until the copy
    ran). Off the GPU the tensor shares the array, which nobody changes."""
    tensor = torch.from_numpy(host)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class PageTable:
    """The block table of a forward's requests: one row per pages list (the
    sequences of one request share its row), padded with page 0 (vLLM's null
    block, which no request owns). A caller may build one for several plans
    (a block-causal group's forwards), so the graphs copy it in once."""

    def __init__(self, page_lists: Iterable[list[int] | None]):
        self._rows: dict[int, int] = {}
        lists = []
        for pages in page_lists:
            if pages and id(pages) not in self._rows:
                self._rows[id(pages)] = len(lists)
                lists.append(pages)
        self._lists = lists  # kept alive, so their ids stay theirs
        width = max(map(len, lists), default=1)
        self.host = np.zeros((max(len(lists), 1), width), np.int32)
        for row, pages in enumerate(lists):
            self.host[row, : len(pages)] = pages
        self._device: torch.Tensor | None = None

    def row(self, pages: list[int] | None) -> int:
        return self._rows[id(pages)] if pages else 0

    def on(self, device: torch.device) -> torch.Tensor:
        if self._device is None:
            self._device = to_device(self.host, device)
        return self._device


def _ints(values) -> np.ndarray:
    return np.array(values, np.int64)


@dataclass
class Columns:
    """A forward's sequences as columns (int64, one entry per sequence): the
    fields of ``SequencePlan`` with ``local_start`` and ``keys_end``
    resolved, the row of its pages in the plan's ``PageTable`` and how many
    pages it has, its write (``write_start == write_end``: none), and its
    ``logits_at`` (how many per sequence; all of them, flat)."""

    q_start: np.ndarray
    q_end: np.ndarray
    local_start: np.ndarray
    keys_end: np.ndarray
    arena_start: np.ndarray
    table_row: np.ndarray
    num_pages: np.ndarray
    write_start: np.ndarray
    write_end: np.ndarray
    logit_counts: np.ndarray
    logits_at: np.ndarray

    @staticmethod
    def of(seqs: list[SequencePlan], table: PageTable) -> "Columns":
        writes = [s.write or (0, 0) for s in seqs]
        counts = _ints([len(s.logits_at) for s in seqs])
        return Columns(
            _ints([s.q_start for s in seqs]), _ints([s.q_end for s in seqs]),
            _ints([s.local_start for s in seqs]),
            _ints([s.q_end if s.keys_end is None else s.keys_end for s in seqs]),
            _ints([s.arena_start for s in seqs]), _ints([table.row(s.pages) for s in seqs]),
            _ints([len(s.pages or ()) for s in seqs]), _ints([w[0] for w in writes]),
            _ints([w[1] for w in writes]), counts,
            np.fromiter(chain.from_iterable(s.logits_at for s in seqs), np.int64,
                        int(counts.sum())))

    @staticmethod
    def concat(parts: list["Columns"]) -> "Columns":
        if len(parts) == 1:
            return parts[0]
        return Columns(*(np.concatenate([getattr(p, f.name) for p in parts])
                         for f in fields(Columns)))


def page_writes(cols: Columns, to_packed: np.ndarray, table: PageTable, page_size: int):
    """Where this forward writes vLLM's KV cache: for each ``write`` position p
    of sequence i, the packed query row holding its key and value
    (p + ``to_packed[i]``), its page and its row in the page (host arrays)."""
    counts = np.maximum(cols.write_end - cols.write_start, 0)
    writing = counts > 0
    if not writing.any():
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    if ((cols.write_start < cols.q_start) | (cols.write_end > cols.q_end)
            | (cols.write_end > cols.num_pages * page_size))[writing].any():
        raise ValueError("a sequence writes outside its queries or its pages")
    first = np.cumsum(counts) - counts
    pos = np.arange(int(counts.sum())) - np.repeat(first - cols.write_start, counts)
    pages = table.host[np.repeat(cols.table_row, counts), pos // page_size]
    return pos + np.repeat(to_packed, counts), pages.astype(np.int64), pos % page_size


@dataclass
class PlanTensors:
    """A plan on the device: what the forward and each attention layer read
    (a graph's are slices of its static buffers, padded)."""

    rows: torch.Tensor  # [tokens] token-buffer (and arena) rows of the queries
    positions: torch.Tensor  # [tokens]
    logit_rows: torch.Tensor  # [logits] packed query rows that get logits
    write_rows: torch.Tensor  # [writes] packed query rows whose keys go to the pages
    write_pages: torch.Tensor  # [writes]
    write_offsets: torch.Tensor  # [writes] rows in the page
    tiles: torch.Tensor  # [tiles, 7] int32: the kernel's tile table (``tile_rows``)
    block_table: torch.Tensor  # [requests, pages] int32
    arena: KeyArena | None
    long: bool  # the tiles are the long-sequence ones
    splits: int = 1  # key splits per tile (``kernels.tile_splits``)

    def fuses_rope(self, q: torch.Tensor) -> bool:
        """Whether ``attend`` takes q and k before RoPE (its ``rope``): with
        the key arena on CUDA, one kernel rotates them and writes the arena
        (``kernels.rope_store``), where vLLM's RoPE and two index copies
        would be three launches per layer."""
        return self.arena is not None and q.is_cuda

    def attend(self, layer: int, q, k, v, scale: float, kv_cache: torch.Tensor,
               rope=None) -> torch.Tensor:
        """``rope``: (vLLM's rotary embedding, positions) when q and k come
        unrotated (``fuses_rope``; needs the arena); they are rotated in place."""
        if rope is not None:
            rotary_emb, positions = rope
            assert rotary_emb.is_neox_style
            # vLLM's RoPE rotates with its cache in q's dtype (already so,
            # from the model's dtype: no copy).
            rope_store(positions, q, k, v, rotary_emb.cos_sin_cache.to(q.dtype), self.rows,
                       self.arena.k[layer], self.arena.v[layer])
        if len(self.write_rows):  # k rotated by now, in either path
            write_pages(kv_cache, (self.write_pages, self.write_offsets),
                        k[self.write_rows], v[self.write_rows])
        if self.arena is not None:
            arena_k, arena_v = self.arena.k[layer], self.arena.v[layer]
            if rope is None:
                arena_k.index_copy_(0, self.rows, k)
                arena_v.index_copy_(0, self.rows, v)
            k, v = arena_k, arena_v
        return attention_with_tiles(q, k, v, self.tiles, scale, kv_cache, self.block_table,
                                    self.long, self.splits)


class AttentionPlan:
    def __init__(self, seqs: list[SequencePlan] | Columns, page_size: int,
                 device: torch.device, arena: KeyArena | None = None,
                 table: PageTable | None = None):
        """``seqs`` as ``SequencePlan``s, or as ``Columns`` whose table rows
        index ``table``."""
        if not isinstance(seqs, Columns):
            table = table if table is not None else PageTable(s.pages for s in seqs)
            seqs = Columns.of(seqs, table)
        cols, self.table, self.device, self.arena = seqs, table, device, arena
        if (cols.local_start > cols.num_pages * page_size).any():
            raise ValueError("a sequence reads keys past its pages")
        lens = cols.q_end - cols.q_start
        starts = np.cumsum(lens) - lens  # packed row of each sequence's first query
        to_packed = starts - cols.q_start  # position p of sequence i: row p + to_packed[i]
        self.num_tokens = int(lens.sum())
        # The most keys (paged prefix and local) of a sequence with queries.
        self.max_keys = int(cols.keys_end[lens > 0].max(initial=0))
        positions = np.arange(self.num_tokens) - np.repeat(to_packed, lens)
        rows = positions + np.repeat(cols.arena_start, lens)
        if arena is not None:
            kv_start = cols.arena_start + cols.local_start
        elif (cols.local_start != cols.q_start).any() or (cols.keys_end != cols.q_end).any():
            raise ValueError("local keys other than the fresh ones need the key arena")
        else:
            kv_start = starts  # the fresh keys, packed as the queries
        # The tile table's columns but the tile offset, per sequence.
        self._seq_cols = (starts, lens, kv_start, cols.keys_end - cols.local_start,
                          cols.local_start, cols.table_row)
        writes = page_writes(cols, to_packed, self.table, page_size)
        logit_rows = cols.logits_at + np.repeat(to_packed, cols.logit_counts)
        self.num_logits, self.num_writes = len(logit_rows), len(writes[0])
        # As the eager kernel did for long canvases without cached keys.
        self.long = (arena is None and not cols.local_start.any()
                     and long_tiles(self.num_tokens, len(lens)))
        # Every int64 input, in one array: one copy to the device.
        self.host = np.concatenate([rows, positions, logit_rows, *writes])
        self._tiles: dict[int, np.ndarray] = {}
        self._tensors: tuple[tuple[int, int], PlanTensors] | None = None

    def sections(self) -> list[int]:
        """Lengths of ``host``'s parts: rows, positions, logit rows, then the
        writes' packed rows, pages and rows in the page."""
        return [self.num_tokens, self.num_tokens, self.num_logits] + [self.num_writes] * 3

    def tiles(self, block_m: int) -> np.ndarray:
        """The attention kernel's tile table ([tiles, 7] int32, ``tile_rows``'
        columns; the last one is the sequence's block-table row)."""
        tiles = self._tiles.get(block_m)
        if tiles is None:
            starts, lens, kv_start, kv_len, prefix, table_rows = self._seq_cols
            counts = -(-lens // block_m)
            seq = np.repeat(np.arange(len(lens)), counts)
            offsets = (np.arange(len(seq)) - np.repeat(np.cumsum(counts) - counts, counts)) * block_m
            tiles = self._tiles[block_m] = np.stack(
                [starts[seq], lens[seq], offsets, kv_start[seq], kv_len[seq], prefix[seq],
                 table_rows[seq]], axis=1).astype(np.int32)
        return tiles

    def tensors(self, block_m: int, splits: int = 1) -> PlanTensors:
        """The plan on its device, for ``block_m`` queries per tile and
        ``splits`` key splits per tile."""
        if self._tensors is None or self._tensors[0] != (block_m, splits):
            parts = to_device(self.host, self.device).split(self.sections())
            tensors = PlanTensors(*parts, to_device(self.tiles(block_m), self.device),
                                  self.table.on(self.device), self.arena, self.long, splits)
            self._tensors = ((block_m, splits), tensors)
        return self._tensors[1]

    def fuses_rope(self, q: torch.Tensor) -> bool:
        """As ``PlanTensors.fuses_rope``."""
        return self.arena is not None and q.is_cuda

    def attend(self, layer: int, q, k, v, scale: float, kv_cache: torch.Tensor,
               rope=None) -> torch.Tensor:
        """The plan handed to the model as is (the tests' forwards)."""
        block_m = tile_block_m(q.shape[-1], q.dtype, q.device, self.long,
                               q.shape[1] // k.shape[1])
        splits = tile_splits(len(self.tiles(block_m)), self.max_keys, q.shape[1], k.shape[1],
                             q.device, self.long)
        return self.tensors(block_m, splits).attend(layer, q, k, v, scale, kv_cache, rope)
