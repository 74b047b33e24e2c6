"""Qwen-Image's MMDiT (diffusers' ``QwenImageTransformer2DModel``) on vLLM's
parallel layers, over packed variable-length sequences.

A forward takes many sequences at once, each its own request and CFG branch:
sequence i is ``txt_lens[i]`` text tokens and an image of ``img_shapes[i]``
= (frames, rows, cols) patches, at its own timestep. Text and image streams
keep their own weights (projections, norms, MLPs, modulation) and meet in one
joint attention per sequence over [its text; its image], which runs through
``vllm_omni.kernels`` on the packed rows: nothing is padded to the longest
sequence, and a text token sees exactly its own sequence (diffusers' text
mask, without the padding).

What each piece reproduces (diffusers 0.42.1, ``transformer_qwenimage.py``):
- the timestep embedding (sinusoidal, 256 channels, cos first, then a
  two-layer MLP) and the per-sequence adaLN modulation (shift, scale, gate
  for the attention and the MLP of each stream; ``norm_out``'s scale, shift);
- per-head RMSNorm of q and k, then 3-axis RoPE as complex rotations of
  channel pairs: the image's (frame, row, col) positions centred
  (``scale_rope``), the text at positions from max(rows, cols) / 2 on
  (``rope.py``);
- GELU (tanh) MLPs, LayerNorm without affine, eps 1e-6.
Tensor parallelism: heads and MLP columns split across ranks as in vLLM's own
models; the modulation projections are column-parallel with gathered output.

The model's ``load_weights`` maps diffusers' ``transformer/`` weight names.
Variants this port does not implement (``zero_cond_t``,
``use_additional_t_cond``, ``use_layer3d_rope``, guidance embeddings) are
refused at construction.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

from vllm_omni.kernels import SequenceBatch, bidirectional_attention
from vllm_omni.kernels.dit import modulated_norm, qk_norm_rope
from vllm_omni.models.qwen_image.rope import QwenRope
from vllm_omni.models.transformer import load_mapped_weights

EPS = 1e-6


@dataclass(frozen=True)
class QwenImageDiTConfig:
    """What the transformer needs from diffusers' ``transformer/config.json``."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)

    UNSUPPORTED = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")

    @classmethod
    def from_dict(cls, config: dict) -> "QwenImageDiTConfig":
        on = [k for k in cls.UNSUPPORTED if config.get(k)]
        if on:
            raise ValueError(f"Qwen-Image transformer config sets {on}; this port "
                             f"implements the base model only (all of {list(cls.UNSUPPORTED)} false)")
        fields = {k: config[k] for k in cls.__dataclass_fields__ if k in config}
        if "axes_dims_rope" in fields:
            fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
        if fields.get("out_channels") is None:
            fields["out_channels"] = config.get("in_channels", cls.in_channels)
        return cls(**fields)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass(frozen=True)
