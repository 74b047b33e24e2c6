"""Seeded sampling: the same seed gives the same tokens across runs and batch
compositions; different seeds differ; sampling departs from greedy."""

import pytest
from vllm import SamplingParams

PROMPT = "This License applies to any program or other work which"


def run(llm, params_list, prompts=None):
    prompts = prompts or [PROMPT] * len(params_list)
    outs = llm.generate(prompts, params_list, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(params=["llada", "dream"])
def engine(request, llada_llm, dream_llm):
    if request.param == "llada":
        return llada_llm, [{"algorithm": "low_confidence", "block_length": 8, "steps": 16},
                           {"algorithm": "random", "block_length": 8, "steps": 32}]
    return dream_llm, [{"algorithm": "maskgit_plus", "steps": 16},
                       {"algorithm": "entropy", "steps": 8, "alg_temp": 0.5},
                       {"algorithm": "origin", "steps": 16}]


def sp(knobs, seed, temperature=0.9, **kw):
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=32,
                          ignore_eos=True, extra_args=knobs, **kw)


def test_same_seed_same_tokens_alone_and_in_any_batch(engine):
    llm, variants = engine
    for knobs in variants:
        alone = run(llm, [sp(knobs, 1234)])[0]
        assert run(llm, [sp(knobs, 1234)])[0] == alone
        other = {**knobs}
        mixed = run(llm, [sp(other, 7), sp(knobs, 1234), sp(other, 8, temperature=0)],
                    prompts=["Copyright", PROMPT, "Everyone is permitted"])
        assert mixed[1] == alone, knobs


def test_different_seeds_differ_and_sampling_differs_from_greedy(engine):
    llm, variants = engine
    knobs = variants[0]
    a, b, c = run(llm, [sp(knobs, 1), sp(knobs, 2), sp(knobs, 3)])
    assert len({tuple(a), tuple(b), tuple(c)}) > 1
    greedy = run(llm, [sp(knobs, None, temperature=0)])[0]
    assert any(x != greedy for x in (a, b, c))
