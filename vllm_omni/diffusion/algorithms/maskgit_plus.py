"""Dream's ``maskgit_plus``: masked positions ranked by their token's
probability (``dream.py`` has the rest)."""

from vllm_omni.diffusion.algorithms.dream import commit_ranked, positions_sampled, sample_tokens
from vllm_omni.diffusion.algorithms.registry import register_algorithm


@register_algorithm("maskgit_plus", families=("dream",),
                    knobs=("eps", "top_k", "top_p", "alg_temp"), draws_random=positions_sampled)
def maskgit_plus(logits, masked, step, params, generator):
    _, tokens, chosen = sample_tokens(logits[masked], params, generator)
    return commit_ranked(chosen, masked, step, params, tokens, generator)
