"""Offline throughput: a diffusion LM through vLLM-Omni, in each cache mode and
at fixed tokens per step, next to plain vLLM AR decoding on a Llama of the
same dimensions, in one run.

    python benchmarks/throughput.py --model ../shared/models/llada-8b-shape \
        --batch 1 8 32 64 --gen 256 --block 32 --tokens-per-step 1 2 4 \
        --json benchmarks/results/h100_llada8b_modes.json
    python benchmarks/plot_throughput.py benchmarks/results/h100_llada8b_modes.json
    # block diffusion (SDAR): block 4, k tokens per step, next to a Qwen3 twin
    python benchmarks/throughput.py --model benchmarks/models/sdar-4b-shape --prompt 512 \
        --gen 512 --block 4 --tokens-per-step 1 2 4 --batch 1 32 128 \
        --json benchmarks/results/h100_block.json

``--tensor-parallel-size N`` runs both engines over N GPUs (each row says
``tp``; ``tflops_frac`` is then of N GPUs' peak). ``--no-diffusion`` runs only
the AR twin, e.g. on another GPU at the same time as the diffusion engine.

Dummy weights (``load_format="dummy"``) in bf16, random prompt token ids, no
tokenizer. One diffusion engine serves every row (batch x mode x k, the knobs
are per request); the AR twin runs after it. Each engine runs in its own
process (vLLM frees a GPU engine reliably only at process exit).

k tokens per step is fixed through ``steps = canvas // k``: dummy weights never
pass a confidence threshold, so every block takes exactly block // k steps.
A block-diffusion model (SDAR: attention causal across blocks, committed
blocks in vLLM's KV cache) runs mode "block" instead of the cache modes:
``low_confidence_static`` with ``denoising_steps_per_block = block // k``
commits exactly k tokens per step; its AR twin is vLLM's Qwen3 with the
same config.
``--blocks-in-flight 1 2 3`` adds multi-block rows to mode "block" (printed
"block/n"; docs/architecture/overview.md, "Multi-block decoding"): up to n
blocks of a request in flight. Dummy weights never pass the semi-activated
threshold either, so a later block only commits once fully activated:
``--decoded-token-threshold`` (at most (block - k) / block) lets it start
before the block before it is finished. Those rows leave out the TFLOP/s
(``block_flops`` counts one block in flight).
Mode "none" is printed as "exact". A row whose estimated time (the last
measurement of the same mode and k, warm-up included, scaled linearly by
batch) exceeds ``--max-seconds-per-row`` is not run but recorded as skipped,
with the estimate. Prints one table; ``--json`` writes all rows.
"""

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback

from vllm_omni.worker import WORKER_CLS as WORKER
LABEL = {"none": "exact", "prefix": "prefix", "dual": "dual", "block": "block"}
# Architectures served in mode "block", with the knobs that make a step
# commit exactly k tokens (denoising_steps_per_block = block / k): SDAR's
# static schedule; LLaDA2's block_refinement with its threshold at 1 (always
# the quota) and editing off (then, as its reference, one more forward after
# the block's last mask).
BLOCK_CAUSAL = {
    "SDARForCausalLM": {"algorithm": "low_confidence_static"},
    "LLaDA2MoeModelLM": {"algorithm": "block_refinement", "confidence_threshold": 1.0,
                         "editing_threshold": 0.0},
}
MULTI_BLOCK_KNOBS = ("block_add_threshold", "decoded_token_threshold", "semi_active_threshold")


