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

Where the commit runs, its tie rule and why the random draws are the
reference's: ``docs/architecture/overview.md`` ("Dream's commit"). In short:
a step without random draws runs on the device alone over every row of the
block (or of a batch of blocks), with the count of masked positions a
tensor; a step that draws is told that count by the denoiser (one look per
step for the whole batch), because the draws' shapes follow it.
"""

from functools import lru_cache

import numpy as np
import torch


def timesteps(steps: int, eps: float) -> torch.Tensor:
    # Always on the CPU in float32, as the reference builds them: the same
    # numbers on every device.
    return torch.linspace(1, eps, steps + 1)


@lru_cache(maxsize=4096)
def transfer_fraction(step: int, steps: int, eps: float) -> float | None:
    """1 - s/t of the step in float32 (a float holds it exactly), or None at
    the last step, which commits every masked position."""
    if step >= steps - 1:
        return None
    t = timesteps(steps, eps)
    return float(1 - t[step + 1] / t[step])


def transfer_count(num_masked: int, step: int, steps: int, eps: float) -> int:
    fraction = transfer_fraction(step, steps, eps)
    if fraction is None:
        return num_masked
    # float32 arithmetic as in the reference (a mean of a bool tensor times
    # a float32 tensor), then truncation.
    return int(np.float32(num_masked) * np.float32(fraction))


def transfer_counts(masked: torch.Tensor, step: int, params) -> torch.Tensor:
    """``transfer_count`` of each block in ``masked`` [..., block], on the
    device: the float32 product rounds as the reference's (the fraction is a
    float32 value, so either precision of the kernel's scalar gives the same
    rounding), and int64 truncates as ``int()``."""
    num_masked = masked.sum(dim=-1)
    fraction = transfer_fraction(step, params.steps_per_block, params.eps)
    if fraction is None:
        return num_masked
    return (num_masked.to(torch.float32) * fraction).to(torch.int64)


def select_top(scores: torch.Tensor, masked: torch.Tensor, k) -> torch.Tensor:
    """The ``k`` highest-scoring masked positions of each block, as a bool
    selection [..., block]; ``k`` an int or a tensor [...] on the device.
    The set ``torch.topk`` picks when no two scores tie at the boundary;
    among equal scores the lower position wins, and a decided position is
    never picked."""
    scores = scores.masked_fill(~masked, -torch.inf)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, ranks)
    if isinstance(k, torch.Tensor):
        k = k.unsqueeze(-1)
    return (rank < k) & masked


def masked_rows(masked: torch.Tensor, num_masked: int) -> torch.Tensor:
    """The masked positions of a block in order, given their number (what
    ``masked.nonzero()`` gives, without waiting for the device to count)."""
    order = torch.sort(masked.to(torch.uint8), descending=True, stable=True).indices
    return order[:num_masked]


def draw_top(weights: torch.Tensor, k: int, generator) -> torch.Tensor:
    """``torch.multinomial(weights, k, replacement=False)``, as ATen computes
    it (``aten/src/ATen/native/Distributions.cpp``): one Exp(1) number per
    entry, then the k largest weights / number (the argmax for k = 1). The
    same numbers from the generator, the same picks, without the checks of
    the weights that older PyTorch makes the host wait for."""
    scores = weights / torch.empty_like(weights).exponential_(1, generator=generator)
    if k == 1:
        return scores.argmax(dim=-1, keepdim=True)
    return torch.topk(scores, k).indices


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
    """(probabilities, tokens, chosen-token probability) after filtering,
    row by row over any leading dimensions. At temperature > 0 the tokens
    are drawn as ``torch.multinomial(probs, 1)`` draws them (``draw_top``)."""
    if params.temperature > 0:
        logits = logits / params.temperature
    if params.top_p is not None and params.top_p < 1:
        logits = _top_p(logits, params.top_p)
    if params.top_k:
        logits = _top_k(logits, params.top_k)
    probs = torch.softmax(logits, dim=-1)
    if params.temperature > 0:
        tokens = draw_top(probs, 1, generator).squeeze(-1)
        chosen = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        chosen, tokens = probs.max(dim=-1)
    return probs, tokens, chosen


def commit_ranked(logits, masked, step, params, generator, num_masked, confidence):
    """A ranked algorithm's step: ``confidence(probs, chosen)`` ranks the
    positions. ``num_masked`` None: no random draws (greedy, alg_temp 0),
    ``logits`` [..., block, vocab] of one block or a batch, every row, all
    on the device (``select_top``). Otherwise the draws take the reference's
    shapes, known from ``num_masked``: the tokens' over the masked rows
    [num_masked, vocab], then (alg_temp > 0, only when the step commits
    any) the positions' over the block (``draw_top``); the picks are
    ``torch.topk``'s, as before, less any decided position."""
    if num_masked is None:
        probs, tokens, chosen = sample_tokens(logits, params, None)
        counts = transfer_counts(masked, step, params)
        return select_top(confidence(probs, chosen), masked, counts), tokens
    rows = masked_rows(masked, num_masked)
    probs, drawn, chosen = sample_tokens(logits[rows], params, generator)
    k = transfer_count(num_masked, step, params.steps_per_block, params.eps)
    if k == 0:
        return rows[:0], drawn[:0]
    full = torch.full(masked.shape, -torch.inf, dtype=probs.dtype, device=masked.device)
    full[rows] = confidence(probs, chosen)
    if params.alg_temp:
        picked = draw_top(torch.softmax(full / params.alg_temp, dim=-1), k, generator)
    else:
        picked = torch.topk(full, k).indices
    tokens = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    tokens[rows] = drawn
    return torch.zeros_like(masked).index_fill_(0, picked, True) & masked, tokens


def ranked_counts_masks(params) -> bool:
    """A ranked step draws random numbers (tokens at temperature > 0,
    positions at alg_temp > 0) whose shapes follow the number of masked
    positions: the denoiser counts them for it."""
    return params.temperature > 0 or params.alg_temp > 0


def ranked_batch_key(params):
    """Steps without draws of blocks of the same shape and filters commit as
    one batch (the step index and algorithm are the denoiser's part of the key)."""
    if ranked_counts_masks(params):
        return None
    return (params.block_length, params.steps_per_block, params.eps, params.top_k,
            params.top_p)


def positions_sampled(params) -> bool:
    """Ranked algorithms draw their positions at alg_temp > 0."""
    return params.alg_temp > 0
