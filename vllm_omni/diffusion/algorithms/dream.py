"""Dream's decoding (HKUNLP/Dream ``generation_utils.py``, ``_sample`` and
``sample_tokens``), applied to one block (by default the whole canvas).

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


def _commit_ranked(confidence, masked, step, params, tokens, generator):
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


def maskgit_plus(logits, masked, step, params, generator):
    _, tokens, chosen = sample_tokens(logits[masked], params, generator)
    return _commit_ranked(chosen, masked, step, params, tokens, generator)


def topk_margin(logits, masked, step, params, generator):
    probs, tokens, _ = sample_tokens(logits[masked], params, generator)
    top2 = torch.topk(probs, 2, dim=-1).values
    return _commit_ranked(top2[:, 0] - top2[:, 1], masked, step, params, tokens, generator)


def entropy(logits, masked, step, params, generator):
    probs, tokens, _ = sample_tokens(logits[masked], params, generator)
    negative_entropy = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    return _commit_ranked(negative_entropy, masked, step, params, tokens, generator)


def origin(logits, masked, step, params, generator):
    rows = masked.nonzero().squeeze(-1)
    if step >= params.steps_per_block - 1:
        chosen = rows
    else:
        t = timesteps(params.steps_per_block, params.eps)
        p_transfer = float(1 - t[step + 1] / t[step])
        draw = torch.rand(rows.numel(), device=logits.device, generator=generator)
        chosen = rows[draw < p_transfer]
    _, tokens, _ = sample_tokens(logits[chosen], params, generator)
    return chosen, tokens
