"""Still-image decoder of Qwen-Image's VAE (diffusers' ``AutoencoderKLQwenImage``).

``QwenImageVAEDecoder.decode(z)`` reproduces ``AutoencoderKLQwenImage.decode(z).sample``
(diffusers 0.42.1, no tiling / slicing) for latents shaped [B, z_dim, 1, h, w], the
only shape ``QwenImagePipeline`` decodes: ``post_quant_conv``, then the decoder
(``conv_in``; mid block = resnet, single-head attention, resnet; up blocks of
``num_res_blocks + 1`` resnets and a x2 nearest-exact upsample + conv; RMS norm,
SiLU, ``conv_out``), then ``clamp(-1, 1)``. The pipeline's latents de-normalisation
(``z * std + mean``) happens before ``decode`` in the pipeline, not here.

Simplifications, exact for one frame (each checked against diffusers' code and
numerically in tests/test_qwen_image_vae.py):
- Every causal conv3d becomes a conv2d holding the kernel's *last* temporal tap.
  Diffusers pads time with 2*p frames in front using ``F.pad`` (zeros), or with the
  cached previous frames; decoding frame 0 starts from an empty cache (``clear_cache``),
  so frame 0 sees only zero padding and the taps other than the last multiply zeros.
  (Not replicate padding: with non-zero padded frames this would be wrong.)
- ``upsample3d`` == ``upsample2d``: on the first frame diffusers only marks its cache
  slot "Rep" and skips ``time_conv`` (the temporal x2); the frame count stays 1. So
  ``time_conv`` weights are never used and ``temperal_downsample`` changes nothing.
- The feature cache / frame loop disappears (one frame, nothing to carry over), and
  tensors stay 4-D [B, C, H, W]; RMS norm over channels is the same in 4-D and 5-D.
- ``attn_scales`` only affects the encoder (the decoder's up blocks have no
  attention); ``dropout`` is inference-time identity; both are accepted and unused.
Deliberate deviation: diffusers upsamples via ``x.float()`` and back. Nearest
upsampling copies values, so this is bit-identical for fp16/bf16/fp32; we upsample
in the input dtype (no fp32 copy of the largest activations). Only float64 differs:
diffusers rounds it to fp32 there, we do not.
"""

import logging
import re
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class _RMSNorm(nn.Module):
    """diffusers' ``QwenImageRMS_norm`` (channel-first, no bias): L2-normalise over
    channels, times sqrt(C) and a per-channel gamma (stored as [C, 1, 1])."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same precision policy as diffusers: low-precision inputs normalise in fp32.
        low = x.dtype in (torch.float16, torch.bfloat16) or any(
            t in str(x.dtype) for t in ("float4_", "float8_"))
        n = F.normalize(x.float() if low else x, dim=1).to(x.dtype)
        # Same multiplication order as diffusers (n * scale * gamma), for identical rounding.
        return n * self.scale * self.gamma


class _ResBlock(nn.Module):
    """RMS norm, SiLU, 3x3 conv, twice; plus a 1x1 conv shortcut if channels change."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = _RMSNorm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _RMSNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.conv_shortcut(x)


