"""Qwen-Image's text encoder: the language model of Qwen2.5-VL, text only,
on the same vLLM-layer stack as the text diffusion models
(``models/transformer.py``), with causal attention.

diffusers' ``QwenImagePipeline._get_qwen_prompt_embeds`` wraps the prompt in
a chat template, runs the model and keeps the last hidden state (after the
final norm) of every token past the template's first 34. For text alone
Qwen2.5-VL's multimodal RoPE gives all three position sections the same
position, which is plain RoPE (neox layout) with the model's ``rope_theta``.
Each prompt is encoded on its own (packed with others, never padded), which
equals diffusers' padded batch for every kept token.
"""

import re

import torch
import torch.nn.functional as F
from torch import nn

from vllm_omni.kernels import SequenceBatch
from vllm_omni.models.qwen_image.pipeline_math import (DEFAULT_MAX_SEQUENCE_LENGTH,
                                                       PROMPT_TEMPLATE_DROP)
from vllm_omni.models.transformer import (BidirectionalTransformer, TransformerShape,
                                          load_mapped_weights)


def text_config_of(config) -> dict:
    """The language model's config: Qwen2.5-VL nests it as ``text_config``."""
    if not isinstance(config, dict):
        config = config.to_dict()
    return config.get("text_config") or config


def text_shape(config) -> TransformerShape:
    c = text_config_of(config)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    return TransformerShape(
        hidden_size=c["hidden_size"], num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        num_layers=c["num_hidden_layers"], intermediate_size=c["intermediate_size"],
        vocab_size=c["vocab_size"], rms_norm_eps=c["rms_norm_eps"],
        rope_theta=rope.get("rope_theta", c.get("rope_theta", 1e6)),
        max_position=c["max_position_embeddings"], qkv_bias=True)


class CausalPlan:
    """Causal self-attention within each packed prompt (the denoising
    models' plans attend bidirectionally; this one is for the encoder)."""

    def __init__(self, lens: list[int]):
        self.batch = SequenceBatch.from_lengths(lens)

    def fuses_rope(self, q) -> bool:
        return False  # the model applies RoPE before ``attend`` (no key arena)

    def attend(self, layer: int, q, k, v, scale: float, kv_cache, rope=None) -> torch.Tensor:
        out = torch.empty_like(q)
        for start, n in zip(self.batch.starts, self.batch.lens):
            rows = slice(start, start + n)
            # [tokens, heads, dim] -> [heads, tokens, dim]; GQA as the model has it.
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1), k[rows].transpose(0, 1), v[rows].transpose(0, 1),
                is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
            out[rows] = o.transpose(0, 1)
        return out


class QwenTextEncoder(nn.Module):
    def __init__(self, config, vllm_config, prefix: str):
        super().__init__()
        self.model = BidirectionalTransformer(text_shape(config), vllm_config, f"{prefix}.model",
                                              paged_kv=False)

    def forward(self, input_ids, positions, plan=None):
        return self.model(input_ids, positions, plan)

    def encode(self, prompts: list[list[int]], device,
               max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> list[torch.Tensor]:
        """Each templated prompt's embeddings past the template's system part,
        at most ``max_sequence_length`` of them (the pipeline's cut)."""
        lens = [len(p) for p in prompts]
        ids = torch.tensor([t for p in prompts for t in p], device=device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(device)
        hidden = self.model(ids, positions, CausalPlan(lens))
        drop = PROMPT_TEMPLATE_DROP
        return [h[drop:drop + max_sequence_length] for h in hidden.split(lens)]

    # Qwen2.5-VL checkpoints name the language model "model.language_model."
    # (transformers >= 4.52) or "model." (earlier); the vision tower and the
    # LM head are not used.
    _SKIP = re.compile(r"^(model\.)?visual\.|^lm_head\.")
    _PREFIX = re.compile(r"^model\.(language_model\.)?")
    _SHARDS = {"q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
               "v_proj": ("self_attn.qkv_proj", "v"), "o_proj": ("self_attn.o_proj", None),
               "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
               "down_proj": ("mlp.down_proj", None)}

    def load_weights(self, weights) -> set[str]:
        return load_mapped_weights(self, weights, self.map_weight_name, "Qwen-Image text encoder")

    @classmethod
    def map_weight_name(cls, name: str) -> tuple[str, str | int | None] | None:
        if cls._SKIP.match(name):
            return None
        name = cls._PREFIX.sub("", name)
        m = re.match(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$", name)
        if m:
            layer, _, part, kind = m.groups()
            ours, shard = cls._SHARDS[part]
            return f"model.layers.{layer}.{ours}.{kind}", shard
        return f"model.{name}", None
