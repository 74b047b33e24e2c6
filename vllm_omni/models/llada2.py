"""LLaDA2.0 / 2.1 (inclusionAI): block diffusion on a BailingMoE-style sparse MoE.

The checkpoint (``LLaDA2MoeModelLM``, ``model_type: llada2_moe``) is causal
across blocks and bidirectional inside one (the official ``generate()``
builds that mask; ``tests/llada2/NOTES.md``), blocks counted from absolute
position 0, so it runs in the block-causal engine mode like SDAR
(``docs/architecture/overview.md``, "Block-causal families"; "LLaDA2" there
says what differs). The token at position i is predicted from the output at
i (no shift).

What it adds to the shared stack (``transformer.py``):
- the fused q/k/v projection ``query_key_value``, per-head RMSNorm of q and k
  (``use_qk_norm``), RoPE over the first half of each head
  (``partial_rotary_factor``);
- from layer ``first_k_dense_replace`` on, a mixture of experts instead of
  the SwiGLU MLP: router logits in float32, sigmoid scores, experts chosen
  on the scores plus a per-expert bias within the best ``topk_group`` of
  ``n_group`` groups (a group's score: its two best), weights the chosen
  scores renormalised times ``routed_scaling_factor``; one shared expert
  added. The routed experts are vLLM's fused MoE layer (tensor and expert
  parallel as vLLM shards it, grouped top-k routing as vLLM implements it);
  float32 on CUDA runs them in plain PyTorch instead (``LLaDA2MoE._plain_routed``).

Checkpoints name ``auto_map`` modules (the hub's remote code); registering
``LLaDA2MoeConfig`` and ``LLaDA2MoeModelLM`` loads them without
``trust_remote_code``. The mask token is the tokenizer's ``mask_token``
(the released configs carry no id).
"""

import re
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, PretrainedConfig
from vllm.config import get_current_vllm_config
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.forward_context import set_forward_context

from vllm_omni.compat import fused_moe
from vllm_omni.models.transformer import (DiffusionLM, SwiGLU, TransformerShape,
                                          load_mapped_weights)


