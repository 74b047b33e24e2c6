"""LLaDA's low-confidence remasking (ML-GSAI/LLaDA ``generate.py``), with the
confidence-threshold parallel decoding of Fast-dLLM (NVlabs/Fast-dLLM
``llada/generate.py``, ``get_transfer_index``).

At each step every masked position of the current block gets the greedy token
and its softmax probability (in float64) as confidence. Without a threshold the
``num_to_commit`` most confident positions are committed; with one, the most
confident position always is, plus every other one whose confidence reaches
the threshold.
"""

import torch


def transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """Tokens committed at each step of a block: as even as possible, the
    remainder going to the first steps (LLaDA's ``get_num_transfer_tokens``)."""
    base, remainder = divmod(num_masked, steps)
    return [base + (i < remainder) for i in range(steps)]


def select(
    logits: torch.Tensor,  # [block_length, vocab] for the current block
    masked: torch.Tensor,  # [block_length] bool
    num_to_commit: int,
    threshold: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = logits.argmax(dim=-1)
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    confidence = torch.where(masked, confidence, -torch.inf)
    if threshold is None:
        positions = torch.topk(confidence, num_to_commit).indices
    else:
        ranked = torch.topk(confidence, int(masked.sum())).indices
        keep = confidence[ranked] >= threshold
        keep[0] = True
        positions = ranked[keep]
    return positions, tokens[positions]
