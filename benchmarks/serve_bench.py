"""Drive a running OpenAI-compatible server with N concurrent streaming clients.

    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --model llada \
        --concurrency 1 4 16 64 --requests 128 --max-tokens 64 \
        --xargs '{"steps": 32, "block_length": 16}' --plot docs/serve_llada_tiny.png

Each client streams completions back to back. Per request we record the time to
the first block (TTFT) and the gaps between blocks (inter-block latency). The
table reports request throughput, output tokens/s and latency percentiles; the
plot shows throughput and latency against concurrency.
"""

import argparse
import asyncio
import json
import statistics
import time

import openai

PROMPTS = [
    "The licenses for most software are designed to",
    "Everyone is permitted to copy and distribute",
    "This License applies to any program or other work which",
    "What does this license allow me to do?",
]


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def run_level(args, concurrency: int) -> dict:
    client = openai.AsyncOpenAI(base_url=args.url + "/v1", api_key="none")
    queue = list(range(args.requests))
    ttft, gaps, tokens = [], [], 0

    async def worker():
        nonlocal tokens
        while queue:
            i = queue.pop()
            start = time.perf_counter()
            last = None
            stream = await client.completions.create(
                model=args.model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=args.max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"vllm_xargs": args.xargs, "ignore_eos": True})
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].text:
                    if last is None:
                        ttft.append(now - start)
                    else:
                        gaps.append(now - last)
                    last = now
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {
        "concurrency": concurrency, "requests": args.requests, "seconds": round(elapsed, 2),
        "req_per_s": round(args.requests / elapsed, 2), "out_tok_per_s": round(tokens / elapsed, 1),
        "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1),
        "ttft_p99_ms": round(1000 * percentile(ttft, 99), 1),
        "block_gap_p50_ms": round(1000 * percentile(gaps, 50), 1),
        "block_gap_p99_ms": round(1000 * percentile(gaps, 99), 1),
        "block_gap_mean_ms": round(1000 * statistics.fmean(gaps), 1) if gaps else None,
    }


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(c, [r["out_tok_per_s"] for r in rows], "o-")
    a.set(xscale="log", xlabel="concurrent clients", ylabel="output tokens/s", title="throughput")
    for key in ("ttft_p50_ms", "ttft_p99_ms", "block_gap_p50_ms", "block_gap_p99_ms"):
        b.plot(c, [r[key] for r in rows], "o-", label=key)
    b.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="latency")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64])
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--xargs", type=json.loads, default={})
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--plot", help="write a PNG here")
    args = ap.parse_args()

    rows = []
    for level in args.concurrency:
        rows.append(asyncio.run(run_level(args, level)))
        print(rows[-1], flush=True)
    keys = list(rows[0])
    print("\n" + " | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
