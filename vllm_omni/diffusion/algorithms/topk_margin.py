"""Dream's ``topk_margin``: masked positions ranked by top-1 minus top-2
probability (``dream.py`` has the rest)."""

import torch

from vllm_omni.diffusion.algorithms.dream import (commit_ranked, positions_sampled,
                                                  ranked_batch_key, ranked_counts_masks)
from vllm_omni.diffusion.algorithms.registry import always, register_algorithm


def _margin(probs, chosen):
    top2 = torch.topk(probs, 2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@register_algorithm("topk_margin", families=("dream",),
                    knobs=("eps", "top_k", "top_p", "alg_temp"), draws_random=positions_sampled,
                    ends_on_schedule=always, counts_masks=ranked_counts_masks,
                    batch_key=ranked_batch_key)
def topk_margin(logits, masked, step, params, generator, num_masked=None):
    return commit_ranked(logits, masked, step, params, generator, num_masked, _margin)
