"""The LLaDA port layer by layer: one full forward against the official
model's logits (../shared/golden/llada_forward.safetensors), run inside the
worker of a real engine."""

from functools import partial

import torch

from conftest import GOLDEN
import pytest


def _forward_logits(model, input_ids):
    from vllm_omni.models.attention_plan import AttentionPlan, SequencePlan

    ids = input_ids.to(next(model.parameters()).device)
    n = ids.numel()
    positions = torch.arange(n, device=ids.device)
    rows = torch.arange(n, device=ids.device)
    with torch.inference_mode():
        return model.denoise_logits(ids, positions, AttentionPlan([SequencePlan(n, 0, n)]), rows).cpu()


def test_forward_matches_official_logits(llada_llm):
    path = GOLDEN / "llada_forward.safetensors"
    if not path.exists():
        pytest.skip("golden forward not found")
    from safetensors.torch import load_file

    ref = load_file(str(path))
    (logits,) = llada_llm.apply_model(partial(_forward_logits, input_ids=ref["input_ids"]))
    assert logits.shape == ref["logits"].shape
    err = (logits - ref["logits"]).abs().max().item()
    assert err < 1e-4, err
    rel = ((logits - ref["logits"]).norm() / ref["logits"].norm()).item()
    assert rel < 1e-5, rel
    assert torch.equal(logits.argmax(-1), ref["logits"].argmax(-1))
