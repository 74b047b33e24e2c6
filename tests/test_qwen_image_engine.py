"""Qwen-Image through a real vLLM engine against diffusers' own outputs
(tests/qwen_image/golden, recorded by tests/qwen_image/record_golden.py from
``QwenImagePipeline`` on the tiny checkpoint), float32 on CPU: the images
(max abs pixel difference <= 1e-4), and since a tiny random model barely
listens to its prompt, also the prompt embeddings after the template drop and
the latents after every step (<= 1e-5). On a GPU (float32 as well: TF32 off,
IEEE dots in the attention kernel, but other kernels and summation orders) the
bound is 2e-3 for both. Requests carry the prompt token ids
diffusers tokenized and the knobs as the IO processor sends them
(``PoolingParams.extra_kwargs``), so this engine runs without the IO
processor (``hf_overrides``), whose own parsing and tokenization are tested
in tests/test_image_requests.py."""

import json

import pytest
import torch
from safetensors.torch import load_file
from vllm.pooling_params import PoolingParams

from conftest import ASSETS, REPO, start_engine
from vllm_omni.models.qwen_image.pipeline_math import (DEFAULT_MAX_SEQUENCE_LENGTH,
                                                       PROMPT_TEMPLATE_DROP)

GOLDEN = REPO / "tests" / "qwen_image" / "golden"
META = json.loads((GOLDEN / "cases.json").read_text())
TENSORS = load_file(GOLDEN / "golden.safetensors")
# Single-prompt cases. A diffusers batch (c11) draws both images' noise from
# one generator, which per-request seeds cannot reproduce.
CASES = [c for c in META["cases"] if c["batch_size"] == 1]
PIXEL_TOL, LATENT_TOL = (2e-3, 2e-3) if torch.cuda.is_available() else (1e-4, 1e-5)


def request(case):
    neg = TENSORS.get(f"{case['id']}/negative_input_ids")
    prompt = {"prompt_token_ids": TENSORS[f"{case['id']}/prompt_input_ids"][0].tolist()}
    extra = {"height": case["height"], "width": case["width"],
             "num_inference_steps": case["num_inference_steps"],
             "true_cfg_scale": case["true_cfg_scale"], "seed": case["seed"],
             "negative_prompt_token_ids": None if neg is None else neg[0].tolist()}
    return prompt, PoolingParams(task="plugin", extra_kwargs=extra)


def golden_image(case) -> torch.Tensor:
    return TENSORS[f"{case['id']}/image"][0].permute(1, 2, 0)  # [H, W, 3], as "np"


def generate(llm, cases):
    prompts, params = zip(*(request(c) for c in cases))
    outs = llm.encode(list(prompts), pooling_params=list(params), pooling_task="plugin",
                      use_tqdm=False)
    return [o.outputs.data for o in outs]


@pytest.fixture(scope="module")
def image_llm():
    llm = start_engine(str(ASSETS / "qwen-image-tiny"), config_format="qwen_image",
                       max_model_len=None, hf_overrides={"io_processor_plugin": None})
    yield llm
    del llm


def test_every_case_in_one_batch_matches_diffusers(image_llm):
    assert len(CASES) >= 10
    worst = 0.0
    for case, image in zip(CASES, generate(image_llm, CASES)):
        want = golden_image(case)
        assert image.dtype == torch.float32 and image.shape == want.shape, case["id"]
        diff = (image - want).abs().max().item()
        assert diff <= PIXEL_TOL, case["id"]
        worst = max(worst, diff)
    print(f"\nmax pixel difference over {len(CASES)} cases in one batch: {worst:.2e}")


def test_one_request_at_a_time_matches_diffusers(image_llm):
    for case in CASES[::3]:
        (image,) = generate(image_llm, [case])
        assert (image - golden_image(case)).abs().max().item() <= PIXEL_TOL, case["id"]


def _set_budget(worker, tokens: int) -> int:
    denoiser = worker.model_runner.image_denoiser
    denoiser.tokens_per_forward, old = tokens, denoiser.tokens_per_forward
    return old


def test_a_small_forward_budget_splits_the_batch_without_changing_it(image_llm):
    # One token per forward: every request is decoded in a group of its own.
    (old,) = image_llm.collective_rpc(_set_budget, args=(1,))
    try:
        images = generate(image_llm, CASES[:4])
    finally:
        image_llm.collective_rpc(_set_budget, args=(old,))
    for case, image in zip(CASES[:4], images):
        assert (image - golden_image(case)).abs().max().item() <= PIXEL_TOL, case["id"]