def model_shape(config: dict) -> dict:
    """Dimensions from config.json: LLaDA's keys or Dream's (Qwen2's)."""
    def first(*keys):
        return next(config[k] for k in keys if config.get(k))  # LLaDA may write n_kv_heads: null
    # An MoE's active MLP width per token: its routed and shared experts.
    experts = config.get("num_experts_per_tok", 0) + config.get("num_shared_experts", 0)
    active_mlp = experts * config.get("moe_intermediate_size", 0)
    return {
        "active_mlp": active_mlp,
        "hidden": first("d_model", "hidden_size"),
        "heads": first("n_heads", "num_attention_heads"),
        "kv_heads": first("n_kv_heads", "num_key_value_heads", "n_heads", "num_attention_heads"),
        "layers": first("n_layers", "num_hidden_layers"),
        "mlp": first("mlp_hidden_size", "intermediate_size"),
        "vocab": first("embedding_size", "vocab_size"),  # LLaDA's head is embedding_size wide
        # SDAR (Qwen3) sets head_dim: heads * head_dim need not equal hidden.
        "head_dim": config.get("head_dim") or first("d_model", "hidden_size")
        // first("n_heads", "num_attention_heads"),
        "block_knobs": next((BLOCK_CAUSAL[a] for a in config.get("architectures", [])
                             if a in BLOCK_CAUSAL), None),
        # Dream predicts position i from the output at i - 1 (models/dream.py).
        "logit_shift": int("DreamModel" in config.get("architectures", [])),
    }


def denoise_flops(s: dict, prompt: int, gen: int, block: int, k: int, mode: str) -> float:
    """FLOPs of one request's denoising forwards (a multiply-add is 2 FLOPs).

    Every forward runs q query tokens against all L = prompt + canvas keys
    (canvas = gen rounded up to whole blocks; the cache modes splice cached
    keys in, so attention always spans L):
      linear     2 * q * layers * (2*h*h + 2*h*kv_dim + 3*h*mlp)   (q,o; k,v; gate,up,down)
      attention  4 * q * L * h * layers   (QK^T and PV, h = q heads * head_dim; bidirectional)
      LM head    2 * block * h * vocab    (only the block's rows go through the head)
    Steps per block spb = block // k. exact ("none"): spb forwards over L.
    prefix: one over L, then spb - 1 over the block and everything after it.
    dual: one over L, then spb - 1 over the block only. Dream's cached steps
    also run the position before the block (its logit shift): included.
    Embeddings, norms, RoPE, softmax and biases are left out.
    Divide by seconds for TFLOP/s; ``--peak-tflops`` defaults to 989, the
    H100 SXM dense bf16 peak, for ``tflops_frac``.
    """
    h, layers = s["hidden"], s["layers"]
    kv_dim = s["kv_heads"] * h // s["heads"]
    per_token = 2 * layers * (2 * h * h + 2 * h * kv_dim + 3 * h * s["mlp"])
    canvas = math.ceil(gen / block) * block
    length, spb = prompt + canvas, block // k
    total = 0.0
    for start in range(prompt, length, block):
        cached = {"none": length, "prefix": length - start + s["logit_shift"],
                  "dual": block + s["logit_shift"]}[mode]
        for q in [length] + [cached] * (spb - 1):
            total += q * per_token + 4 * q * length * h * layers
        total += spb * 2 * block * h * s["vocab"]
    return total


def block_flops(s: dict, prompt: int, gen: int, block: int, k: int) -> float:
    """FLOPs of one block-diffusion request (mode "block"), as ``denoise_flops``
    counts them, with q = heads * head_dim: the prompt's prefill (causal
    across blocks: a token attends to ~half the prompt on average), then per
    block spb = block // k forwards of the block's tokens over the cached
    prefix and the block, each through the LM head, and one store forward
    of the committed block (no LM head)."""
    h, layers, qd = s["hidden"], s["layers"], s["heads"] * s["head_dim"]
    kv_dim = s["kv_heads"] * s["head_dim"]
    mlp = s["active_mlp"] or s["mlp"]  # an MoE: the experts a token runs through
    per_token = 2 * layers * (2 * h * qd + 2 * h * kv_dim + 3 * h * mlp)
    total = prompt * per_token + 4 * prompt * (prompt / 2) * qd * layers
    spb = block // k
    for start in range(prompt - prompt % block, prompt + gen, block):
        keys = start + block
        forward = block * per_token + 4 * block * keys * qd * layers
        total += (spb + 1) * forward + spb * 2 * block * h * s["vocab"]
    return total