class _Attention(nn.Module):
    """Single-head self-attention over the h*w pixels of one image (channels = head
    dim, default 1/sqrt(C) scale), with residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = _RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # [B, 3C, H, W] -> [B, 1, HW, 3C]; q, k, v are channel thirds, as in diffusers.
        qkv = self.to_qkv(self.norm(x)).reshape(b, 1, 3 * c, h * w).transpose(2, 3).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return self.proj(o) + x


class _MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([_ResBlock(dim, dim), _ResBlock(dim, dim)])
        self.attentions = nn.ModuleList([_Attention(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _UpBlock(nn.Module):
    """``num_res_blocks + 1`` resnets, then (except in the last block) x2 nearest-exact
    upsampling and a 3x3 conv that halves the channels."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [_ResBlock(cin if i == 0 else cout, cout) for i in range(num_res_blocks + 1)])
        self.upsample_conv = nn.Conv2d(cout, cout // 2, 3, padding=1) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample_conv is not None:
            # Input dtype, not diffusers' fp32 round trip: see the module docstring.
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
        return x


# diffusers name -> ours. Everything of the decoder keeps its diffusers name minus the
# "decoder." prefix, except the upsampler conv (diffusers: nn.Sequential(Upsample, Conv2d)).
_UNUSED = re.compile(r"^(encoder\.|quant_conv\.)|\.time_conv\.")


def map_vae_weight_name(name: str) -> str | None:
    """Map a ``vae/diffusion_pytorch_model.safetensors`` name to our parameter name, or
    None for weights the single-frame decoder does not use: the encoder, ``quant_conv``
    and the upsamplers' ``time_conv`` (skipped on the first frame, see docstring).

    ``decoder.X`` -> ``X``; ``post_quant_conv.X`` unchanged;
    ``...upsamplers.0.resample.1.{weight,bias}`` -> ``...upsample_conv.{weight,bias}``.
    Unknown names are returned as they are, so that ``load_weights`` rejects them."""
    if _UNUSED.search(name):
        return None
    if name.startswith("decoder."):
        name = name[len("decoder."):]
    return name.replace(".upsamplers.0.resample.1.", ".upsample_conv.")


class QwenImageVAEDecoder(nn.Module):
    """Decoder half of ``AutoencoderKLQwenImage`` for single images; see module docstring."""

    def __init__(self, base_dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4),
                 num_res_blocks: int = 2, attn_scales=(), temperal_downsample=(False, True, True),
                 dropout: float = 0.0, input_channels: int = 3) -> None:
        super().__init__()
        # attn_scales / temperal_downsample / dropout: no effect on a one-frame decode.
        del attn_scales, temperal_downsample, dropout
        self.z_dim = z_dim
        dim_mult = list(dim_mult)
        # Channel widths from the deepest level up, as in diffusers' QwenImageDecoder3d.
        dims = [base_dim * m for m in [dim_mult[-1]] + dim_mult[::-1]]
        self.post_quant_conv = nn.Conv2d(z_dim, z_dim, 1)
        self.conv_in = nn.Conv2d(z_dim, dims[0], 3, padding=1)
        self.mid_block = _MidBlock(dims[0])
        self.up_blocks = nn.ModuleList()
        for i in range(len(dim_mult)):
            # Each upsample halves the channels, so later blocks receive dims[i] // 2.
            cin = dims[i] if i == 0 else dims[i] // 2
            self.up_blocks.append(_UpBlock(cin, dims[i + 1], num_res_blocks,
                                           upsample=i != len(dim_mult) - 1))
        self.norm_out = _RMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], input_channels, 3, padding=1)

    @classmethod
    def from_config(cls, config: Mapping) -> "QwenImageVAEDecoder":
        """Build from the VAE's ``config.json`` (a dict). ``latents_mean`` / ``latents_std``
        and the ``_``-prefixed keys are for the pipeline / diffusers, not the decoder."""
        keys = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
                "temperal_downsample", "dropout", "input_channels")
        return cls(**{k: config[k] for k in keys if k in config})

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """[B, z_dim, 1, h, w] -> [B, 3, 1, H, W] in [-1, 1] (or 4-D in, 4-D out).
        ``clamp=False`` returns the decoder output before diffusers' final clamp."""
        video = z.dim() == 5
        if video:
            if z.shape[2] != 1:
                raise ValueError(f"QwenImageVAEDecoder decodes single frames, got {z.shape[2]}")
            z = z[:, :, 0]
        x = self.conv_in(self.post_quant_conv(z))
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        x = self.conv_out(F.silu(self.norm_out(x)))
        if clamp:
            x = x.clamp(-1.0, 1.0)
        return x.unsqueeze(2) if video else x

    forward = decode

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     strict: bool = False) -> set[str]:
        """Load diffusers VAE weights (the whole checkpoint is fine: unused ones are
        skipped). Raises on a name that maps to no parameter or on a shape mismatch;
        missing parameters are logged (raised if ``strict``). Returns loaded names."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for ckpt_name, tensor in weights:
            name = map_vae_weight_name(ckpt_name)
            if name is None:
                continue
            param = params.get(name)
            if param is None:
                raise ValueError(f"unexpected Qwen-Image VAE weight {ckpt_name!r}")
            if tensor.dim() == 5 and param.dim() == 4:
                # Causal conv3d kernel [O, I, T, kh, kw]: one frame behind zero time
                # padding meets only the last temporal tap (see module docstring).
                tensor = tensor[:, :, -1]
            elif name.endswith("gamma"):
                # Resnet norms store gamma as [C, 1, 1, 1] (5-D broadcast); ours is [C, 1, 1].
                tensor = tensor.reshape(param.shape) if tensor.numel() == param.numel() else tensor
            if tensor.shape != param.shape:
                raise ValueError(f"Qwen-Image VAE weight {ckpt_name!r}: shape "
                                 f"{tuple(tensor.shape)} does not fit {name} {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            if strict:
                raise ValueError(f"Qwen-Image VAE weights missing: {missing}")
            logger.warning("Qwen-Image VAE weights missing (left at init): %s", missing)
        return loaded
