"""LLaDA2 through the real LLM(..., worker_cls=...) against diffusers'
``LLaDA2Pipeline`` + ``BlockRefinementScheduler`` with the official model code
on the tiny MoE checkpoint (tests/llada2/golden; how it was recorded and why
the model runs under its own block-diffusion mask: tests/llada2/README.md).

Output rule: ours equals the pipeline's ``sequences`` (``max_tokens`` =
``gen_length``). A case recorded with ``eos_early_stop`` runs with vLLM's eos
stop and matches up to and including the first eos (the pipeline then stops
and leaves later blocks masked); one recorded without it runs with
``ignore_eos`` and matches whole."""

import json
from functools import partial

import pytest
import torch
from vllm import SamplingParams

from conftest import (REPO, block_causal_forward, checked_bookkeeping, graph_shaped_steps,
                      in_lockstep, start_engine)
from vllm_omni.compat import RequestError

LLADA2 = REPO / "tests" / "llada2"
GOLDEN = json.loads((LLADA2 / "golden" / "llada2_cases.json").read_text())
EOS = GOLDEN["tokens"]["eos"]


def cases():
    return GOLDEN["cases"]


def case_named(name):
    return next(c for c in cases() if c["name"] == name)


def knobs_of(case):
    return {"block_length": case["B"], "denoising_steps_per_block": case["S"],
            "confidence_threshold": case["threshold"],
            "editing_threshold": case["editing_threshold"],
            "max_post_steps": case["max_post_steps"]}


def params_for(case, knobs=True):
    s = case["sampling"]
    kw = dict(temperature=s["temperature"], max_tokens=case["gen"],
              ignore_eos=not case["eos_early_stop"])
    if knobs:
        kw["extra_args"] = knobs_of(case)
    if s["temperature"] > 0:
        kw.update(seed=case["seed"], top_k=s["top_k"] or 0, top_p=s["top_p"] or 1.0)
    return SamplingParams(**kw)


def want(case):
    out = case["output_ids"]
    if case["eos_early_stop"] and EOS in out:
        return out[: out.index(EOS) + 1]
    return out


def generate(llm, batch, knobs=True):
    outs = llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in batch],
                        [params_for(c, knobs) for c in batch], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def check_all(batch, got):
    bad = [c["name"] for c, tokens in zip(batch, got) if tokens != want(c)]
    assert not bad, bad


@pytest.fixture(scope="module")
def llada2_llm():
    # Prefix caching off: the cases' block lengths (4, 8, 16, 32) mix per
    # request. Prompts arrive in chunks of at most 32 tokens, a step's work
    # is split into groups within the budget of 64 tokens.
    llm = start_engine(str(LLADA2 / "tiny"), max_num_batched_tokens=64,
                       long_prefill_token_threshold=32, enable_prefix_caching=False)
    yield llm
    del llm


def test_golden_set_covers_the_reference_paths():
    batch = cases()
    assert len(batch) == 13
    assert {c["sampling"]["temperature"] > 0 for c in batch} == {True, False}
    assert {bool(c["editing_threshold"]) for c in batch} == {True, False}
    assert {c["B"] for c in batch} == {4, 8, 16, 32}
    assert any(c["eos_early_stop"] and c["eos_in_output"] for c in batch)
    assert any(not c["eos_early_stop"] for c in batch)
    assert any(t["edited"] for c in batch for t in c["trace"])  # editing happened
    # Steps after a block's last mask (the post-mask refinement) happened.
    assert any(not t["committed"] for c in batch for t in c["trace"])


def test_forward_matches_official_logits(llada2_llm):
    from safetensors.torch import load_file

    ref = load_file(str(LLADA2 / "golden" / "llada2_forward.safetensors"))
    block = int(ref["block_length"])
    (logits,) = llada2_llm.apply_model(partial(block_causal_forward, input_ids=ref["input_ids"],
                                               block_length=block))
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"]).abs().max().item() < 1e-4
    assert torch.equal(logits.argmax(-1), ref["logits"].argmax(-1))


def test_all_cases_in_one_batch(llada2_llm):
    batch = cases()
    check_all(batch, generate(llada2_llm, batch))


def reference_forwards(case):
    """The pipeline's forwards up to the block that returns the first eos to
    vLLM. The pipeline may go on: an eos ends it only in a step that commits
    an eos with no mask before the first one, so when a later step of that
    block fills the masks before it, the next block runs until it commits an
    eos (NOTES.md); vLLM stops at the first eos once the block comes back."""
    out = want(case)
    if not case["eos_early_stop"] or out[-1:] != [EOS]:
        return case["nfe"]
    last = (len(case["prompt_ids"]) + len(out) - 1) // case["B"]
    return sum(t["block"] <= last for t in case["trace"])


def test_cases_one_at_a_time_with_the_reference_forwards(llada2_llm):
    """Alone, a request runs exactly the pipeline's forwards: one per
    refinement step (stores ride along with them), the steps after the last
    mask included."""
    fewer = []
    for case in cases():
        llada2_llm.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
        assert generate(llada2_llm, [case]) == [want(case)], case["name"]
        stats = llada2_llm.collective_rpc("diffusion_step_stats")[0]
        assert stats["steps"] == reference_forwards(case), (case["name"], stats)
        if stats["steps"] < case["nfe"]:
            fewer.append(case["name"])
    assert fewer == ["greedy_b8_s4_thr1_edit", "sample_b8_s8_noedit"]  # the quirk above