def qwen3_twin(config: dict, path: str) -> str:
    """vLLM's Qwen3 with a block-diffusion model's config (SDAR is Qwen3's
    architecture with block attention)."""
    qwen3 = {k: v for k, v in config.items() if k not in ("block_size", "mask_token_id")}
    qwen3.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(qwen3, f)
    return path


def bailing_twin(config: dict, path: str) -> str:
    """vLLM's BailingMoeV2 (Ling 2.0, the AR model LLaDA2.0 is built from) with
    LLaDA2's config: the same attention, experts, grouped sigmoid routing and
    shared expert; causal attention and one token a step."""
    twin = {k: v for k, v in config.items() if k not in ("mask_token_id", "auto_map")}
    twin.update(architectures=["BailingMoeV2ForCausalLM"],
                moe_shared_expert_intermediate_size=config["moe_intermediate_size"])
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(twin, f)
    return path


def llama_twin(s: dict, config: dict, path: str) -> str:
    """A Llama config with the diffusion model's dimensions (MHA/GQA, MLP,
    vocab), for the AR baseline."""
    llama = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": s["hidden"], "intermediate_size": s["mlp"],
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
        "num_hidden_layers": s["layers"], "vocab_size": s["vocab"],
        "max_position_embeddings": config.get("max_sequence_length",
                                              config.get("max_position_embeddings")),
        "rms_norm_eps": config.get("rms_norm_eps", 1e-5),
        "rope_theta": config.get("rope_theta", 10000.0),
        "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(llama, f)
    return path


