"""LLaDA's decoding (ML-GSAI/LLaDA ``generate.py``) with Fast-dLLM's
confidence-threshold parallel decoding (NVlabs/Fast-dLLM ``llada/generate.py``,
``get_transfer_index``).

The arithmetic LLaDA's algorithms share (``low_confidence.py``,
``random_remasking.py``): each step gives every masked position of the block a
token (greedy, or Gumbel-max in float64 at temperature > 0) and a confidence
(the algorithm's). Without a threshold the step's quota of most confident
positions is committed, the quota following ``transfer_schedule``; with one,
the most confident position always is, plus every other one reaching the
threshold.
"""

import torch


def transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """Tokens committed at each step of a block: as even as possible, the
    remainder going to the first steps (LLaDA's ``get_num_transfer_tokens``)."""
    base, remainder = divmod(num_masked, steps)
    return [base + (i < remainder) for i in range(steps)]


def draw_tokens(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits.to(torch.float64).exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)


def commit_by_confidence(confidence, masked, tokens, step, params):
    confidence = torch.where(masked, confidence, -torch.inf)
    if params.threshold is None:
        quota = transfer_schedule(params.block_length, params.steps_per_block)[step]
        positions = torch.topk(confidence, quota).indices
    else:
        ranked = torch.topk(confidence, int(masked.sum())).indices
        keep = confidence[ranked] >= params.threshold
        keep[0] = True
        positions = ranked[keep]
    return positions, tokens[positions]


def fixed_steps(params) -> bool:
    """Without a threshold a block takes exactly ``steps_per_block`` steps (the
    reference runs a fixed number of steps too)."""
    return params.threshold is None
