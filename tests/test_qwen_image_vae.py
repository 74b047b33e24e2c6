"""vllm_omni.models.qwen_image.vae against diffusers' AutoencoderKLQwenImage (single frame)."""

import copy
import functools

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKLQwenImage  # noqa: E402
from diffusers.models.autoencoders import autoencoder_kl_qwenimage as dq  # noqa: E402

from vllm_omni.models.qwen_image.vae import QwenImageVAEDecoder, map_vae_weight_name  # noqa: E402

CONFIGS = {
    # vllm_omni/assets/qwen-image-tiny/vae: 3 levels, one upsample2d and one upsample3d.
    "tiny": dict(z_dim=4, base_dim=8, dim_mult=[1, 2, 4], num_res_blocks=1, attn_scales=[],
                 temperal_downsample=[False, True]),
    # The published Qwen-Image VAE's structure (dim_mult, num_res_blocks, attn_scales,
    # temperal_downsample and z_dim as in its config.json), at base_dim 8 instead of 96.
    "published": dict(z_dim=16, base_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                      attn_scales=[], temperal_downsample=[False, True, True]),
}
SIZES = [(1, 4, 4), (2, 4, 6), (1, 8, 12), (2, 8, 12)]  # (batch, latent h, latent w)


def _random_vae(cfg: dict, seed: int = 0) -> AutoencoderKLQwenImage:
    vae = AutoencoderKLQwenImage(**cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # no zero-initialised layer (gammas, biases) may hide a bug
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return vae


@functools.lru_cache
def _pair(name: str):
    vae = _random_vae(CONFIGS[name])
    ours = QwenImageVAEDecoder.from_config(dict(vae.config)).eval()
    ours.load_weights(vae.state_dict().items(), strict=True)
    return vae, ours


def _latents(b, h, w, z_dim, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed + 100 * b + 10 * h + w)
    return torch.randn(b, z_dim, 1, h, w, generator=gen).to(dtype)


@torch.no_grad()
def _max_diff(vae, ours, dtype, sizes=SIZES):
    worst, f = 0.0, 2 ** (len(vae.config.dim_mult) - 1)  # one x2 upsample per level but the last
    for b, h, w in sizes:
        z = _latents(b, h, w, vae.config.z_dim, dtype)
        ref = vae.decode(z).sample
        out = ours.decode(z)
        assert out.shape == ref.shape == (b, 3, 1, f * h, f * w)
        assert out.dtype == dtype
        worst = max(worst, (out - ref).abs().max().item())
    return worst


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_matches_diffusers_fp32(name):
    vae, ours = _pair(name)
    diff = _max_diff(vae, ours, torch.float32)
    print(f"\n[{name}] fp32 max |ours - diffusers| = {diff:.3e}")
    assert diff <= 1e-5


def test_decode_matches_diffusers_fp64(monkeypatch):
    vae, ours = _pair("published")
    vae, ours = copy.deepcopy(vae).double(), copy.deepcopy(ours).double()
    sizes = [(2, 4, 6)]
    # As shipped, diffusers upsamples through x.float(), rounding float64 activations to
    # fp32 (we do not, see vae.py): the difference is then fp32-rounding sized.
    shipped = _max_diff(vae, ours, torch.float64, sizes)
    # Without that round trip the two agree to float64 rounding.
    monkeypatch.setattr(dq.QwenImageUpsample, "forward",
                        lambda self, x: torch.nn.Upsample.forward(self, x))
    exact = _max_diff(vae, ours, torch.float64, sizes)
    print(f"\n[published] fp64 max diff: {shipped:.3e} (diffusers as shipped), "
          f"{exact:.3e} (diffusers upsampling in float64)")
    assert shipped <= 1e-6
    assert exact <= 1e-12


@torch.no_grad()
def test_clamp_and_unclamped_output():
    # Scale conv_out so that most pixels leave [-1, 1]: the final clamp must then match.
    vae = _random_vae(CONFIGS["tiny"], seed=3)
    vae.decoder.conv_out.weight.mul_(10.0)
    ours = QwenImageVAEDecoder.from_config(dict(vae.config)).eval()
    ours.load_weights(vae.state_dict().items(), strict=True)
    z = _latents(2, 4, 6, 4)
    vae.clear_cache()
    raw = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=[0])
    assert (raw.abs() > 1).float().mean() > 0.3
    assert (ours.decode(z, clamp=False) - raw).abs().max() <= 1e-5 * raw.abs().max()
    ref = vae.decode(z).sample
    assert torch.equal(ref, raw.clamp(-1, 1))  # diffusers clamps to [-1, 1] at the end
    assert (ours.decode(z) - ref).abs().max() <= 1e-5


