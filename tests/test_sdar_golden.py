"""SDAR through the real LLM(..., worker_cls=...) against the official
``block_diffusion_generate`` on the tiny checkpoint (tests/sdar/golden, how
it was recorded: tests/sdar/README.md).

Output rule: ours equals the reference's ``generated_ids`` up to and including
the first stop token (generation_config's eos ids, which vLLM reads), at most
``max_tokens``. The reference checks stops only after a block and then leaves
later blocks masked; a run it did not stop early is reproduced whole with
``ignore_eos``."""

import json
import math
from functools import partial

import pytest
import torch
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from conftest import (REPO, block_causal_forward, checked_bookkeeping, graph_shaped_steps,
                      start_engine)
from vllm_omni.compat import RequestError

SDAR = REPO / "tests" / "sdar"
STOP_IDS = (1983, 1981)  # generation_config.json's eos_token_id


def cases():
    return json.loads((SDAR / "golden" / "sdar_cases.json").read_text())["cases"]


def params_for(case, ignore_eos=True, max_tokens=None):
    knobs = {"algorithm": case["remasking_strategy"], "block_length": case["block_length"],
             "denoising_steps_per_block": case["denoising_steps"]}
    if case["confidence_threshold"] is not None:
        knobs["confidence_threshold"] = case["confidence_threshold"]
    max_tokens = max_tokens or len(case["generated_ids"])
    if case["top_k"] == 1 and case["temperature"] == 1.0:  # the official greedy
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos,
                              extra_args=knobs)
    return SamplingParams(temperature=case["temperature"], top_k=case["top_k"],
                          top_p=case["top_p"], seed=case["seed"], max_tokens=max_tokens,
                          ignore_eos=ignore_eos, extra_args=knobs)


def first_stop(tokens):
    return next((i for i, t in enumerate(tokens) if t in STOP_IDS), None)


def check(case, tokens, ignore_eos=True, max_tokens=None):
    want = case["generated_ids"][: max_tokens or len(case["generated_ids"])]
    stop = first_stop(want)
    if not ignore_eos and stop is not None:
        assert tokens == want[: stop + 1], case["name"]
    elif case["stopped_early"]:  # the reference's tokens end at its stop
        assert len(tokens) == len(want) and tokens[: stop + 1] == want[: stop + 1], case["name"]
    else:
        assert tokens == want, case["name"]


def generate(llm, batch, ignore_eos=True, max_tokens=None):
    outs = llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in batch],
                        [params_for(c, ignore_eos, max_tokens and max_tokens(c)) for c in batch],
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def sdar_llm():
    # Prompts arrive in chunks of at most 32 tokens (their whole blocks are
    # stored as they come), and a step's work is split into groups within
    # the budget of 64 tokens. Prefix caching on: every request uses the
    # engine's block length (4).
    llm = start_engine(str(SDAR / "tiny"), max_num_batched_tokens=64,
                       long_prefill_token_threshold=32)
    yield llm
    del llm


@pytest.fixture(scope="module")
def any_block_sdar():
    # The same, with prefix caching off: the golden cases' block lengths
    # (4, 8, 16) may then mix per request.
    llm = start_engine(str(SDAR / "tiny"), max_num_batched_tokens=64,
                       long_prefill_token_threshold=32, enable_prefix_caching=False)
    yield llm
    del llm