class JointBatch:
    """The packed layout of one forward. Text and image tokens arrive packed
    per stream (sequence after sequence); the joint attention runs over rows
    laid out as [text of 0, image of 0, text of 1, image of 1, ...]."""

    txt_lens: tuple[int, ...]
    img_shapes: tuple[tuple[int, int, int], ...]

    @property
    def img_lens(self) -> tuple[int, ...]:
        return tuple(f * h * w for f, h, w in self.img_shapes)

    def joint(self) -> SequenceBatch:
        return SequenceBatch.from_lengths([t + i for t, i in zip(self.txt_lens, self.img_lens)])

    def rows(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint rows of the packed text tokens, and of the packed image tokens."""
        txt, img, start = [], [], 0
        for t, i in zip(self.txt_lens, self.img_lens):
            txt.append(torch.arange(start, start + t))
            img.append(torch.arange(start + t, start + t + i))
            start += t + i
        return torch.cat(txt).to(device), torch.cat(img).to(device)

    def seq_index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each text token's and each image token's sequence."""
        seqs = torch.arange(len(self.txt_lens))
        return (seqs.repeat_interleave(torch.tensor(self.txt_lens)).to(device),
                seqs.repeat_interleave(torch.tensor(self.img_lens)).to(device))


def timestep_embedding(t: torch.Tensor, channels: int = 256) -> torch.Tensor:
    """diffusers' ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0,
    scale=1000)``: cos then sin of t * 1000 * 10000^(-j / (channels / 2))."""
    half = channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / half
    freqs = torch.exp(exponent).to(t.device, t.dtype)
    angles = 1000 * (t[:, None].float() * freqs[None, :])
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Modulation(nn.Module):
    """SiLU, then a linear to ``chunks`` x dim per sequence (replicated output)."""

    def __init__(self, dim: int, chunks: int, prefix: str):
        super().__init__()
        self.chunks = chunks
        self.linear = ColumnParallelLinear(dim, chunks * dim, bias=True, gather_output=True,
                                           prefix=prefix)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, _ = self.linear(F.silu(temb))
        return out.chunk(self.chunks, dim=-1)


class GeluMLP(nn.Module):
    def __init__(self, dim: int, prefix: str):
        super().__init__()
        self.up = ColumnParallelLinear(dim, 4 * dim, bias=True, prefix=f"{prefix}.up")
        self.down = RowParallelLinear(4 * dim, dim, bias=True, prefix=f"{prefix}.down")

    def forward(self, x):
        x, _ = self.up(x)
        x, _ = self.down(F.gelu(x, approximate="tanh"))
        return x


class JointAttention(nn.Module):
    """Per stream: fused q, k, v, per-head RMSNorm of q and k; one attention
    over every sequence's [text; image]; per stream output projection."""

    def __init__(self, cfg: QwenImageDiTConfig, prefix: str):
        super().__init__()
        dim, head_dim = cfg.inner_dim, cfg.attention_head_dim
        self.head_dim = head_dim
        self.num_heads = cfg.num_attention_heads // get_tensor_model_parallel_world_size()
        self.scale = head_dim**-0.5
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_qkv", QKVParallelLinear(
                dim, head_dim, cfg.num_attention_heads, bias=True, prefix=f"{prefix}.{stream}_qkv"))
            setattr(self, f"{stream}_out", RowParallelLinear(
                dim, dim, bias=True, prefix=f"{prefix}.{stream}_out"))
            setattr(self, f"{stream}_norm_q", RMSNorm(head_dim, eps=EPS))
            setattr(self, f"{stream}_norm_k", RMSNorm(head_dim, eps=EPS))

    def forward(self, img, txt, layout: "PackedLayout"):
        # Each stream's projection goes straight to its rows of the joint
        # q, k, v (normed and rotated on the way): no per-stream copies.
        joint = [img.new_empty((layout.joint_rows, self.num_heads, self.head_dim))
                 for _ in range(3)]
        for stream, x, freqs, rows in (("img", img, layout.img_freqs, layout.img_rows),
                                       ("txt", txt, layout.txt_freqs, layout.txt_rows)):
            qkv, _ = getattr(self, f"{stream}_qkv")(x)
            qk_norm_rope(qkv, getattr(self, f"{stream}_norm_q").weight,
                         getattr(self, f"{stream}_norm_k").weight, EPS, freqs, rows, *joint)
        attn = bidirectional_attention(*joint, layout.joint, self.scale).flatten(1)
        img_out, _ = self.img_out(attn[layout.img_rows])
        txt_out, _ = self.txt_out(attn[layout.txt_rows])
        return img_out, txt_out


