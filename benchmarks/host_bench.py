"""What the CPU host-overhead microbenchmarks (``dream_host_overhead.py``,
``block_host_overhead.py``) share: vLLM's distributed state for one rank in
this process (the denoiser asks for the tensor-parallel size; the tests'
``conftest.one_rank``), and the profiled, timed runs of a denoiser."""

import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import one_rank  # noqa: E402,F401


def profiled_runs(denoiser, make_step, repeat: int) -> tuple[int, float, dict]:
    """One warm-up run of ``make_step()``'s work, then ``repeat`` runs under
    cProfile: (denoiser steps, seconds, pstats' raw stats) of the latter."""
    denoiser.run(make_step())
    profile = cProfile.Profile()
    steps, elapsed = 0, 0.0
    for _ in range(repeat):
        work = make_step()  # built outside the timed part
        before = denoiser.stats.steps
        start = time.perf_counter()
        profile.enable()
        denoiser.run(work)
        profile.disable()
        elapsed += time.perf_counter() - start
        steps += denoiser.stats.steps - before
    return steps, elapsed, pstats.Stats(profile).stats
