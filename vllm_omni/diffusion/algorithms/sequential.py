"""SDAR's ``sequential``: step i commits the ``k`` positions from the block's
first mask on, whatever their confidence (``sdar.py`` has the rest)."""

import torch

from vllm_omni.diffusion.algorithms.registry import register_algorithm
from vllm_omni.diffusion.algorithms.sdar import draw, quota, steps_to_finish


@register_algorithm("sequential", families=("sdar",),
                    knobs=("denoising_steps_per_block", "top_k", "top_p"),
                    min_steps=steps_to_finish)
def sequential(logits, masked, step, params, generator):
    tokens, _ = draw(logits, params, generator)
    where = torch.arange(masked.shape[-1], device=masked.device)
    first = masked.int().argmax(dim=-1, keepdim=True)  # the first mask (a decoded block has one)
    return (where >= first) & (where < first + quota(step, params)), tokens
