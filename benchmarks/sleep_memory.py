"""Sleep mode on a large model: the device memory the engine holds awake and
asleep (levels 1 and 2), and whether its tokens after waking are unchanged.

    python benchmarks/sleep_memory.py --model ../shared/models/llada-8b-shape \
        --json benchmarks/results/h100_sleep.json

Dummy bf16 weights, one engine with ``enable_sleep_mode=True``. Before the
first sleep it decodes in every cache mode (exact, prefix, dual), so the key
arena, the KV pages and the denoiser's CUDA graphs all exist. Memory is the
driver's view (``torch.cuda.mem_get_info``), minus what was in use before the
engine started. Level 1 keeps the weights on the host: the tokens after waking
must equal those before. Level 2 discards them; this script then only reports
memory (dummy weights cannot be reloaded from disk).
"""

import argparse
import json

import torch
from vllm import LLM, SamplingParams

from vllm_omni.worker import WORKER_CLS as WORKER

GiB = 1 << 30


def in_use() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--json")
    args = ap.parse_args()
    before = in_use()
    llm = LLM(model=args.model, worker_cls=WORKER, load_format="dummy", dtype="bfloat16",
              skip_tokenizer_init=True, max_model_len=512, seed=0, enable_sleep_mode=True,
              gpu_memory_utilization=args.gpu_memory_utilization,
              tensor_parallel_size=args.tensor_parallel_size)
    prompts = [{"prompt_token_ids": list(range(1000, 1128))}] * 4
    params = [SamplingParams(temperature=0, max_tokens=64, ignore_eos=True,
                             extra_args={"block_length": 32, "steps": 16, "cache": cache})
              for cache in ("none", "prefix", "dual")]

    def run():
        return [[list(o.outputs[0].token_ids) for o in llm.generate(prompts, p, use_tqdm=False)]
                for p in params]

    row = {"model": args.model, "tp": args.tensor_parallel_size}
    first = run()
    row["awake_gib"] = round((in_use() - before) / GiB, 2)
    llm.sleep(level=1)
    row["asleep_level1_gib"] = round((in_use() - before) / GiB, 2)
    llm.wake_up()
    row["tokens_equal_after_level1"] = run() == first
    row["awake_again_gib"] = round((in_use() - before) / GiB, 2)
    llm.sleep(level=2)
    row["asleep_level2_gib"] = round((in_use() - before) / GiB, 2)
    llm.wake_up()
    print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
