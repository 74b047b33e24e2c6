"""Dream's decoding (HKUNLP/Dream ``generation_utils.py``, ``_sample`` and
``sample_tokens``), applied to one block (by default the whole canvas): the
arithmetic Dream's algorithms share (``maskgit_plus.py``, ``topk_margin.py``,
``entropy.py``, ``origin.py``).

Step i of a block of ``steps`` uses the times t = T[i], s = T[i+1] of
``T = linspace(1, eps, steps + 1)``. Confidences come from the probabilities
*after* temperature, top-p and top-k filtering (also at temperature 0), on the
masked positions only. ``maskgit_plus`` ranks by the chosen token's
probability, ``topk_margin`` by top-1 minus top-2 probability, ``entropy`` by
negative entropy; they commit ``int(n_masked * (1 - s/t))`` positions (all
that remain at the last step), the most confident ones, or drawn from
softmax(confidence / alg_temp). ``origin`` commits each masked position with
probability 1 - s/t.
"""

import torch


def timesteps(steps: int, eps: float) -> torch.Tensor:
    # Always on the CPU in float32, as the reference builds them: the same
    # numbers on every device.
    return torch.linspace(1, eps, steps + 1)


def transfer_count(num_masked: int, step: int, steps: int, eps: float) -> int:
    if step >= steps - 1:
        return num_masked
    t = timesteps(steps, eps)
    fraction = 1 - t[step + 1] / t[step]
    # float32 arithmetic as in the reference (a mean of a bool tensor).
    return int(torch.tensor(num_masked, dtype=torch.float32) * fraction)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cumulative > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
    drop[..., 0] = False
    mask = torch.zeros_like(drop).scatter_(-1, order, drop)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(logits, params, generator):
    """(probabilities, tokens, chosen-token probability) after filtering."""
    if params.temperature > 0:
        logits = logits / params.temperature
    if params.top_p is not None and params.top_p < 1:
        logits = _top_p(logits, params.top_p)
    if params.top_k:
        logits = _top_k(logits, params.top_k)
    probs = torch.softmax(logits, dim=-1)
    if params.temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        chosen = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        chosen, tokens = probs.max(dim=-1)
    return probs, tokens, chosen


def commit_ranked(confidence, masked, step, params, tokens, generator):
    rows = masked.nonzero().squeeze(-1)
    k = transfer_count(rows.numel(), step, params.steps_per_block, params.eps)
    if k == 0:
        return rows[:0], tokens[:0]
    full = torch.full(masked.shape, -torch.inf, dtype=confidence.dtype, device=masked.device)
    full[rows] = confidence
    if params.alg_temp:
        weights = torch.softmax(full / params.alg_temp, dim=-1)
        picked = torch.multinomial(weights, k, generator=generator)
    else:
        picked = torch.topk(full, k).indices
    block_tokens = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    block_tokens[rows] = tokens
    return picked, block_tokens[picked]


def positions_sampled(params) -> bool:
    """Ranked algorithms draw their positions at alg_temp > 0."""
    return params.alg_temp > 0
