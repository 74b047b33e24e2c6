"""LLaDA through the real LLM(..., worker_cls=...) against the official code's
outputs on the tiny checkpoint (../shared/golden/llada_cases.json)."""

import pytest
import torch
from vllm import SamplingParams

from conftest import golden_cases, graph_shaped_steps

STOP_IDS = (0, 4)  # <|endoftext|>, <|eot_id|> (generation_config.json)


CACHE = {"exact": "none", "prefix_cache": "prefix", "dual_cache": "dual"}


def all_cases():
    return golden_cases("llada_cases.json")["cases"]


def exact_cases():
    return [c for c in all_cases() if c["mode"] == "exact"]


def params_for(case, ignore_eos):
    knobs = {"steps": case["steps"], "block_length": case["block_length"],
             "cache": CACHE[case["mode"]]}
    if case["threshold"] is not None:
        knobs["threshold"] = case["threshold"]
    return SamplingParams(
        temperature=0,
        max_tokens=case["gen_length"],
        ignore_eos=ignore_eos,
        extra_args=knobs,
    )


def expected(case, ignore_eos):
    out = case["output_ids"]
    if ignore_eos:
        return out
    for i, tok in enumerate(out):
        if tok in STOP_IDS:
            return out[: i + 1]
    return out


def generate(llm, cases, ignore_eos):
    prompts = [{"prompt_token_ids": c["prompt_ids"]} for c in cases]
    outs = llm.generate(prompts, [params_for(c, ignore_eos) for c in cases], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_exact_cases_in_one_batch(llada_llm, ignore_eos):
    cases = exact_cases()
    assert len(cases) == 7
    got = generate(llada_llm, cases, ignore_eos)
    for case, tokens in zip(cases, got):
        assert tokens == expected(case, ignore_eos), case["name"]


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_cache_modes_mixed_with_exact_in_one_batch(llada_llm, ignore_eos):
    cases = all_cases()
    assert {c["mode"] for c in cases} == {"exact", "prefix_cache", "dual_cache"}
    got = generate(llada_llm, cases, ignore_eos)
    for case, tokens in zip(cases, got):
        assert tokens == expected(case, ignore_eos), case["name"]


def test_identical_prompts_never_share_cached_keys(llada_llm):
    """The cached modes write each canvas' prefix keys into its KV pages; the
    keys depend on the whole canvas, so requests with the same prompt must not
    share pages: prefix caching is off and every copy decodes exactly."""
    assert not llada_llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    cases = [c for c in all_cases() if c["mode"] != "exact"] * 3
    for case, tokens in zip(cases, generate(llada_llm, cases, True)):
        assert tokens == expected(case, True), case["name"]


def test_steps_replay_cuda_graphs_on_cuda(llada_llm):
    """On CUDA small groups' forwards replay captured graphs in every mode
    (the golden cases above pass through them); elsewhere nothing is captured."""
    llada_llm.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
    cases = all_cases()
    for case, tokens in zip(cases, generate(llada_llm, cases, True)):
        assert tokens == expected(case, True), case["name"]
    stats = llada_llm.collective_rpc("diffusion_step_stats")[0]
    assert stats["steps"] > 0
    if torch.cuda.is_available():
        assert stats["graph_steps"] > 0, stats
    else:
        assert stats["graph_steps"] == 0, stats


def test_graph_shaped_steps_are_exact(llada_llm):
    """The forward the CUDA graphs capture (fixed buffers refilled per block,
    padding to buckets, ids gathered from the canvas rows, prefix keys copied
    from the arena into the pages), run without capture: every mode, mixed
    in one batch, token for token; singly too (other buckets)."""
    with graph_shaped_steps(llada_llm):
        llada_llm.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
        cases = all_cases()
        for case, tokens in zip(cases, generate(llada_llm, cases, False)):
            assert tokens == expected(case, False), case["name"]
        for case in cases[:4]:
            assert generate(llada_llm, [case], True)[0] == expected(case, True), case["name"]
        stats = llada_llm.collective_rpc("diffusion_step_stats")[0]
        assert 0 < stats["graph_steps"] <= stats["steps"], stats


def test_cache_cases_one_at_a_time(llada_llm):
    for case in all_cases():
        if case["mode"] != "exact":
            assert generate(llada_llm, [case], True)[0] == expected(case, True), case["name"]


def test_exact_cases_one_at_a_time(llada_llm):
    for case in exact_cases():
        for ignore_eos in (True, False):
            assert generate(llada_llm, [case], ignore_eos)[0] == expected(case, ignore_eos), (
                case["name"],
                ignore_eos,
            )


def test_stop_token_ends_early_and_text_matches(llada_llm):
    # A case whose canvas holds a stop token before its end.
    cases = [c for c in exact_cases() if any(t in STOP_IDS for t in c["output_ids"][:-1])]
    if not cases:
        pytest.skip("no exact case stops early")
    case = cases[0]
    out = llada_llm.generate(
        [{"prompt_token_ids": case["prompt_ids"]}], params_for(case, False), use_tqdm=False
    )[0].outputs[0]
    assert list(out.token_ids) == expected(case, False)
    assert out.finish_reason == "stop"


def test_max_tokens_cuts_the_last_block(llada_llm):
    # max_tokens 20 with blocks of 8: the canvas is 24 (3 blocks, 12 steps);
    # the output is the golden 24-token canvas cut to 20.
    case = next(c for c in exact_cases() if c["name"] == "exact_two_per_step")
    sp = SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True,
        extra_args={"steps": 12, "block_length": 8},
    )
    out = llada_llm.generate([{"prompt_token_ids": case["prompt_ids"]}], sp, use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == case["output_ids"][:20]
    assert out[0].outputs[0].finish_reason == "length"


def test_text_prompt_and_usage_counts(llada_llm):
    case = exact_cases()[0]
    assert not case["prompt"]["chat"]
    out = llada_llm.generate(case["prompt"]["text"], params_for(case, True), use_tqdm=False)[0]
    assert list(out.prompt_token_ids) == case["prompt_ids"]
    assert list(out.outputs[0].token_ids) == case["output_ids"]
    assert out.outputs[0].text == llada_llm.get_tokenizer().decode(case["output_ids"])
