"""LLaDA's ``low_confidence`` remasking: a position's confidence is the
softmax probability (float64) of its token (``llada.py`` has the rest)."""

import torch

from vllm_omni.diffusion.algorithms.llada import commit_by_confidence, draw_tokens, fixed_steps
from vllm_omni.diffusion.algorithms.registry import register_algorithm


@register_algorithm("low_confidence", families=("llada",), knobs=("threshold",),
                    ends_on_schedule=fixed_steps)
def low_confidence(logits, masked, step, params, generator):
    tokens = draw_tokens(logits, params.temperature, generator)
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return commit_by_confidence(confidence, masked, tokens, step, params)
