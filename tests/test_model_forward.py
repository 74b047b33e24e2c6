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


def _pruned_and_full_logits(model, rows):
    """Logits of packed query rows ``rows`` (before ``logit_shift``) of two
    canvases, stacked: through ``denoise_logits`` (the last layer's MLP on
    those rows only), and through the whole stack's every row, indexed
    afterwards."""
    from vllm_omni.models.attention_plan import AttentionPlan, SequencePlan

    device = next(model.parameters()).device
    lens = [40, 24]
    ids = torch.randint(0, model.shape.vocab_size, (sum(lens),),
                        generator=torch.Generator().manual_seed(0))
    ids[48:56] = model.mask_token_id  # a masked block in the second canvas
    ids, rows = ids.to(device), rows.to(device)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    seqs = [SequencePlan(n, 0, n) for n in lens]
    with torch.inference_mode():
        plan = AttentionPlan(seqs, model.kv_cache_page_size(), device)
        pruned = model.denoise_logits(ids, positions, plan, rows)
        hidden = model.model(ids, positions, plan)
        full = model.compute_logits(hidden[rows - model.logit_shift])
        # No rows: the whole stack runs (it stores keys), no logits.
        assert model.denoise_logits(ids, positions, plan, rows[:0]) is None
    return torch.stack([pruned, full]).cpu()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_pruned_last_layer_matches_full_forward(family, request):
    # The second canvas's block, then rows out of order, a repeat and the
    # first canvas's: a wrong row or order would change the logits.
    rows = torch.tensor([*range(48, 56), 63, 5, 5, 40, 1])
    llm = request.getfixturevalue(f"{family}_llm")
    ((pruned, full),) = llm.apply_model(partial(_pruned_and_full_logits, rows=rows))
    assert pruned.shape == (len(rows), full.shape[-1])
    torch.testing.assert_close(pruned, full, rtol=1e-5, atol=1e-5)
