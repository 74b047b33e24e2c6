"""Generate an image with Qwen-Image through vLLM:
``python -m vllm_omni.generate_image "a red apple" --out apple.png``.

Runs the embedded tiny Qwen-Image by default, so it works on a fresh clone
(its pictures are noise-like: the tiny model has random weights). The default
size here is 64x64 and 8 steps so a CPU answers in seconds. These are this
command's defaults, not diffusers' (diffusers: 128 * the VAE's scale factor a
side, 50 steps); a request sent without them gets diffusers' defaults.
"""

import argparse
import os
import time
from pathlib import Path

DEFAULT_MODEL = str(Path(__file__).parent / "assets" / "qwen-image-tiny")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt")
    ap.add_argument("--out", default="image.png", help="PNG to write (default: image.png)")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="a diffusers Qwen-Image folder (default: the embedded tiny model)")
    ap.add_argument("--height", type=int, default=64, help="pixels (default: 64)")
    ap.add_argument("--width", type=int, default=64, help="pixels (default: 64)")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps (default: 8)")
    ap.add_argument("--cfg", type=float, default=4.0,
                    help="true_cfg_scale; true CFG runs when > 1 and a negative prompt is "
                         "given (default: 4.0, as diffusers)")
    ap.add_argument("--negative-prompt", default=None, help="(default: none)")
    ap.add_argument("--seed", type=int, default=None,
                    help="(default: a random seed, printed)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    # On CPU, a 1 GiB KV cache budget is plenty (the model keeps no KV cache).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from vllm_omni.compat import RequestError
    from vllm_omni.entrypoints.image_io import to_pil
    from vllm_omni.worker import WORKER_CLS

    llm = LLM(model=args.model, worker_cls=WORKER_CLS,
              config_format="qwen_image", dtype=args.dtype)
    data = {"prompt": args.prompt, "height": args.height, "width": args.width,
            "num_inference_steps": args.steps, "true_cfg_scale": args.cfg,
            "negative_prompt": args.negative_prompt, "seed": args.seed}
    start = time.perf_counter()
    try:
        out = llm.encode({"data": data}, pooling_task="plugin", use_tqdm=False)[0].outputs
    except RequestError as exc:  # a bad setting: vLLM's message names it
        ap.exit(2, f"error: {exc}\n")
    elapsed = time.perf_counter() - start
    to_pil(out).save(args.out)
    print(f"{args.out}: {out.width}x{out.height}, {args.steps} steps, seed {out.seed}, "
          f"{elapsed:.2f} s")


if __name__ == "__main__":
    main()
