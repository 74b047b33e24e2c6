"""Fast-dLLM v2 through the real LLM(..., worker_cls=...) against the
checkpoint's own ``generate`` (its ``modeling.py``) on the tiny checkpoint
(tests/fast_dllm_v2: NOTES.md says what the decoder does, README.md how the
cases were recorded).

Output rule: the reference returns its new tokens cut after the first
``<|im_end|>``, else ``num_blocks * 32 - P % 32 + 1`` of them (the last
block-end AR token included). With ``max_tokens`` = that count and the
reference's stop set (only ``<|im_end|>``: ``ignore_eos`` plus
``stop_token_ids``), ours must be equal token for token. vLLM's default stop
set adds generation_config's ``<|endoftext|>``, which no golden output holds,
so the default gives the same outputs here."""

import json

import pytest
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from conftest import REPO, checked_bookkeeping, start_engine
from vllm_omni.compat import RequestError

FDV2 = REPO / "tests" / "fast_dllm_v2"
STOP = 1983  # <|im_end|>, the reference's stop_token
B = 32  # the checkpoint's bd_size


def cases():
    return json.loads((FDV2 / "golden" / "cases.json").read_text())["cases"]


def case_named(name):
    return next(c for c in cases() if c["name"] == name)


def knobs_of(case):
    return {"small_block_size": case["small_block_size"], "unmask_threshold": case["threshold"],
            "cache": "block" if case["use_block_cache"] else "none"}


def params_for(case, reference_stops=True, max_tokens=None, **kwargs):
    common = dict(max_tokens=max_tokens or len(case["output_ids"]), extra_args=knobs_of(case),
                  **kwargs)
    if reference_stops:
        common.update(ignore_eos=True, stop_token_ids=[STOP])
    if case["temperature"] == 0:
        return SamplingParams(temperature=0, **common)
    return SamplingParams(temperature=case["temperature"], top_p=case["top_p"],
                          seed=case["seed"], **common)


def generate(llm, batch, **kwargs):
    outs = llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in batch],
                        [params_for(c, **kwargs) for c in batch], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _preemptions(llm) -> int:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


@pytest.fixture(scope="module")
def fdv2_llm():
    # Pages of 32 (the block), 8 of them: a case takes up to 5, so requests
    # running together get preempted. Prompts arrive in chunks of at most 32
    # tokens (the 64-token prompts' AR token comes from the second chunk's
    # store), and a step's work is split into groups within the budget of 64
    # tokens.
    llm = start_engine(str(FDV2 / "tiny"), max_model_len=192, num_gpu_blocks_override=8,
                       max_num_batched_tokens=64, long_prefill_token_threshold=32,
                       disable_log_stats=False)
    yield llm
    del llm


def test_engine_keeps_prefix_caching_with_pages_of_whole_blocks(fdv2_llm):
    cache = fdv2_llm.llm_engine.vllm_config.cache_config
    assert cache.enable_prefix_caching and cache.block_size == B


@pytest.mark.parametrize("reference_stops", [True, False])
def test_all_cases_in_one_batch(fdv2_llm, reference_stops):
    batch = cases()
    assert len(batch) == 12
    got = generate(fdv2_llm, batch, reference_stops=reference_stops)
    for case, tokens in zip(batch, got):
        assert tokens == case["output_ids"], case["name"]


