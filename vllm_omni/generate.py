"""Generate with a diffusion LM through vLLM: ``python -m vllm_omni.generate``.

Runs the embedded tiny LLaDA by default, so it works on a fresh clone.
"""

import argparse
import json
import os
import time
from pathlib import Path

DEFAULT_MODEL = str(Path(__file__).parent / "assets" / "llada-tiny")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("prompt", nargs="*", default=["The licenses for most software are designed to"])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--knobs", default="{}", help='diffusion knobs as JSON, e.g. \'{"steps": 16, "block_length": 8}\'')
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chat", action="store_true", help="apply the model's chat template")
    args = ap.parse_args()

    # On CPU, a 1 GiB KV cache is plenty for the tiny model.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from vllm_omni.worker import WORKER_CLS

    llm = LLM(model=args.model, worker_cls=WORKER_CLS,
              dtype=args.dtype, max_model_len=512)
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, extra_args=json.loads(args.knobs))
    start = time.perf_counter()
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], sp, use_tqdm=False)
    else:
        outs = llm.generate(args.prompt, sp, use_tqdm=False)
    elapsed = time.perf_counter() - start
    for out in outs:
        print(f"prompt: {out.prompt!r}\noutput: {out.outputs[0].text!r}\n")
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"{tokens} tokens in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
