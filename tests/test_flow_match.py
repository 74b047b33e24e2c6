"""Flow-matching schedule, Euler step and Qwen-Image pipeline maths against
diffusers 0.42.1 (bitwise: every comparison is torch.equal / array_equal)."""

import json
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage as qwen  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from vllm_omni.diffusion.flow_match import FlowMatchConfig, calculate_shift, euler_step, schedule  # noqa: E402
from vllm_omni.models.qwen_image import pipeline_math as pm  # noqa: E402

# Qwen/Qwen-Image scheduler/scheduler_config.json (the same values appear in
# Qwen-Image-2.1 and in several independent ports), and the Qwen-Image-Lightning
# config (ModelTC/Qwen-Image-Lightning generate_with_diffusers.py).
QWEN_IMAGE = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.34.0.dev0",
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
LIGHTNING = {**QWEN_IMAGE, "base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}
CONFIGS = {
    "qwen_image": QWEN_IMAGE,
    "lightning": LIGHTNING,
    "default": {},
    "linear_shift": {**QWEN_IMAGE, "time_shift_type": "linear"},
    "static_shift3": {"shift": 3.0, "shift_terminal": 0.1},
}
# bf16/fp16 rounding is per device kernel: run the dtype tests on CUDA too where present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _reference(cfg: dict, steps: int, seq_len: int, device: str = "cpu"):
    """What QwenImagePipeline.__call__ does to its scheduler (step 5)."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    mu = qwen.calculate_shift(
        seq_len, sched.config.get("base_image_seq_len", 256), sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
    qwen.retrieve_timesteps(sched, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched, mu


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("seq_len", [16, 256, 4096])
def test_schedule_matches_set_timesteps(name, steps, seq_len):
    cfg = FlowMatchConfig.from_dict(CONFIGS[name])
    with np.errstate(invalid="ignore", divide="ignore"):
        ref, mu = _reference(CONFIGS[name], steps, seq_len)
    assert calculate_shift(seq_len, cfg) == mu
    if steps == 1 and cfg.shift_terminal:
        # diffusers: (1 - 1) / (1 - 1) -> a NaN schedule; we refuse instead.
        assert torch.isnan(ref.timesteps).all()
        with pytest.raises(ValueError, match="NaN"):
            schedule(cfg, steps, seq_len)
        return
    timesteps, sigmas = schedule(cfg, steps, seq_len)
    assert timesteps.dtype == sigmas.dtype == torch.float32
    assert torch.equal(timesteps, ref.timesteps) and torch.equal(sigmas, ref.sigmas)
    assert sigmas[-1] == 0 and len(sigmas) == steps + 1


def test_custom_sigmas_and_config_file(tmp_path):
    path = tmp_path / "scheduler"
    path.mkdir()
    (path / "scheduler_config.json").write_text(json.dumps(QWEN_IMAGE))
    cfg = FlowMatchConfig.from_json(path)
    custom = [1.0, 0.8, 0.5, 0.3]
    ref = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE)
    ref.set_timesteps(sigmas=custom, mu=calculate_shift(1024, cfg))
    timesteps, sigmas = schedule(cfg, 50, 1024, sigmas=custom)  # sigmas set the step count
    assert torch.equal(timesteps, ref.timesteps) and torch.equal(sigmas, ref.sigmas)


@pytest.mark.parametrize("bad", [
    {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True},
    {"stochastic_sampling": True}, {"invert_sigmas": True}, {"time_shift_type": "cosine"},
    {"base_shift": None}, {"made_up_knob": 1}, {"_class_name": "EulerDiscreteScheduler"},
])
def test_unsupported_config_refused(bad):
    with pytest.raises(ValueError):
        FlowMatchConfig.from_dict({**QWEN_IMAGE, **bad})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_euler_matches_step_over_schedule(dtype, device):
    ref, _ = _reference(QWEN_IMAGE, 7, 256, device)
    _, sigmas = schedule(FlowMatchConfig.from_dict(QWEN_IMAGE), 7, 256, device=device)
    gen = torch.Generator().manual_seed(0)
    ours = theirs = torch.randn(2, 256, 64, generator=gen).to(device, dtype)
    ref.set_begin_index(0)
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(2, 256, 64, generator=gen).to(device, dtype)
        theirs = ref.step(out, t, theirs, return_dict=False)[0]
        ours = euler_step(ours, out, sigmas[i], sigmas[i + 1])
        assert ours.dtype == theirs.dtype == dtype
        assert torch.equal(ours, theirs), i


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_euler_batched_across_requests(dtype, device):
    """Requests at different steps of different schedules, stepped in one call
    with per-request sigmas, equal each one stepped alone by diffusers."""
    gen = torch.Generator().manual_seed(1)
    requests = [(QWEN_IMAGE, 7, 256, 3), (LIGHTNING, 2, 16, 0), ({}, 50, 4096, 49)]
    samples = torch.randn(3, 16, 64, generator=gen).to(device, dtype)
    outputs = torch.randn(3, 16, 64, generator=gen).to(device, dtype)
    sig, sig_next, expected = [], [], []
    for b, (cfg, steps, seq, i) in enumerate(requests):
        ref, _ = _reference(cfg, steps, seq, device)
        ref.set_begin_index(i)
        expected.append(ref.step(outputs[b:b + 1], ref.timesteps[i], samples[b:b + 1], return_dict=False)[0])
        _, sigmas = schedule(FlowMatchConfig.from_dict(cfg), steps, seq, device=device)
        sig.append(sigmas[i])
        sig_next.append(sigmas[i + 1])
    ours = euler_step(samples, outputs, torch.stack(sig).view(3, 1, 1), torch.stack(sig_next).view(3, 1, 1))
    assert torch.equal(ours, torch.cat(expected))


def _pipeline_cfg(noise_pred, neg_noise_pred, true_cfg_scale):
    # The lines of QwenImagePipeline.__call__'s `if do_true_cfg:` branch.
    comb_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
    cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
    noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
    return comb_pred * (cond_norm / noise_norm)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_true_cfg_combine(dtype, device):
    gen = torch.Generator().manual_seed(2)
    cond, uncond = (torch.randn(3, 24, 64, generator=gen).to(device, dtype) for _ in range(2))
    scales = [4.0, 1.7, 7.3]
    expected = torch.cat([_pipeline_cfg(cond[b:b + 1], uncond[b:b + 1], s) for b, s in enumerate(scales)])
    assert torch.equal(pm.combine_true_cfg(cond[:1], uncond[:1], 4.0), expected[:1])
    batched = pm.combine_true_cfg(cond, uncond, torch.tensor(scales, device=device).view(3, 1, 1))
    assert batched.dtype == dtype and torch.equal(batched, expected)


def test_true_cfg_condition():
    assert pm.true_cfg_enabled(4.0, True) == (True, None)
    on, warning = pm.true_cfg_enabled(4.0, False)  # the pipeline's default scale, no negative prompt
    assert not on and "no negative prompt" in warning
    on, warning = pm.true_cfg_enabled(1.0, True)
    assert not on and "true_cfg_scale <= 1" in warning
    assert pm.true_cfg_enabled(1.0, False) == (False, None)


def test_noise_packing_and_sizes():
    assert pm.latent_size(1024, 1024, 8) == (128, 128) and pm.image_seq_len(1024, 1024, 8) == 4096
    assert pm.latent_size(1000, 1320, 8) == (124, 164) and pm.size_warning(1000, 1320, 8)
    assert pm.size_warning(928, 1664, 8) is None
    with pytest.raises(ValueError):
        pm.latent_size(8, 64, 8)
    def gens(seeds):  # one generator, or a list of one per image
        made = [torch.Generator().manual_seed(s) for s in seeds]
        return made[0] if len(made) == 1 else made

    for seeds in ((5,), (6, 7)):
        ref = randn_tensor((2, 1, 16, 12, 20), generator=gens(seeds), device=torch.device("cpu"),
                           dtype=torch.bfloat16)
        ref = QwenImagePipeline._pack_latents(ref, 2, 16, 12, 20)
        ours = pm.initial_noise(gens(seeds), 16, 96, 160, 8, torch.bfloat16, "cpu", batch_size=2)
        assert ours.shape == (2, 60, 64) and torch.equal(ours, ref)
        unpacked = pm.unpack_latents(ours, 96, 160, 8)
        assert torch.equal(unpacked, QwenImagePipeline._unpack_latents(ours, 96, 160, 8))
        assert torch.equal(pm.pack_latents(unpacked), ours)


def test_decode_side_maths():
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(2, 3, 16, 24, generator=gen) * 1.5
    proc = VaeImageProcessor(vae_scale_factor=16)
    assert torch.equal(pm.postprocess_image(image, "pt"), proc.postprocess(image, output_type="pt"))
    assert np.array_equal(pm.postprocess_image(image, "np"), proc.postprocess(image, output_type="np"))
    pil = proc.postprocess(image, output_type="pil")
    assert np.array_equal(pm.postprocess_image(image, "uint8")[1], np.asarray(pil[1]))
    assert pm.text_seq_len(34 + 20) == 20 and pm.text_seq_len(2000) == 512
    assert pm.text_seq_len(2000, 1024) == 1024


def _tiny_pipeline(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.1, -0.3, 0.7, 0.05], latents_std=[1.3, 0.7, 2.1, 0.9])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device, dtype)
    calls = []
    forward = transformer.forward

    def recording_forward(**kwargs):
        out = forward(**kwargs)
        calls.append({**kwargs, "out": out[0]})
        return out

    transformer.forward = recording_forward
    return pipe, calls


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_pipeline_end_to_end(dtype, device):
    """A tiny random QwenImagePipeline: our noise, schedule, CFG, Euler steps,
    unpack, de-normalisation and post-processing around the same transformer
    and VAE reproduce its every step and its output image bitwise."""
    pipe, calls = _tiny_pipeline(device, dtype)
    height, width, steps, scale = 40, 56, 3, 4.0  # a 5 x 7 token grid
    gen = torch.Generator().manual_seed(1)
    embeds, neg_embeds = (torch.randn(1, n, 16, generator=gen).to(device, dtype) for n in (7, 5))
    after_step = []
    image = pipe(
        prompt_embeds=embeds, prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
        negative_prompt_embeds=neg_embeds, negative_prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long),
        true_cfg_scale=scale, height=height, width=width, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(42), output_type="pt",
        callback_on_step_end=lambda p, i, t, kw: after_step.append(kw["latents"]) or {},
    ).images

    vsf = pm.vae_scale_factor(pipe.vae.config.temperal_downsample)
    assert vsf == pipe.vae_scale_factor == 4
    cfg = FlowMatchConfig.from_dict(dict(pipe.scheduler.config))
    timesteps, sigmas = schedule(cfg, steps, pm.image_seq_len(height, width, vsf), device=device)
    assert torch.equal(timesteps, pipe.scheduler.timesteps) and torch.equal(sigmas, pipe.scheduler.sigmas)

    # A CPU generator: drawn on the CPU, then moved (as randn_tensor does).
    latents = pm.initial_noise(torch.Generator().manual_seed(42), 4, height, width, vsf, embeds.dtype, device)
    assert torch.equal(latents, calls[0]["hidden_states"])
    assert len(calls) == 2 * steps  # cond then uncond each step
    for i, t in enumerate(timesteps):
        step_outputs = []
        for call, text in zip(calls[2 * i:2 * i + 2], (embeds, neg_embeds)):
            shapes = pm.transformer_shapes(height, width, vsf, text.shape[1])
            assert call["img_shapes"] == [list(shapes.img_shapes)] and call["encoder_hidden_states_mask"] is None
            ts = pm.transformer_timestep(t.expand(1), latents.dtype)
            assert torch.equal(call["timestep"], ts)
            step_outputs.append(pipe.transformer(hidden_states=latents, timestep=ts, encoder_hidden_states=text,
                                                 img_shapes=[list(shapes.img_shapes)], return_dict=False)[0])
        noise_pred = pm.combine_true_cfg(step_outputs[0], step_outputs[1], scale)
        latents = euler_step(latents, noise_pred, sigmas[i], sigmas[i + 1])
        assert torch.equal(latents, after_step[i]), i

    z = pm.denormalize_latents(pm.unpack_latents(latents, height, width, vsf), pipe.vae.config.latents_mean,
                               pipe.vae.config.latents_std, pipe.vae.dtype)
    ours = pm.postprocess_image(pipe.vae.decode(z, return_dict=False)[0][:, :, 0], "pt")
    assert ours.shape == image.shape == (1, 3, height, width) and torch.equal(ours, image)

    # Text RoPE starts at max(h_tok // 2, w_tok // 2) = 3 on the 5 x 7 grid.
    shapes = pm.transformer_shapes(height, width, vsf, 7)
    rope = pipe.transformer.pos_embed
    _, txt_freqs = rope([list(shapes.img_shapes)], max_txt_seq_len=7, device=torch.device(device))
    assert shapes.txt_rope_start == 3
    assert torch.equal(txt_freqs, rope.pos_freqs[3:10].to(device))


@torch.no_grad()
@pytest.mark.parametrize("scale,negative,runs_cfg", [(4.0, False, False), (1.0, True, False), (1.5, True, True)])
def test_tiny_pipeline_cfg_condition(scale, negative, runs_cfg):
    pipe, calls = _tiny_pipeline()
    neg = dict(negative_prompt_embeds=torch.zeros(1, 3, 16)) if negative else {}
    pipe(prompt_embeds=torch.ones(1, 4, 16), prompt_embeds_mask=torch.ones(1, 4, dtype=torch.long),
         true_cfg_scale=scale, height=32, width=32, num_inference_steps=2,
         generator=torch.Generator().manual_seed(0), output_type="latent", **neg)
    assert pm.true_cfg_enabled(scale, negative)[0] == runs_cfg
    assert len(calls) == 2 * (2 if runs_cfg else 1)
