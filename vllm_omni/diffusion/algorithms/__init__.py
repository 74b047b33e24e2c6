"""Decoding algorithms: at one denoising step of a block, which masked
positions to commit and with which tokens.

One file per algorithm, which registers itself (``registry.py``); the
families' shared arithmetic lives in ``llada.py``, ``dream.py`` and ``sdar.py``. Every
module of this package is imported here, so adding an algorithm is adding
its file (``docs/architecture/overview.md``, "Knobs and algorithms").
"""

import importlib
import pkgutil

from vllm_omni.diffusion.algorithms.registry import (ALGORITHMS, Algorithm, RefineState,
                                                     algorithms_for, apply_commit,
                                                     register_algorithm)

__all__ = ["ALGORITHMS", "Algorithm", "RefineState", "algorithms_for", "apply_commit",
           "counts_masks",
           "draws_random", "ends_on_schedule", "register_algorithm"]

for _module in pkgutil.iter_modules(__path__, f"{__name__}."):
    importlib.import_module(_module.name)


def draws_random(params) -> bool:
    """Whether a step of this request draws random numbers (sampling at
    temperature > 0, or an algorithm that draws at any temperature)."""
    return params.temperature > 0 or ALGORITHMS[params.algorithm].draws_random(params)


def ends_on_schedule(params) -> bool:
    """Whether a block takes exactly ``steps_per_block`` steps, whatever the
    logits (so the denoiser needs no look at the device to know it is done)."""
    return ALGORITHMS[params.algorithm].ends_on_schedule(params)


def counts_masks(params) -> bool:
    """Whether a step must be told, on the host, how many positions of the
    block are masked (its random draws take that shape)."""
    return ALGORITHMS[params.algorithm].counts_masks(params)
