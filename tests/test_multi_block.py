"""Multi-block decoding (D2F, Diffulex's multi-block engine; the semantics:
docs/architecture/overview.md, "Multi-block decoding") through the real
LLM(..., worker_cls=...) on the tiny SDAR and LLaDA2 checkpoints.

No D2F or Diffulex run is possible here (neither serves SDAR's or LLaDA2's
own algorithms, nor runs on CPU), so ``reference`` below is the semantics
written as a plain per-request loop: every iteration one forward of the
whole canvas under the block-causal mask (our model, no KV cache, no
engine), then each block in flight commits in order. The engine must give
its tokens exactly, batched and alone, through preemption and through the
graph-shaped forward; with ``max_blocks_in_flight`` = 1 it must give the
golden outputs of single-block decoding."""

from dataclasses import dataclass
from functools import partial

import pytest
import torch
from vllm import SamplingParams

import test_llada2_golden as llada2_golden
import test_sdar_golden as sdar_golden
from conftest import REPO, checked_bookkeeping, graph_shaped_steps, start_engine
from vllm_omni.compat import RequestError
from vllm_omni.diffusion.params import resolve_params
from vllm_omni.models import FAMILIES_BY_NAME

SDAR_STOPS = {1981, 1983}  # the tokenizer's eos and generation_config's eos ids
LLADA2_STOPS = {llada2_golden.EOS}


# -- the reference: the semantics, plainly ---------------------------------------

@dataclass
class Block:
    start: int
    tokens: torch.Tensor
    known: int  # prompt tokens at its start
    full: bool  # fully activated
    step: int = 0  # steps since it was fully activated
    state: object = None  # a refining algorithm's block state
    finished: bool = False


def canvas_logits(model, ids: list[int], block_length: int) -> torch.Tensor:
    """Logits of every position under the block-causal mask, from scratch:
    one sequence per block, reading the keys of every position up to its
    block's end (all computed in this forward) from a key arena of its own."""
    from vllm_omni.models.attention_plan import AttentionPlan, KeyArena, SequencePlan

    device = next(model.parameters()).device
    n, kv = len(ids), model.kv_layout()
    arena = KeyArena(kv.num_layers, n, kv.num_kv_heads, kv.head_dim, kv.dtype, device)
    seqs = [SequencePlan(n, s, s + block_length, keys_start=0, keys_end=s + block_length)
            for s in range(0, n, block_length)]
    with torch.inference_mode():
        plan = AttentionPlan(seqs, model.kv_cache_page_size(), device, arena)
        rows = torch.arange(n, device=device)
        ids = torch.tensor(ids, device=device)
        return model.denoise_logits(ids, rows, plan, rows).cpu()


