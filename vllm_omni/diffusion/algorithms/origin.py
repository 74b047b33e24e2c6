"""Dream's ``origin``: each masked position is committed with probability
1 - s/t, drawn at any temperature (``dream.py`` has the schedule)."""

import torch

from vllm_omni.diffusion.algorithms.dream import sample_tokens, timesteps
from vllm_omni.diffusion.algorithms.registry import always, register_algorithm


@register_algorithm("origin", families=("dream",), knobs=("eps", "top_k", "top_p"),
                    draws_random=always)
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
