"""A KV budget too small for the batch forces vLLM to preempt requests; every
request still gives the official tokens (exact and cached modes alike)."""

import pytest
from vllm import SamplingParams

from conftest import ASSETS, golden_cases, start_engine

MAX_LEN = 96


@pytest.fixture(scope="module")
def small_kv_llm():
    # 8 KV blocks of 16 tokens: room for about two requests at a time.
    llm = start_engine(str(ASSETS / "llada-tiny"), max_model_len=MAX_LEN,
                       num_gpu_blocks_override=8, block_size=16,
                       max_num_batched_tokens=MAX_LEN, disable_log_stats=False)
    yield llm
    del llm


def test_preempted_requests_resume_exactly(small_kv_llm):
    cases = [c for c in golden_cases("llada_cases.json")["cases"]
             if len(c["prompt_ids"]) + c["gen_length"] <= MAX_LEN]
    assert len(cases) >= 6
    cache = {"exact": "none", "prefix_cache": "prefix", "dual_cache": "dual"}
    params = [SamplingParams(temperature=0, max_tokens=c["gen_length"], ignore_eos=True,
                             extra_args={"steps": c["steps"], "block_length": c["block_length"],
                                         "cache": cache[c["mode"]],
                                         **({"threshold": c["threshold"]} if c["threshold"] else {})})
              for c in cases]
    outs = small_kv_llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in cases] * 2,
                                 params * 2, use_tqdm=False)
    for case, out in zip(cases * 2, outs):
        assert list(out.outputs[0].token_ids) == case["output_ids"], case["name"]
    preemptions = sum(m.value for m in small_kv_llm.get_metrics()
                      if m.name == "vllm:num_preemptions")
    assert preemptions > 0