def test_cases_one_at_a_time_with_the_references_forwards(fdv2_llm):
    """Alone, a request runs the reference's forwards: one per denoising
    step, and per finished block one that stores it and gives the AR token.
    Its prompt arrives in chunks of 32 here: each chunk before the last is a
    forward storing it (the reference prefills in one), and the last chunk's
    store rides along with the first denoising step, unless the prompt ends
    on a block boundary (then it gives the first AR token, as the
    reference's prefill does). A stopped case is not counted: the reference
    ends its block at the stop, we finish it (the tokens past the stop are
    never returned)."""
    for case in cases():
        fdv2_llm.reset_prefix_cache()
        fdv2_llm.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
        assert generate(fdv2_llm, [case])[0] == case["output_ids"], case["name"]
        forwards = fdv2_llm.collective_rpc("diffusion_step_stats")[0]["steps"]
        P = len(case["prompt_ids"])
        chunks = -(-P // B)
        ours = (case["forwards"]["denoise"] + case["forwards"]["block_complete"] + chunks - 1
                + (P > B and P % B == 0))
        if case["stop_reason"] == "length":
            assert forwards == ours, case["name"]


def test_stops_end_the_output_as_the_reference_cuts_it(fdv2_llm):
    """The stopped cases commit <|im_end|> while an earlier position is
    masked, and tokens after it; vLLM stops at the first stop token in output
    order, also under its default stop set and a larger max_tokens."""
    batch = [c for c in cases() if c["stop_reason"] == "stop_token"]
    assert len(batch) == 2
    for stops in (True, False):
        for case, tokens in zip(batch, generate(fdv2_llm, batch, reference_stops=stops,
                                                max_tokens=150)):
            assert tokens == case["output_ids"] and tokens[-1] == STOP, case["name"]


def test_streaming_returns_the_ar_token_with_the_next_block(fdv2_llm):
    # P = 8: block 0 gives 24 tokens; each later chunk is the block-end AR
    # token of the block before and the 31 tokens decoded after it; the last
    # chunk is the final AR token alone (its block is not decoded).
    case = case_named("short_thr0.9_sb8")
    params = params_for(case)
    params.output_kind = RequestOutputKind.DELTA
    engine = fdv2_llm.llm_engine
    engine.add_request("stream-0", {"prompt_token_ids": case["prompt_ids"]}, params)
    chunks = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs[0].token_ids:
                chunks.append(list(out.outputs[0].token_ids))
    assert sum(chunks, []) == case["output_ids"]
    assert [len(c) for c in chunks] == [24, 32, 1]


def test_max_tokens_cuts_the_output(fdv2_llm):
    batch = [c for c in cases() if c["stop_reason"] == "length"][:4]
    got = generate(fdv2_llm, batch, max_tokens=30)
    for case, tokens in zip(batch, got):
        assert tokens == case["output_ids"][:30], case["name"]


def test_defaults_are_the_model_cards_call(fdv2_llm):
    # Sub-blocks of 8, threshold 0.9, no block cache.
    case = case_named("chat_thr0.9_sb8")
    sp = SamplingParams(temperature=0, max_tokens=len(case["output_ids"]), ignore_eos=True,
                        stop_token_ids=[STOP])
    out = fdv2_llm.generate([{"prompt_token_ids": case["prompt_ids"]}], sp, use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == case["output_ids"]


def test_preempted_requests_resume_exactly(fdv2_llm):
    batch = cases() * 2
    before = _preemptions(fdv2_llm)
    with checked_bookkeeping(fdv2_llm) as log:
        got = generate(fdv2_llm, batch)
    assert _preemptions(fdv2_llm) > before
    assert log["steps"] > 0 and log["mismatches"] == []
    for case, tokens in zip(batch, got):
        assert tokens == case["output_ids"], case["name"]


def test_prefix_cache_hits_stay_exact(fdv2_llm):
    """A request reads another's pages: from a later step, and from the same
    step (pages vLLM hashes while scheduling the first, written by its store
    in the same forward). A prompt continuing a case with its own output up
    to a block boundary hits pages holding generated tokens, and its first
    new token is the AR token of its prompt's last block."""
    case = case_named("chat_thr0.9_sb8")
    prompt = {"prompt_token_ids": case["prompt_ids"]}
    fdv2_llm.reset_prefix_cache()
    first = fdv2_llm.generate([prompt], params_for(case), use_tqdm=False)[0]
    again = fdv2_llm.generate([prompt] * 2, params_for(case), use_tqdm=False)
    assert first.num_cached_tokens == 0 and [o.num_cached_tokens for o in again] == [B, B]
    fdv2_llm.reset_prefix_cache()
    same_step = fdv2_llm.generate([prompt] * 2, params_for(case), use_tqdm=False)
    assert same_step[1].num_cached_tokens == B
    for out in [first, *again, *same_step]:
        assert list(out.outputs[0].token_ids) == case["output_ids"]

    cut = 2 * B - len(case["prompt_ids"])  # prompt + generated tokens: two whole blocks
    longer = {"prompt_token_ids": case["prompt_ids"] + case["output_ids"][:cut]}
    rest = case["output_ids"][cut:]
    out = fdv2_llm.generate([longer], params_for(case, max_tokens=len(rest)),
                            use_tqdm=False)[0]
    assert out.num_cached_tokens == B  # vLLM recomputes the last block of a full hit
    assert list(out.outputs[0].token_ids) == rest


BAD = [
    ({"small_block_size": 3}, r"small_block_size must divide the block length 32, one of "
     r"\[1, 2, 4, 8, 16, 32\], got 3"),
    ({"small_block_size": 0}, "small_block_size must be >= 1"),
    ({"small_block_size": "8"}, "small_block_size must be an integer"),
    ({"unmask_threshold": 1.5}, r"unmask_threshold must be a number in \[0, 1\]"),
    ({"unmask_threshold": "high"}, "unmask_threshold must be a number"),
    ({"cache": "dual"}, r"cache must be one of \['none', 'block'\] for fast_dllm_v2"),
    ({"algorithm": "low_confidence_dynamic"},
     r"algorithm must be one of \['parallel_threshold'\] for fast_dllm_v2"),
    ({"top_p": 0}, r"top_p must be a number in \(0, 1\]"),
    ({"block_length": 16}, r"unknown diffusion knob\(s\) \['block_length'\]"),
    ({"threshold": 0.9}, "unknown diffusion knob"),
    ({"confidence_threshold": 0.9}, "unknown diffusion knob"),
]


@pytest.mark.parametrize("knobs,message", BAD)
def test_bad_knobs_are_rejected_at_submission(fdv2_llm, knobs, message):
    sp = SamplingParams(temperature=0, max_tokens=8, extra_args=knobs)
    with pytest.raises(RequestError, match=message):
        fdv2_llm.generate("Copyright", sp, use_tqdm=False)


def test_sampling_fields_the_reference_has_not_are_rejected(fdv2_llm):
    sp = SamplingParams(temperature=0.8, top_k=5, max_tokens=8)
    with pytest.raises(RequestError, match="top_k is not used by fast_dllm_v2"):
        fdv2_llm.generate("Copyright", sp, use_tqdm=False)


def test_engine_refuses_a_page_size_the_checkpoints_block_does_not_divide():
    # The config hook runs in the front end: refused before any engine starts.
    with pytest.raises(ValueError, match=r"block length 32 \(the checkpoint's bd_size\) does "
                       "not divide the KV page size 16"):
        start_engine(str(FDV2 / "tiny"), block_size=16)


def test_generation_config_defaults_the_decoder_does_not_apply_are_dropped(fdv2_llm):
    # generation_config.json is Qwen2.5-Instruct's: repetition_penalty 1.05
    # and top_k 20 would make every request that leaves them unset (the
    # OpenAI server's, LLM.generate without SamplingParams) fail validation.
    defaults = fdv2_llm.get_default_sampling_params()
    assert defaults.repetition_penalty == 1.0 and defaults.top_k in (0, -1)
    assert (defaults.temperature, defaults.top_p) == (0.7, 0.8)  # kept: the decoder samples
    out = fdv2_llm.generate({"prompt_token_ids": cases()[0]["prompt_ids"]}, use_tqdm=False)
    assert 0 < len(out[0].outputs[0].token_ids) <= defaults.max_tokens  # unseeded: may stop
