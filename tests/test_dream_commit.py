"""Dream's commit on the device (``diffusion/algorithms/dream.py``) against a
plain per-request commit, the one it replaced (kept here as the reference):
on random logits, step by step through whole blocks, the same positions and
tokens, and seeded generators left in the same state. Also: a commit without
random draws never waits for the device."""

import pytest
import torch
from vllm import SamplingParams

from vllm_omni.diffusion.algorithms import ALGORITHMS, apply_commit
from vllm_omni.diffusion.algorithms.dream import sample_tokens, timesteps, transfer_count
from vllm_omni.diffusion.params import resolve_params
from vllm_omni.models import FAMILIES_BY_NAME

VOCAB = 97
MASK = VOCAB - 1


# -- the plain per-request commit (what the engine ran before) --------------

def plain_ranked(confidence, masked, step, params, tokens, generator):
    rows = masked.nonzero().squeeze(-1)
    k = transfer_count(rows.numel(), step, params.steps_per_block, params.eps)
    if k == 0:
        return rows[:0], tokens[:0]
    full = torch.full(masked.shape, -torch.inf, dtype=confidence.dtype)
    full[rows] = confidence
    if params.alg_temp:
        weights = torch.softmax(full / params.alg_temp, dim=-1)
        picked = torch.multinomial(weights, k, generator=generator)
    else:
        picked = torch.topk(full, k).indices
    block_tokens = torch.zeros(masked.shape, dtype=torch.long)
    block_tokens[rows] = tokens
    return picked, block_tokens[picked]


def plain_commit(name, logits, masked, step, params, generator):
    if name == "origin":
        rows = masked.nonzero().squeeze(-1)
        if step >= params.steps_per_block - 1:
            chosen = rows
        else:
            t = timesteps(params.steps_per_block, params.eps)
            p_transfer = float(1 - t[step + 1] / t[step])
            chosen = rows[torch.rand(rows.numel(), generator=generator) < p_transfer]
        _, tokens, _ = sample_tokens(logits[chosen], params, generator)
        return chosen, tokens
    probs, tokens, chosen = sample_tokens(logits[masked], params, generator)
    if name == "maskgit_plus":
        confidence = chosen
    elif name == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    else:
        confidence = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    return plain_ranked(confidence, masked, step, params, tokens, generator)


# -- helpers ----------------------------------------------------------------

def dream_params(algorithm, temperature=0.0, block=None, max_tokens=24, steps=8, **knobs):
    extra = {"algorithm": algorithm, "steps": steps, **knobs}
    if block:
        extra["block_length"] = block
    sampling = SamplingParams(temperature=temperature, max_tokens=max_tokens, extra_args=extra)
    return resolve_params(FAMILIES_BY_NAME["dream"], sampling)


def random_logits(rows, seed, peaked=True):
    """Peaked rows, a quarter with the mask token likely (so it gets drawn at
    times), the first one certain (so it stays masked to the end); not
    peaked for top-p, which would leave rows of one token at probability 1:
    ties, which the golden cases avoid (the plain commit's ``torch.topk``
    breaks them its own way)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=g)
    if peaked:
        logits *= 3
        logits[: rows // 4, MASK] += 6
        logits[0, MASK] += 30
    return logits


def new_commit(name, logits, block, step, params, generator):
    masked = block == MASK
    counted = {}
    if ALGORITHMS[name].counts_masks(params):
        counted["num_masked"] = int(masked.sum())  # what the denoiser's look gives
    return ALGORITHMS[name].commit(logits, masked, step, params, generator, **counted)


def decode_both(name, params, seed, generator_seed):
    """One block decoded step by step by both commits (same logits per
    step): the blocks after each step, and the generators' final states."""
    old_gen = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    new_gen = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    old = torch.full((params.block_length,), MASK)
    new = old.clone()
    for step in range(params.steps_per_block):
        top_p = params.top_p is not None and params.top_p < 1
        logits = random_logits(params.block_length, seed * 1000 + step, peaked=not top_p)
        torch.manual_seed(seed + step)  # the global generator, when unseeded
        positions, tokens = plain_commit(name, logits, old == MASK, step, params, old_gen)
        old[positions] = tokens
        old_global = torch.get_rng_state()
        torch.manual_seed(seed + step)
        positions, tokens = new_commit(name, logits, new, step, params, new_gen)
        apply_commit(new, positions, tokens)
        assert torch.equal(old, new), (name, step)
        assert torch.equal(old_global, torch.get_rng_state()), (name, step)
    states = [g.get_state() if g is not None else None for g in (old_gen, new_gen)]
    return old, new, states


CASES = [
    # (temperature, knobs)
    (0.0, {}),
    (0.0, {"top_k": 0}),
    (0.0, {"top_p": 0.9, "top_k": 20}),
    (0.8, {}),
    (1.0, {"top_k": 0, "top_p": 0.95}),
    (0.0, {"alg_temp": 0.5}),
    (0.7, {"alg_temp": 0.3}),
    (1.0, {"alg_temp": 2.0, "top_k": 0}),
]


@pytest.mark.parametrize("name,temperature,knobs", [
    (name, temperature, knobs) for name in ("maskgit_plus", "topk_margin", "entropy", "origin")
    for temperature, knobs in CASES if name != "origin" or "alg_temp" not in knobs])