def reference(model, prompt, params, max_tokens, eos, stops, seed, max_len):
    """One request's output tokens (``eos``: None under ignore_eos; ``stops``:
    vLLM's stop ids then, else empty). Returns (tokens, forwards)."""
    from vllm_omni.diffusion.algorithms import ALGORITHMS, RefineState
    from vllm_omni.diffusion.algorithms.sdar import draw

    algorithm = ALGORITHMS[params.algorithm]
    mask, B = model.mask_token_id, params.block_length
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    tokens = list(prompt)  # what vLLM holds: the prompt, then the returned blocks
    limit = min(len(prompt) + max_tokens, max_len)

    def activate(block):
        block.full, block.step = True, 0
        if algorithm.refines:
            block.state = RefineState(block.known, eos, mask)

    def decided(block):
        return int((block.tokens != mask).sum()) / B

    start = len(prompt) // B * B
    known = len(prompt) - start
    first = Block(start, torch.tensor(tokens[start:] + [mask] * (B - known)), known, False)
    activate(first)
    flight, eos_seen, forwards = [first], False, 0
    while True:
        # A block joins (at most one an iteration), then blocks activate.
        last = flight[-1]
        if (len(flight) < params.max_blocks_in_flight and not eos_seen
                and last.start + B < limit and decided(last) >= params.block_add_threshold):
            flight.append(Block(last.start + B, torch.full((B,), mask), 0, False))
        for before, block in zip(flight, flight[1:]):
            if not block.full and decided(before) >= params.decoded_token_threshold:
                activate(block)
        # One forward over the stored tokens and every block in flight.
        logits = canvas_logits(model, tokens[:start] + sum((b.tokens.tolist() for b in flight),
                                                           []), B)
        forwards += 1
        for block in flight:
            if block.finished:
                continue
            rows = logits[block.start : block.start + B]
            masked = block.tokens == mask
            if not block.full:  # semi-activated: only what clears its threshold
                if params.temperature == 0:
                    new = rows.argmax(-1)
                    confidence = torch.softmax(rows, -1).gather(-1, new[:, None])[:, 0]
                else:
                    new, confidence = draw(rows, params, generator)
                chosen = masked & (confidence > params.semi_active_threshold) & (new != mask)
            else:
                if block.step >= params.max_block_steps:
                    rows = rows.clone()
                    rows[:, mask] = float("-inf")
                if algorithm.refines:
                    block.state.block = block.tokens
                    block.state.had_masks = bool(masked.any())
                    chosen, new = algorithm.commit(rows, masked, block.step, params, generator,
                                                   block.state)
                else:
                    chosen, new = algorithm.commit(rows[None], masked[None], block.step, params,
                                                   generator)
                    chosen, new = chosen[0], new[0]
                block.step += 1
            block.tokens = torch.where(chosen, new, block.tokens)
            if algorithm.refines:
                block.finished = block.full and bool(block.state.done)
            else:
                block.finished = not bool((block.tokens == mask).any())
            if eos is not None and (block.tokens[block.known:] == eos).any():
                eos_seen = True
        # The finished blocks at the front go back to vLLM, which stores them.
        while flight and flight[0].finished:
            block = flight.pop(0)
            tokens += block.tokens[block.known:].tolist()
            start = block.start + B
        out = tokens[len(prompt):]
        stop = next((i for i, t in enumerate(out) if t in stops), None)
        if stop is not None:
            return out[: stop + 1], forwards
        if len(out) >= max_tokens or start >= limit:
            return out[:max_tokens], forwards
        if not flight:
            flight.append(Block(start, torch.full((B,), mask), 0, False))
        if not flight[0].full:  # the one before it is stored now
            activate(flight[0])


def expected(llm, family, prompt, sp: SamplingParams, stops, max_len):
    params = resolve_params(FAMILIES_BY_NAME[family], sp, {}, 32)
    eos = None if sp.ignore_eos else llm.get_tokenizer().eos_token_id
    (result,) = llm.apply_model(partial(
        reference, prompt=prompt, params=params, max_tokens=sp.max_tokens, eos=eos,
        stops=set() if sp.ignore_eos else stops, seed=sp.seed, max_len=max_len))
    return result


def generate(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def stats(llm, reset=False):
    return llm.collective_rpc("diffusion_step_stats", kwargs={"reset": reset})[0]


def _saved_flights(worker):
    return len(worker.model_runner.denoiser.flights.saved)


# -- what each forward holds: stores before every block in flight -----------------

def _watch_forwards(worker, on: bool):
    """On: log, per forward and request, the blocks it stores and the blocks
    in flight (denoising, or finished and waiting: riders). Off: the log."""
    denoiser = worker.model_runner.denoiser
    if not on:
        del denoiser._forward
        return denoiser.__dict__.pop("forward_log")
    log = denoiser.forward_log = []
    forward = denoiser._forward

    def logged(stores, active, awaiting, riders=()):
        entry = {}
        for kind, works in (("stores", stores), ("active", active), ("riders", riders)):
            for w in works:
                seen = entry.setdefault(w.req_id, {"stores": [], "active": [], "riders": [],
                                                   "B": w.block_length,
                                                   "N": w.params.max_blocks_in_flight})
                seen[kind] += [(w.store_start, w.store_end)] if kind == "stores" else [
                    w.store_end]
        log.append(entry)
        return forward(stores, active, awaiting, riders)

    denoiser._forward = logged


def check_forwards(log) -> tuple[int, int]:
    """Every forward: a request's stored blocks all lie before its blocks in
    flight, which are consecutive blocks from its first one (denoising), at
    most max_blocks_in_flight. Returns the largest number in flight and how
    many forwards carried a rider."""
    most = riders = 0
    for entry in log:
        for req, seen in entry.items():
            flight = sorted(seen["active"] + seen["riders"])
            if not flight:
                continue
            B, first = seen["B"], flight[0]
            assert flight == list(range(first, first + B * len(flight), B)), (req, seen)
            assert len(flight) <= seen["N"], (req, seen)
            assert first in seen["active"], (req, seen)  # the first one is never finished
            assert all(end <= first for _, end in seen["stores"]), (req, seen)
            most, riders = max(most, len(flight)), riders + bool(seen["riders"])
    return most, riders


# -- SDAR ----------------------------------------------------------------------

MAX_LEN = 64


@pytest.fixture(scope="module")
def sdar_llm():
    # 8 pages of 16 tokens (preemption), prompts in chunks of 32, groups of
    # at most 64 tokens; prefix caching off: block lengths mix per request.
    llm = start_engine(str(REPO / "tests" / "sdar" / "tiny"), max_model_len=MAX_LEN,
                       num_gpu_blocks_override=8, block_size=16, max_num_batched_tokens=MAX_LEN,
                       long_prefill_token_threshold=32, disable_log_stats=False,
                       enable_prefix_caching=False)
    yield llm
    del llm


def sdar_params(knobs, max_tokens, temperature=0.0, seed=None, ignore_eos=True, **sampling):
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          ignore_eos=ignore_eos, extra_args=knobs, **sampling)


