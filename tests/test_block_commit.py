"""The block-causal families' batched commits (``diffusion/algorithms/``,
``registry.py``): n blocks committed in one call are committed as each block
alone would be, and ``min_steps`` never lets the denoiser skip the look at a
block that can be finished.

The engine-level exactness of the batches is in the golden tests
(``test_sdar_golden.py``, ``test_fast_dllm_v2_golden.py``: mixed batches);
here the batch and the blocks alone draw from two generators of one seed, so
the comparison also pins down that a batch consumes the random stream as its
blocks one after another do.
"""

import pytest
import torch

from vllm import SamplingParams

from vllm_omni.diffusion.algorithms import ALGORITHMS, algorithms_for
from vllm_omni.diffusion.algorithms.sdar import schedule
from vllm_omni.diffusion.params import resolve_params
from vllm_omni.models import FAMILIES_BY_NAME

VOCAB, MASK = 50, 49


def params_for(family: str, algorithm: str, block: int, **extra):
    knobs = {"algorithm": algorithm, **extra}
    fixed = None  # Fast-dLLM v2's block length is its checkpoint's
    if family == "sdar":
        knobs.update(block_length=block, denoising_steps_per_block=block // 2)
    else:
        fixed = block
    sampling = SamplingParams(temperature=0.7, max_tokens=64, extra_args=knobs)
    return resolve_params(FAMILIES_BY_NAME[family], sampling, {}, None, block_length=fixed)


CASES = [(f, a) for f in ("sdar", "fast_dllm_v2") for a in algorithms_for(f)]


@pytest.mark.parametrize("family,algorithm", CASES)
@pytest.mark.parametrize("step", [0, 1])
def test_a_batch_commits_each_block_as_alone(family, algorithm, step):
    torch.manual_seed(step)
    n, width = 6, 8
    params = params_for(family, algorithm, width)
    # Peaked logits: distinct confidences, so no tie decides a selection.
    logits = 4 * torch.randn(n, width, VOCAB)
    logits[..., MASK] = float("-inf")
    masked = torch.rand(n, width) < 0.7
    masked[:, -1] = True  # every block still has a mask
    commit = ALGORITHMS[algorithm].commit
    together = commit(logits, masked, step, params, torch.Generator().manual_seed(7))
    alone_generator = torch.Generator().manual_seed(7)
    for i in range(n):
        positions, tokens = commit(logits[i : i + 1], masked[i : i + 1], step, params,
                                   alone_generator)
        assert torch.equal(together[0][i], positions[0]), f"block {i}: positions"
        assert torch.equal(together[1][i], tokens[0]), f"block {i}: tokens"
        assert positions[0].any(), "a step commits at least one position"


@pytest.mark.parametrize("algorithm", ["sequential", "low_confidence_static"])
@pytest.mark.parametrize("block,steps", [(4, 4), (4, 2), (8, 3), (5, 2)])
def test_min_steps_is_when_the_schedule_covers_the_masks(algorithm, block, steps):
    sampling = SamplingParams(temperature=0, max_tokens=64, extra_args={
        "algorithm": algorithm, "block_length": block, "denoising_steps_per_block": steps})
    params = resolve_params(FAMILIES_BY_NAME["sdar"], sampling, {}, None)
    min_steps = ALGORITHMS[algorithm].min_steps
    counts = schedule(block, steps)
    for masks in range(1, block + 1):
        # Greedy decoding of a block whose last ``masks`` positions are masked:
        # the step at which the block is finished, taken step by step.
        tokens = torch.arange(block).repeat(1, 1)
        tokens[0, block - masks :] = MASK
        logits = torch.randn(1, block, VOCAB)
        logits[..., MASK] = float("-inf")
        taken = 0
        while (tokens == MASK).any():
            assert taken < len(counts), "the schedule must finish the block"
            positions, drawn = ALGORITHMS[algorithm].commit(logits, tokens == MASK, taken,
                                                            params, None)
            tokens = torch.where(positions, drawn, tokens)
            taken += 1
        assert min_steps(params, masks) == taken, f"{masks} masks"
    assert sum(counts) == block
