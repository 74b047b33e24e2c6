"""A batch of requests takes one engine step per block, on a real engine
(``docs/architecture/overview.md``, "Arrival skew"): requests that are all in
the scheduler when it steps decode their blocks together, B blocks in B engine
steps. ``LLM.generate`` may start stepping before its last request arrives;
every engine step still decodes exactly one block per scheduled request."""

import random

import pytest
from vllm import SamplingParams

from conftest import ASSETS, in_lockstep, start_engine

BATCH, PROMPT, GEN, BLOCK = 16, 32, 128, 32
BLOCKS = GEN // BLOCK


@pytest.fixture(scope="module")
def llm():
    # A token budget that holds every prompt (the scheduler admits prompts
    # past it in later steps, which skews the batch too) and every canvas (the
    # denoiser runs one group per step, so forwards = steps per block).
    llm = start_engine(str(ASSETS / "llada-tiny"),
                       max_num_batched_tokens=BATCH * (PROMPT + GEN))
    yield llm
    del llm


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(100, 1900) for _ in range(PROMPT)]}
            for _ in range(BATCH)]


def params(steps_per_block: int) -> SamplingParams:
    # No threshold: every block takes exactly its steps (forwards).
    return SamplingParams(temperature=0, max_tokens=GEN, ignore_eos=True,
                          extra_args={"block_length": BLOCK, "steps": BLOCKS * steps_per_block})


def measured(llm, run):
    llm.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
    outs = run()
    return [list(o.outputs[0].token_ids) for o in outs], llm.collective_rpc(
        "diffusion_step_stats")[0]


@pytest.mark.parametrize("steps_per_block", [8, 4])
def test_a_batch_added_before_the_engine_steps_takes_one_step_per_block(
        llm, prompts, steps_per_block):
    tokens, stats = measured(llm, lambda: in_lockstep(llm, prompts, params(steps_per_block)))
    assert [len(t) for t in tokens] == [GEN] * BATCH
    assert stats["engine_steps"] == BLOCKS
    assert stats["steps"] == BLOCKS * steps_per_block  # forwards


def test_generate_decodes_one_block_per_request_per_engine_step(llm, prompts):
    sp = params(8)
    tokens, stats = measured(llm, lambda: llm.generate(prompts, sp, use_tqdm=False))
    # Requests that arrive while a step runs join the next one, a block
    # behind (at worst one arrival per step); each step decodes one block.
    assert BLOCKS <= stats["engine_steps"] <= BLOCKS + BATCH - 1
    assert stats["steps"] == stats["engine_steps"] * 8
    # When a request arrives changes nothing in its tokens.
    assert tokens == measured(llm, lambda: in_lockstep(llm, prompts, sp))[0]
