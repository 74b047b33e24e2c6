"""Dream's ``entropy``: masked positions ranked by negative entropy
(``dream.py`` has the rest)."""

import torch

from vllm_omni.diffusion.algorithms.dream import (commit_ranked, positions_sampled,
                                                  ranked_batch_key, ranked_counts_masks)
from vllm_omni.diffusion.algorithms.registry import always, register_algorithm


def _negative_entropy(probs, chosen):
    return (probs * torch.log(probs + 1e-10)).sum(dim=-1)


@register_algorithm("entropy", families=("dream",),
                    knobs=("eps", "top_k", "top_p", "alg_temp"), draws_random=positions_sampled,
                    ends_on_schedule=always, counts_masks=ranked_counts_masks,
                    batch_key=ranked_batch_key)
def entropy(logits, masked, step, params, generator, num_masked=None):
    return commit_ranked(logits, masked, step, params, generator, num_masked,
                         _negative_entropy)