def run_engine(kind: str, model: str, args, shape: dict, out_path: str) -> None:
    """Runs every row of one engine; appends each row to ``out_path`` as a
    JSON line when done, so a crash keeps the rows measured before it."""
    import numpy as np
    from vllm import LLM, SamplingParams

    canvas = math.ceil(args.gen / args.block) * args.block
    kwargs = dict(model=model, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                  max_model_len=args.prompt + canvas + 64, seed=0,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  tensor_parallel_size=args.tensor_parallel_size,
                  quantization=args.quantization)
    if kind == "diffusion":
        # One forward may pack every canvas of the largest batch (exact mode):
        # the denoiser splits a step into groups of at most this many tokens.
        kwargs.update(worker_cls=WORKER, enforce_eager=args.eager,
                      max_num_batched_tokens=args.max_num_batched_tokens
                      or max(args.batch) * (args.prompt + canvas))
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    start_s = round(time.perf_counter() - t0, 1)
    rng = np.random.default_rng(0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompts = [{"prompt_token_ids": rng.integers(100, vocab - 1000, args.prompt).tolist()}
               for _ in range(max(args.batch))]
    variants = ([(m, k, n) for m in args.modes for k in args.tokens_per_step
                 for n in (args.blocks_in_flight if m == "block" else [1])]
                if kind == "diffusion" else [("ar", 1, 1)])
    last = {}  # (mode, k, n) -> (batch, seconds) of its latest run, for the estimate
    for batch in args.batch:
        for mode, k, n in variants:
            extra = None
            if kind == "diffusion" and mode == "block":
                extra = {"block_length": args.block, "denoising_steps_per_block": args.block // k,
                         **shape["block_knobs"]}
                if n > 1:
                    extra.update(max_blocks_in_flight=n, **{
                        knob: getattr(args, knob) for knob in MULTI_BLOCK_KNOBS
                        if getattr(args, knob) is not None})
            elif kind == "diffusion":
                extra = {"block_length": args.block, "steps": canvas // k, "cache": mode}
            sp = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True,
                                extra_args=extra)
            row = {"engine": kind, "model": args.name, "mode": LABEL.get(mode, mode),
                   "batch": batch, "k": k, "blocks_in_flight": n,
                   "tp": args.tensor_parallel_size, "quantization": args.quantization,
                   "prompt": args.prompt, "gen": args.gen,
                   "block": args.block, "engine_start_s": start_s}
            if (mode, k, n) not in last:  # warm-up, once per variant; also the first estimate
                t = time.perf_counter()
                llm.generate(prompts[:1], sp, use_tqdm=False)
                last[mode, k, n] = (1, time.perf_counter() - t)
            b0, s0 = last[mode, k, n]
            estimate = s0 * batch / b0  # linear in batch: pessimistic where batching helps
            if estimate > args.max_seconds_per_row:
                row.update(skipped=True, estimate_s=round(estimate, 2))
            else:
                if kind == "diffusion":
                    # Warm up at this batch so its CUDA graphs are captured
                    # here, not in the timed run: the whole request up to
                    # batch 8 (prefix-cache steps shrink block by block),
                    # one block above (larger groups mostly run eager).
                    one_block = ({} if mode == "block" else {"steps": args.block // k})
                    warm = sp if batch <= 8 else SamplingParams(
                        temperature=0, max_tokens=args.block, ignore_eos=True,
                        extra_args={**extra, **one_block})
                    llm.generate(prompts[:batch], warm, use_tqdm=False)
                    llm.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
                t = time.perf_counter()
                outs = llm.generate(prompts[:batch], sp, use_tqdm=False)
                elapsed = time.perf_counter() - t
                last[mode, k, n] = (batch, elapsed)
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                # Steps each request takes; batched requests take them together.
                steps = canvas // k if kind == "diffusion" else args.gen
                row.update(tokens=tokens, seconds=round(elapsed, 3),
                           tok_per_s=round(tokens / elapsed, 1),
                           steps_per_s=round(steps / elapsed, 1))
                if kind == "diffusion" and n == 1:
                    flops = batch * (block_flops(shape, args.prompt, args.gen, args.block, k)
                                     if mode == "block" else
                                     denoise_flops(shape, args.prompt, args.gen, args.block, k, mode))
                    tflops = flops / elapsed / 1e12
                    tp_peak = args.peak_tflops * args.tensor_parallel_size  # all GPUs
                    # Significant digits, not decimals: a CPU's figures are tiny.
                    row.update(tflops=float(f"{tflops:.4g}"),
                               tflops_frac=float(f"{tflops / tp_peak:.4g}"))
                if kind == "diffusion":
                    # The denoiser's own account (rank 0): per step, the host
                    # time until its kernels are queued vs. until it is done.
                    st = llm.collective_rpc("diffusion_step_stats")[0]
                    row.update(engine_steps=st["engine_steps"],  # one per block in lockstep
                               forwards=st["steps"], graph_forwards=st["graph_steps"],
                               forward_tokens=st["forward_tokens"],
                               host_ms_per_forward=round(1e3 * st["host_s"] / st["steps"], 3),
                               wall_ms_per_forward=round(1e3 * st["wall_s"] / st["steps"], 3),
                               denoise_frac=round(st["wall_s"] / elapsed, 3),
                               # with our runner's own work (the rest: vLLM's
                               # scheduling, outputs and IPC, the front end)
                               runner_frac=round(st["runner_s"] / elapsed, 3),
                               capture_ms=round(1e3 * st["capture_s"], 1),
                               blocks_added=st.get("multi_block_blocks_added", 0))
                    eager = st["steps"] - st["graph_steps"]
                    # Graphed (block-only) and eager (refresh, exact, prefix) steps apart.
                    for part, count, host, wall in (
                            ("graph", st["graph_steps"], st["graph_host_s"], st["graph_wall_s"]),
                            ("eager", eager, st["host_s"] - st["graph_host_s"],
                             st["wall_s"] - st["graph_wall_s"])):
                        if count:
                            row[f"{part}_host_wall_ms_per_forward"] = [
                                round(1e3 * host / count, 3), round(1e3 * wall / count, 3)]
            print(row, flush=True)
            with open(out_path, "a") as f:
                f.write(json.dumps(row) + "\n")


def engine_process(*args) -> None:
    """run_engine in a child process. On an error, print it and exit at once:
    a normal exit would wait forever on the engine's own processes."""
    try:
        run_engine(*args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _mode(row: dict) -> str:
    n = row.get("blocks_in_flight", 1)
    return row["mode"] if n == 1 else f"{row['mode']}/{n}"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'engine':<10}{'mode':<7}{'tp':>3}{'batch':>6}{'k':>3}{'tok/s':>10}{'steps/s':>9}"
          f"{'s':>9}{'TFLOP/s':>10}{'of peak':>11}  note")
    for r in rows:
        if r.get("skipped"):
            print(f"{r['engine']:<10}{_mode(r):<7}{r.get('tp', 1):>3}{r['batch']:>6}{r['k']:>3}"
                  f"{'-':>10}{'-':>9}"
                  f"{'-':>9}{'-':>10}{'-':>11}  skipped, estimate {r['estimate_s']} s")
            continue
        tf = f"{r['tflops']:.3g}" if "tflops" in r else "-"
        frac = f"{100 * r['tflops_frac']:.3g}%" if "tflops_frac" in r else "-"
        print(f"{r['engine']:<10}{_mode(r):<7}{r.get('tp', 1):>3}{r['batch']:>6}{r['k']:>3}"
              f"{r['tok_per_s']:>10}"
              f"{r['steps_per_s']:>9}{r['seconds']:>9}{tf:>10}{frac:>11}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a diffusion model dir (config.json at least)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--modes", nargs="+", choices=[m for m in LABEL if m != "block"],
                    default=["none", "prefix", "dual"],
                    help="cache modes; none is printed as exact (a block-diffusion model "
                    "runs mode block only)")
    ap.add_argument("--tokens-per-step", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--blocks-in-flight", type=int, nargs="+", default=[1],
                    help="mode block: a row per max_blocks_in_flight (1: single-block)")
    for knob in MULTI_BLOCK_KNOBS:
        ap.add_argument("--" + knob.replace("_", "-"), type=float,
                        help=f"multi-block rows: the {knob} knob (default: the knob's)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--max-seconds-per-row", type=float, default=60.0)
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="for tflops_frac; 989 = H100 SXM dense bf16")
    ap.add_argument("--no-ar", action="store_true", help="skip the AR baseline")
    ap.add_argument("--no-diffusion", action="store_true",
                    help="only the AR baseline (e.g. on another GPU at the same time)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="vLLM's tensor_parallel_size, for both engines")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--max-num-batched-tokens", type=int, default=0,
                    help="the diffusion engine's token budget (default: the largest batch's canvases)")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs of the denoising forwards")
    ap.add_argument("--quantization", default=None,
                    help="vLLM's quantization for both engines, e.g. fp8 (weights at load)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    bad = [k for k in args.tokens_per_step if k < 1 or args.block % k]
    if bad:
        ap.error(f"--tokens-per-step {bad}: each k must divide --block {args.block}")
    args.batch = sorted(set(args.batch))  # ascending, so estimates scale up from measured rows
    args.name = os.path.basename(os.path.normpath(args.model))

    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    shape = model_shape(config)
    if shape["block_knobs"]:
        args.modes = ["block"]
    engines = [] if args.no_diffusion else [("diffusion", args.model)]
    if not args.no_ar:
        twin_dir = tempfile.mkdtemp(prefix="ar-twin-")
        twin = {"SDARForCausalLM": qwen3_twin, "LLaDA2MoeModelLM": bailing_twin}.get(
            config["architectures"][0])
        engines.append(("ar", twin(config, twin_dir) if twin
                        else llama_twin(shape, config, twin_dir)))
    ctx = mp.get_context("spawn")
    rows, failed = [], []
    for kind, model in engines:
        if args.json:  # beside the result, so a killed run leaves its rows
            out_path = f"{args.json}.{kind}.jsonl"
            open(out_path, "w").close()
        else:
            fd, out_path = tempfile.mkstemp(prefix=f"{kind}-rows-", suffix=".jsonl")
            os.close(fd)
        proc = ctx.Process(target=engine_process, args=(kind, model, args, shape, out_path))
        proc.start()
        proc.join()
        with open(out_path) as f:
            rows += [json.loads(line) for line in f]
        os.unlink(out_path)
        if proc.exitcode != 0:
            failed.append(f"{kind} engine failed (exit code {proc.exitcode})")

    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if failed:
        raise SystemExit("; ".join(failed) + " (its rows so far are above)")


if __name__ == "__main__":
    main()