def _profile(worker, max_side: int) -> tuple[int, int, int, int]:
    runner = worker.model_runner
    limits = {**runner._image_limits(), "max_side": max_side}
    tokens = runner.image_denoiser.profile(runner.scheduler_config.max_num_seqs, **limits)
    return (tokens, runner.scheduler_config.max_num_seqs, limits["max_prompt_tokens"],
            runner.image_denoiser.vsf)


def test_profile_pass_runs_the_largest_group_then_serving_stays_exact(image_llm):
    """The start-up pass (on the GPU, inside ``profile_run``) run here at a
    64x64 limit: max_num_seqs requests with CFG and the longest prompts, cut
    into forward groups as serving cuts them; its first group's forward."""
    (old,) = image_llm.collective_rpc(_set_budget, args=(10_000,))
    try:
        ((tokens, seqs, prompt, vsf),) = image_llm.collective_rpc(_profile, args=(64,))
    finally:
        image_llm.collective_rpc(_set_budget, args=(old,))
    image = (64 // vsf // 2) ** 2  # tokens per branch: 2x2 latent patches
    per_request = 2 * (image + prompt)  # a group's budget counts the template
    in_group = min(seqs, 10_000 // per_request)
    assert seqs >= 2 and in_group >= 2
    # The forward's text: the prompts past the template, at most 512 tokens.
    text = min(prompt - PROMPT_TEMPLATE_DROP, DEFAULT_MAX_SEQUENCE_LENGTH)
    assert tokens == in_group * 2 * (image + text)
    case = CASES[0]
    (got,) = generate(image_llm, [case])
    assert (got - golden_image(case)).abs().max().item() <= PIXEL_TOL


def _set_trace(worker, on: bool):
    worker.model_runner.image_denoiser.trace = {} if on else None


def _get_trace(worker):
    return worker.model_runner.image_denoiser.trace


@pytest.mark.parametrize("case", [c for c in CASES if c["do_true_cfg"]][:2] + CASES[:1],
                         ids=lambda c: c["id"])
def test_embeddings_and_latents_after_every_step_match_diffusers(image_llm, case):
    image_llm.collective_rpc(_set_trace, args=(True,))
    try:
        generate(image_llm, [case])
        (trace,) = image_llm.collective_rpc(_get_trace)[0].values()
    finally:
        image_llm.collective_rpc(_set_trace, args=(False,))
    key = case["id"]
    torch.testing.assert_close(trace["embeds"][0], TENSORS[f"{key}/prompt_embeds"][0],
                               rtol=0, atol=LATENT_TOL)
    if case["do_true_cfg"]:
        torch.testing.assert_close(trace["neg_embeds"][0], TENSORS[f"{key}/negative_embeds"][0],
                                   rtol=0, atol=LATENT_TOL)
    else:
        assert "neg_embeds" not in trace
    latents = torch.stack(trace["latents"])  # initial, then after each step
    torch.testing.assert_close(latents[0], TENSORS[f"{key}/latents_init"][0], rtol=0,
                               atol=LATENT_TOL)
    want = TENSORS[f"{key}/latents"][:, 0]  # [steps, tokens, channels]
    assert latents.shape[0] == case["num_inference_steps"] + 1
    torch.testing.assert_close(latents[1:], want, rtol=0, atol=LATENT_TOL)


def test_tensor_parallel_2_matches_diffusers(tmp_path, monkeypatch):
    """TP=2 splits the MMDiT's heads and MLP columns (and the text encoder's)
    across two ranks. The shipped transformer has 3 heads, so this test swaps
    in a 4-head one (same format, random weights) and compares with diffusers
    run live on the same folder."""
    import shutil

    diffusers = pytest.importorskip("diffusers")
    if not torch.cuda.is_available():
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    folder = tmp_path / "qwen-image-4-heads"
    shutil.copytree(ASSETS / "qwen-image-tiny", folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(**{**config, "num_attention_heads": 4})
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.2)
    transformer.save_pretrained(folder / "transformer")

    case = next(c for c in CASES if c["do_true_cfg"])
    pipe = diffusers.QwenImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)
    want = pipe(prompt=case["prompt"],
                negative_prompt=case["negative_prompt"], true_cfg_scale=case["true_cfg_scale"],
                height=case["height"], width=case["width"],
                num_inference_steps=case["num_inference_steps"],
                generator=torch.Generator("cpu").manual_seed(case["seed"]),
                output_type="pt").images[0].permute(1, 2, 0)
    llm = start_engine(str(folder), config_format="qwen_image", max_model_len=None,
                       tensor_parallel_size=2, hf_overrides={"io_processor_plugin": None})
    try:
        (image,) = generate(llm, [case])
    finally:
        del llm
    assert (image - want).abs().max().item() <= PIXEL_TOL
