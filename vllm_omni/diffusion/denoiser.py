"""The denoising loop: decode the current block of every ready request.

Runner-agnostic: it sees token ids and a ``DiffusionLM``, nothing of vLLM's
scheduler. Requests in different settings and at different steps share each
batched forward; a request leaves the loop as soon as its block is decided.
"""

from dataclasses import dataclass

import torch

from vllm_omni.diffusion.algorithms import ALGORITHMS
from vllm_omni.diffusion.params import DiffusionParams
from vllm_omni.kernels import SequenceBatch


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

    @property
    def block(self) -> torch.Tensor:
        return self.canvas[self.block_start : self.block_start + self.params.block_length]


class Denoiser:
    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self.mask_token_id = model.mask_token_id

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
        active = list(jobs)
        while active:
            logits = self._forward(active)
            offset = 0
            for job in active:
                n = job.params.block_length
                self._step(job, logits[offset : offset + n])
                offset += n
            active = [j for j in active if bool((j.block == self.mask_token_id).any())]
        return {job.req_id: job.block.tolist() for job in jobs}

    def _forward(self, jobs: list[BlockJob]) -> torch.Tensor:
        """One bidirectional forward over all canvases, packed; logits for
        the rows of each job's current block."""
        batch = SequenceBatch.from_lengths([len(j.canvas) for j in jobs])
        input_ids = torch.cat([j.canvas for j in jobs])
        positions = torch.cat(
            [torch.arange(n, device=self.device) for n in batch.lens]
        )
        rows = torch.cat(
            [
                torch.arange(j.block_start, j.block_start + j.params.block_length)
                + start
                for j, start in zip(jobs, batch.starts)
            ]
        ).to(self.device)
        return self.model.denoise_logits(input_ids, positions, batch, rows)

    def _step(self, job: BlockJob, logits: torch.Tensor) -> None:
        block = job.block
        commit = ALGORITHMS[job.params.algorithm]
        positions, tokens = commit(
            logits, block == self.mask_token_id, job.step, job.params, job.generator
        )
        block[positions] = tokens
        job.step += 1