def test_forward_matches_official_logits(sdar_llm):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = SDAR / "golden" / "sdar_forward.safetensors"
    ref = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        assert "block_length=4" in f.metadata()["info"]
    (logits,) = sdar_llm.apply_model(partial(block_causal_forward, input_ids=ref["input_ids"],
                                             block_length=4))
    want = ref["logits"]
    assert logits.shape == want.shape
    assert (logits - want).abs().max().item() < 1e-4
    assert torch.equal(logits.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_all_cases_in_one_batch(any_block_sdar, ignore_eos):
    batch = cases()
    assert len(batch) == 13
    assert {c["remasking_strategy"] for c in batch} == {
        "sequential", "low_confidence_static", "low_confidence_dynamic"}
    for case, tokens in zip(batch, generate(any_block_sdar, batch, ignore_eos)):
        check(case, tokens, ignore_eos)


def test_cases_one_at_a_time(any_block_sdar):
    for case in cases():
        check(case, generate(any_block_sdar, [case])[0])


def test_max_tokens_cuts_the_last_block(any_block_sdar):
    # gen_length: the reference rounds the output up to whole blocks from
    # position 0; vLLM returns max_tokens of them.
    batch = [c for c in cases() if c["gen_length"] < len(c["generated_ids"])]
    assert batch
    got = generate(any_block_sdar, batch, max_tokens=lambda c: c["gen_length"])
    for case, tokens in zip(batch, got):
        check(case, tokens, max_tokens=case["gen_length"])


def test_stores_share_forwards_with_denoising_steps(any_block_sdar):
    """A block's keys are stored in the forward of the next block's first
    denoising step: one request alone runs exactly its denoising forwards
    (the reference runs a prefill and a store per block besides)."""
    case = next(c for c in cases() if c["name"] == "seq_b4_s4_greedy_p8")
    any_block_sdar.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
    check(case, generate(any_block_sdar, [case])[0])
    stats = any_block_sdar.collective_rpc("diffusion_step_stats")[0]
    assert stats["steps"] == case["nfe_breakdown"]["denoise"], stats


def test_forwards_replay_cuda_graphs_on_cuda(any_block_sdar):
    """On CUDA every forward here (at most 64 tokens: the engine's budget)
    replays a graph, stores and denoising steps alike; elsewhere none is
    captured."""
    any_block_sdar.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
    batch = cases()[:4]
    for case, tokens in zip(batch, generate(any_block_sdar, batch)):
        check(case, tokens)
    stats = any_block_sdar.collective_rpc("diffusion_step_stats")[0]
    want = stats["steps"] if torch.cuda.is_available() else 0
    assert stats["steps"] > 0 and stats["graph_steps"] == want, stats


def test_graph_shaped_forwards_are_exact(any_block_sdar):
    """The forward the CUDA graphs capture (each plan copied into fixed
    buffers, padded to its bucket: token rows gather the spare row, page
    writes land in page 0, tile rows are empty, logits rows read row 0), run
    without capture: all cases in one batch, stores and denoising steps of
    every request sharing forwards, token for token; singly (other buckets);
    and the last block cut by max_tokens. Every forward fits a graph."""
    with graph_shaped_steps(any_block_sdar):
        any_block_sdar.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
        batch = cases()
        for case, tokens in zip(batch, generate(any_block_sdar, batch, ignore_eos=False)):
            check(case, tokens, ignore_eos=False)
        for case in batch[::4]:
            check(case, generate(any_block_sdar, [case])[0])
        cut = [c for c in batch if c["gen_length"] < len(c["generated_ids"])]
        for case, tokens in zip(cut, generate(any_block_sdar, cut,
                                              max_tokens=lambda c: c["gen_length"])):
            check(case, tokens, max_tokens=case["gen_length"])
        stats = any_block_sdar.collective_rpc("diffusion_step_stats")[0]
        assert stats["steps"] > 0 and stats["graph_steps"] == stats["steps"], stats


def test_streaming_returns_one_block_per_chunk(any_block_sdar):
    case = next(c for c in cases() if c["name"] == "seq_b4_s4_greedy_p8")
    params = params_for(case)
    params.output_kind = RequestOutputKind.DELTA
    engine = any_block_sdar.llm_engine
    engine.add_request("stream-0", {"prompt_token_ids": case["prompt_ids"]}, params)
    chunks = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs[0].token_ids:
                chunks.append(list(out.outputs[0].token_ids))
    assert sum(chunks, []) == case["generated_ids"]
    # Blocks of 4 from position 0; the 8-token prompt ends on a boundary.
    assert [len(c) for c in chunks] == [4] * 6


def test_prefix_hit_on_a_prompt_still_arriving_in_chunks(sdar_llm):
    """vLLM hands a page to other requests as soon as it schedules the page's
    tokens, so the runner stores the whole blocks of a prompt chunk in the
    step that schedules it, not once the prompt is complete. A's 100-token
    prompt comes in chunks of 32; B, whose prompt is A's first 40 tokens, is
    scheduled in A's first step, hits A's first page and decodes in that
    step: as it does alone."""
    prompt = sum((c["prompt_ids"] for c in cases()), [])[:100]
    short = prompt[:40]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sdar_llm.reset_prefix_cache()
    alone = sdar_llm.generate([{"prompt_token_ids": short}], sp, use_tqdm=False)[0]
    sdar_llm.reset_prefix_cache()
    a, b = sdar_llm.generate([{"prompt_token_ids": prompt}, {"prompt_token_ids": short}], sp,
                             use_tqdm=False)
    assert alone.num_cached_tokens == 0 and b.num_cached_tokens == 32
    assert list(b.outputs[0].token_ids) == list(alone.outputs[0].token_ids)
    assert len(a.outputs[0].token_ids) == 12


BAD = [
    ({"block_length": 3}, "block_length must divide the KV page size 32"),
    ({"block_length": 64}, r"one of \[1, 2, 4, 8, 16, 32\]"),
    # Another block length would read cached pages written under 4.
    ({"block_length": 8}, "block_length must be 4, the engine's block length, while prefix "
     "caching is on"),
    ({"algorithm": "low_confidence"}, "algorithm must be one of "
     r"\['low_confidence_dynamic', 'low_confidence_static', 'sequential'\] for sdar"),
    ({"denoising_steps_per_block": 0}, "denoising_steps_per_block must be >= 1"),
    ({"denoising_steps_per_block": "4"}, "denoising_steps_per_block must be an integer"),
    ({"denoising_steps_per_block": 5}, r"denoising_steps_per_block must be <= block_length \(4\)"),
    ({"confidence_threshold": 1.5}, "confidence_threshold"),
    ({"steps": 8}, "unknown diffusion knob"),
    ({"cache": "prefix"}, "unknown diffusion knob"),
    ({"threshold": 0.9}, "unknown diffusion knob"),
]


@pytest.mark.parametrize("knobs,message", BAD)
def test_bad_knobs_are_rejected_at_submission(sdar_llm, knobs, message):
    sp = SamplingParams(temperature=0, max_tokens=8, extra_args=knobs)
    with pytest.raises(RequestError, match=message):
        sdar_llm.generate("Copyright", sp, use_tqdm=False)


def test_defaults_are_the_official_command_line(sdar_llm):
    # Block 4, 4 steps, low_confidence_dynamic at 0.85: the greedy chat case
    # was recorded with 0.85 as well.
    case = next(c for c in cases() if c["name"] == "dyn_b4_s4_greedy_chat_stop")
    assert (case["block_length"], case["denoising_steps"], case["confidence_threshold"]) == (
        4, 4, 0.85)
    sp = SamplingParams(temperature=0, max_tokens=len(case["generated_ids"]), ignore_eos=True)
    out = sdar_llm.generate([{"prompt_token_ids": case["prompt_ids"]}], sp, use_tqdm=False)
    check(case, list(out[0].outputs[0].token_ids))


def test_engine_keeps_prefix_caching_with_pages_of_whole_blocks(sdar_llm):
    cache = sdar_llm.llm_engine.vllm_config.cache_config
    assert cache.enable_prefix_caching and cache.block_size == 32


def test_engine_refuses_a_page_size_its_default_block_length_does_not_divide():
    # The config hook runs in the front end: refused before any engine starts.
    with pytest.raises(ValueError, match="default block_length 32 does not divide the KV page "
                       "size 16"):
        start_engine(str(SDAR / "tiny"), block_size=16,
                     additional_config={"diffusion": {"block_length": 32}})


# -- a small KV cache: preemption, and prefix hits on golden prompts -----------

MAX_LEN = 64


def _small_kv_engine(prefix_caching: bool):
    # 8 pages of 16 tokens: room for about three requests at a time; pages
    # of 16 let the golden prompts (up to 19 tokens) hit the prefix cache.
    return start_engine(str(SDAR / "tiny"), max_model_len=MAX_LEN, num_gpu_blocks_override=8,
                        block_size=16, max_num_batched_tokens=MAX_LEN, disable_log_stats=False,
                        enable_prefix_caching=prefix_caching)


@pytest.fixture(scope="module")
def small_kv_sdar():
    # Prefix caching off: every case's block length (4, 8, 16) is allowed.
    llm = _small_kv_engine(False)
    yield llm
    del llm


@pytest.fixture(scope="module")
def small_kv_prefix_sdar():
    # Prefix caching on (the default): block length 4 only.
    llm = _small_kv_engine(True)
    yield llm
    del llm


def _preemptions(llm) -> int:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


@pytest.mark.parametrize("graph_shaped", [False, True])
def test_preempted_requests_resume_exactly(small_kv_sdar, graph_shaped):
    batch = [c for c in cases() if c["prompt_length"] + len(c["generated_ids"]) <= MAX_LEN]
    assert len(batch) == 13
    before = _preemptions(small_kv_sdar)
    with checked_bookkeeping(small_kv_sdar) as log:
        if graph_shaped:  # the static forward CUDA graphs capture (conftest)
            with graph_shaped_steps(small_kv_sdar):
                got = generate(small_kv_sdar, batch * 2)
        else:
            got = generate(small_kv_sdar, batch * 2)
    assert _preemptions(small_kv_sdar) > before
    assert log["steps"] > 0 and log["mismatches"] == []
    for case, tokens in zip(batch * 2, got):
        check(case, tokens)


def test_prefix_cache_hits_stay_exact(small_kv_prefix_sdar):
    """The second request of a pair sharing a prompt reads the first one's
    pages: from a later step, and from the same step (pages vLLM hashes while
    scheduling the first, written by its store in the same forward). A prompt
    that continues a greedy case with its own output hits pages holding
    generated tokens and must continue as the reference did."""
    case = next(c for c in cases() if c["name"] == "dyn_b4_s4_greedy_chat_stop")
    assert case["prompt_length"] > 16
    small_kv_prefix_sdar.reset_prefix_cache()
    prompt = {"prompt_token_ids": case["prompt_ids"]}
    first = small_kv_prefix_sdar.generate([prompt], params_for(case), use_tqdm=False)[0]
    again = small_kv_prefix_sdar.generate([prompt] * 2, params_for(case), use_tqdm=False)
    assert first.num_cached_tokens == 0
    assert [o.num_cached_tokens for o in again] == [16, 16]
    for out in [first, *again]:
        check(case, list(out.outputs[0].token_ids))

    small_kv_prefix_sdar.reset_prefix_cache()
    same_step = small_kv_prefix_sdar.generate([prompt] * 2, params_for(case), use_tqdm=False)
    assert same_step[1].num_cached_tokens == 16
    for out in same_step:
        check(case, list(out.outputs[0].token_ids))

    base = next(c for c in cases() if c["name"] == "seq_b4_s4_greedy_p8")
    small_kv_prefix_sdar.reset_prefix_cache()
    check(base, generate(small_kv_prefix_sdar, [base])[0])
    cut = 16  # prompt 8 + 16 generated tokens: whole blocks
    longer = {"prompt_token_ids": base["prompt_ids"] + base["generated_ids"][:cut]}
    rest = base["generated_ids"][cut:]
    sp = SamplingParams(temperature=0, max_tokens=len(rest), ignore_eos=True,
                        extra_args=params_for(base).extra_args)
    out = small_kv_prefix_sdar.generate([longer], sp, use_tqdm=False)[0]
    assert out.num_cached_tokens == 16 * math.floor((8 + cut - 1) / 16)
    assert list(out.outputs[0].token_ids) == rest
