"""Bad knobs fail at submission with a message naming the field; the engine
and the other requests never notice."""

import pytest
from vllm import SamplingParams

from conftest import golden_cases
from vllm_omni.compat import RequestError

BAD = [
    ({"stepz": 4}, "stepz"),
    ({"algorithm": "nope"}, "algorithm"),
    ({"algorithm": 3}, "algorithm"),
    ({"steps": "8"}, "steps"),
    ({"steps": 0}, "steps"),
    ({"steps": True}, "steps"),
    ({"steps": 5, "block_length": 8}, "multiple of the number of blocks"),
    ({"steps": 40}, "steps must be <= the canvas length"),
    ({"block_length": -2}, "block_length"),
    ({"block_length": 8.0}, "block_length"),
    ({"threshold": 0}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": "high"}, "threshold"),
    ({"cache": "paged"}, "cache"),
]


@pytest.mark.parametrize("knobs,message", BAD)
def test_bad_knob_is_rejected_at_submission(llada_llm, knobs, message):
    sp = SamplingParams(temperature=0, max_tokens=32, extra_args=knobs)
    with pytest.raises(RequestError, match=message):
        llada_llm.generate("Copyright", sp, use_tqdm=False)


@pytest.mark.parametrize("knobs,message", [
    ({"algorithm": "maskgit_plus"}, "algorithm must be one of \\['low_confidence', 'random'\\]"),
    ({"eps": 0.01}, "unknown diffusion knob"),
    ({"top_k": 5}, "unknown diffusion knob"),
])
def test_knob_of_another_family_is_rejected(llada_llm, knobs, message):
    sp = SamplingParams(temperature=0, max_tokens=32, extra_args=knobs)
    with pytest.raises(RequestError, match=message):
        llada_llm.generate("Copyright", sp, use_tqdm=False)


def test_llada_refuses_top_k_sampling(llada_llm):
    sp = SamplingParams(temperature=0.7, top_k=5, max_tokens=8)
    with pytest.raises(RequestError, match="top_k"):
        llada_llm.generate("Copyright", sp, use_tqdm=False)


@pytest.mark.parametrize("knobs,message", [
    ({"threshold": 0.9}, "unknown diffusion knob"),
    ({"algorithm": "low_confidence"}, "algorithm"),
    ({"eps": 0}, "eps"),
    ({"eps": 1.0}, "eps"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 0}, "top_p"),
    ({"alg_temp": -0.5}, "alg_temp"),
])
def test_dream_bad_knobs(dream_llm, knobs, message):
    sp = SamplingParams(temperature=0, max_tokens=16, extra_args=knobs)
    with pytest.raises(RequestError, match=message):
        dream_llm.generate("Copyright", sp, use_tqdm=False)


def test_engine_serves_good_requests_after_bad_ones(llada_llm):
    case = next(c for c in golden_cases("llada_cases.json")["cases"] if c["name"] == "exact_semi_ar")
    good = SamplingParams(
        temperature=0, max_tokens=32, ignore_eos=True,
        extra_args={"steps": 16, "block_length": 8},
    )
    with pytest.raises(RequestError):
        llada_llm.generate(
            [{"prompt_token_ids": case["prompt_ids"]}] * 2,
            [good, SamplingParams(temperature=0, max_tokens=32, extra_args={"steps": 3, "block_length": 8})],
            use_tqdm=False,
        )
    out = llada_llm.generate([{"prompt_token_ids": case["prompt_ids"]}], good, use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == case["output_ids"]


def test_defaults_block_32_and_steps_equal_canvas(llada_llm):
    # No knobs: block 32 (max_tokens 32 -> one block), 32 steps: the
    # exact_single_block case.
    case = next(c for c in golden_cases("llada_cases.json")["cases"] if c["name"] == "exact_single_block")
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    out = llada_llm.generate([{"prompt_token_ids": case["prompt_ids"]}], sp, use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == case["output_ids"]


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 0.5), ("repetition_penalty", 1.2), ("min_p", 0.1), ("min_tokens", 4),
    ("logit_bias", {5: 1.0}), ("allowed_token_ids", [5, 6]), ("prompt_logprobs", 1),
])
def test_sampling_fields_the_denoiser_cannot_honour_are_refused(llada_llm, field, value):
    sp = SamplingParams(temperature=0.8, max_tokens=8, **{field: value})
    with pytest.raises(RequestError, match=field):
        llada_llm.generate("Copyright", sp, use_tqdm=False)
