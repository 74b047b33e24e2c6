"""LLaDA2's plain routed experts (``LLaDA2MoE._plain_routed``: what float32 on
CUDA runs instead of vLLM's TF32 fused-MoE kernel) against vLLM's fused MoE
layer, on CPU where that layer is true float32: the tiny checkpoint's MoE
layers, random hidden states."""

import pytest
import torch
from safetensors.torch import load_file
from vllm.config import get_current_vllm_config
from vllm.forward_context import set_forward_context

from conftest import REPO
from vllm_omni.models.llada2 import (_EXPERT, _SHARDS, LLaDA2MoE, LLaDA2MoeConfig,
                                     LLaDA2MoeModelLM, _expert_param, map_llada2_weight_name)
from vllm_omni.models.transformer import default_weight_loader

TINY = REPO / "tests" / "llada2" / "tiny"


def build(config, layer: int, prefix: str, tensors: dict, processed: bool) -> LLaDA2MoE:
    """Layer ``layer``'s MoE loaded as ``LLaDA2MoeModelLM.load_weights`` does.
    ``processed``: the routed experts through vLLM's post-load step too, which
    on CPU repacks their weights for its kernel (the plain path reads them as
    loaded, as the Triton backend keeps them on CUDA)."""
    moe = LLaDA2MoE(config, LLaDA2MoeModelLM.shape_from_config(config), prefix)
    params = dict(moe.named_parameters())
    ours = f"model.layers.{layer}.mlp."
    for name, tensor in tensors.items():
        if not name.startswith(ours):
            continue
        if expert := _EXPERT.match(name):
            _, index, part = expert.groups()
            suffix = "w2_weight" if _SHARDS[part] == "w2" else "w13_weight"
            target = _expert_param(params, "experts.", suffix)
            params[target].weight_loader(param=params[target], loaded_weight=tensor,
                                         weight_name=target, shard_id=_SHARDS[part],
                                         expert_id=int(index))
            continue
        target, shard = map_llada2_weight_name(name)
        param = params[target.removeprefix(ours)]
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, tensor) if shard is None else loader(param, tensor, shard)
    # vLLM's post-load step (the runner only hands on its routed experts' method).
    for module in moe.modules():
        if hasattr(module, "quant_method") and not hasattr(module, "routed_experts") and (
                processed or not hasattr(module, "w13_weight")):
            module.quant_method.process_weights_after_loading(module)
    return moe


# On CUDA vLLM's fused layer is TF32, nothing to compare at this bound; there the
# plain path meets the official logits (test_llada2_golden's forward test).
@pytest.mark.skipif(torch.cuda.is_available(), reason="the fused layer is true float32 on CPU only")
@pytest.mark.parametrize("layer", [1, 2])  # the tiny checkpoint's MoE layers
def test_plain_experts_match_vllms_fused_layer(single_rank, layer):
    config = LLaDA2MoeConfig.from_pretrained(str(TINY))
    assert config.first_k_dense_replace == 1 and config.num_hidden_layers == 3
    tensors = load_file(str(TINY / "model.safetensors"))
    fused = build(config, layer, f"fused{layer}", tensors, processed=True)
    plain = build(config, layer, f"plain{layer}", tensors, processed=False)
    x = torch.randn(67, config.hidden_size, generator=torch.Generator().manual_seed(layer))
    with torch.no_grad(), set_forward_context(None, get_current_vllm_config()):
        want = fused(x, plain=False)
        got = plain(x, plain=True)
        # Off CUDA the default is vLLM's fused layer, unchanged.
        assert torch.equal(fused(x), want)
    # Routing that differed anywhere would show far above this bound.
    assert (got - want).abs().max().item() < 1e-5
    assert want.abs().max().item() > 0.1
    # Most experts are chosen somewhere (the routing is exercised).
    ids, _ = plain._route(torch.nn.functional.linear(x, plain.gate_weight))
    assert ids.unique().numel() >= config.num_experts - 2