class QwenImageBlock(nn.Module):
    def __init__(self, cfg: QwenImageDiTConfig, prefix: str):
        super().__init__()
        dim = cfg.inner_dim
        self.img_mod = Modulation(dim, 6, f"{prefix}.img_mod")
        self.txt_mod = Modulation(dim, 6, f"{prefix}.txt_mod")
        self.attn = JointAttention(cfg, f"{prefix}.attn")
        self.img_mlp = GeluMLP(dim, f"{prefix}.img_mlp")
        self.txt_mlp = GeluMLP(dim, f"{prefix}.txt_mlp")

    def forward(self, img, txt, temb, layout: "PackedLayout", img_pending, txt_pending):
        """``*_pending``: the previous block's (MLP output, gate) not yet added
        to the stream ((None, None) for the first block); this block's are
        returned, for the next block's (or the final) norm to add."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(temb)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(temb)
        si, st = layout.img_seq, layout.txt_seq
        img, img_h = modulated_norm(img, i_shift1, i_scale1, si, *img_pending, eps=EPS)
        txt, txt_h = modulated_norm(txt, t_shift1, t_scale1, st, *txt_pending, eps=EPS)
        img_attn, txt_attn = self.attn(img_h, txt_h, layout)
        img, img_h = modulated_norm(img, i_shift2, i_scale2, si, img_attn, i_gate1, eps=EPS)
        txt, txt_h = modulated_norm(txt, t_shift2, t_scale2, st, txt_attn, t_gate1, eps=EPS)
        return img, txt, (self.img_mlp(img_h), i_gate2), (self.txt_mlp(txt_h), t_gate2)


@dataclass
class PackedLayout:
    """A ``JointBatch`` turned into device index tensors and RoPE factors,
    once per forward (shared by every layer)."""

    joint: SequenceBatch
    joint_rows: int
    txt_rows: torch.Tensor
    img_rows: torch.Tensor
    txt_seq: torch.Tensor
    img_seq: torch.Tensor
    txt_freqs: torch.Tensor  # complex RoPE factors per packed token (rope.py)
    img_freqs: torch.Tensor


class QwenImageTransformer(nn.Module):
    def __init__(self, cfg: QwenImageDiTConfig, prefix: str = ""):
        super().__init__()
        self.cfg = cfg
        dim = cfg.inner_dim
        self.rope = QwenRope(cfg.axes_dims_rope)
        self.time_linear_1 = ReplicatedLinear(256, dim, bias=True, prefix=f"{prefix}.time_linear_1")
        self.time_linear_2 = ReplicatedLinear(dim, dim, bias=True, prefix=f"{prefix}.time_linear_2")
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, eps=EPS)
        self.img_in = ReplicatedLinear(cfg.in_channels, dim, bias=True, prefix=f"{prefix}.img_in")
        self.txt_in = ReplicatedLinear(cfg.joint_attention_dim, dim, bias=True,
                                       prefix=f"{prefix}.txt_in")
        self.blocks = nn.ModuleList(QwenImageBlock(cfg, f"{prefix}.blocks.{i}")
                                    for i in range(cfg.num_layers))
        self.norm_out = Modulation(dim, 2, f"{prefix}.norm_out")
        self.proj_out = ReplicatedLinear(dim, cfg.patch_size**2 * cfg.out_channels, bias=True,
                                         prefix=f"{prefix}.proj_out")

    def layout(self, batch: JointBatch, device) -> PackedLayout:
        joint = batch.joint()
        txt_rows, img_rows = batch.rows(device)
        txt_seq, img_seq = batch.seq_index(device)
        txt_freqs, img_freqs = self.rope.freqs(batch.txt_lens, batch.img_shapes, device)
        return PackedLayout(joint, sum(joint.lens), txt_rows, img_rows, txt_seq, img_seq,
                            txt_freqs, img_freqs)

    def forward(self, img_tokens: torch.Tensor, txt_embeds: torch.Tensor,
                timesteps: torch.Tensor, batch: JointBatch) -> torch.Tensor:
        """``img_tokens`` [image tokens, in_channels] and ``txt_embeds`` [text
        tokens, joint_attention_dim], packed sequence after sequence;
        ``timesteps`` [sequences] as the pipeline passes them (t / 1000).
        Returns the prediction per image token [image tokens, patch^2 * out]."""
        layout = self.layout(batch, img_tokens.device)
        img, _ = self.img_in(img_tokens)
        txt, _ = self.txt_in(self.txt_norm(txt_embeds))
        temb = timestep_embedding(timesteps.to(img.dtype)).to(img.dtype)
        temb, _ = self.time_linear_1(temb)
        temb, _ = self.time_linear_2(F.silu(temb))
        # A block's residual adds are fused into the norms after them
        # (vllm_omni.kernels.dit.modulated_norm): the MLP's into the next
        # block's first norm, the last block's into norm_out.
        img_pending = txt_pending = (None, None)
        for block in self.blocks:
            img, txt, img_pending, txt_pending = block(img, txt, temb, layout, img_pending,
                                                       txt_pending)
        scale, shift = self.norm_out(temb)
        _, img = modulated_norm(img, shift, scale, layout.img_seq, *img_pending, eps=EPS)
        out, _ = self.proj_out(img)
        return out

    # diffusers' weight names -> ours (with the shard of a fused projection).
    _RENAMES = (
        ("time_text_embed.timestep_embedder.linear_", "time_linear_"),
        ("norm_out.linear.", "norm_out.linear."),
        ("transformer_blocks.", "blocks."),
        (".img_mod.1.", ".img_mod.linear."),
        (".txt_mod.1.", ".txt_mod.linear."),
        (".attn.to_out.0.", ".attn.img_out."),
        (".attn.to_add_out.", ".attn.txt_out."),
        (".attn.norm_q.", ".attn.img_norm_q."),
        (".attn.norm_k.", ".attn.img_norm_k."),
        (".attn.norm_added_q.", ".attn.txt_norm_q."),
        (".attn.norm_added_k.", ".attn.txt_norm_k."),
        ("_mlp.net.0.proj.", "_mlp.up."),
        ("_mlp.net.2.", "_mlp.down."),
    )
    _QKV = {".attn.to_q.": ("img", "q"), ".attn.to_k.": ("img", "k"), ".attn.to_v.": ("img", "v"),
            ".attn.add_q_proj.": ("txt", "q"), ".attn.add_k_proj.": ("txt", "k"),
            ".attn.add_v_proj.": ("txt", "v")}

    @classmethod
    def map_weight_name(cls, name: str) -> tuple[str, str | None]:
        for old, new in cls._RENAMES:
            name = name.replace(old, new)
        for old, (stream, shard) in cls._QKV.items():
            if old in name:
                return name.replace(old, f".attn.{stream}_qkv."), shard
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mapped_weights(self, weights, self.map_weight_name, "Qwen-Image transformer")