SDAR_SETTINGS = {
    # Greedy with a fixed schedule: blocks join after a quarter, activate at half.
    "static_greedy_n3": (dict(algorithm="low_confidence_static", block_length=4,
                              denoising_steps_per_block=4, max_blocks_in_flight=3,
                              block_add_threshold=0.25, decoded_token_threshold=0.5,
                              semi_active_threshold=0.3), {}),
    # Sampled, seeded: a block joins every step, activates when the one
    # before it is complete.
    "dynamic_sampled_n2": (dict(algorithm="low_confidence_dynamic", block_length=8,
                                denoising_steps_per_block=8, confidence_threshold=0.6,
                                max_blocks_in_flight=2, block_add_threshold=0.0,
                                decoded_token_threshold=1.0, semi_active_threshold=0.4),
                           dict(temperature=0.8, top_k=8, seed=7)),
    # Greedy, left to right, the D2F demo's thresholds (Diffulex's defaults
    # otherwise), four in flight.
    "sequential_greedy_n4": (dict(algorithm="sequential", block_length=4,
                                  denoising_steps_per_block=2, max_blocks_in_flight=4,
                                  decoded_token_threshold=0.5), {}),
}


def sdar_prompts():
    return [c["prompt_ids"] for c in sdar_golden.cases()]


def check_sdar(llm, setting, prompts, max_tokens=24, ignore_eos=True, alone=False):
    knobs, sampling = SDAR_SETTINGS[setting]
    sp = sdar_params(knobs, max_tokens, ignore_eos=ignore_eos, **sampling)
    got = ([generate(llm, [p], sp)[0] for p in prompts] if alone
           else generate(llm, prompts, sp))
    for prompt, tokens in zip(prompts, got):
        want, _ = expected(llm, "sdar", prompt, sp, SDAR_STOPS, MAX_LEN)
        assert tokens == want, (setting, prompt)
    return got


def test_one_block_in_flight_is_single_block_decoding(sdar_llm):
    """max_blocks_in_flight = 1, set explicitly: every golden case, in one
    batch, as the official sampler decodes it."""
    batch = sdar_golden.cases()
    params = [sdar_golden.params_for(c) for c in batch]
    for p in params:
        p.extra_args = {**p.extra_args, "max_blocks_in_flight": 1}
    got = generate(sdar_llm, [c["prompt_ids"] for c in batch], params)
    for case, tokens in zip(batch, got):
        sdar_golden.check(case, tokens)
    assert stats(sdar_llm)["multi_block_blocks_added"] == 0


@pytest.mark.parametrize("setting", list(SDAR_SETTINGS))
def test_engine_matches_the_reference_batched(sdar_llm, setting):
    prompts = sdar_prompts()
    stats(sdar_llm, reset=True)
    with checked_bookkeeping(sdar_llm) as log:
        sdar_llm.collective_rpc(_watch_forwards, args=(True,))
        try:
            got = check_sdar(sdar_llm, setting, prompts)
        finally:
            forwards = sdar_llm.collective_rpc(_watch_forwards, args=(False,))[0]
    assert log["mismatches"] == []
    most, riders = check_forwards(forwards)
    counts = stats(sdar_llm)
    assert most >= 2, most
    assert counts["multi_block_flights_resumed"] > 0, counts  # carried across engine steps
    assert all(2007 not in tokens for tokens in got)  # nothing masked comes back
    if setting == "static_greedy_n3":  # later blocks finish first and come back with it
        assert riders > 0 and counts["multi_block_blocks_returned_with_predecessor"] > 0
    assert sdar_llm.collective_rpc(_saved_flights) == [0]  # finished requests leave nothing