def test_graph_shaped_forwards_are_exact(llada2_llm):
    """The static forward the CUDA graphs capture, run uncaptured: every case
    in one batch, token for token."""
    with graph_shaped_steps(llada2_llm):
        llada2_llm.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
        batch = cases()
        check_all(batch, generate(llada2_llm, batch))
        stats = llada2_llm.collective_rpc("diffusion_step_stats")[0]
        assert stats["steps"] > 0 and stats["graph_steps"] == stats["steps"], stats


def test_defaults_are_the_pipelines(llada2_llm):
    # Block 32, 32 steps, threshold 0.7, editing 0.5 with 16 post steps: the
    # greedy chat case was recorded with exactly these.
    case = case_named("greedy_b32_s32_edit_chat")
    assert knobs_of(case) == {"block_length": 32, "denoising_steps_per_block": 32,
                              "confidence_threshold": 0.7, "editing_threshold": 0.5,
                              "max_post_steps": 16}
    assert generate(llada2_llm, [case], knobs=False) == [want(case)]


BAD = [
    ({"block_length": 3}, "block_length must divide the KV page size 32"),
    ({"algorithm": "low_confidence_dynamic"},
     r"algorithm must be one of \['block_refinement'\] for llada2"),
    ({"editing_threshold": 1.5}, r"editing_threshold must be a number in \[0, 1\]"),
    ({"editing_threshold": "high"}, "editing_threshold must be a number"),
    ({"max_post_steps": -1}, "max_post_steps must be >= 0"),
    ({"confidence_threshold": 2.0}, "confidence_threshold"),
    ({"denoising_steps_per_block": 0}, "denoising_steps_per_block must be >= 1"),
    ({"steps": 8}, "unknown diffusion knob"),
    ({"threshold": 0.9}, "unknown diffusion knob"),
]


@pytest.mark.parametrize("knobs,message", BAD)
def test_bad_knobs_are_rejected_at_submission(llada2_llm, knobs, message):
    sp = SamplingParams(temperature=0, max_tokens=8, extra_args=knobs)
    with pytest.raises(RequestError, match=message):
        llada2_llm.generate("Copyright", sp, use_tqdm=False)


# -- a small KV cache: preemption; prefix-cache hits ----------------------------

MAX_LEN = 64


@pytest.fixture(scope="module")
def small_kv_llada2():
    # 5 pages of 16 tokens: one request at its longest (64 tokens) and a
    # little more, so a batch that starts together runs out of pages (the
    # engine's default block length must divide the page: 16).
    llm = start_engine(str(LLADA2 / "tiny"), max_model_len=MAX_LEN, num_gpu_blocks_override=5,
                       block_size=16, max_num_batched_tokens=MAX_LEN, disable_log_stats=False,
                       enable_prefix_caching=False,
                       additional_config={"diffusion": {"block_length": 16}})
    yield llm
    del llm


def _preemptions(llm) -> int:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_preempted_requests_resume_exactly(small_kv_llada2):
    batch = [c for c in cases() if c["B"] <= 16]  # block lengths dividing the page
    assert len(batch) == 12
    assert all(len(c["prompt_ids"]) + c["gen"] <= MAX_LEN for c in batch)
    before = _preemptions(small_kv_llada2)
    # All in the scheduler before the first step (not arriving while it
    # steps), so the pages run out whatever the timing.
    with checked_bookkeeping(small_kv_llada2) as log:
        outs = in_lockstep(small_kv_llada2, [{"prompt_token_ids": c["prompt_ids"]}
                                             for c in batch * 2],
                           [params_for(c) for c in batch * 2])
        got = [list(o.outputs[0].token_ids) for o in outs]
    assert _preemptions(small_kv_llada2) > before
    assert log["steps"] > 0 and log["mismatches"] == []
    check_all(batch * 2, got)


@pytest.fixture(scope="module")
def prefix_llada2():
    # Prefix caching on: pages of 16 tokens, every request at the engine's
    # block length 16.
    llm = start_engine(str(LLADA2 / "tiny"), max_model_len=MAX_LEN, block_size=16,
                       max_num_batched_tokens=MAX_LEN,
                       additional_config={"diffusion": {"block_length": 16}})
    yield llm
    del llm


def test_prefix_cache_hits_stay_exact(prefix_llada2):
    """The second request of a pair sharing a prompt reads the first one's
    stored page, from a later step and from the same step."""
    case = case_named("sample_b16_s16_thr1_edit")
    assert case["B"] == 16 and len(case["prompt_ids"]) > 16
    prompt = {"prompt_token_ids": case["prompt_ids"]}
    prefix_llada2.reset_prefix_cache()
    first = prefix_llada2.generate([prompt], params_for(case), use_tqdm=False)[0]
    again = prefix_llada2.generate([prompt] * 2, params_for(case), use_tqdm=False)
    assert first.num_cached_tokens == 0
    assert [o.num_cached_tokens for o in again] == [16, 16]
    prefix_llada2.reset_prefix_cache()
    same_step = prefix_llada2.generate([prompt] * 2, params_for(case), use_tqdm=False)
    assert same_step[1].num_cached_tokens == 16
    for out in [first, *again, *same_step]:
        assert list(out.outputs[0].token_ids) == want(case)


def test_other_block_lengths_are_refused_while_prefix_caching_is_on(prefix_llada2):
    sp = SamplingParams(temperature=0, max_tokens=8, extra_args={"block_length": 8})
    with pytest.raises(RequestError, match="block_length must be 16, the engine's block length"):
        prefix_llada2.generate("Copyright", sp, use_tqdm=False)
