"""Decoding algorithms: which masked positions of the current block to
commit at a denoising step, and with which tokens.

Adding one: a module with a ``select`` function and a line in ``ALGORITHMS``.
"""

from vllm_omni.diffusion.algorithms import low_confidence

# name -> select(logits, masked, num_to_commit, threshold) -> (positions, tokens)
ALGORITHMS = {
    "low_confidence": low_confidence.select,
}
