"""The arithmetic of diffusers 0.42.1's ``QwenImagePipeline`` around its
transformer, for one request at a time and batchable across requests.

Reproduces (``pipelines/qwenimage/pipeline_qwenimage.py`` unless noted),
without importing diffusers:

(a) when true CFG runs, and its norm-rescaled combination (``__call__``);
(b) the initial noise (``prepare_latents`` + ``utils/torch_utils.randn_tensor``),
    the latent grid, and ``_pack_latents`` / ``_unpack_latents``;
(c) the latent de-normalisation before ``vae.decode`` (``__call__``) and
    ``VaeImageProcessor.postprocess`` (``image_processor.py``);
(d) what the transformer is given per request: ``img_shapes``, the text length
    its RoPE uses, and the timestep it sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# The pipeline's prompt template (prompt_template_encode), the template prefix
# it drops from the embeddings (prompt_template_encode_start_idx) and its
# tokenizer limit (tokenizer_max_length): __init__ / _get_qwen_prompt_embeds.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
PROMPT_TEMPLATE_DROP = 34
TOKENIZER_MAX_LENGTH = 1024
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # __call__'s default for max_sequence_length


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------- (a) true CFG

def true_cfg_enabled(true_cfg_scale: float, has_negative_prompt: bool) -> tuple[bool, str | None]:
    """``do_true_cfg = true_cfg_scale > 1 and has_neg_prompt``, with the warning
    the pipeline logs (None when it logs none).

    ``has_neg_prompt`` is ``negative_prompt is not None or negative_prompt_embeds
    is not None``: an empty string counts as given. ``true_cfg_scale`` defaults
    to 4.0, so a call without a negative prompt runs without CFG and warns;
    a negative prompt with scale <= 1 is warned about and never encoded.
    """
    if true_cfg_scale > 1 and not has_negative_prompt:
        return False, (f"true_cfg_scale is {true_cfg_scale}, but classifier-free guidance "
                       "is off because no negative prompt was given")
    if true_cfg_scale <= 1 and has_negative_prompt:
        return False, "a negative prompt was given, but classifier-free guidance is off since true_cfg_scale <= 1"
    return true_cfg_scale > 1 and has_negative_prompt, None


def combine_true_cfg(
    cond: torch.Tensor, uncond: torch.Tensor, true_cfg_scale: float | torch.Tensor
) -> torch.Tensor:
    """``comb = uncond + scale * (cond - uncond)``, then rescaled per token by
    ``||cond|| / ||comb||`` over the last (channel) dim, in the pipeline's
    order of operations and dtypes.

    ``true_cfg_scale`` is a number or a tensor broadcasting against ``cond``
    (one scale per request or per token). diffusers multiplies by a Python
    float, which torch applies in float32 to bf16/fp16 and rounds after; the
    same is done here so that a per-request scale tensor does not promote.
    """
    diff = cond - uncond
    compute = _opmath(diff.dtype)
    scale = torch.as_tensor(true_cfg_scale, dtype=compute, device=diff.device)
    comb = uncond + (diff.to(compute) * scale).to(diff.dtype)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    comb_norm = torch.norm(comb, dim=-1, keepdim=True)
    return comb * (cond_norm / comb_norm)


# ------------------------------------------------------- (b) noise and packing

def vae_scale_factor(temperal_downsample: Sequence[bool]) -> int:
    """``2 ** len(vae.config.temperal_downsample)`` (spatial, despite the name):
    8 for Qwen-Image's VAE."""
    return 2 ** len(temperal_downsample)


def size_warning(height: int, width: int, vae_scale_factor: int) -> str | None:
    """``check_inputs`` only warns when height/width are not multiples of
    ``2 * vae_scale_factor`` (it says they "will be resized"): the latent grid
    floors them, so the image comes out at the floored size."""
    multiple = 2 * vae_scale_factor
    if height % multiple or width % multiple:
        return (f"height and width should be multiples of {multiple}, got {height}x{width}; "
                f"the image will be {height // multiple * multiple}x{width // multiple * multiple}")
    return None


