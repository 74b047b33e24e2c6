"""SDAR's ``low_confidence_dynamic`` (its default): a step commits every masked
position whose confidence is strictly above ``confidence_threshold`` when
there are at least ``k`` of them (possibly more than k), else the ``k`` most
confident (``sdar.py`` has the rest)."""

import torch

from vllm_omni.diffusion.algorithms.registry import register_algorithm
from vllm_omni.diffusion.algorithms.sdar import draw, quota, top_confidence


@register_algorithm("low_confidence_dynamic", families=("sdar",),
                    knobs=("denoising_steps_per_block", "confidence_threshold", "top_k",
                           "top_p"))
def low_confidence_dynamic(logits, masked, step, params, generator):
    tokens, confidence = draw(logits, params, generator)
    k = quota(step, params)
    high = masked & (confidence > params.confidence_threshold)
    # Chosen on the device: no wait for the count of confident positions.
    enough = high.sum(dim=-1, keepdim=True) >= k
    return torch.where(enough, high, top_confidence(confidence, masked, k)), tokens
