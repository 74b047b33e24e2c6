"""The engine step of a block-causal family (SDAR): store finished blocks'
keys in vLLM's KV pages, then decode each ready request's next block.

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
from vllm_omni.models.attention_plan import AttentionPlan, SequencePlan


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
    block: torch.Tensor | None = field(default=None, repr=False)  # on the device
    step: int = 0  # denoising steps taken on the block

    @property
    def block_length(self) -> int:
        return self.params.block_length

    @property
    def num_known(self) -> int:
        """Known tokens inside the decoded block (a prompt's partial block)."""
        return len(self.tokens) - self.store_end

    def store_blocks(self) -> range:
        return range(self.store_start, self.store_end, self.block_length)

    def num_tokens(self) -> int:
        """Query tokens of its first forward."""
        return self.store_end - self.store_start + (self.block_length if self.decode else 0)


class BlockCausalDenoiser:
    def __init__(self, model, device: torch.device, token_budget: int):
        self.stats = StepStats()
        self.model = model
        self.device = device
        self.token_budget = token_budget
        self.mask_token_id = model.mask_token_id
        self.tp_size = get_tensor_model_parallel_world_size()

    def page_size(self) -> int:
        return self.model.kv_cache_page_size()

    def allocate_arena(self) -> None:
        """No key arena: every key a forward reads is in vLLM's pages or its own."""

    def release_graphs(self) -> None:
        """No CUDA graphs of this mode yet (``docs/architecture/overview.md``)."""

    def run(self, works: list[BlockWork]) -> dict[str, list[int]]:
        """Store every work's blocks and decode the ready ones; returns each
        decoded request's new tokens (the block past its known tokens)."""
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
            out[work.req_id] = blocks[offset + work.num_known : offset + work.block_length]
            offset += work.block_length
        return out

    def _run_group(self, works: list[BlockWork]) -> None:
        active = [w for w in works if w.decode]
        for work in active:
            known = work.tokens[work.store_end :]
            block = known + [self.mask_token_id] * (work.block_length - len(known))
            work.block = torch.tensor(block, device=self.device)
        stores = [w for w in works if w.store_end > w.store_start]
        while stores or active:
            start = time.perf_counter()
            logits = self._forward(stores, active)
            stores = []
            offset = 0
            for work in active:
                n = work.block_length
                self._step(work, logits[offset : offset + n])
                offset += n
            if self.tp_size > 1 and any(w.generator is None and draws_random(w.params)
                                        for w in active):
                self._agree(active)
            issued = time.perf_counter()
            if active:  # one look at the device for the whole batch
                unfinished = torch.stack([(w.block == self.mask_token_id).any() for w in active])
                active = [w for w, more in zip(active, unfinished.tolist()) if more]
            self.stats.record(False, issued - start, time.perf_counter() - start)

    def _forward(self, stores: list[BlockWork], active: list[BlockWork]):
        """One forward: the store sequences of ``stores``, then a decode
        sequence per active job; logits of the decode rows only."""
        seqs, ids = [], []
        for work in stores:
            for s in work.store_blocks():
                end = s + work.block_length
                seqs.append(SequencePlan(end, s, end, work.pages, write=(s, end)))
                ids.append(torch.tensor(work.tokens[s:end]))
        num_stores = len(seqs)
        for work in active:
            s = work.store_end
            seqs.append(SequencePlan(s + work.block_length, s, s + work.block_length, work.pages))
        stored = [torch.cat(ids).to(self.device)] if ids else []
        input_ids = torch.cat(stored + [w.block for w in active])
        positions = torch.cat([torch.arange(s.q_start, s.q_end) for s in seqs]).to(self.device)
        plan = AttentionPlan(seqs, self.page_size(), self.device)
        rows = torch.cat([torch.arange(start, start + s.num_queries) for s, start in
                          zip(seqs[num_stores:], plan.queries.starts[num_stores:])]
                         or [torch.zeros(0, dtype=torch.long)]).to(self.device)
        self.stats.forward_tokens += len(positions)
        return self.model.denoise_logits(input_ids, positions, plan, rows)

    def _step(self, work: BlockWork, logits: torch.Tensor) -> None:
        masked = work.block == self.mask_token_id
        if work.step >= work.params.denoising_steps_per_block:
            # Only when the model drew the mask token itself, past the
            # reference's schedule (where it raises): no longer drawn, so
            # this step commits every masked position.
            logits = logits.clone()
            logits[:, self.mask_token_id] = float("-inf")
        commit = ALGORITHMS[work.params.algorithm].commit
        positions, tokens = commit(logits, masked, work.step, work.params, work.generator)
        apply_commit(work.block, positions, tokens)
        work.step += 1

    @staticmethod
    def _agree(works: list[BlockWork]) -> None:
        blocks = get_tp_group().broadcast(torch.cat([w.block for w in works]), src=0)
        for work, block in zip(works, blocks.split([w.block_length for w in works])):
            work.block.copy_(block)
