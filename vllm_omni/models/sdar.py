"""SDAR (JetAstra/SDAR): a block-diffusion LM in Qwen3's weight layout.

Attention is causal across blocks and bidirectional inside a block of the
request's block length, blocks counted from absolute position 0; positions
are absolute. Unlike LLaDA and Dream, a finished block's keys and values are
final, so they go into vLLM's paged KV cache once, as an AR prefill would
(``docs/architecture/overview.md``, "Block-causal families"). The token at
position i is predicted from the output at i (no shift).

Qwen3 in the stack: per-head RMSNorm of q and k before RoPE, ``head_dim`` from
the config, no q/k/v bias (``attention_bias``), an untied LM head.

Checkpoints name ``model_type: sdar`` with ``auto_map`` modules that are not
shipped; registering ``SDARConfig`` with transformers and
``SDARForCausalLM`` with vLLM loads them without ``trust_remote_code``.
"""

from transformers import PretrainedConfig

from vllm_omni.models.dream import map_qwen_weight_name
from vllm_omni.models.transformer import DiffusionLM, TransformerShape


class SDARConfig(PretrainedConfig):
    model_type = "sdar"

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 2560,
        intermediate_size: int = 9728,
        num_hidden_layers: int = 36,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        head_dim: int = 128,
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1000000.0,
        attention_bias: bool = False,
        tie_word_embeddings: bool = False,
        # SDAR-4B-Chat's <|MASK|> (the official sampler reads it from the
        # tokenizer; the checkpoints we know also carry it here).
        mask_token_id: int = 151669,
        block_size: int = 4,  # the block length the model was trained with
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class SDARForCausalLM(DiffusionLM):
    logit_shift = 0
    block_causal = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.config.tie_word_embeddings:  # the small Qwen3 bases tie them
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)

    @staticmethod
    def shape_from_config(config) -> TransformerShape:
        return TransformerShape.from_hf_config(config, qkv_bias=config.attention_bias,
                                               qk_norm=True, explicit_head_dim=config.head_dim)

    def map_weight_name(self, name: str):
        if name.startswith("lm_head.") and self.config.tie_word_embeddings:
            return None  # tied: the embedding's weight
        return map_qwen_weight_name(name)
