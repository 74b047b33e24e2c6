"""What an image request arriving mid-batch waits (docs/architecture/images.md).

    python benchmarks/image_arrival.py [--model DIR] [--json OUT]

Starts vLLM's OpenAI server on the model, then times over ``/pooling``:
- a short request alone (its own service time);
- a long request alone;
- the long request, then the short one ``--delay`` seconds later.
The whole pipeline of a request runs inside one engine step, so the short
request that arrives while the long one denoises waits for that step to end:
its latency is about the long request's remaining time plus its own.
Defaults suit the embedded tiny model on a CPU.
"""

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import Server  # noqa: E402  (the tests' real-server helper)


def post(url: str, data: dict) -> float:
    start = time.perf_counter()
    r = requests.post(url + "/pooling", json={"model": "m", "data": data}, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "vllm_omni" / "assets" / "qwen-image-tiny"))
    ap.add_argument("--long", default="256x256x50", help="WxHxSTEPS of the long request")
    ap.add_argument("--short", default="32x32x2", help="WxHxSTEPS of the short request")
    ap.add_argument("--delay", type=float, default=0.2, help="seconds after the long one")
    ap.add_argument("--json")
    args = ap.parse_args()

    def data(spec, seed):
        w, h, steps = map(int, spec.split("x"))
        return {"prompt": "a red apple", "width": w, "height": h, "num_inference_steps": steps,
                "seed": seed}

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    server = Server(args.model, "--served-model-name", "m", "--config-format", "qwen_image",
                    "--max-model-len", "1058")
    try:
        post(server.url, data(args.short, 0))  # warm-up
        short_alone = min(post(server.url, data(args.short, 1)) for _ in range(3))
        long_alone = post(server.url, data(args.long, 2))
        result = {}
        slow = threading.Thread(target=lambda: result.setdefault(
            "long", post(server.url, data(args.long, 3))))
        slow.start()
        time.sleep(args.delay)
        short_behind = post(server.url, data(args.short, 4))
        slow.join()
    finally:
        server.stop()
    row = {"model": Path(args.model).name, "long": args.long, "short": args.short,
           "delay_s": args.delay, "short_alone_s": round(short_alone, 3),
           "long_alone_s": round(long_alone, 3), "short_behind_long_s": round(short_behind, 3),
           "short_waited_s": round(short_behind - short_alone, 3),
           "long_with_short_s": round(result["long"], 3)}
    print(row)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