def test_engine_matches_the_reference_alone(sdar_llm):
    """Alone, a request also runs exactly the reference's forwards (the
    stores ride along with them)."""
    knobs, sampling = SDAR_SETTINGS["static_greedy_n3"]
    sp = sdar_params(knobs, 24, **sampling)
    for prompt in sdar_prompts()[:4]:
        stats(sdar_llm, reset=True)
        want, forwards = expected(sdar_llm, "sdar", prompt, sp, SDAR_STOPS, MAX_LEN)
        assert generate(sdar_llm, [prompt], sp)[0] == want
        assert stats(sdar_llm)["steps"] == forwards
    check_sdar(sdar_llm, "dynamic_sampled_n2", sdar_prompts()[4:7], alone=True)


def test_more_blocks_in_flight_take_fewer_forwards(sdar_llm):
    """What multi-block is for: at batch 1, the same tokens' worth of blocks
    in fewer forwards."""
    knobs = dict(SDAR_SETTINGS["static_greedy_n3"][0])
    prompt = sdar_prompts()[0]
    steps = []
    for n in (1, 3):
        stats(sdar_llm, reset=True)
        generate(sdar_llm, [prompt], sdar_params({**knobs, "max_blocks_in_flight": n}, 40))
        steps.append(stats(sdar_llm)["steps"])
    assert steps[1] < steps[0], steps


def test_stops_and_max_tokens(sdar_llm):
    """With vLLM's stop tokens on, a request ends at its first stop: no token
    of a later block comes back, and no block joins once one in flight holds
    the eos. max_tokens cuts inside a block."""
    prompts, stopped = sdar_prompts(), 0
    for setting in SDAR_SETTINGS:
        got = check_sdar(sdar_llm, setting, prompts, max_tokens=40, ignore_eos=False)
        stopped += sum(tokens[-1] in SDAR_STOPS and len(tokens) < 40 for tokens in got)
    assert stopped > 0
    for max_tokens in (13, 18):
        got = check_sdar(sdar_llm, "static_greedy_n3", prompts, max_tokens=max_tokens)
        assert {len(t) for t in got} == {max_tokens}
    assert sdar_llm.collective_rpc(_saved_flights) == [0]


def _preemptions(llm) -> int:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


@pytest.mark.parametrize("graph_shaped", [False, True])
def test_preemption_mid_flight_resumes_exactly(sdar_llm, graph_shaped):
    """Eight pages of 16 tokens for 26 requests: vLLM preempts some while
    they have blocks in flight; those are kept, and continue where they were
    once the request's tokens are stored again."""
    knobs, sampling = SDAR_SETTINGS["static_greedy_n3"]
    sp = sdar_params(knobs, 40, **sampling)
    prompts = sdar_prompts() * 2
    before = _preemptions(sdar_llm)
    stats(sdar_llm, reset=True)
    if graph_shaped:  # the static forward CUDA graphs capture (conftest)
        with graph_shaped_steps(sdar_llm):
            got = generate(sdar_llm, prompts, sp)
        counts = stats(sdar_llm)
        assert counts["graph_steps"] == counts["steps"], counts
    else:
        got = generate(sdar_llm, prompts, sp)
        counts = stats(sdar_llm)
    assert _preemptions(sdar_llm) > before
    assert counts["multi_block_flights_resumed_after_preemption"] > 0, counts
    wants = {}
    for prompt, tokens in zip(prompts, got):
        key = tuple(prompt)
        if key not in wants:
            wants[key] = expected(sdar_llm, "sdar", prompt, sp, SDAR_STOPS, MAX_LEN)[0]
        assert tokens == wants[key]


