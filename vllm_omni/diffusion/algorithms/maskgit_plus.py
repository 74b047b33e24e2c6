"""Dream's ``maskgit_plus``: masked positions ranked by their token's
probability (``dream.py`` has the rest)."""

from vllm_omni.diffusion.algorithms.dream import (commit_ranked, positions_sampled,
                                                  ranked_batch_key, ranked_counts_masks)
from vllm_omni.diffusion.algorithms.registry import always, register_algorithm


@register_algorithm("maskgit_plus", families=("dream",),
                    knobs=("eps", "top_k", "top_p", "alg_temp"), draws_random=positions_sampled,
                    ends_on_schedule=always, counts_masks=ranked_counts_masks,
                    batch_key=ranked_batch_key)
def maskgit_plus(logits, masked, step, params, generator, num_masked=None):
    return commit_ranked(logits, masked, step, params, generator, num_masked,
                         lambda probs, chosen: chosen)