class LLaDA2MoeConfig(PretrainedConfig):
    model_type = "llada2_moe"

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        intermediate_size: int = 5120,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: int | None = 128,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_qk_norm: bool = True,
        use_bias: bool = False,
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 32768,
        rope_theta: float = 600000.0,
        partial_rotary_factor: float = 0.5,
        rotary_dim: int | None = None,
        num_experts: int = 256,
        num_shared_experts: int = 1,
        num_experts_per_tok: int = 8,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        moe_intermediate_size: int = 512,
        first_k_dense_replace: int = 1,
        norm_topk_prob: bool = True,
        score_function: str = "sigmoid",
        moe_router_enable_expert_bias: bool = True,
        tie_word_embeddings: bool = False,
        # None: the tokenizer's mask_token (the released configs carry no id).
        mask_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_qk_norm = use_qk_norm
        self.use_bias = use_bias
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.rotary_dim = rotary_dim
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.score_function = score_function
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.mask_token_id = mask_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class LLaDA2MoE(nn.Module):
    """Routed experts (vLLM's fused MoE layer; float32 on CUDA: plain PyTorch) plus the
    shared expert."""

    def __init__(self, config: LLaDA2MoeConfig, shape: TransformerShape, prefix: str,
                 quant_config=None):
        super().__init__()
        experts, hidden = config.num_experts, config.hidden_size
        # The official router runs in float32 whatever the model's dtype.
        self.gate_weight = nn.Parameter(torch.empty(experts, hidden, dtype=torch.float32),
                                        requires_grad=False)
        self.expert_bias = nn.Parameter(torch.zeros(experts, dtype=torch.float32),
                                        requires_grad=False)
        self.experts = fused_moe(
            num_experts=experts,
            top_k=config.num_experts_per_tok,
            hidden_size=hidden,
            intermediate_size=config.moe_intermediate_size,
            # The official gate renormalises whenever it keeps more than one expert.
            renormalize=config.num_experts_per_tok > 1,
            use_grouped_topk=True,
            num_expert_group=config.n_group,
            topk_group=config.topk_group,
            scoring_func="sigmoid",
            e_score_correction_bias=self.expert_bias,
            routed_scaling_factor=config.routed_scaling_factor,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
        )
        self.shared_experts = None
        if config.num_shared_experts:
            shared = replace(shape, intermediate_size=config.moe_intermediate_size
                             * config.num_shared_experts)
            self.shared_experts = SwiGLU(shared, f"{prefix}.shared_experts", quant_config)
        self.config = config

    def forward(self, x: torch.Tensor, plain: bool | None = None) -> torch.Tensor:
        """``plain``: None picks the path (see ``_plain_routed``); tests force it."""
        router_logits = F.linear(x.float(), self.gate_weight)
        if plain is None:
            plain = x.dtype == torch.float32 and x.is_cuda
        if plain:
            out = self._plain_routed(x, router_logits)
        else:
            out = self.experts(hidden_states=x, router_logits=router_logits)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _plain_routed(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """The routed experts in plain PyTorch, for float32 on CUDA.

        vLLM's fused-MoE Triton kernel runs float32 dots as TF32 (max logit
        error 0.03 on the tiny checkpoint, above the golden cases' decision
        margins); torch's matmuls here stay IEEE float32. The routing is the
        official gate's (``_route``); the weights are the fused layer's own:
        ``w13_weight`` [E, 2 I, H] (gate rows then up rows), ``w2_weight``
        [E, H, I], their unpermuted layout on the Triton backend that float32
        gets. Under tensor parallelism each rank
        holds a slice of every expert's I: the partial sums are all-reduced as
        the fused layer does (the shared expert reduces its own output).
        Expert or data parallelism (experts spread over ranks) is refused.
        """
        experts = getattr(self.experts, "routed_experts", self.experts)  # 0.27.1 / 0.26
        parallel = experts.moe_config
        if parallel.ep_size > 1 or parallel.dp_size > 1:
            raise NotImplementedError("LLaDA2 float32 on CUDA (plain routed experts) supports "
                                      "tensor parallelism only, not expert or data parallelism")
        w13, w2 = experts.w13_weight, experts.w2_weight
        ids, weights = self._route(router_logits)
        tokens, top_k = ids.shape
        # Every expert over every token, each (token, slot) keeping its own
        # expert's output, then weighted and summed over the slots as the
        # official moe_infer does. No data-dependent shapes or host syncs, so
        # it runs inside the CUDA graphs (``diffusion/cuda_graphs.py``);
        # the price: E / top_k times the routed experts' work.
        y = x.new_zeros(tokens, top_k, x.shape[-1])
        for e in range(w13.shape[0]):
            gate, up = F.linear(x, w13[e]).chunk(2, dim=-1)
            out_e = F.linear(F.silu(gate) * up, w2[e])
            y = torch.where((ids == e).unsqueeze(-1), out_e.unsqueeze(1), y)
        out = (y * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        if parallel.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out

    def _route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The official LLaDA2MoeGate, step for step: expert ids and weights [tokens, top_k]."""
        cfg, top_k = self.config, self.config.num_experts_per_tok
        scores = torch.sigmoid(router_logits)
        biased = scores + self.expert_bias  # chooses; the unbiased scores weigh
        tokens = biased.shape[0]
        groups = biased.view(tokens, cfg.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        chosen = torch.topk(groups, k=cfg.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(groups).scatter_(1, chosen, 1).bool()
        keep = keep.unsqueeze(-1).expand(-1, -1, cfg.num_experts // cfg.n_group).reshape(tokens, -1)
        ids = torch.topk(biased.masked_fill(~keep, float("-inf")), k=top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        if top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor


# Checkpoint name -> (our parameter name, shard id), inside a layer.
_LAYER = {
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", None),
    "attention.query_key_value.weight": ("self_attn.qkv_proj.weight", None),  # fused q, k, v
    "attention.query_key_value.bias": ("self_attn.qkv_proj.bias", None),
    "attention.query_layernorm.weight": ("self_attn.q_norm.weight", None),
    "attention.key_layernorm.weight": ("self_attn.k_norm.weight", None),
    "attention.dense.weight": ("self_attn.o_proj.weight", None),
    "mlp.gate.weight": ("mlp.gate_weight", None),
    "mlp.gate.expert_bias": ("mlp.expert_bias", None),
}
_MLP = re.compile(r"mlp\.(shared_experts\.)?(gate|up|down)_proj\.weight$")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_SHARDS = {"gate": "w1", "up": "w3", "down": "w2"}  # vLLM's names of an expert's weights
_TOP = {"model.word_embeddings.weight": "model.embed_tokens.weight",
        "model.norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def map_llada2_weight_name(name: str):
    if name in _TOP:
        return _TOP[name], None
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
    if m is None:
        raise ValueError(f"unexpected LLaDA2 checkpoint weight {name!r}")
    layer, rest = m.groups()
    if rest in _LAYER:
        ours, shard = _LAYER[rest]
        return f"model.layers.{layer}.{ours}", shard
    if mlp := _MLP.match(rest):
        shared, part = mlp.groups()
        where = f"model.layers.{layer}.mlp.{shared or ''}"
        if part == "down":
            return f"{where}down_proj.weight", None
        return f"{where}gate_up_proj.weight", 0 if part == "gate" else 1
    raise ValueError(f"unexpected LLaDA2 checkpoint weight {name!r}")


class LLaDA2MoeModelLM(DiffusionLM):
    logit_shift = 0
    block_causal = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        # The stack has plain RoPE, SiLU MLPs, an o_proj without bias, sigmoid
        # routing; refuse the options the released checkpoints do not use
        # rather than run them wrong (transformers 5 reports plain RoPE as
        # rope_type "default").
        rope = getattr(config, "rope_scaling", None) or {}
        unsupported = [name for name, bad in (
            ("rope_scaling", rope.get("rope_type", rope.get("type", "default")) != "default"),
            ("use_bias", config.use_bias), ("hidden_act", config.hidden_act != "silu"),
            ("score_function", config.score_function != "sigmoid"),
            ("norm_topk_prob", not config.norm_topk_prob),
            ("tie_word_embeddings", config.tie_word_embeddings)) if bad]
        if unsupported:
            raise ValueError(f"LLaDA2MoeModelLM: {unsupported} are not supported")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vllm_config = vllm_config
        if self.mask_token_id is None:
            self.mask_token_id = _mask_token_id(vllm_config.model_config)

    def denoise_logits(self, *args, **kwargs):
        # vLLM's MoE layer finds itself through the forward context, which
        # vLLM sets only around its own forwards.
        with set_forward_context(None, self.vllm_config):
            return super().denoise_logits(*args, **kwargs)

    @staticmethod
    def shape_from_config(config) -> TransformerShape:
        return TransformerShape.from_hf_config(
            config, qkv_bias=config.use_qkv_bias, qk_norm=config.use_qk_norm,
            explicit_head_dim=config.head_dim,
            rotary_dim=config.rotary_dim or int(config.head_dim * config.partial_rotary_factor))

    def make_mlp(self, layer_idx: int, prefix: str) -> nn.Module | None:
        if not self.config.num_experts or layer_idx < self.config.first_k_dense_replace:
            return None  # dense: the stack's SwiGLU
        # vLLM's quantization (the experts' own method, e.g. fp8), as the stack's layers.
        return LLaDA2MoE(self.config, self.shape, prefix, get_current_vllm_config().quant_config)

    @staticmethod
    def map_weight_name(name: str):
        return map_llada2_weight_name(name)

    def load_weights(self, weights) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def others():
            for name, tensor in weights:
                expert = _EXPERT.match(name)
                if expert is None:
                    yield name, tensor
                    continue
                layer, index, part = expert.groups()
                shard = _SHARDS[part]
                # The fused layer's parameter: w13 holds gate and up, w2 down.
                suffix = "w2_weight" if shard == "w2" else "w13_weight"
                target = _expert_param(params, f"model.layers.{layer}.mlp.experts.", suffix)
                params[target].weight_loader(param=params[target], loaded_weight=tensor,
                                             weight_name=target, shard_id=shard,
                                             expert_id=int(index))
                loaded.add(target)

        loaded |= load_mapped_weights(self, others(), self.map_weight_name,
                                      self.__class__.__name__)
        return loaded


def _expert_param(params: dict, prefix: str, suffix: str) -> str:
    matches = [n for n in params if n.startswith(prefix) and n.endswith(suffix)]
    if len(matches) != 1:
        raise ValueError(f"LLaDA2: expected one {prefix}...{suffix} parameter, found {matches}")
    return matches[0]


def _mask_token_id(model_config) -> int:
    tokenizer = AutoTokenizer.from_pretrained(
        model_config.tokenizer, revision=model_config.tokenizer_revision,
        trust_remote_code=model_config.trust_remote_code)
    if tokenizer.mask_token_id is None:
        raise ValueError(f"LLaDA2: the tokenizer at {model_config.tokenizer} has no mask_token; "
                         "set mask_token_id in config.json")
    return tokenizer.mask_token_id
