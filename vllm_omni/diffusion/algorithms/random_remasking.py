"""LLaDA's ``random`` remasking: a position's confidence is a uniform draw,
at any temperature (``llada.py`` has the rest)."""

import torch

from vllm_omni.diffusion.algorithms.llada import commit_by_confidence, draw_tokens, fixed_steps
from vllm_omni.diffusion.algorithms.registry import always, register_algorithm


@register_algorithm("random", families=("llada",), knobs=("threshold",),
                    draws_random=always, ends_on_schedule=fixed_steps)
def random_remasking(logits, masked, step, params, generator):
    tokens = draw_tokens(logits, params.temperature, generator)
    confidence = torch.rand(masked.shape, device=logits.device, generator=generator)
    return commit_by_confidence(confidence.to(torch.float64), masked, tokens, step, params)