@pytest.mark.parametrize("seeded", [True, False])
def test_device_commit_equals_plain_commit(name, temperature, knobs, seeded):
    left_masked = 0
    for seed, (max_tokens, steps) in enumerate([(24, 8), (24, 24), (20, 7), (32, 5)]):
        params = dream_params(name, temperature, max_tokens=max_tokens, steps=steps, **knobs)
        old, new, (old_state, new_state) = decode_both(name, params, seed,
                                                       100 + seed if seeded else None)
        assert torch.equal(old, new)
        if seeded:
            assert torch.equal(old_state, new_state)
        left_masked += int((new == MASK).sum())
    if temperature == 0 and "top_p" not in knobs:
        # The logits make the mask token win at times: committed, the
        # position stays masked, and after the last step some stay so.
        assert left_masked > 0


def test_batched_commit_equals_one_by_one():
    """A batch of greedy blocks [n, block, vocab] commits what each block
    commits alone, at every step, whatever else is in the batch."""
    for name in ("maskgit_plus", "topk_margin", "entropy"):
        params = dream_params(name, top_p=0.9)
        blocks = torch.full((5, params.block_length), MASK)
        for step in range(params.steps_per_block):
            logits = torch.stack([random_logits(params.block_length, 7 * i + step)
                                  for i in range(5)])
            alone = blocks.clone()
            for i in range(5):
                positions, tokens = new_commit(name, logits[i], alone[i], step, params, None)
                apply_commit(alone[i], positions, tokens)
            selection, tokens = new_commit(name, logits, blocks, step, params, None)
            blocks = torch.where(selection, tokens, blocks)
            assert torch.equal(blocks, alone), (name, step)


@pytest.mark.parametrize("name", ["maskgit_plus", "topk_margin", "entropy"])
def test_greedy_commit_never_waits_for_the_device(name):
    """On the meta device no value can ever reach the host (``.item()``,
    ``nonzero``, a bool index raise there): a greedy step, alone or as a
    batch, commits there, so it never waits for the device. The plain
    commit cannot."""
    params = dream_params(name, top_p=0.9)
    for step in range(params.steps_per_block):
        for shape in [(params.block_length,), (3, params.block_length)]:
            block = torch.full(shape, MASK, device="meta")
            logits = torch.empty(*shape, VOCAB, device="meta")
            positions, tokens = ALGORITHMS[name].commit(logits, block == MASK, step, params, None)
            assert positions.dtype == torch.bool and positions.shape == shape
            apply_commit(block, positions, tokens)
    with pytest.raises((NotImplementedError, RuntimeError)):
        plain_commit(name, logits[0], block[0] == MASK, 0, params, None)


@pytest.mark.parametrize("name,temperature,knobs", [
    ("maskgit_plus", 0.8, {}), ("entropy", 0.0, {"alg_temp": 0.5}),
    ("topk_margin", 1.0, {"alg_temp": 2.0}), ("origin", 0.0, {})])
def test_drawing_commit_waits_only_for_the_count(name, temperature, knobs):
    """Told the number of masked positions (the denoiser's one look per step
    for the whole batch), a step that draws waits for nothing else. (Origin
    at temperature > 0 draws tokens for the positions it picked: their
    number is a look of its own.)"""
    params = dream_params(name, temperature, **knobs)
    block = torch.full((params.block_length,), MASK, device="meta")
    logits = torch.empty(params.block_length, VOCAB, device="meta")
    for step in range(params.steps_per_block):
        positions, tokens = ALGORITHMS[name].commit(logits, block == MASK, step, params, None,
                                                    num_masked=params.block_length - step)
        apply_commit(block, positions, tokens)


# -- through the engine ------------------------------------------------------

def _golden_cases():
    from conftest import golden_cases

    return golden_cases("dream_cases.json")["cases"]


def _generate(llm, cases, **sampling):
    params = [SamplingParams(max_tokens=c["max_new_tokens"], ignore_eos=True,
                             extra_args={"algorithm": c["alg"], "steps": c["steps"],
                                         "eps": c["eps"], "top_k": c["top_k"],
                                         "top_p": c["top_p"]}, **sampling)
              for c in cases]
    outs = llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in cases], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _stats(llm, reset=False):
    return llm.collective_rpc("diffusion_step_stats", kwargs={"reset": reset})[0]


def test_greedy_batches_commit_together_and_never_look(dream_llm):
    """Each golden case three times in one batch: the copies of a case share
    their knobs, so they commit as one batch of blocks; every output is the
    official one, and the loop never waits for the device to count masks."""
    cases = [c for c in _golden_cases() for _ in range(3)]
    _stats(dream_llm, reset=True)
    outputs = _generate(dream_llm, cases, temperature=0)
    stats = _stats(dream_llm)
    for case, tokens in zip(cases, outputs):
        assert tokens == case["output_ids"], case["name"]
    assert stats["steps"] > 0 and stats["batched_commits"] > 0, stats
    assert stats["looks"] == 0, stats


def test_draws_shaped_by_the_mask_count_look_once_per_step(dream_llm):
    """A seeded sampling request needs the count of masked positions (its
    draws take that shape): one look per step, shared by the whole batch,
    and the same tokens alone as beside others."""
    case = _golden_cases()[1]
    knobs = {"steps": case["steps"], "alg_temp": 0.5}
    sp = [SamplingParams(temperature=0.8, seed=seed, max_tokens=case["max_new_tokens"],
                         ignore_eos=True, extra_args=knobs) for seed in (3, 4, 5)]
    prompt = {"prompt_token_ids": case["prompt_ids"]}
    alone = dream_llm.generate([prompt], sp[0], use_tqdm=False)[0].outputs[0].token_ids
    _stats(dream_llm, reset=True)
    together = dream_llm.generate([prompt] * 3, sp, use_tqdm=False)
    stats = _stats(dream_llm)
    assert list(together[0].outputs[0].token_ids) == list(alone)
    assert 0 < stats["looks"] <= stats["steps"], stats
