"""SDAR's decoding (JetAstra/SDAR ``generate.py``, ``block_diffusion_generate``
at c2041a8; ``../shared/SDAR-NOTES.md`` sections 5-7), applied to one block:
the arithmetic SDAR's algorithms share (``sequential.py``,
``low_confidence_static.py``, ``low_confidence_dynamic.py``).

Every step draws a token for *every* position of the block (masked or not,
prompt tokens of a partial block too) from the processed distribution:
logits / temperature (unless it is 1), top-k (ties at the k-th kept), top-p
(the token crossing p kept), softmax, then one ``torch.multinomial`` over the
block's [B, vocab] probabilities; a position's confidence is its drawn
token's probability. The official greedy is temperature 1 with top_k 1, so
vLLM's temperature 0 takes the argmax with confidence 1 (no draw).

The draw must consume the request's random stream as the reference does (one
multinomial over [B, vocab] per denoising forward, row-major; notes quirk 4):
a seeded request draws on the CPU from its CPU generator (seeded with the
request's seed, as ``torch.manual_seed`` seeds the reference), the
probabilities going to the CPU for it on a GPU; an unseeded one draws on the
device from the global generator.

The commit functions are batched: ``logits`` [n, B, vocab] and ``masked``
[n, B] hold n blocks that share the step and every knob the algorithm reads
(the denoiser batches them so, ``diffusion/block_causal.py``); a seeded
request's block is always alone (n = 1), drawing from its own generator.

Step i commits ``k = schedule[i]`` positions (``block_length // steps``, one
more for the first ``block_length % steps`` steps). The commits are returned
as a selection over the block and the block's drawn tokens (``apply_commit``)
so that nothing waits for the device. Where the reference would overwrite a
decided token because k exceeds the masks left (notes quirk 6: ``topk`` then
also picks ``-inf`` positions), only masked positions are committed.
"""

import torch
import torch.nn.functional as F


def schedule(block_length: int, steps: int) -> list[int]:
    """Tokens committed at each step (``get_num_transfer_tokens``)."""
    base, remainder = divmod(block_length, steps)
    return [base + (i < remainder) for i in range(steps)]


def quota(step: int, params) -> int:
    """Positions step ``step`` commits. Past the schedule (only when the model
    drew the mask token itself, where the reference raises IndexError, notes
    quirk 7; the denoiser then keeps the mask token from being drawn), all."""
    counts = schedule(params.block_length, params.denoising_steps_per_block)
    return counts[step] if step < len(counts) else params.block_length


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    # k past the vocabulary keeps everything (the reference's topk would raise).
    kth = torch.topk(logits, min(k, logits.shape[-1])).values[..., -1, None]
    return torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop = cumulative > p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses p
    drop[..., 0] = False
    mask = torch.scatter(torch.zeros_like(drop), -1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def draw(logits: torch.Tensor, params, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, confidences) of every position of ``logits`` [..., vocab]:
    the rows of a batch of blocks are drawn as one [positions, vocab]
    multinomial, so one block alone draws exactly as the reference does."""
    shape = logits.shape[:-1]
    if params.temperature == 0:  # the argmax is the same in bf16 and float32
        return logits.argmax(dim=-1), torch.ones(shape, device=logits.device)
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k:
        logits = _top_k(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        logits = _top_p(logits, params.top_p)
    probs = F.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        tokens = torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    else:
        tokens = torch.multinomial(probs, 1, generator=generator)
    return tokens.view(shape), probs.gather(-1, tokens).view(shape)


def top_confidence(confidence: torch.Tensor, masked: torch.Tensor, k: int) -> torch.Tensor:
    """The k most confident masked positions of each block [n, B], as a
    selection (fewer when fewer are masked: quirk 6 left out)."""
    confidence = torch.where(masked, confidence, float("-inf"))
    picked = torch.topk(confidence, min(k, confidence.shape[-1]), dim=-1).indices
    return torch.zeros_like(masked).scatter_(-1, picked, True) & masked


def steps_to_finish(params, num_masked: int) -> int:
    """The steps a block with ``num_masked`` masks takes under a fixed
    schedule (``sequential``, ``low_confidence_static``) when the model never
    draws the mask token itself (then it takes more): the first step at which
    the schedule's commits cover the masks. Before it the denoiser knows the
    block is unfinished without looking."""
    done = 0
    for step, count in enumerate(schedule(params.block_length, params.denoising_steps_per_block)):
        done += count
        if done >= num_masked:
            return step + 1
    return params.denoising_steps_per_block
