"""Fast-dLLM v2 (NVlabs/Fast-dLLM ``v2/``): block diffusion on Qwen2.5.

The checkpoint (``Efficient-Large-Model/Fast_dLLM_v2_7B``) is Qwen2.5 in
Qwen2's weight layout: q/k/v biases, GQA, an untied LM head, RoPE with the
config's theta. Attention is causal across blocks of ``bd_size`` (32) tokens
and bidirectional inside one, blocks counted from absolute position 0, like
SDAR, so it runs in the block-causal engine mode (``docs/architecture/
overview.md``, "Block-causal families"). What differs from SDAR, each a flag
of this class read by ``diffusion/block_causal.py``:

- the token at position j is predicted by the output at j - 1 (Dream's shift;
  a block's first position reads its own output, as the reference does);
- a block's first token is not decoded: it is the argmax of the last row of
  the forward that stores the previous block (the reference's "AR token"), or
  of the prompt's last block when the prompt ends on a block boundary;
- the block length is the checkpoint's ``bd_size``, not a request knob
  (``Family.block_length_key``).

Reference: the checkpoint's own ``modeling.py`` (``generate``), which ships
with the weights, not with the GitHub repo (``tests/fast_dllm_v2/NOTES.md``).
Checkpoints name ``model_type: Fast_dLLM_Qwen`` with ``auto_map`` modules;
registering the classes below loads them without ``trust_remote_code``.
"""

from transformers import AutoTokenizer, PretrainedConfig

from vllm_omni.models.dream import map_qwen_weight_name
from vllm_omni.models.transformer import DiffusionLM, TransformerShape

# The reference decoder's mask token (a hard-coded id, 151665, in its
# ``generate``; the tokenizer's last added token). Read from the tokenizer by
# name, so a checkpoint with another vocabulary (the tiny test one) works.
MASK_TOKEN = "|<MASK>|"


class Fast_dLLM_QwenConfig(PretrainedConfig):  # noqa: N801 (the checkpoint's name)
    model_type = "Fast_dLLM_Qwen"

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
        use_sliding_window: bool = False,
        tie_word_embeddings: bool = False,
        bd_size: int = 32,  # the block length it was trained with
        # None: the tokenizer's MASK_TOKEN (the checkpoints carry no id here).
        mask_token_id: int | None = None,
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
        self.use_sliding_window = use_sliding_window
        self.bd_size = bd_size
        self.mask_token_id = mask_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class Fast_dLLM_QwenForCausalLM(DiffusionLM):  # noqa: N801
    logit_shift = 1
    block_causal = True
    block_starts_with_ar_token = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        # The stack has plain RoPE and full attention; the released
        # checkpoints use neither option, so refuse rather than run them wrong.
        # (transformers 5 reports plain RoPE as rope_type "default".)
        rope = getattr(config, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default" or \
                config.use_sliding_window:
            raise ValueError("Fast_dLLM_QwenForCausalLM: rope_scaling and sliding-window "
                             "attention are not supported")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.mask_token_id is None:
            self.mask_token_id = _mask_token_id(vllm_config.model_config)

    @staticmethod
    def shape_from_config(config) -> TransformerShape:
        return TransformerShape.from_hf_config(config, qkv_bias=True)

    def map_weight_name(self, name: str):
        return map_qwen_weight_name(name)


def _mask_token_id(model_config) -> int:
    tokenizer = AutoTokenizer.from_pretrained(
        model_config.tokenizer, revision=model_config.tokenizer_revision,
        trust_remote_code=model_config.trust_remote_code)
    vocab = tokenizer.get_vocab()
    if MASK_TOKEN not in vocab:
        raise ValueError(f"Fast-dLLM v2: the tokenizer at {model_config.tokenizer} has no "
                         f"{MASK_TOKEN!r} token; set mask_token_id in config.json")
    return vocab[MASK_TOKEN]
