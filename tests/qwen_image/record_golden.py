"""Record diffusers' QwenImagePipeline on the tiny Qwen-Image (CPU, float32).

    .venv/bin/python tests/qwen_image/record_golden.py

Reads ``vllm_omni/assets/qwen-image-tiny`` (``scripts/make_qwen_image_tiny.py``) and
writes ``tests/qwen_image/golden/cases.json`` and ``golden.safetensors``.

Per case, under ``"{case id}/..."`` in the safetensors file:

* ``image``: the pipeline's ``output_type="pt"`` images, float32 (B, 3, H, W) in [0, 1].
* ``prompt_input_ids`` / ``prompt_attention_mask``: the tokenized template
  (``pipe.prompt_template_encode``), before the drop of the first
  ``prompt_template_encode_start_idx`` (34) tokens.
* ``prompt_embeds`` (B, L, 16) and ``prompt_embeds_mask`` (B, L) after the drop: what
  ``_get_qwen_prompt_embeds`` returns. ``encode_prompt`` hands the transformer ``None``
  instead of the mask when it is all ones; cases.json says which (``*_mask_passed``).
* ``negative_*``: the same for the negative prompt, when CFG runs.
* ``latents_init`` (B, S, 16): packed initial noise; ``latents`` (steps, B, S, 16): the
  latents after each scheduler step (``callback_on_step_end``).
* ``timesteps`` (steps,) and ``sigmas`` (steps + 1,): the scheduler's after the call.

Each case is then re-run with the pipeline in float64 from the same initial noise (the
fp32 ``latents_init`` upcast: a float64 draw from the same seed gives different noise),
and cases.json records the fp32-vs-fp64 differences (flagged above 1e-4).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ASSET = REPO / "vllm_omni" / "assets" / "qwen-image-tiny"
GOLDEN = HERE / "golden"
FP64_FLAG = 1e-4

PROMPTS = [
    "a red cat",
    "A serene lake at dawn, mist over the water, a small wooden boat",
    "neon sign that says 'OPEN 24h' on a brick wall",
]
NEG = "blurry, low quality"
NEG_SPACE = " "  # what Qwen-Image's model card passes to turn CFG on without a negative text


def case(cid, prompt, negative_prompt, true_cfg_scale, height, width, steps, seed, note=""):
    return dict(id=cid, prompt=prompt, negative_prompt=negative_prompt,
                true_cfg_scale=true_cfg_scale, height=height, width=width,
                num_inference_steps=steps, seed=seed, note=note)


CASES = [
    case("c00_base", PROMPTS[0], None, 1.0, 32, 32, 2, 0,
         "baseline; single prompt, so encode_prompt passes no mask"),
    case("c01_neg_cfg1", PROMPTS[0], NEG, 1.0, 32, 32, 2, 0,
         "negative prompt ignored at true_cfg_scale <= 1: equals c00"),
    case("c02_cfg4_noneg", PROMPTS[0], None, 4.0, 32, 32, 2, 0,
         "CFG needs a negative prompt: equals c00"),
    case("c03_cfg4_neg", PROMPTS[0], NEG, 4.0, 32, 32, 2, 0, "CFG with norm rescale"),
    case("c04_seed1", PROMPTS[0], None, 1.0, 32, 32, 2, 1, "seed change vs c00"),
    case("c05_prompt1", PROMPTS[1], None, 1.0, 32, 32, 2, 0, "prompt change vs c00"),
    case("c06_40x56", PROMPTS[1], None, 1.0, 40, 56, 3, 2,
         "odd packed grid 5x7 (centred RoPE with odd sizes)"),
    case("c07_64x32_cfg", PROMPTS[2], NEG_SPACE, 4.0, 64, 32, 5, 42,
         "tall image, negative prompt ' '"),
    case("c08_48x64_cfg", PROMPTS[2], NEG, 4.0, 48, 64, 6, 7, "wide image, CFG"),
    case("c09_64x96_8steps", PROMPTS[0], NEG, 4.0, 64, 96, 8, 3,
         "largest: 64x96, 8 steps, CFG"),
    case("c10_64x96_4steps", PROMPTS[1], None, 1.0, 64, 96, 4, 123, "largest, no CFG"),
    case("c11_batch_cfg", [PROMPTS[0], PROMPTS[2]], [NEG, NEG_SPACE], 4.0, 48, 48, 3, 5,
         "batch of 2 prompts of different lengths: padded masks reach the transformer; "
         "one generator draws the noise of both"),
]


def load_pipeline(dtype=torch.float32):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(ASSET, torch_dtype=torch.float32)
    if dtype != torch.float32:
        pipe.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_case(pipe, c: dict, latents: torch.Tensor | None = None) -> dict:
    """Run one case through ``pipe``; returns every tensor of interest (on CPU)."""
    got: dict = {"encode": [], "raw": [], "steps": []}

    orig_encode, orig_raw, orig_prep = (pipe.encode_prompt, pipe._get_qwen_prompt_embeds,
                                        pipe.prepare_latents)

    def encode_prompt(*a, **kw):
        out = orig_encode(*a, **kw)
        got["encode"].append(out)
        return out

    def get_qwen_prompt_embeds(prompt=None, *a, **kw):
        out = orig_raw(prompt, *a, **kw)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        txt = [pipe.prompt_template_encode.format(p) for p in prompts]
        toks = pipe.tokenizer(txt, max_length=pipe.tokenizer_max_length
                              + pipe.prompt_template_encode_start_idx,
                              padding=True, truncation=True, return_tensors="pt")
        got["raw"].append((out, toks))
        return out

    def prepare_latents(*a, **kw):
        out = orig_prep(*a, **kw)
        got["latents_init"] = out.clone()
        return out

    def on_step_end(_pipe, i, t, kw):
        got["steps"].append(kw["latents"].clone())
        return {}

    pipe.encode_prompt, pipe._get_qwen_prompt_embeds, pipe.prepare_latents = (
        encode_prompt, get_qwen_prompt_embeds, prepare_latents)
    try:
        image = pipe(prompt=c["prompt"], negative_prompt=c["negative_prompt"],
                     true_cfg_scale=c["true_cfg_scale"], height=c["height"], width=c["width"],
                     num_inference_steps=c["num_inference_steps"],
                     generator=torch.Generator("cpu").manual_seed(c["seed"]),
                     latents=latents, output_type="pt",
                     callback_on_step_end=on_step_end,
                     callback_on_step_end_tensor_inputs=["latents"]).images
    finally:
        del pipe.encode_prompt, pipe._get_qwen_prompt_embeds, pipe.prepare_latents

    out = {"image": image, "latents_init": got["latents_init"],
           "latents": torch.stack(got["steps"]),
           "timesteps": pipe.scheduler.timesteps.clone(),
           "sigmas": pipe.scheduler.sigmas.clone()}
    meta = {}
    for which, (emb_mask, toks), enc in zip(("prompt", "negative"), got["raw"], got["encode"]):
        emb, mask = emb_mask
        out[f"{which}_input_ids"] = toks.input_ids
        out[f"{which}_attention_mask"] = toks.attention_mask
        out[f"{which}_embeds"] = emb
        out[f"{which}_embeds_mask"] = mask
        assert torch.equal(enc[0], emb)
        meta[f"{which}_embeds_mask_passed"] = enc[1] is not None
    meta["do_true_cfg"] = len(got["encode"]) == 2
    return out, meta


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def calculate_mu(pipe, seq_len: int) -> float:
    cfg = pipe.scheduler.config
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return seq_len * m + cfg.base_shift - m * cfg.base_image_seq_len


def main() -> None:
    import diffusers
    import transformers

    pipe = load_pipeline()
    pipe64 = load_pipeline(torch.float64)
    assert pipe64.transformer.dtype == torch.float64 and pipe64.vae.dtype == torch.float64
    assert pipe64.text_encoder.dtype == torch.float64

    tensors: dict[str, torch.Tensor] = {}
    records = []
    results = {}
    for c in CASES:
        out, meta = run_case(pipe, c)
        results[c["id"]] = out
        for k, v in out.items():
            tensors[f"{c['id']}/{k}"] = v.contiguous()
        # float64 from the same noise.
        out64, _ = run_case(pipe64, c, latents=out["latents_init"].to(torch.float64))
        seq = out["latents_init"].shape[1]
        rec = dict(c)
        rec.update(meta)
        rec.update(
            batch_size=out["image"].shape[0],
            image_shape=list(out["image"].shape),
            latents_init_shape=list(out["latents_init"].shape),
            latents_shape=list(out["latents"].shape),
            packed_grid=[c["height"] // (2 * pipe.vae_scale_factor),
                         c["width"] // (2 * pipe.vae_scale_factor)],
            image_seq_len=seq,
            mu=calculate_mu(pipe, seq),
            timesteps=[float(t) for t in out["timesteps"]],
            sigmas=[float(s) for s in out["sigmas"]],
            prompt_tokens=int(out["prompt_attention_mask"].sum(1).max()),
            prompt_embeds_shape=list(out["prompt_embeds"].shape),
            image_stats=dict(min=float(out["image"].min()), max=float(out["image"].max()),
                             mean=float(out["image"].mean()),
                             frac_clamped=float(((out["image"] == 0) | (out["image"] == 1))
                                                .float().mean())),
            fp64=dict(
                image_max_abs_diff=max_diff(out["image"], out64["image"]),
                final_latents_max_abs_diff=max_diff(out["latents"][-1], out64["latents"][-1]),
                prompt_embeds_max_abs_diff=max_diff(out["prompt_embeds"],
                                                    out64["prompt_embeds"]),
            ),
        )
        rec["fp64"]["flagged"] = rec["fp64"]["image_max_abs_diff"] > FP64_FLAG
        records.append(rec)
        print(f"{c['id']}: image {rec['image_shape']} steps {c['num_inference_steps']} "
              f"cfg {rec['do_true_cfg']} mask {rec['prompt_embeds_mask_passed']} "
              f"fp64 diff {rec['fp64']['image_max_abs_diff']:.2e}"
              + (" FLAGGED" if rec["fp64"]["flagged"] else ""), flush=True)

    # How far the knobs move the image (all at 32x32, 2 steps; vs c00 unless stated).
    def d(a, b):
        return max_diff(results[a]["image"], results[b]["image"])

    sensitivity = {
        "negative_prompt_at_cfg1 (c01 vs c00)": d("c01_neg_cfg1", "c00_base"),
        "cfg4_without_negative (c02 vs c00)": d("c02_cfg4_noneg", "c00_base"),
        "cfg4_with_negative (c03 vs c00)": d("c03_cfg4_neg", "c00_base"),
        "seed 0 -> 1 (c04 vs c00)": d("c04_seed1", "c00_base"),
        "prompt 0 -> 1 (c05 vs c00)": d("c05_prompt1", "c00_base"),
    }
    # Extra runs (not recorded): another negative text; CFG scale 4 -> 2.
    base = dict(CASES[3])
    for label, change in (("negative text NEG -> ' ' at cfg 4 (vs c03)",
                           {"negative_prompt": NEG_SPACE}),
                          ("true_cfg_scale 4 -> 2 (vs c03)", {"true_cfg_scale": 2.0})):
        alt, _ = run_case(pipe, {**base, **change})
        sensitivity[label] = max_diff(alt["image"], results["c03_cfg4_neg"]["image"])
    # Re-running a case is bit-exact.
    again, _ = run_case(pipe, CASES[9])
    sensitivity["rerun c09 (determinism)"] = max_diff(again["image"],
                                                      results[CASES[9]["id"]]["image"])

    GOLDEN.mkdir(parents=True, exist_ok=True)
    save_file(tensors, GOLDEN / "golden.safetensors",
              metadata={"diffusers": diffusers.__version__})
    doc = {
        "about": "diffusers QwenImagePipeline on vllm_omni/assets/qwen-image-tiny, CPU float32 "
                 "(tests/qwen_image/record_golden.py). Tensors are in golden.safetensors "
                 "under '<case id>/<name>'. Noise: torch.Generator('cpu').manual_seed(seed).",
        "versions": {"diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
        "dtype": "float32",
        "output_type": "pt",
        "prompt_template_encode": pipe.prompt_template_encode,
        "prompt_template_encode_start_idx": pipe.prompt_template_encode_start_idx,
        "vae_scale_factor": pipe.vae_scale_factor,
        "fp64_flag_threshold": FP64_FLAG,
        "fp64_note": "pipe.to(torch.float64) runs, but parts stay float32: "
                     "FlowMatchEulerDiscreteScheduler.step upcasts the sample to float32 "
                     "(so each step rounds the float64 latents to float32), the transformer's "
                     "RoPE (x.float() then complex64) and timestep embedding, and "
                     "transformers' Qwen2 RMSNorm (hidden_states.to(float32)). The float64 run "
                     "reuses the float32 initial noise.",
        "sensitivity_image_max_abs_diff": sensitivity,
        "cases": records,
    }
    (GOLDEN / "cases.json").write_text(json.dumps(doc, indent=1) + "\n")
    size = sum(f.stat().st_size for f in GOLDEN.iterdir())
    print(json.dumps(sensitivity, indent=1))
    print(f"wrote {GOLDEN} ({size} bytes)")
    assert size < 2_000_000, size


if __name__ == "__main__":
    main()
