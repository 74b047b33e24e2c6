"""Decoding algorithms: at one denoising step of a block, which masked
positions to commit and with which tokens.

Each algorithm is a function
``commit(logits, masked, step, params, generator) -> (positions, tokens)``:
``logits`` are the block's rows [block_length, vocab], ``masked`` says which
block positions are still masks, ``step`` counts the steps taken on this
block. Adding one: the function in its family's module and a line here.
"""

from vllm_omni.diffusion.algorithms import dream, llada

ALGORITHMS = {
    "low_confidence": llada.low_confidence,
    "random": llada.random_remasking,
    "maskgit_plus": dream.maskgit_plus,
    "topk_margin": dream.topk_margin,
    "entropy": dream.entropy,
    "origin": dream.origin,
}

# Algorithms that draw random numbers even at temperature 0.
_RANDOM_ALGORITHMS = ("random", "origin")


def draws_random(params) -> bool:
    """Whether a step of this request draws random numbers (sampling at
    temperature > 0, a random ranking, or Dream's sampled positions)."""
    return (params.temperature > 0 or params.algorithm in _RANDOM_ALGORITHMS
            or params.alg_temp > 0)


def ends_on_schedule(params) -> bool:
    """Whether a block takes exactly ``steps_per_block`` steps, whatever the
    logits: LLaDA's quota schedule without a threshold commits a fixed number
    of positions per step (the reference runs a fixed number of steps too).
    The denoiser then needs no look at the block to know it is done."""
    return params.algorithm in ("low_confidence", "random") and params.threshold is None
