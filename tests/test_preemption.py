"""A KV budget too small for the batch forces vLLM to preempt requests; every
request still gives the official tokens (exact and cached modes alike)."""

import pytest
from vllm import SamplingParams

from conftest import ASSETS, golden_cases, graph_shaped_steps, start_engine

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


def _preemptions(llm) -> int:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
