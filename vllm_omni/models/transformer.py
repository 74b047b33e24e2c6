"""The bidirectional transformer shared by the diffusion LM families.

LLaDA, Dream and SDAR are Llama-shaped stacks (RMSNorm, RoPE, SwiGLU MLP, GQA;
SDAR as Qwen3 with per-head q/k RMSNorm; LLaDA2 with partial RoPE and a
mixture of experts as its later layers' MLP, ``DiffusionLM.make_mlp``) that
attend as the forward's plan says: no causal mask for LLaDA and Dream, SDAR's block-causal mask as one plan
sequence per block (``docs/architecture/overview.md``, "Block-causal
families"). This module builds that stack once from vLLM's parallel layers,
so tensor parallelism and weight loading work as in vLLM's own models; each
family file only maps its config and weight names.

Two forwards exist:
- ``forward``: vLLM's standard signature, attention through vLLM's paged
  ``Attention`` layer. vLLM calls it for memory profiling and warm-up.
- ``denoise_logits``: the denoising forward, attention as an
  ``AttentionPlan`` says (no causal mask; whole canvases, or query blocks
  over cached keys) through ``vllm_omni.kernels``.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.distributed import get_tensor_model_parallel_world_size

from vllm_omni.compat import PagedAttention
from vllm_omni.models.attention_plan import AttentionPlan


@dataclass(frozen=True)
class TransformerShape:
    """What the shared stack needs to know, read from a family's HF config."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    qkv_bias: bool
    # Qwen3/SDAR: RMSNorm over each head of q and k before RoPE.
    qk_norm: bool = False
    # Qwen3/SDAR give it in the config; it need not be hidden_size / num_heads.
    explicit_head_dim: int | None = None
    # RoPE over the first rotary_dim dims of each head only (LLaDA2: half); None: all.
    rotary_dim: int | None = None

    @classmethod
    def from_hf_config(cls, config, **family) -> "TransformerShape":
        """The shape from a Qwen/Llama-style HF config's standard keys; a
        family gives the rest (``qkv_bias``, ``qk_norm``, ...) in ``family``."""
        return cls(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                   num_kv_heads=config.num_key_value_heads,
                   num_layers=config.num_hidden_layers,
                   intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
                   rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
                   max_position=config.max_position_embeddings, **family)

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    def kv_heads_per_rank(self, tp: int) -> int:
        # Fewer KV heads than ranks: vLLM's QKVParallelLinear replicates them.
        return max(1, self.num_kv_heads // tp)


@dataclass(frozen=True)
class KVLayout:
    """The keys a diffusion LM's attention layers keep on this rank: what a
    buffer of keys beside vLLM's KV cache (the denoiser's key arena) and the
    attention kernel's tiling are sized by."""

    num_layers: int
    num_kv_heads: int  # on this rank
    head_dim: int
    dtype: torch.dtype
    group: int = 1  # query heads per KV head (the kernel's GQA packing)


class DenoiseAttention(nn.Module):
    def __init__(
        self, shape: TransformerShape, vllm_config: VllmConfig, prefix: str, layer_idx: int,
        paged_kv: bool = True,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = shape.head_dim
        self.num_heads = shape.num_heads // tp
        self.num_kv_heads = shape.kv_heads_per_rank(tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = QKVParallelLinear(
            shape.hidden_size,
            self.head_dim,
            shape.num_heads,
            shape.num_kv_heads,
            bias=shape.qkv_bias,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            shape.num_heads * self.head_dim,
            shape.hidden_size,
            bias=False,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.q_norm = self.k_norm = None
        if shape.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=shape.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=shape.rms_norm_eps)
        self.rotary_emb = get_rope(
            self.head_dim,
            # The last block may reach past max_model_len (the canvas rounds
            # max_tokens up to whole blocks, a block being <= max_tokens).
            max_position=2 * max(shape.max_position, vllm_config.model_config.max_model_len),
            rope_parameters={"rope_theta": shape.rope_theta, "rope_type": "default",
                             "partial_rotary_factor":
                                 (shape.rotary_dim or self.head_dim) / self.head_dim},
            is_neox_style=True,
        )
        # vLLM's paged attention: it owns this layer's KV cache and serves
        # the standard forward (profiling, warm-up). A stack that always runs
        # with a plan and keeps no KV (a text encoder) has none.
        self.attn = None if not paged_kv else PagedAttention(
            self.num_heads,
            self.head_dim,
            self.scale,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.attn",
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        plan: AttentionPlan | None,
    ) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:  # per head, as vLLM's Qwen3 does
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        # With the key arena on CUDA the plan applies RoPE in the kernel that
        # writes the arena (``PlanTensors.fuses_rope``); else vLLM's RoPE.
        rope = None
        if plan is not None and plan.fuses_rope(q):
            rope = (self.rotary_emb, positions)
        else:
            q, k = self.rotary_emb(positions, q, k)
        if plan is None:
            out = self.attn(q, k, v)
        else:
            out = plan.attend(
                self.layer_idx,
                q.view(-1, self.num_heads, self.head_dim),
                k.view(-1, self.num_kv_heads, self.head_dim),
                v.view(-1, self.num_kv_heads, self.head_dim),
                self.scale,
                # bound by vLLM once it allocates the KV cache
                None if self.attn is None else self.attn.kv_cache,
                rope,
            ).reshape(-1, self.q_size)
        out, _ = self.o_proj(out)
        return out


class SwiGLU(nn.Module):
    def __init__(self, shape: TransformerShape, prefix: str, quant_config=None):
        super().__init__()
        # quant_config: vLLM's (e.g. quantization="fp8": the weights quantized
        # at load, activations per token); the LM head stays in the model dtype.
        self.gate_up_proj = MergedColumnParallelLinear(
            shape.hidden_size,
            [shape.intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            shape.intermediate_size,
            shape.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class DecoderLayer(nn.Module):
    def __init__(
        self, shape: TransformerShape, vllm_config: VllmConfig, prefix: str, layer_idx: int,
        paged_kv: bool = True, mlp: nn.Module | None = None,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, eps=shape.rms_norm_eps)
        self.self_attn = DenoiseAttention(shape, vllm_config, f"{prefix}.self_attn", layer_idx,
                                          paged_kv)
        self.post_attention_layernorm = RMSNorm(
            shape.hidden_size, eps=shape.rms_norm_eps
        )
        # A family's own MLP for this layer (LLaDA2's mixture of experts), else SwiGLU.
        self.mlp = mlp if mlp is not None else SwiGLU(shape, f"{prefix}.mlp",
                                                      vllm_config.quant_config)

    def forward(self, positions, hidden_states, residual, plan, keep=None):
        # Pre-norm residual blocks with each residual add fused into the next
        # norm (vLLM's RMSNorm(x, residual)): one kernel instead of two, the
        # same float32 arithmetic (the add, then the norm of the sum). The
        # caller adds the last sublayer's output in the final norm.
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, plan)
        if keep is not None:  # only these rows from here on (the stack's forward says why)
            hidden_states, residual = hidden_states[keep], residual[keep]
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class BidirectionalTransformer(nn.Module):
    """The stack; attention as the forward's plan says (``paged_kv=False``:
    no vLLM KV cache, every forward has a plan)."""

    def __init__(self, shape: TransformerShape, vllm_config: VllmConfig, prefix: str,
                 paged_kv: bool = True, make_mlp=None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size)
        # make_mlp(layer index, prefix) -> the layer's MLP, or None for SwiGLU.
        self.layers = nn.ModuleList(
            DecoderLayer(shape, vllm_config, f"{prefix}.layers.{i}", i, paged_kv,
                         make_mlp(i, f"{prefix}.layers.{i}.mlp") if make_mlp else None)
            for i in range(shape.num_layers)
        )
        self.norm = RMSNorm(shape.hidden_size, eps=shape.rms_norm_eps)

    def forward(self, input_ids, positions, plan: AttentionPlan | None, keep_rows=None):
        """The final hidden states of every row, or of rows ``keep_rows`` (in
        that order). Past the last layer's attention no row reads another, so
        its post-attention norm, MLP and the final norm run on the kept rows
        only: the LM head's rows, e.g. a block's 32 of a 384-token exact-mode
        canvas. Every row still runs every attention, whose plan writes (or
        caches) every row's keys and values."""
        hidden_states, residual = self.embed_tokens(input_ids), None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden_states, residual = layer(positions, hidden_states, residual, plan,
                                            keep_rows if i == last else None)
        return self.norm(hidden_states, residual)[0]


class DiffusionLM(nn.Module):
    """Base class of the diffusion model families (see ``models/llada.py``).

    A family (registered in ``vllm_omni.models.FAMILIES`` under its class
    name) implements ``shape_from_config`` and ``map_weight_name``, and says
    how its logits line up with canvas positions through ``logit_shift``.
    """

    # Position i's token is predicted from the output at i - logit_shift.
    logit_shift: int = 0
    # Attention causal across blocks of the request's block length (SDAR):
    # the runner then stores each finished block's keys in vLLM's pages once
    # and decodes the next block over them (``diffusion/block_causal.py``).
    block_causal: bool = False
    # Block-causal only (Fast-dLLM v2): a block's first token is the argmax of
    # the last row of the forward that stores the block before it (an AR
    # step), not a denoised position.
    block_starts_with_ar_token: bool = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.shape = self.shape_from_config(config)
        self.mask_token_id: int = config.mask_token_id
        self.model = BidirectionalTransformer(self.shape, vllm_config, "model",
                                              make_mlp=self.make_mlp)
        self.lm_head = ParallelLMHead(self.shape.vocab_size, self.shape.hidden_size)
        self.logits_processor = LogitsProcessor(self.shape.vocab_size)

    @staticmethod
    def shape_from_config(config) -> TransformerShape:
        raise NotImplementedError

    def make_mlp(self, layer_idx: int, prefix: str) -> nn.Module | None:
        """The MLP of layer ``layer_idx``; None: the stack's SwiGLU (a family
        with another MLP, LLaDA2's mixture of experts, overrides this)."""
        return None

    @staticmethod
    def map_weight_name(name: str) -> tuple[str, str | int | None] | None:
        """Checkpoint weight name -> (our parameter name, shard id), or None
        to skip the weight."""
        raise NotImplementedError

    # vLLM's model interface -------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, None)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # The denoising forward ---------------------------------------------------
    def kv_layout(self) -> KVLayout:
        tp = get_tensor_model_parallel_world_size()
        kv_heads = self.shape.kv_heads_per_rank(tp)
        return KVLayout(self.shape.num_layers, kv_heads, self.shape.head_dim,
                        self.lm_head.weight.dtype, self.shape.num_heads // tp // kv_heads)

    def kv_cache_page_size(self) -> int:
        """Rows per page of the KV cache vLLM bound to the attention layers
        (its layout: ``vllm_omni/kernels/paged_kv.py``; every layer's alike)."""
        return self.model.layers[0].self_attn.attn.kv_cache.shape[2]

    def denoise_logits(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        plan: AttentionPlan,
        rows: torch.Tensor,
        shift: bool = True,
    ) -> torch.Tensor:
        """Logits predicting the tokens at packed query rows ``rows``. Only
        the rows they are read from go through the LM head (none: a forward
        that only stores keys, which returns None). ``shift=False``: ``rows``
        are the rows to read (the caller applied ``logit_shift``)."""
        if rows.numel() == 0:
            self.model(input_ids, positions, plan)  # its attention writes the keys
            return None
        keep = rows - self.logit_shift if shift else rows
        return self.compute_logits(self.model(input_ids, positions, plan, keep_rows=keep))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mapped_weights(self, weights, self.map_weight_name, self.__class__.__name__)


def load_mapped_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                        map_name, what: str) -> set[str]:
    """Checkpoint weights into ``module``'s parameters through each one's vLLM
    ``weight_loader`` (which shards it for tensor parallelism).
    ``map_name(checkpoint name) -> (parameter name, shard id) | None`` (None:
    a weight the module does not use). Returns the loaded parameter names."""
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for ckpt_name, tensor in weights:
        mapped = map_name(ckpt_name)
        if mapped is None:
            continue
        name, shard = mapped
        if name not in params:
            raise ValueError(f"unexpected {what} weight {ckpt_name!r}")
        param = params[name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        if shard is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard)
        loaded.add(name)
    return loaded