def latent_size(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Latent (h, w) before packing: ``2 * (int(x) // (2 * vae_scale_factor))``
    (``prepare_latents``), so always even. Refuses sizes that floor to 0, on
    which the pipeline would build an empty latent."""
    h = 2 * (int(height) // (vae_scale_factor * 2))
    w = 2 * (int(width) // (vae_scale_factor * 2))
    if h == 0 or w == 0:
        raise ValueError(f"height and width must be at least {2 * vae_scale_factor}, got {height}x{width}")
    return h, w


def image_seq_len(height: int, width: int, vae_scale_factor: int) -> int:
    """Packed token count (``latents.shape[1]``), the ``image_seq_len`` of mu."""
    h, w = latent_size(height, width, vae_scale_factor)
    return (h // 2) * (w // 2)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``_pack_latents``: [B, C, H, W] -> [B, (H/2)(W/2), 4C]; token (i, j) is
    the 2x2 patch at rows 2i..2i+1, cols 2j..2j+1, its features ordered
    (channel, dy, dx). Also takes one frame as 5-D, either the noise's
    [B, 1, C, H, W] or the VAE's [B, C, 1, H, W]."""
    if latents.dim() == 5:
        if 1 not in latents.shape[1:3]:
            raise ValueError(f"expected one frame, got shape {tuple(latents.shape)}")
        b, _, _, h, w = latents.shape
        latents = latents.reshape(b, -1, h, w)
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """``_unpack_latents``: [B, tokens, 4C] -> [B, C, 1, H, W] for the video VAE."""
    b, _, features = packed.shape
    h, w = latent_size(height, width, vae_scale_factor)
    c = features // 4
    grid = packed.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, c, 1, h, w)


def initial_noise(
    generator: torch.Generator | Sequence[torch.Generator],
    num_channels_latents: int,
    height: int,
    width: int,
    vae_scale_factor: int,
    dtype: torch.dtype,
    device: torch.device | str,
    batch_size: int = 1,
) -> torch.Tensor:
    """The packed initial latents ``prepare_latents`` draws: [B, tokens, 4C].

    ``randn_tensor`` semantics: one ``torch.randn`` of shape [B, 1, C, h, w]
    (``C = transformer.in_channels // 4``, ``dtype = prompt_embeds.dtype``,
    ``B = batch * num_images_per_prompt``) on the generator's device when that
    is the CPU (then moved to ``device``), else on ``device``; a CUDA generator
    for a CPU tensor is an error. A list of generators draws one [1, ...]
    sample per image (a list of one is a single generator).

    Per request there is no global state: a generator is required (the pipeline
    with ``generator=None`` draws from torch's global RNG).
    """
    if generator is None:
        raise ValueError("a torch.Generator is required (seeded per request)")
    device = torch.device(device)
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if len(gens) != 1 and len(gens) != batch_size:
        raise ValueError(f"{len(gens)} generators for a batch of {batch_size}")
    gen_type = gens[0].device.type
    if gen_type == device.type:
        draw_device = device
    elif gen_type == "cpu":
        draw_device = torch.device("cpu")  # drawn on the CPU, then moved
    else:
        raise ValueError(f"cannot draw a {device} tensor from a {gen_type} generator")
    h, w = latent_size(height, width, vae_scale_factor)
    shape = (batch_size, 1, num_channels_latents, h, w)
    if len(gens) == 1:
        noise = torch.randn(shape, generator=gens[0], device=draw_device, dtype=dtype)
    else:
        noise = torch.cat([torch.randn((1,) + shape[1:], generator=g, device=draw_device, dtype=dtype)
                           for g in gens])
    return pack_latents(noise.to(device))


# ------------------------------------------------------ (c) decode-side maths

def denormalize_latents(
    latents: torch.Tensor,
    latents_mean: Sequence[float],
    latents_std: Sequence[float],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Before ``vae.decode``: ``latents / (1 / std) + mean`` per channel, on
    unpacked [B, z_dim, 1, H, W] latents cast to the VAE's dtype.

    Kept as a division by the reciprocal (not ``* std``): the pipeline casts
    std to the latents' dtype, takes ``1.0 / std`` there and divides, and the
    multiply would round differently. (``torch.tensor`` of the lists is float32
    here; the pipeline's follows torch's default dtype, float32 unless changed.)
    """
    if dtype is not None:
        latents = latents.to(dtype)
    z_dim = len(latents_mean)
    view = (1, z_dim, 1, 1, 1)
    mean = torch.tensor(latents_mean, dtype=torch.float32).view(view).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(latents_std, dtype=torch.float32).view(view).to(latents.device, latents.dtype)
    return latents / inv_std + mean


def postprocess_image(image: torch.Tensor, output_type: str = "pt") -> torch.Tensor | np.ndarray:
    """``VaeImageProcessor.postprocess`` (``do_normalize=True``) on the decoded
    first frame ``vae.decode(z)[0][:, :, 0]`` ([B, 3, H, W] in [-1, 1]):
    ``(x * 0.5 + 0.5).clamp(0, 1)``; "np" also moves it to an [B, H, W, 3]
    float32 array; "uint8" is what "pil" makes before ``Image.fromarray``
    (``(x * 255).round()``)."""
    if output_type not in ("pt", "np", "uint8"):
        raise ValueError(f"output_type must be 'pt', 'np' or 'uint8', got {output_type!r}")
    image = (image * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return (array * 255).round().astype("uint8")


# ------------------------------------------ (d) what the transformer is given

@dataclass(frozen=True)
class TransformerShapes:
    """Per-request geometry the pipeline hands ``QwenImageTransformer2DModel``.

    img_shapes: ``[(frames, h_tokens, w_tokens)]`` for one image, i.e. the
        ``img_shapes[b]`` entry (``(1, height // vsf // 2, width // vsf // 2)``).
    txt_seq_len: text tokens in ``encoder_hidden_states``. In diffusers 0.42.1
        the transformer's RoPE uses this (padded) length; there is no
        ``txt_seq_lens`` argument any more.
    txt_rope_start: first RoPE position of the text tokens (scale_rope=True):
        ``max(h_tokens // 2, w_tokens // 2)``; image rows/cols are centred
        around 0, the frame axis is 0.
    """

    img_shapes: tuple[tuple[int, int, int], ...]
    txt_seq_len: int
    txt_rope_start: int


def text_seq_len(num_template_tokens: int, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> int:
    """Text length of one prompt: the templated prompt's token count, truncated
    by the tokenizer at 1024 + 34, minus the 34 template tokens dropped, then
    cut to ``max_sequence_length`` (default 512, at most 1024) by
    ``encode_prompt``. For a single prompt there is no padding, so the mask is
    all ones and the pipeline passes ``encoder_hidden_states_mask=None``."""
    if not 1 <= max_sequence_length <= TOKENIZER_MAX_LENGTH:
        raise ValueError(f"max_sequence_length must be in [1, 1024], got {max_sequence_length}")
    kept = min(num_template_tokens, TOKENIZER_MAX_LENGTH + PROMPT_TEMPLATE_DROP) - PROMPT_TEMPLATE_DROP
    return min(max(kept, 0), max_sequence_length)


def transformer_shapes(height: int, width: int, vae_scale_factor: int, txt_seq_len: int) -> TransformerShapes:
    """``img_shapes`` and the text RoPE placement for one image of a request."""
    h_tok = height // vae_scale_factor // 2
    w_tok = width // vae_scale_factor // 2
    return TransformerShapes(((1, h_tok, w_tok),), txt_seq_len, max(h_tok // 2, w_tok // 2))


def transformer_timestep(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The timestep the transformer sees: ``t.to(latents.dtype) / 1000``, so in
    bf16 the schedule's timestep is rounded before the division."""
    return t.to(dtype) / 1000
