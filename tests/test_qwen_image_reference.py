"""The tiny Qwen-Image asset and diffusers' recorded outputs on it.

``vllm_omni/assets/qwen-image-tiny`` comes from ``scripts/make_qwen_image_tiny.py``; the
golden data in ``tests/qwen_image/golden`` from ``tests/qwen_image/record_golden.py``
(diffusers 0.42.1, CPU, float32). Re-running diffusers on two recorded cases must give
the recorded tensors back, so a diffusers (or transformers/torch) upgrade that changes
the reference shows up here before it shows up as a mismatch of our own port.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
from safetensors.torch import load_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSET = REPO / "vllm_omni" / "assets" / "qwen-image-tiny"
GOLDEN = REPO / "tests" / "qwen_image" / "golden"
LIVE_CASES = ["c09_64x96_8steps", "c11_batch_cfg"]  # CFG + 8 steps + 64x96; batch + masks
ATOL = 1e-6


def _recorder():
    spec = importlib.util.spec_from_file_location(
        "qwen_image_record_golden", REPO / "tests" / "qwen_image" / "record_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def recorder():
    return _recorder()


@pytest.fixture(scope="module")
def pipe(recorder):
    return recorder.load_pipeline()


@pytest.fixture(scope="module")
def golden():
    doc = json.loads((GOLDEN / "cases.json").read_text())
    return {c["id"]: c for c in doc["cases"]}, doc, load_file(GOLDEN / "golden.safetensors")


def test_asset_loads_and_is_small(pipe):
    size = sum(f.stat().st_size for f in ASSET.rglob("*") if f.is_file())
    assert size < 3_000_000, size
    names = {p.name for p in ASSET.iterdir()}
    assert {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer",
            "scheduler"} <= names
    assert pipe.transformer.config.in_channels == 16
    text_cfg = pipe.text_encoder.config.text_config
    assert pipe.transformer.config.joint_attention_dim == text_cfg.hidden_size == 16
    assert pipe.vae.config.z_dim == 4 and pipe.vae_scale_factor == 4
    assert pipe.scheduler.config.use_dynamic_shifting
    assert len(pipe.tokenizer) <= text_cfg.vocab_size
    # The template's system part is exactly the 34 tokens the pipeline drops.
    prefix = pipe.prompt_template_encode.split("{}")[0]
    ids = pipe.tokenizer(prefix)["input_ids"]
    assert len(ids) == pipe.prompt_template_encode_start_idx == 34
    assert pipe.tokenizer.convert_ids_to_tokens(ids[:1] + ids[-3:]) == [
        "<|im_start|>", "<|im_start|>", "user", "\u010a"]


def test_recorded_cases_are_consistent(golden):
    cases, doc, tensors = golden
    assert 8 <= len(cases) <= 12
    for cid, c in cases.items():
        n = c["num_inference_steps"]
        assert tensors[f"{cid}/latents"].shape[0] == n
        assert tensors[f"{cid}/timesteps"].shape == (n,)
        assert tensors[f"{cid}/sigmas"].shape == (n + 1,)
        assert list(tensors[f"{cid}/image"].shape) == c["image_shape"]
        assert (f"{cid}/negative_embeds" in tensors) == c["do_true_cfg"]
        assert not c["fp64"]["flagged"], (cid, c["fp64"])
    # A negative prompt at true_cfg_scale 1, or CFG without one, changes nothing.
    base = tensors["c00_base/image"]
    assert torch.equal(tensors["c01_neg_cfg1/image"], base)
    assert torch.equal(tensors["c02_cfg4_noneg/image"], base)
    assert not torch.equal(tensors["c03_cfg4_neg/image"], base)


@pytest.mark.parametrize("cid", LIVE_CASES)
def test_diffusers_reproduces_recording(cid, recorder, pipe, golden):
    cases, _, tensors = golden
    out, meta = recorder.run_case(pipe, cases[cid])
    assert meta["do_true_cfg"] == cases[cid]["do_true_cfg"]
    assert meta["prompt_embeds_mask_passed"] == cases[cid]["prompt_embeds_mask_passed"]
    keys = sorted(k.split("/", 1)[1] for k in tensors if k.startswith(cid + "/"))
    assert sorted(out) == keys
    for k in keys:
        want, got = tensors[f"{cid}/{k}"], out[k]
        assert got.shape == want.shape and got.dtype == want.dtype, k
        diff = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
        assert diff <= ATOL, f"{cid}/{k}: max abs diff {diff:.3e}"
