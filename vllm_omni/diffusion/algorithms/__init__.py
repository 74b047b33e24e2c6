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
