"""Fast-dLLM v2's decoding step (the checkpoint's ``modeling.py``: ``generate``
and ``sample_with_top_p``; ``tests/fast_dllm_v2/NOTES.md`` section 3 and 7).

The denoiser hands over the rows of the current sub-block only (the one
holding the block's first mask, ``small_block_size`` wide), already shifted
(position j read from the output at j - 1), masked or not: the reference
draws for all of them, so the random stream is consumed as its is.

- Greedy (temperature 0): ``p = softmax(logits)`` over the whole vocabulary,
  token = argmax p, confidence = max p.
- Sampling: ``softmax(logits / T)``, top-p (tokens past the cumulative
  ``top_p`` dropped, the one crossing it kept, renormalised), one
  ``torch.multinomial`` over the sub-block's [S, vocab] rows; confidence is
  the drawn token's renormalised probability.
- Every masked position whose confidence is strictly above
  ``unmask_threshold`` is committed, plus the most confident masked one (the
  lowest on a tie), so a step commits at least one token.

The arithmetic stays in the logits' dtype as the reference's does (bf16 for
the released model: its confidences saturate at 1.0 there, quirk 6). The
top-p filter runs even at top_p 1, as the reference's always does (rounding
in the cumulative sum can drop tail tokens). A seeded request draws on the
CPU from its CPU generator, as ``algorithms/sdar.py`` does, so its stream is
the reference's under ``torch.manual_seed``.
"""

import torch

from vllm_omni.diffusion.algorithms.registry import register_algorithm


def _top_p_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    drop = torch.cumsum(sorted_probs, dim=-1) > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
    drop[..., 0] = False
    probs = probs.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), 0)
    return probs / probs.sum(dim=-1, keepdim=True)


def draw(logits: torch.Tensor, params, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, confidences) of every row of ``logits`` [..., vocab] (a batch
    of sub-blocks draws as one [rows, vocab] multinomial)."""
    shape = logits.shape[:-1]
    logits = logits.reshape(-1, logits.shape[-1])
    if params.temperature == 0:
        probs = torch.softmax(logits, dim=-1)
        tokens = probs.argmax(dim=-1)
    else:
        top_p = 1.0 if params.top_p is None else params.top_p
        probs = _top_p_probs(logits, params.temperature, top_p)
        if generator is not None and generator.device != probs.device:
            tokens = torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
        else:
            tokens = torch.multinomial(probs, 1, generator=generator)
        tokens = tokens.squeeze(-1)
    return tokens.view(shape), probs.gather(-1, tokens[:, None]).view(shape)


@register_algorithm("parallel_threshold", families=("fast_dllm_v2",),
                    knobs=("unmask_threshold", "top_p"))
def parallel_threshold(logits, masked, step, params, generator):
    tokens, confidence = draw(logits, params, generator)
    confidence = torch.where(masked, confidence, float("-inf"))
    commit = confidence > params.unmask_threshold
    # The most confident masked one of each sub-block, on the device (no wait
    # for the count).
    commit.scatter_(-1, confidence.argmax(dim=-1, keepdim=True), True)
    return commit & masked, tokens