BAD = [
    ({"max_blocks_in_flight": 0}, "max_blocks_in_flight must be >= 1, got 0"),
    ({"max_blocks_in_flight": 9}, "max_blocks_in_flight must be <= 8, got 9"),
    ({"max_blocks_in_flight": 2.0}, "max_blocks_in_flight must be an integer"),
    ({"block_add_threshold": 1.5}, r"block_add_threshold must be a number in \[0, 1\]"),
    ({"decoded_token_threshold": -0.1}, r"decoded_token_threshold must be a number in \[0, 1\]"),
    ({"semi_active_threshold": "high"}, "semi_active_threshold must be a number"),
]


@pytest.mark.parametrize("knobs,message", BAD)
def test_bad_knobs_are_rejected_at_submission(sdar_llm, knobs, message):
    with pytest.raises(RequestError, match=message):
        sdar_llm.generate("Copyright", sdar_params(knobs, 8), use_tqdm=False)


def test_fast_dllm_v2_refuses_multi_block():
    """Its blocks start with the token the previous block's last forward
    gives: none can start before the one before it is finished."""
    sp = sdar_params({"max_blocks_in_flight": 2}, 8)
    with pytest.raises(RequestError, match=r"unknown diffusion knob\(s\) "
                       r"\['max_blocks_in_flight'\] for fast_dllm_v2"):
        resolve_params(FAMILIES_BY_NAME["fast_dllm_v2"], sp, {}, 32, 32)


# -- LLaDA2 --------------------------------------------------------------------

@pytest.fixture(scope="module")
def llada2_llm():
    llm = start_engine(str(llada2_golden.LLADA2 / "tiny"), max_num_batched_tokens=64,
                       long_prefill_token_threshold=32, enable_prefix_caching=False)
    yield llm
    del llm


def test_llada2_one_block_in_flight_is_single_block_decoding(llada2_llm):
    batch = llada2_golden.cases()
    params = [llada2_golden.params_for(c) for c in batch]
    for p in params:
        p.extra_args = {**p.extra_args, "max_blocks_in_flight": 1}
    got = generate(llada2_llm, [c["prompt_ids"] for c in batch], params)
    llada2_golden.check_all(batch, got)


LLADA2_CASES = ["greedy_b8_s8_edit", "greedy_b4_s4_edit_stop", "sample_b8_s4_edit",
                "greedy_b16_s8_edit_post2", "greedy_b8_s8_edit_no_early_stop"]


@pytest.mark.parametrize("n", [2, 3])
def test_llada2_engine_matches_the_reference(llada2_llm, n):
    """block_refinement with editing and its eos stop: later blocks are
    edited once fully activated, and a block is returned only once its
    algorithm says it is done."""
    batch = [llada2_golden.case_named(name) for name in LLADA2_CASES]
    params = []
    for case in batch:
        p = llada2_golden.params_for(case)
        p.extra_args = {**p.extra_args, "max_blocks_in_flight": n,
                        "decoded_token_threshold": 0.5, "semi_active_threshold": 0.3}
        params.append(p)
    prompts = [c["prompt_ids"] for c in batch]
    stats(llada2_llm, reset=True)
    got = generate(llada2_llm, prompts, params)
    alone = [generate(llada2_llm, [prompt], p)[0] for prompt, p in zip(prompts[:2], params)]
    assert alone == got[:2]
    for prompt, p, tokens in zip(prompts, params, got):
        assert tokens == expected(llada2_llm, "llada2", prompt, p, LLADA2_STOPS, 512)[0], prompt
    assert stats(llada2_llm)["multi_block_blocks_added"] > 0


# -- the benchmark's rows ------------------------------------------------------

def test_throughput_benchmark_measures_blocks_in_flight(tmp_path):
    """benchmarks/throughput.py's multi-block rows at batch 1, on the tiny
    checkpoint with dummy weights: the same tokens in fewer forwards."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--model",
           str(REPO / "tests" / "sdar" / "tiny"), "--batch", "1", "--prompt", "16", "--gen", "32",
           "--block", "4", "--tokens-per-step", "1", "--blocks-in-flight", "1", "2",
           "--decoded-token-threshold", "0.5", "--no-ar", "--gpu-memory-utilization", "0.2",
           "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True, timeout=600)
    rows = {r["blocks_in_flight"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {1, 2} and rows[1]["tokens"] == rows[2]["tokens"] == 32
    assert rows[1]["blocks_added"] == 0 < rows[2]["blocks_added"]
    assert rows[2]["forwards"] < rows[1]["forwards"], rows
