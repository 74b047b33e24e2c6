"""SDAR's ``low_confidence_static``: step i commits the ``k`` most confident
masked positions (``sdar.py`` has the rest)."""

from vllm_omni.diffusion.algorithms.registry import register_algorithm
from vllm_omni.diffusion.algorithms.sdar import draw, quota, steps_to_finish, top_confidence


@register_algorithm("low_confidence_static", families=("sdar",),
                    knobs=("denoising_steps_per_block", "top_k", "top_p"),
                    min_steps=steps_to_finish)
def low_confidence_static(logits, masked, step, params, generator):
    tokens, confidence = draw(logits, params, generator)
    return top_confidence(confidence, masked, quota(step, params)), tokens
