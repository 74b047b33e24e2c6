"""LLaDA2's decoding: diffusers' ``BlockRefinementScheduler`` as
``LLaDA2Pipeline`` drives it, one block at a time (``tests/llada2/NOTES.md``
says step by step what the reference does; ``docs/architecture/overview.md``,
"LLaDA2").

Every step draws a token for every block position: greedy (temperature 0)
takes the argmax with its softmax probability as confidence; otherwise
``algorithms/sdar.py``'s draw (temperature, top-k, top-p, one
``torch.multinomial`` over the block on the request's CPU generator when
seeded; the reference's arithmetic and random stream alike).

- A step that begins with masks commits every masked position whose
  confidence is strictly above ``confidence_threshold`` when they are at least
  the step's quota, else the quota's most confident (the quota: the block
  spread over ``denoising_steps_per_block`` steps, nothing past the block
  length).
- Editing (``editing_threshold`` > 0): every step also replaces each decided,
  non-prompt position whose drawn token differs and whose confidence is
  strictly above the editing threshold.
- The block is done after a step when: an eos it committed or edited is the
  block's first eos with no mask before it (unless the request ignores eos);
  or the step began with masks and was the block's last scheduled one; or it
  began with none and editing is off, edited nothing, or was the
  ``max_post_steps`` + 1-th such step. A step that begins with no mask and
  editing off still runs (and draws), as the reference's does, so a seeded
  stream stays in step with it.
"""

import torch

from vllm_omni.diffusion.algorithms.registry import register_algorithm
from vllm_omni.diffusion.algorithms.sdar import draw as sample, schedule, top_confidence


def draw(logits: torch.Tensor, params, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, confidences) of every block position."""
    if params.temperature == 0:
        probs = torch.softmax(logits.float(), dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)
    return sample(logits, params, generator)


def _eos_finished(block, changed, tokens, state) -> torch.Tensor:
    """The reference's eos stop: an eos among this step's commits and edits,
    and no mask before the block's first eos (prompt positions excluded)."""
    eos = state.eos_token_id
    where = torch.arange(block.numel(), device=block.device)
    generated = where >= state.known
    candidates = (block == eos) & generated
    first = torch.where(candidates, where, block.numel()).min()
    masks_before = ((block == state.mask_token_id) & generated & (where < first)).any()
    return (changed & (tokens == eos)).any() & candidates.any() & ~masks_before


@register_algorithm("block_refinement", families=("llada2",),
                    knobs=("denoising_steps_per_block", "confidence_threshold",
                           "editing_threshold", "max_post_steps", "top_k", "top_p"),
                    refines=True)
def block_refinement(logits, masked, step, params, generator, state):
    tokens, confidence = draw(logits, params, generator)
    steps = params.denoising_steps_per_block
    editing = bool(params.editing_threshold)
    if state.had_masks:
        state.mask_steps += 1
        k = schedule(params.block_length, steps)[min(state.mask_steps, steps) - 1]
        high = masked & (confidence > params.confidence_threshold)
        # Chosen on the device: no wait for the count of confident positions.
        commit = torch.where(high.sum() >= k, high, top_confidence(confidence, masked, k))
    else:
        state.post_steps += 1
        commit = torch.zeros_like(masked)
    edit = torch.zeros_like(masked)
    if editing:
        where = torch.arange(masked.numel(), device=masked.device)
        edit = (~masked & (where >= state.known) & (tokens != state.block)
                & (confidence > params.editing_threshold))
    changed = commit | edit
    if state.had_masks:
        done = state.mask_steps >= steps
    else:
        done = not editing or state.post_steps > params.max_post_steps
        if not done:
            done = ~edit.any()
    if state.eos_token_id is not None and done is not True:
        done = _eos_finished(torch.where(changed, tokens, state.block), changed, tokens,
                             state) | done
    state.done = done
    return changed, tokens
