"""Dream (HKUNLP/Dream): a masked-diffusion LM in Qwen2's weight layout.

Two things differ from LLaDA: q/k/v carry biases, and Dream predicts position
i from the output at position i - 1 (its logits are shifted right by one; the
first canvas position reads the last prompt position).
"""

import re

from transformers import PretrainedConfig

from vllm_omni.models.transformer import DiffusionLM, TransformerShape


class DreamConfig(PretrainedConfig):
    model_type = "Dream"

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int = 4,
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1000000.0,
        mask_token_id: int = 151666,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)


_SHARDS = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"),
           "v_proj": ("qkv_proj", "v"), "gate_proj": ("gate_up_proj", 0),
           "up_proj": ("gate_up_proj", 1)}
_PROJ = re.compile(r"(.*\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)(\.weight|\.bias)$")


def map_qwen_weight_name(name: str):
    """Qwen2/Qwen3 checkpoint names (Dream, SDAR): ours are the same but for
    the fused projections."""
    if m := _PROJ.match(name):
        prefix, part, kind = m.groups()
        fused, shard = _SHARDS[part]
        return f"{prefix}{fused}{kind}", shard
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name, None


class DreamModel(DiffusionLM):
    logit_shift = 1

    @staticmethod
    def shape_from_config(config) -> TransformerShape:
        return TransformerShape.from_hf_config(config, qkv_bias=True)

    map_weight_name = staticmethod(map_qwen_weight_name)
