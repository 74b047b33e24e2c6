"""LLaDA's decoding (ML-GSAI/LLaDA ``generate.py``) with Fast-dLLM's
confidence-threshold parallel decoding (NVlabs/Fast-dLLM ``llada/generate.py``,
``get_transfer_index``).

Each step gives every masked position of the block a token (greedy, or
Gumbel-max in float64 at temperature > 0) and a confidence: its softmax
probability in float64 (``low_confidence``) or a uniform draw (``random``).
Without a threshold the step's quota of most confident positions is
committed, the quota following ``transfer_schedule``; with one, the most
confident position always is, plus every other one reaching the threshold.
"""

import torch


def transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """Tokens committed at each step of a block: as even as possible, the
    remainder going to the first steps (LLaDA's ``get_num_transfer_tokens``)."""
    base, remainder = divmod(num_masked, steps)
    return [base + (i < remainder) for i in range(steps)]


def _tokens(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits.to(torch.float64).exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)


def _commit(confidence, masked, tokens, step, params):
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


def low_confidence(logits, masked, step, params, generator):
    tokens = _tokens(logits, params.temperature, generator)
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return _commit(confidence, masked, tokens, step, params)


def random_remasking(logits, masked, step, params, generator):
    tokens = _tokens(logits, params.temperature, generator)
    confidence = torch.rand(masked.shape, device=logits.device, generator=generator)
    return _commit(confidence.to(torch.float64), masked, tokens, step, params)
