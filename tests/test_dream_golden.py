"""Dream through the real LLM(..., worker_cls=...) against the official
``diffusion_generate`` outputs (../shared/golden/dream_cases.json)."""

import pytest
from vllm import SamplingParams

from conftest import golden_cases, graph_shaped_steps

EOS = 0


def cases():
    return golden_cases("dream_cases.json")["cases"]


def params_for(case, ignore_eos):
    knobs = {"algorithm": case["alg"], "steps": case["steps"], "eps": case["eps"],
             "top_k": case["top_k"], "top_p": case["top_p"]}
    return SamplingParams(temperature=case["temperature"], max_tokens=case["max_new_tokens"],
                          ignore_eos=ignore_eos, extra_args=knobs)


def expected(case, ignore_eos):
    out = case["output_ids"]
    if not ignore_eos and EOS in out:
        return out[: out.index(EOS) + 1]
    return out


def generate(llm, batch, ignore_eos):
    outs = llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in batch],
                        [params_for(c, ignore_eos) for c in batch], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_cases_in_one_batch(dream_llm, ignore_eos):
    batch = cases()
    assert {c["alg"] for c in batch} >= {"maskgit_plus", "topk_margin", "entropy"}
    for case, tokens in zip(batch, generate(dream_llm, batch, ignore_eos)):
        assert tokens == expected(case, ignore_eos), case["name"]


def test_cases_one_at_a_time(dream_llm):
    for case in cases():
        assert generate(dream_llm, [case], True)[0] == expected(case, True), case["name"]


def test_default_top_k_is_dreams_50(dream_llm):
    # A case made with top_k=50, top_p=None, sent without those knobs.
    case = next(c for c in cases() if c["top_k"] == 50 and c["top_p"] is None)
    sp = SamplingParams(temperature=0, max_tokens=case["max_new_tokens"], ignore_eos=True,
                        extra_args={"algorithm": case["alg"], "steps": case["steps"]})
    out = dream_llm.generate([{"prompt_token_ids": case["prompt_ids"]}], sp, use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == case["output_ids"]


def test_cache_modes_run_and_are_batch_invariant(dream_llm):
    # No official outputs exist for Dream with Fast-dLLM caches: check that
    # each request decodes the same alone and packed with others in mixed
    # modes (the shifted query window of the cached steps included).
    base = cases()[1]
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                             extra_args={"steps": 16, "block_length": 8, "cache": mode,
                                         "algorithm": alg})
              for mode, alg in (("prefix", "maskgit_plus"), ("dual", "entropy"),
                                ("none", "topk_margin"), ("dual", "maskgit_plus"))]
    prompts = [{"prompt_token_ids": base["prompt_ids"][: 4 + i]} for i in range(4)]
    together = dream_llm.generate(prompts, params, use_tqdm=False)
    for prompt, sp, out in zip(prompts, params, together):
        alone = dream_llm.generate([prompt], sp, use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == list(alone.outputs[0].token_ids)
        assert len(out.outputs[0].token_ids) == 32
        assert 1985 not in out.outputs[0].token_ids  # no mask token left


def test_graph_shaped_steps_are_exact(dream_llm):
    """The forward Dream's CUDA graphs capture (its logit shift: the query row
    before each block), run without capture: the official tokens, and the
    cache modes as in eager steps."""
    base = cases()[1]
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                             extra_args={"steps": 16, "block_length": 8, "cache": mode})
              for mode in ("prefix", "dual", "none")]
    prompts = [{"prompt_token_ids": base["prompt_ids"][: 5 + i]} for i in range(3)]
    eager = dream_llm.generate(prompts, params, use_tqdm=False)
    with graph_shaped_steps(dream_llm):
        dream_llm.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
        for case, tokens in zip(cases(), generate(dream_llm, cases(), True)):
            assert tokens == expected(case, True), case["name"]
        static = dream_llm.generate(prompts, params, use_tqdm=False)
        stats = dream_llm.collective_rpc("diffusion_step_stats")[0]
    assert 0 < stats["graph_steps"] <= stats["steps"], stats
    for a, b in zip(eager, static):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
