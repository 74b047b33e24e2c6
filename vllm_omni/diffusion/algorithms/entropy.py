"""Dream's ``entropy``: masked positions ranked by negative entropy
(``dream.py`` has the rest)."""

import torch

from vllm_omni.diffusion.algorithms.dream import commit_ranked, positions_sampled, sample_tokens
from vllm_omni.diffusion.algorithms.registry import register_algorithm


@register_algorithm("entropy", families=("dream",),
                    knobs=("eps", "top_k", "top_p", "alg_temp"), draws_random=positions_sampled)
def entropy(logits, masked, step, params, generator):
    probs, tokens, _ = sample_tokens(logits[masked], params, generator)
    negative_entropy = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    return commit_ranked(negative_entropy, masked, step, params, tokens, generator)
