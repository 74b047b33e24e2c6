"""The plans of a block-causal engine step's forwards (``block_causal.py``;
``docs/architecture/overview.md``, "Block-causal families" and "The attention
plan").

A forward packs, in this order:
- a **store sequence** per finished block ``[s, s + B)`` of the requests that
  store: its queries attend to the pages ``[0, s)`` and to the block, and each
  layer writes the block's keys and values to the pages first. The last row
  of an awaiting request's last store gets logits (its block's AR token);
- a **decode sequence** per active request: its block over the pages before
  it and the block itself (with the block cache, a step whose sub-block
  starts with a decided token runs only the sub-block's queries, over the
  pages and the arena's block); the window's positions get logits. A later
  block in flight (multi-block, ``multi_block.py``) reads its local keys
  from ``keys_from``, the first block in flight, through the key arena;
- a **rider** sequence per finished block still in flight (multi-block):
  as a decode sequence, without logits (the blocks after it read its keys).
So the logits come as the AR rows of the awaiting requests, then the
windows of the active ones.

Token rows (the sequences' ``arena_start``): a decoding request's block
lives at rows ``[arena_row, + B)`` of the group's token buffer, which
``BlockWork.block`` views, so the commits update it in place and each forward
gathers its input ids from there (a CUDA graph replays with nothing copied
in); the stores' tokens are copied in after the blocks, for the forward that
stores them. With the block cache the key arena uses the same rows.

The sequences are built as the plan's columns, vectorised over requests (a
forward packs hundreds). A group's forwards share one ``PageTable``, and a
forward with only decode sequences laid out as the last one (a block's later
steps, while the windows stay put) reuses its plan: neither the plan nor the
graphs' inputs are built again.
"""


import numpy as np
import torch

from vllm_omni.models.attention_plan import (AttentionPlan, Columns, KeyArena, PageTable,
                                             to_device)


def _ints(values) -> np.ndarray:
    return np.array(values, np.int64)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``starts[i] + 0..counts[i]-1`` for each i, flat."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts - starts, counts)


