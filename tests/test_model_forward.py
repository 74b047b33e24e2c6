"""The model ports layer by layer: one full forward against the official
model's logits (../shared/golden/{llada,dream}_forward.safetensors), run inside
the worker of a real engine."""

from functools import partial

import pytest
import torch

from conftest import GOLDEN


def _denoise_logits(model, input_ids):
    """The logits our denoising forward gives each position of ``input_ids``
    (for Dream, whose logits are shifted, each position but the last)."""
    from vllm_omni.models.attention_plan import AttentionPlan, SequencePlan

    ids = input_ids.to(next(model.parameters()).device)
    n = ids.numel()
    positions = torch.arange(n, device=ids.device)
    # denoise_logits reads row r from position r - logit_shift.
    rows = torch.arange(model.logit_shift, n, device=ids.device)
    with torch.inference_mode():
        plan = AttentionPlan([SequencePlan(n, 0, n)], model.kv_cache_page_size(), ids.device)
        return model.denoise_logits(ids, positions, plan, rows).cpu()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_forward_matches_official_logits(family, request):
    path = GOLDEN / f"{family}_forward.safetensors"
    if not path.exists():
        pytest.skip("golden forward not found")
    from safetensors.torch import load_file

    llm = request.getfixturevalue(f"{family}_llm")
    ref = load_file(str(path))
    (logits,) = llm.apply_model(partial(_denoise_logits, input_ids=ref["input_ids"]))
    # The files hold the raw (unshifted) logits of every position.
    want = ref["logits"][: logits.shape[0]]
    assert logits.shape == want.shape
    assert (logits - want).abs().max().item() < 1e-4
    assert ((logits - want).norm() / want.norm()).item() < 1e-5
    assert torch.equal(logits.argmax(-1), want.argmax(-1))
