"""Dream's ``topk_margin``: masked positions ranked by top-1 minus top-2
probability (``dream.py`` has the rest)."""

import torch

from vllm_omni.diffusion.algorithms.dream import commit_ranked, positions_sampled, sample_tokens
from vllm_omni.diffusion.algorithms.registry import register_algorithm


@register_algorithm("topk_margin", families=("dream",),
                    knobs=("eps", "top_k", "top_p", "alg_temp"), draws_random=positions_sampled)
def topk_margin(logits, masked, step, params, generator):
    probs, tokens, _ = sample_tokens(logits[masked], params, generator)
    top2 = torch.topk(probs, 2, dim=-1).values
    return commit_ranked(top2[:, 0] - top2[:, 1], masked, step, params, tokens, generator)
