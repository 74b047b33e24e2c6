"""The denoising loop: decode the current block of every ready request.

Runner-agnostic: it sees token ids and a ``DiffusionLM``, nothing of vLLM's
scheduler. Requests in different settings, cache modes and at different steps
share each batched forward; a request leaves the loop as soon as its block is
decided.

Cache modes (Fast-dLLM, NVlabs/Fast-dLLM ``llada/generate.py``):
- ``none``: every step runs the whole canvas.
- ``prefix``: the block's first step runs the whole canvas and keeps its keys;
  later steps run the block and everything after it, over the kept keys of
  the positions before the block.
- ``dual``: as ``prefix``, but later steps run only the block, over the kept
  keys before and after it.
The kept keys live in the job, so they last one block (one engine step) and
are gone when the step returns.

Memory: requests are decoded in groups whose canvases add up to at most the
engine's token budget (``max_num_batched_tokens``, what vLLM profiled a
forward at), so a forward never packs more tokens than that (unless one canvas
alone is longer), and the kept keys never exceed that many tokens' worth,
the amount the runner reserves while vLLM profiles memory.

Under tensor parallelism every rank runs this loop on the same (all-gathered)
logits; after each step the first rank's blocks are broadcast so no rank can
commit a different position or token.
"""

from dataclasses import dataclass

import torch
from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

from vllm_omni.diffusion.algorithms import ALGORITHMS
from vllm_omni.diffusion.params import DiffusionParams
from vllm_omni.models.attention_plan import AttentionPlan, LayerKV, SequencePlan


@dataclass
class BlockJob:
    """One request's current block: its canvas (prompt, committed blocks,
    masks) and where the block sits in it."""

    req_id: str
    canvas: torch.Tensor  # [prompt + canvas_length] token ids, on the device
    block_start: int
    params: DiffusionParams
    generator: torch.Generator | None = None
    step: int = 0  # denoising steps taken on this block
    cache: LayerKV | None = None  # keys from this block's first step

    @property
    def block_end(self) -> int:
        return self.block_start + self.params.block_length

    @property
    def block(self) -> torch.Tensor:
        return self.canvas[self.block_start : self.block_end]

    def plan(self, logit_shift: int) -> SequencePlan:
        """Which positions this step runs. A family whose logits are shifted
        also runs the position before the block (its output predicts the
        block's first token)."""
        length = len(self.canvas)
        mode = self.params.cache
        if mode == "none" or self.step == 0:
            return SequencePlan(length, 0, length, record=mode != "none")
        q_start = self.block_start - logit_shift
        q_end = length if mode == "prefix" else self.block_end
        return SequencePlan(length, q_start, q_end, cache=self.cache)


class Denoiser:
    def __init__(self, model, device: torch.device, token_budget: int):
        self.model = model
        self.device = device
        self.token_budget = token_budget
        self.mask_token_id = model.mask_token_id
        self.tp_size = get_tensor_model_parallel_world_size()

    def make_job(
        self,
        req_id: str,
        prompt_ids: list[int],
        output_ids: list[int],
        params: DiffusionParams,
        generator: torch.Generator | None = None,
    ) -> BlockJob:
        """The job for a request's next block, rebuilt from the tokens vLLM
        holds for it (so a preempted request resumes where it was)."""
        num_masks = params.canvas_length - len(output_ids)
        canvas = torch.tensor(
            prompt_ids + output_ids + [self.mask_token_id] * num_masks,
            dtype=torch.long,
            device=self.device,
        )
        return BlockJob(req_id, canvas, len(prompt_ids) + len(output_ids), params, generator)

    def run(self, jobs: list[BlockJob]) -> dict[str, list[int]]:
        """Denoise every job's block to completion; return the blocks."""
        group, tokens = [], 0
        for job in jobs:
            if group and tokens + len(job.canvas) > self.token_budget:
                self._decode(group)
                group, tokens = [], 0
            group.append(job)
            tokens += len(job.canvas)
        if group:
            self._decode(group)
        if not jobs:
            return {}
        # One device-to-host copy for all blocks.
        blocks = torch.cat([job.block for job in jobs]).tolist()
        out, offset = {}, 0
        for job in jobs:
            out[job.req_id] = blocks[offset : offset + job.params.block_length]
            offset += job.params.block_length
        return out

    def _decode(self, jobs: list[BlockJob]) -> None:
        active = list(jobs)
        while active:
            logits = self._forward(active)
            offset = 0
            for job in active:
                n = job.params.block_length
                self._step(job, logits[offset : offset + n])
                offset += n
            if self.tp_size > 1:
                self._agree(active)
            # One device sync for the whole batch, not one per request.
            unfinished = torch.stack([(j.block == self.mask_token_id).any() for j in active])
            active = [j for j, more in zip(active, unfinished.tolist()) if more]
        for job in jobs:
            job.cache = None

    def _forward(self, jobs: list[BlockJob]) -> torch.Tensor:
        """One forward over every job's planned positions, packed; logits
        for the rows of each job's current block."""
        shift = self.model.logit_shift
        plan = AttentionPlan([job.plan(shift) for job in jobs])
        input_ids = torch.cat([j.canvas[s.q_start : s.q_end] for j, s in zip(jobs, plan.seqs)])
        rows = torch.cat(
            [
                torch.arange(job.block_start, job.block_end) - seq.q_start + start
                for job, seq, start in zip(jobs, plan.seqs, plan.queries.starts)
            ]
        ).to(self.device)
        logits = self.model.denoise_logits(input_ids, plan.positions(self.device), plan, rows)
        for job, seq, recorded in zip(jobs, plan.seqs, plan.recorded):
            if seq.record:
                job.cache = recorded
        return logits

    @staticmethod
    def _agree(jobs: list[BlockJob]) -> None:
        blocks = get_tp_group().broadcast(torch.cat([j.block for j in jobs]), src=0)
        for job, block in zip(jobs, blocks.split([j.params.block_length for j in jobs])):
            job.block.copy_(block)

    def _step(self, job: BlockJob, logits: torch.Tensor) -> None:
        block = job.block
        commit = ALGORITHMS[job.params.algorithm]
        positions, tokens = commit(
            logits, block == self.mask_token_id, job.step, job.params, job.generator
        )
        block[positions] = tokens
        job.step += 1
