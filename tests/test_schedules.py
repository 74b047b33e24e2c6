"""The step schedules against their formulas, for many (n_masked, steps)."""

from types import SimpleNamespace

import pytest
import torch

from vllm_omni.diffusion.algorithms.dream import timesteps, transfer_count, transfer_counts
from vllm_omni.diffusion.algorithms.llada import transfer_schedule

PAIRS = [(n, s) for n in (1, 2, 7, 8, 10, 31, 32, 64, 100, 256) for s in (1, 2, 3, 5, 7, 8, 16, 32, 64) if s <= n]


@pytest.mark.parametrize("n,steps", PAIRS)
def test_llada_schedule(n, steps):
    sched = transfer_schedule(n, steps)
    assert len(sched) == steps and sum(sched) == n
    base, rem = divmod(n, steps)
    assert sched == [base + 1] * rem + [base] * (steps - rem)


@pytest.mark.parametrize("n,steps", PAIRS)
@pytest.mark.parametrize("eps", [1e-3, 0.05])
def test_dream_schedule(n, steps, eps):
    t = torch.linspace(1, eps, steps + 1)
    masked = n
    for i in range(steps):
        k = transfer_count(masked, i, steps, eps)
        if i == steps - 1:
            assert k == masked
        else:
            # int(n_masked * (1 - s/t)) in float32, as Dream computes it.
            want = int(torch.tensor(float(masked)) * (1 - t[i + 1] / t[i]))
            assert k == want and 0 <= k <= masked
        masked -= k
    assert masked == 0
    assert torch.equal(timesteps(steps, eps), t)


@pytest.mark.parametrize("steps", sorted({s for _, s in PAIRS}))
@pytest.mark.parametrize("eps", [1e-3, 0.05])
def test_dream_schedule_on_the_device(steps, eps):
    # The count as a tensor (no look at the device), for every number of
    # masked positions of a 256-long block at once: the host's count.
    params = SimpleNamespace(steps_per_block=steps, eps=eps)
    masked = torch.arange(256)[None, :] < torch.arange(257)[:, None]  # row n: n masked
    for i in range(steps):
        counts = transfer_counts(masked, i, params)
        assert counts.tolist() == [transfer_count(n, i, steps, eps) for n in range(257)]
