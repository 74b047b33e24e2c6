"""Offline throughput: a diffusion LM through vLLM-Omni next to plain vLLM AR
decoding on a Llama of the same dimensions, in one run.

    python benchmarks/throughput.py --model ../shared/models/llada-8b-shape \
        --batch 1 32 --gen 256 --block 32 --tokens-per-step 1 4

Dummy weights (``load_format="dummy"``) in bf16, random prompt token ids, no
tokenizer. Each engine runs in its own process (vLLM frees a GPU engine
reliably only at process exit). Prints one table; ``--json`` writes it too.
"""

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time

WORKER = "vllm_omni.worker.DiffusionGPUWorker"


def llama_twin(diffusion_config: dict, path: str) -> str:
    """A Llama config with the diffusion model's dimensions (MHA/GQA, MLP,
    vocab), for the AR baseline."""
    c = diffusion_config
    hidden = c.get("d_model", c.get("hidden_size"))
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": c.get("mlp_hidden_size", c.get("intermediate_size")),
        "num_attention_heads": c.get("n_heads", c.get("num_attention_heads")),
        "num_key_value_heads": c.get("n_kv_heads") or c.get("num_key_value_heads"),
        "num_hidden_layers": c.get("n_layers", c.get("num_hidden_layers")),
        "vocab_size": c.get("embedding_size") or c["vocab_size"],
        "max_position_embeddings": c.get("max_sequence_length", c.get("max_position_embeddings")),
        "rms_norm_eps": c.get("rms_norm_eps", 1e-5),
        "rope_theta": c.get("rope_theta", 10000.0),
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(llama, f)
    return path


def run_engine(kind: str, model: str, args, queue) -> None:
    import numpy as np
    from vllm import LLM, SamplingParams

    kwargs = dict(model=model, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                  max_model_len=args.prompt + args.gen + 64, seed=0,
                  gpu_memory_utilization=args.gpu_memory_utilization)
    if kind == "diffusion":
        kwargs["worker_cls"] = WORKER
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    start_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rows = []
    variants = args.tokens_per_step if kind == "diffusion" else [None]
    for batch in args.batch:
        prompts = [{"prompt_token_ids": rng.integers(100, vocab - 1000, args.prompt).tolist()}
                   for _ in range(batch)]
        for k in variants:
            extra = None
            if k is not None:
                extra = {"block_length": args.block, "steps": args.gen // k}
            sp = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True, extra_args=extra)
            llm.generate(prompts[:1], sp, use_tqdm=False)  # warm-up
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            elapsed = time.perf_counter() - t
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append({"engine": kind, "batch": batch, "tokens_per_step": k or 1,
                         "tokens": tokens, "seconds": round(elapsed, 3),
                         "tok_per_s": round(tokens / elapsed, 1), "engine_start_s": round(start_s, 1)})
            print(rows[-1], flush=True)
    queue.put(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a diffusion model dir (config.json at least)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--tokens-per-step", type=int, nargs="+", default=[1])
    ap.add_argument("--no-ar", action="store_true", help="skip the AR baseline")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()

    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    engines = [("diffusion", args.model)]
    if not args.no_ar:
        engines.append(("ar", llama_twin(config, tempfile.mkdtemp(prefix="ar-twin-"))))
    ctx = mp.get_context("spawn")
    rows = []
    for kind, model in engines:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_engine, args=(kind, model, args, queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"{kind} engine failed (exit code {proc.exitcode})")
        rows += queue.get()

    print(f"\n{'engine':<10}{'batch':>6}{'k':>4}{'tok/s':>10}{'s':>9}{'start s':>9}")
    for r in rows:
        print(f"{r['engine']:<10}{r['batch']:>6}{r['tokens_per_step']:>4}{r['tok_per_s']:>10}"
              f"{r['seconds']:>9}{r['engine_start_s']:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
