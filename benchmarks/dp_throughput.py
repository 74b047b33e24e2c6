"""Data parallelism: vLLM's own DP engines behind its OpenAI server, against one
engine, with the same client and settings.

    python benchmarks/dp_throughput.py --model ../shared/models/llada-8b-shape \
        --data-parallel-size 1 2 --batch 32 --tokens-per-step 4 --cache dual \
        --json benchmarks/results/h100x2_dp.json

For each DP size a server starts (``--data-parallel-size N``, our worker,
dummy bf16 weights, no tokenizer: prompts are random token ids), a warm-up
batch runs one block per request (the denoiser captures its CUDA graphs),
then ``batch`` concurrent completions of ``--gen`` tokens (``ignore_eos``) are
timed from the first request sent to the last response received. One row per
(DP size, batch): ``tok_per_s`` counts the completion tokens the server
reports. On a GPU each DP engine gets its own GPU (vLLM's placement).
"""

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time

import numpy as np
import openai
import requests

from vllm_omni.worker import WORKER_CLS as WORKER


def start_server(args, dp: int, log_path: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    canvas = math.ceil(args.gen / args.block) * args.block
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
           "--served-model-name", "m", "--worker-cls", WORKER, "--load-format", "dummy",
           "--dtype", "bfloat16", "--skip-tokenizer-init", "--seed", "0",
           "--max-model-len", str(args.prompt + canvas + 64),
           "--max-num-batched-tokens", str(max(args.batch) * (args.prompt + canvas)),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization),
           "--data-parallel-size", str(dp), "--host", "127.0.0.1", "--port", str(port)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server (DP={dp}) exited with {proc.returncode}; see {log_path}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"server (DP={dp}) did not come up in {args.start_timeout} s; see {log_path}")


async def run_batch(url: str, prompts: list[list[int]], max_tokens: int, xargs: dict) -> int:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=600)

    async def one(prompt):
        out = await client.completions.create(
            model="m", prompt=prompt, max_tokens=max_tokens, temperature=0,
            extra_body={"vllm_xargs": xargs, "ignore_eos": True})
        return out.usage.completion_tokens

    tokens = await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    return sum(tokens)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-parallel-size", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[32])
    ap.add_argument("--tokens-per-step", type=int, default=4)
    ap.add_argument("--cache", default="dual", choices=["none", "prefix", "dual"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--log-dir", default=".")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    canvas = math.ceil(args.gen / args.block) * args.block
    k = args.tokens_per_step
    xargs = {"block_length": args.block, "steps": canvas // k, "cache": args.cache}
    warm = {**xargs, "steps": args.block // k}
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    vocab = config.get("embedding_size") or config["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, vocab - 1000, args.prompt).tolist()
               for _ in range(max(args.batch))]
    rows = []
    for dp in args.data_parallel_size:
        t0 = time.perf_counter()
        proc, url = start_server(args, dp, os.path.join(args.log_dir, f"dp{dp}-server.log"))
        start_s = round(time.perf_counter() - t0, 1)
        try:
            for batch in args.batch:
                asyncio.run(run_batch(url, prompts[:batch], args.block, warm))
                t = time.perf_counter()
                tokens = asyncio.run(run_batch(url, prompts[:batch], args.gen, xargs))
                elapsed = time.perf_counter() - t
                row = {"engine": "diffusion", "model": os.path.basename(os.path.normpath(
                    args.model)), "mode": {"none": "exact"}.get(args.cache, args.cache),
                       "k": k, "batch": batch, "dp": dp, "tp": 1, "front_end": "openai_server",
                       "prompt": args.prompt, "gen": args.gen, "block": args.block,
                       "tokens": tokens, "seconds": round(elapsed, 3),
                       "tok_per_s": round(tokens / elapsed, 1), "server_start_s": start_s}
                print(row, flush=True)
                rows.append(row)
        finally:
            stop(proc)
    base = {r["batch"]: r["tok_per_s"] for r in rows if r["dp"] == 1}
    for r in rows:
        if r["batch"] in base:
            r["speedup_vs_dp1"] = round(r["tok_per_s"] / base[r["batch"]], 3)
        print(f"dp={r['dp']} batch={r['batch']} {r['tok_per_s']} tok/s "
              f"x{r.get('speedup_vs_dp1', '-')} vs DP=1")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