@torch.no_grad()
def test_diffusers_first_frame_uses_only_last_tap_and_no_time_conv():
    """The premises of our simplification, checked on diffusers itself: for a one-frame
    decode, the temporal taps but the last of every causal conv only ever multiply the
    (zero) padding, and the upsamplers' time_conv is not run at all."""
    vae = _random_vae(CONFIGS["published"], seed=5)
    z = _latents(1, 4, 6, 16)
    ref = vae.decode(z).sample
    for name, m in vae.decoder.named_modules():
        if isinstance(m, dq.QwenImageCausalConv3d):
            if ".time_conv" in name:
                m.weight.fill_(float("nan"))
                m.bias.fill_(float("nan"))
            elif m.weight.shape[2] > 1:
                m.weight[:, :, :-1].normal_(0.0, 5.0)
    assert torch.equal(vae.decode(z).sample, ref)


def test_weight_name_mapping_and_loading():
    cases = {
        "post_quant_conv.weight": "post_quant_conv.weight",
        "decoder.conv_in.bias": "conv_in.bias",
        "decoder.mid_block.attentions.0.to_qkv.weight": "mid_block.attentions.0.to_qkv.weight",
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight":
            "up_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.up_blocks.0.upsamplers.0.resample.1.bias": "up_blocks.0.upsample_conv.bias",
        "decoder.up_blocks.0.upsamplers.0.time_conv.weight": None,
        "decoder.norm_out.gamma": "norm_out.gamma",
        "encoder.conv_in.weight": None,
        "quant_conv.bias": None,
    }
    for src, dst in cases.items():
        assert map_vae_weight_name(src) == dst, src

    # Whole checkpoint, including an encoder with attention: all of ours loaded, and only
    # encoder / quant_conv / time_conv weights skipped.
    vae = _random_vae(dict(CONFIGS["tiny"], attn_scales=[1.0]))
    sd = vae.state_dict()
    ours = QwenImageVAEDecoder.from_config(dict(vae.config))
    assert ours.load_weights(sd.items(), strict=True) == {n for n, _ in ours.named_parameters()}
    skipped = [n for n in sd if map_vae_weight_name(n) is None]
    assert any(".time_conv." in n for n in skipped)
    assert all(n.startswith(("encoder.", "quant_conv.")) or ".time_conv." in n for n in skipped)

    with pytest.raises(ValueError, match="unexpected"):
        ours.load_weights([("decoder.bogus.weight", torch.zeros(1))])
    partial = [(n, t) for n, t in sd.items() if n != "decoder.conv_out.bias"]
    assert "conv_out.bias" not in ours.load_weights(partial)
    with pytest.raises(ValueError, match="missing"):
        ours.load_weights(partial, strict=True)
    with pytest.raises(ValueError, match="shape"):
        ours.load_weights([("decoder.conv_out.bias", torch.zeros(7))])


def test_rejects_multiple_frames():
    _, ours = _pair("tiny")
    with pytest.raises(ValueError, match="single frames"):
        ours.decode(torch.zeros(1, 4, 2, 4, 4))
