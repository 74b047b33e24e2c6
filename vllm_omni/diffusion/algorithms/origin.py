"""Dream's ``origin``: each masked position is committed with probability
1 - s/t, drawn at any temperature (``dream.py`` has the schedule). The
draw is one uniform number per masked position, so the denoiser tells the
step how many there are (``num_masked``); the last step commits them all
without a draw. At temperature > 0 the tokens are drawn for the picked
positions only, whose number the host must see (one look per request and
step); at temperature 0 nothing else waits for the device."""

import torch

from vllm_omni.diffusion.algorithms.dream import masked_rows, sample_tokens, transfer_fraction
from vllm_omni.diffusion.algorithms.registry import always, register_algorithm


@register_algorithm("origin", families=("dream",), knobs=("eps", "top_k", "top_p"),
                    draws_random=always, ends_on_schedule=always, counts_masks=always)
def origin(logits, masked, step, params, generator, num_masked=None):
    rows = masked_rows(masked, num_masked)
    p_transfer = transfer_fraction(step, params.steps_per_block, params.eps)
    if p_transfer is None:
        keep = torch.ones(num_masked, dtype=torch.bool, device=masked.device)
    else:
        draw = torch.rand(num_masked, device=logits.device, generator=generator)
        keep = draw < p_transfer
    if params.temperature == 0:
        _, tokens, _ = sample_tokens(logits, params, None)
        selection = torch.zeros_like(masked)
        selection[rows] = keep
        return selection, tokens
    picked = rows[keep]
    _, tokens, _ = sample_tokens(logits[picked], params, generator)
    return picked, tokens