class BlockPlans:
    def __init__(self, device: torch.device, rows: int, mask_token_id: int, logit_shift: int):
        self.device = device
        self.rows = rows  # token rows a group may use; row ``rows`` is padding's
        self.mask_token_id = mask_token_id
        self.logit_shift = logit_shift
        # Allocated on first need, outside vLLM's sleep-mode pools: the spare
        # row must stay a valid token id for padded graph rows. One more row
        # holds the mask id for ``first_masks``.
        self.tokens: torch.Tensor | None = None
        self._table: PageTable | None = None
        self._key = self._plan = None
        self._looks = None  # (works' ids, their rows for first_masks)

    def start_group(self, works, block_rows: int) -> None:
        """A new group: its page table; its blocks' rows ``[0, block_rows)``
        all masks (``BlockWork.block`` views them)."""
        if self.tokens is None:
            self.tokens = torch.zeros(self.rows + 2, dtype=torch.long, device=self.device)
            self.tokens[-1] = self.mask_token_id
        self.tokens[:block_rows].fill_(self.mask_token_id)
        self._table = PageTable(w.pages for w in works)
        self._key = self._plan = self._looks = None

    def block(self, work) -> torch.Tensor:
        """The rows of the work's block."""
        return self.tokens[work.arena_row : work.arena_row + work.block_length]

    def windows(self, works) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The token rows of the works' windows (``BlockWork.window``, all of
        one width) as [n, width]: a view of the token buffer when they lie
        back to back (a batch of whole blocks), else a gathered copy with its
        row index, which ``write_windows`` writes back through."""
        lows = _ints([w.arena_row + w.window()[0] for w in works])
        width = works[0].window()[1] - works[0].window()[0]
        start = int(lows[0])
        if np.array_equal(lows, start + width * np.arange(len(works))):
            return self.tokens[start : start + width * len(works)].view(len(works), width), None
        index = to_device(lows[:, None] + np.arange(width), self.device)
        return self.tokens[index], index

    def write_windows(self, windows: torch.Tensor, index: torch.Tensor | None,
                      values: torch.Tensor) -> None:
        if index is None:
            windows.copy_(values)
        else:
            self.tokens[index] = values

    def first_masks(self, works, flags=(), extra=None) -> tuple[list[int], list[bool], list[int]]:
        """Each work's first masked block position (its block length: none),
        for all of them in one look at the device: a gather of their blocks'
        rows, each followed by the mask row (the rows are kept while the same
        works ask, as in a block's steps). ``flags`` (device or host bools)
        and ``extra`` (device ints) come back with them, read in the same
        look."""
        key = tuple(map(id, works))
        if self._looks is None or self._looks[0] != key:
            lengths = _ints([w.block_length for w in works])
            cols = np.arange(int(lengths.max()) + 1)
            rows = np.where(cols < lengths[:, None],
                            _ints([w.arena_row for w in works])[:, None] + cols, self.rows + 1)
            self._looks = (key, to_device(rows, self.device))
        blocks = self.tokens[self._looks[1]]
        firsts = (blocks == self.mask_token_id).int().argmax(1)
        if not flags and extra is None:
            return firsts.tolist(), [], []
        parts, n = [firsts], len(works)
        if flags:
            flags = torch.stack([torch.as_tensor(f, device=firsts.device) for f in flags])
            parts.append(flags.to(firsts.dtype))
        if extra is not None:
            parts.append(extra.to(firsts.dtype))
        values = torch.cat(parts).tolist()
        m = n + len(flags)
        return values[:n], [bool(v) for v in values[n:m]], values[m:]

    def plan(self, stores, active, awaiting, store_row: int, page_size: int,
             arena: KeyArena | None, riders=()) -> AttentionPlan:
        """The forward of ``stores``' blocks, ``active``'s denoising steps,
        ``awaiting``'s AR tokens and ``riders``' keys; stores' token rows
        start at ``store_row``."""
        key = None
        if not stores and not awaiting:
            key = (tuple(map(id, active)), self._windows(active), tuple(map(id, riders)))
            if key == self._key:
                return self._plan
        parts = []
        if stores:
            parts.append(self._stores(stores, awaiting, store_row))
        if active:
            parts.append(self._decodes(active, arena is not None))
        if riders:
            parts.append(self._riders(riders))
        plan = AttentionPlan(Columns.concat(parts), page_size, self.device, arena, self._table)
        self._key, self._plan = key, plan
        return plan

    def _pages(self, works) -> tuple[np.ndarray, np.ndarray]:
        """Each work's row of the group's page table, and its page count."""
        return (_ints([self._table.row(w.pages) for w in works]),
                _ints([len(w.pages) for w in works]))

    def _stores(self, stores, awaiting, row: int) -> Columns:
        length = _ints([w.block_length for w in stores])
        first = _ints([w.store_start for w in stores])
        end = _ints([w.store_end for w in stores])
        blocks = (end - first) // length
        work = np.repeat(np.arange(len(stores)), blocks)  # each block's work
        length = length[work]
        q_start = first[work] + _ranges(np.zeros(len(stores), np.int64), blocks) * length
        rows = row + np.cumsum(length) - length  # the token row of each block's start
        if rows[-1] + length[-1] > self.rows:
            raise RuntimeError(f"{rows[-1] + length[-1]} token rows needed, {self.rows} "
                               "allocated")
        ids = torch.from_numpy(np.concatenate(
            [w.tokens[w.store_start : w.store_end] for w in stores]).astype(np.int64))
        if self.device.type == "cuda":  # pinned: the host need not wait for the GPU
            ids = ids.pin_memory()
        self.tokens[row : row + len(ids)].copy_(ids, non_blocking=True)
        # An awaiting work's AR token: the output of its last stored position.
        ar = {id(w) for w in awaiting}
        counts = np.zeros(len(work), np.int64)
        last = np.cumsum(blocks) - 1
        waits = np.array([id(w) in ar for w in stores], bool)
        counts[last[waits]] = 1
        table_row, num_pages = self._pages(stores)
        q_end = q_start + length
        return Columns(q_start, q_end, q_start, q_end, rows - q_start, table_row[work],
                       num_pages[work], q_start, q_end, counts, end[waits] - 1)

    def _windows(self, active) -> np.ndarray:
        """Per work: (lo, hi) of its window in the block and whether the step
        runs only that sub-block (``BlockWork.window``, ``sub_block_step``)."""
        if not any(w.params.small_block_size or w.block_cache for w in active):
            return None  # every window is the whole block
        return tuple((*w.window(), w.sub_block_step()) for w in active)

    def _decodes(self, active, arena: bool) -> Columns:
        s = _ints([w.store_end for w in active])
        end = s + _ints([w.block_length for w in active])
        windows = self._windows(active)
        if windows is None:
            lo, hi, sub = np.zeros_like(s), end - s, np.zeros(len(s), bool)
        else:
            lo, hi, sub = (np.array(c) for c in zip(*windows))
        # A sub-block step's queries are the window; the block's other keys
        # are in the arena (block cache), read as local keys from s on.
        q_start = np.where(sub, s + lo, s)
        q_end = np.where(sub, s + hi, end)
        counts = hi - lo
        logits_at = _ranges(s + lo, counts)
        if self.logit_shift:  # position p from the output at p - shift, a query's at least
            logits_at = np.maximum(logits_at - self.logit_shift, np.repeat(q_start, counts))
        table_row, num_pages = self._pages(active)
        keys = _keys_from(active) if arena else s
        return Columns(q_start, q_end, keys, end, _ints([w.arena_row for w in active]) - s,
                       table_row, num_pages, s, s, counts, logits_at)

    def _riders(self, riders) -> Columns:
        """Finished blocks in flight: their queries give the keys the later
        blocks read; no logits, nothing written."""
        s = _ints([w.store_end for w in riders])
        end = s + _ints([w.block_length for w in riders])
        table_row, num_pages = self._pages(riders)
        none = np.zeros(len(s), np.int64)
        return Columns(s, end, _keys_from(riders), end, _ints([w.arena_row for w in riders]) - s,
                       table_row, num_pages, s, s, none, np.zeros(0, np.int64))


def _keys_from(works) -> np.ndarray:
    """Where each decode sequence's local keys start (``BlockWork.keys_from``)."""
    return _ints([w.store_end if w.keys_from is None else w.keys_from for w in works])
