"""LLaDA (ML-GSAI/LLaDA): a masked-diffusion LM with OLMo-style weight names.

Checkpoints name the config ``model_type: llada`` and the architecture
``LLaDAModelLM`` with ``auto_map`` modules that are not shipped; registering
``LLaDAConfig`` with transformers and ``LLaDAModelLM`` with vLLM loads them
without ``trust_remote_code``.
"""

import re

from transformers import PretrainedConfig

from vllm_omni.models.transformer import DiffusionLM, TransformerShape


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    # The names vLLM reads, mapped onto LLaDA's own.
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_hidden_size: int = 12288,
        vocab_size: int = 126464,
        embedding_size: int | None = None,
        max_sequence_length: int = 4096,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        include_qkv_bias: bool = False,
        mask_token_id: int = 126336,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size or vocab_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.include_qkv_bias = include_qkv_bias
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)


# Checkpoint name -> (our parameter name, shard id); see transformer.py.
_BLOCK_WEIGHTS = {
    "q_proj": ("self_attn.qkv_proj", "q"),
    "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"),
    "attn_out": ("self_attn.o_proj", None),
    "ff_proj": ("mlp.gate_up_proj", 0),  # LLaDA applies the activation to ff_proj
    "up_proj": ("mlp.gate_up_proj", 1),
    "ff_out": ("mlp.down_proj", None),
    "attn_norm": ("input_layernorm", None),
    "ff_norm": ("post_attention_layernorm", None),
}
_TOP_WEIGHTS = {
    "wte": "model.embed_tokens",
    "ln_f": "model.norm",
    "ff_out": "lm_head",
}
_BLOCK = re.compile(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP = re.compile(r"model\.transformer\.(\w+)\.(weight|bias)$")


class LLaDAModelLM(DiffusionLM):
    logit_shift = 0

    @staticmethod
    def shape_from_config(config) -> TransformerShape:
        return TransformerShape(
            hidden_size=config.d_model,
            num_heads=config.n_heads,
            num_kv_heads=config.n_kv_heads,
            num_layers=config.n_layers,
            intermediate_size=config.mlp_hidden_size,
            vocab_size=config.embedding_size,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_theta,
            max_position=config.max_sequence_length,
            qkv_bias=config.include_qkv_bias,
        )

    @staticmethod
    def map_weight_name(name: str):
        if m := _BLOCK.match(name):
            layer, part, kind = m.groups()
            ours, shard = _BLOCK_WEIGHTS[part]
            return f"model.layers.{layer}.{ours}.{kind}", shard
        if m := _TOP.match(name):
            part, kind = m.groups()
            return f"{_TOP_WEIGHTS[part]}.{kind}", None
        raise ValueError(f"unexpected LLaDA checkpoint weight {name!r}")
