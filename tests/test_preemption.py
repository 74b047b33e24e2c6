"""A KV budget too small for the batch forces vLLM to preempt requests; every
request still gives the official tokens (exact and cached modes alike)."""

import pytest
from vllm import SamplingParams

from conftest import ASSETS, checked_bookkeeping, golden_cases, graph_shaped_steps, start_engine

MAX_LEN = 96


@pytest.fixture(scope="module")
def small_kv_llm():
    # 8 KV blocks of 16 tokens: room for about two requests at a time.
    llm = start_engine(str(ASSETS / "llada-tiny"), max_model_len=MAX_LEN,
                       num_gpu_blocks_override=8, block_size=16,
                       max_num_batched_tokens=MAX_LEN, disable_log_stats=False)
    yield llm
    del llm


@pytest.mark.parametrize("graph_shaped", [False, True])
def test_preempted_requests_resume_exactly(small_kv_llm, graph_shaped):
    cases = [c for c in golden_cases("llada_cases.json")["cases"]
             if len(c["prompt_ids"]) + c["gen_length"] <= MAX_LEN]
    assert len(cases) >= 6
    cache = {"exact": "none", "prefix_cache": "prefix", "dual_cache": "dual"}
    params = [SamplingParams(temperature=0, max_tokens=c["gen_length"], ignore_eos=True,
                             extra_args={"steps": c["steps"], "block_length": c["block_length"],
                                         "cache": cache[c["mode"]],
                                         **({"threshold": c["threshold"]} if c["threshold"] else {})})
              for c in cases]
    before = _preemptions(small_kv_llm)
    prompts = [{"prompt_token_ids": c["prompt_ids"]} for c in cases] * 2
    if graph_shaped:  # the static forward CUDA graphs capture (conftest)
        with graph_shaped_steps(small_kv_llm):
            outs = small_kv_llm.generate(prompts, params * 2, use_tqdm=False)
    else:
        outs = small_kv_llm.generate(prompts, params * 2, use_tqdm=False)
    for case, out in zip(cases * 2, outs):
        assert list(out.outputs[0].token_ids) == case["output_ids"], case["name"]
    assert _preemptions(small_kv_llm) > before


def test_runner_batch_holds_prompt_and_output_after_every_step(small_kv_llm):
    """The runner records each committed block where vLLM keeps a request's
    tokens (``worker/bookkeeping.py``): after every engine step, through
    chunked prompts, preemption and a last block cut at ``max_tokens``, each
    request's row of the persistent batch (``token_ids_cpu`` up to
    ``num_tokens_no_spec``) is its prompt and output, and the last row of
    each is what the request returned."""
    cases = [c for c in golden_cases("llada_cases.json")["cases"]
             if c["mode"] == "exact" and len(c["prompt_ids"]) + c["gen_length"] <= MAX_LEN]
    params = [SamplingParams(temperature=0, max_tokens=c["gen_length"], ignore_eos=True,
                             extra_args={"steps": c["steps"], "block_length": c["block_length"]})
              for c in cases] * 2
    # 20 tokens in blocks of 8: the canvas is 24, the last block is cut to 4.
    params.append(SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                 extra_args={"steps": 12, "block_length": 8}))
    prompts = [{"prompt_token_ids": c["prompt_ids"]} for c in cases] * 2 + [
        {"prompt_token_ids": cases[0]["prompt_ids"]}]
    before = _preemptions(small_kv_llm)
    with checked_bookkeeping(small_kv_llm) as log:
        outs = small_kv_llm.generate(prompts, params, use_tqdm=False)
    assert _preemptions(small_kv_llm) > before
    assert log["steps"] > 0 and log["mismatches"] == []
    for case, out in zip(cases * 2, outs):
        assert list(out.outputs[0].token_ids) == case["output_ids"], case["name"]
    assert len(outs[-1].outputs[0].token_ids) == 20
    returned = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs]
    assert sorted(log["rows"].values()) == sorted(returned)


def _preemptions(llm) -> int:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
