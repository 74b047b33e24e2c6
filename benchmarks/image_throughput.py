"""Qwen-Image through vLLM-Omni at the published shapes: seconds per image and
images per minute, next to diffusers' anchor (../shared/gpu/diffusers_qwenimage_bench.py,
same settings: 1024x1024, 50 steps, true CFG 4, batch 1 and 4, bf16 random weights).

    python benchmarks/image_throughput.py --json benchmarks/results/h100_qwen_image.json
    python benchmarks/image_throughput.py --tiny --size 64 --steps 4    # a CPU smoke run

It writes a config-only diffusers folder at Qwen/Qwen-Image's shapes (transformer
60 layers, 24 heads x 128, joint dim 3584; Qwen2.5-VL-7B's language model; the
published VAE's shape, with neutral latent statistics; the published scheduler) and starts our engine on it with
``load_format="dummy"``. Requests are sent as the IO processor would send them
(prompt token ids: the 34 template tokens plus ``--text-tokens``; a negative
prompt of the same length), so the anchor's 128-token text embeddings are
matched; unlike the anchor, our time includes the text encoder. Each batch
size is warmed up with a 2-step run first.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
the peak device memory of each run is read here, and ``--profile`` can run
one batch-1 request under ``torch.profiler``: the share of the text encoder,
the denoising steps and the VAE decode (the denoiser's phase ranges, each
ended by a device sync), and the device time per kernel class.
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "vllm_omni" / "assets" / "qwen-image-tiny"

TRANSFORMER = {"_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": 64,
               "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
               "num_attention_heads": 24, "joint_attention_dim": 3584,
               "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]}
VAE = {"_class_name": "AutoencoderKLQwenImage", "base_dim": 96, "z_dim": 16,
       "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
       "temperal_downsample": [False, True, True], "dropout": 0.0,
       "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}
TEXT = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "dtype": "bfloat16",
        "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4,
                        "vocab_size": 152064, "rms_norm_eps": 1e-6,
                        "max_position_embeddings": 128000,
                        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default",
                                            "mrope_section": [16, 24, 24]}}}
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
             "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9, "shift": 1.0,
             "shift_terminal": 0.02, "time_shift_type": "exponential",
             "use_dynamic_shifting": True, "num_train_timesteps": 1000}


def published_folder() -> str:
    """A diffusers folder with the published configs and no weights."""
    root = Path(tempfile.mkdtemp(prefix="qwen-image-shape-"))
    index = json.loads((TINY / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps(index))
    for name, config, file in (("transformer", TRANSFORMER, "config.json"),
                               ("vae", VAE, "config.json"),
                               ("text_encoder", TEXT, "config.json"),
                               ("scheduler", SCHEDULER, "scheduler_config.json")):
        (root / name).mkdir()
        (root / name / file).write_text(json.dumps(config))
    shutil.copytree(TINY / "tokenizer", root / "tokenizer")
    return str(root)


KERNEL_CLASSES = (  # device kernels by name, for the profile's split (first match)
    ("attention", ("_bidir_attn_kernel",)),
    ("fused norms (adaLN, qk-norm+RoPE)", ("_modulated_norm_kernel", "_qk_norm_rope_kernel")),
    ("convolution (VAE)", ("conv", "implicit", "winograd", "cudnn", "fprop", "dgrad")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "sm90", "cublas", "xmma")),
)
NOT_KERNELS = ("qwen_image.", "aten::", "cuda", "cu", "Command Buffer", "Memcpy", "Memset")


def kernel_class(name: str) -> str:
    low = name.lower()
    for label, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return label
    return "other (elementwise, norms, copies)"


def profile_one(llm, prompts, params) -> dict:
    """One batch-1 run under torch.profiler: phase times and kernel classes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vllm_omni.diffusion.image_denoiser import ImageDenoiser

    ImageDenoiser.profile_phases = True
    try:
        cuda = torch.cuda.is_available()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            llm.encode(prompts, pooling_params=params, pooling_task="plugin", use_tqdm=False)
            if cuda:
                torch.cuda.synchronize()
            total = time.perf_counter() - t
    finally:
        ImageDenoiser.profile_phases = False
    phases, kernels = {}, {}
    for evt in prof.key_averages():
        if evt.key.startswith("qwen_image."):  # the CPU range (ended by a sync)
            if evt.cpu_time_total / 1e6 > phases.get(evt.key, {}).get("seconds", 0):
                phases[evt.key] = {"count": evt.count, "seconds": evt.cpu_time_total / 1e6}
        elif evt.self_device_time_total > 0 and not evt.key.startswith(NOT_KERNELS):
            label = kernel_class(evt.key)
            kernels[label] = kernels.get(label, 0.0) + evt.self_device_time_total / 1e6
    for v in phases.values():
        v["share"] = round(v["seconds"] / total, 4)
        v["seconds"] = round(v["seconds"], 3)
    busy = sum(kernels.values())
    return {"engine_step_s": round(total, 3), "phases": phases,
            "kernel_seconds": {k: round(v, 3) for k, v in sorted(kernels.items())},
            "kernel_share": {k: round(v / busy, 4) for k, v in sorted(kernels.items())},
            "top_kernels": [(e.key[:90], e.count, round(e.self_device_time_total / 1e6, 3))
                            for e in sorted(prof.key_averages(),
                                            key=lambda e: -e.self_device_time_total)[:14]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the embedded tiny model instead")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--profile", action="store_true", help="also profile one batch-1 run")
    ap.add_argument("--json")
    args = ap.parse_args()

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM
    from vllm.pooling_params import PoolingParams

    from vllm_omni.worker import WORKER_CLS

    cuda = torch.cuda.is_available()
    model = str(TINY) if args.tiny else published_folder()
    t0 = time.perf_counter()
    llm = LLM(model=model, config_format="qwen_image", worker_cls=WORKER_CLS, dtype=args.dtype,
              load_format="auto" if args.tiny else "dummy", seed=0, max_num_seqs=max(args.batch),
              hf_overrides={"io_processor_plugin": None})
    start_s = time.perf_counter() - t0
    start_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    ids = list(range(100, 100 + 34 + args.text_tokens))  # template + prompt tokens
    extra = {"height": args.size, "width": args.size, "true_cfg_scale": 4.0,
             "negative_prompt_token_ids": ids[::-1]}

    def run(batch, steps):
        prompts = [{"prompt_token_ids": ids}] * batch
        params = [PoolingParams(task="plugin", extra_kwargs={
            **extra, "num_inference_steps": steps, "seed": i}) for i in range(batch)]
        t = time.perf_counter()
        outs = llm.encode(prompts, pooling_params=params, pooling_task="plugin", use_tqdm=False)
        seconds = time.perf_counter() - t
        assert all(o.outputs.data.shape == (args.size, args.size, 3) for o in outs)
        return seconds, prompts, params

    rows = []
    for batch in args.batch:
        run(batch, 2)  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, _, _ = run(batch, args.steps)
        row = {"engine": "vllm_omni", "model": "qwen-image-tiny" if args.tiny else
               "qwen-image-shape", "size": args.size, "steps": args.steps, "true_cfg": 4.0,
               "batch": batch, "dtype": args.dtype, "seconds": round(seconds, 3),
               "s_per_image": round(seconds / batch, 3),
               "images_per_min": round(60 * batch / seconds, 2), "engine_start_s": round(start_s, 1)}
        if cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            row["start_peak_gib"] = round(start_peak, 2)  # includes the profile pass
        print(row, flush=True)
        rows.append(row)
    result = {"runs": rows}
    if args.profile:
        _, prompts, params = run(1, 2)
        params = [PoolingParams(task="plugin", extra_kwargs={
            **extra, "num_inference_steps": args.steps, "seed": 0})]
        result["profile_batch1"] = profile_one(llm, prompts, params)
        print(json.dumps(result["profile_batch1"], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
