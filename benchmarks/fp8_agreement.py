"""FP8 weights against bf16 on the golden prompts (issue 16): the token
agreement of vLLM's own ``quantization="fp8"`` (weights quantized at load,
activations per token; the LM head and the KV cache stay bf16) with the same
engine in bf16, on LLaDA's and Dream's golden cases (``../shared/golden``,
the tiny checkpoints in ``vllm_omni/assets``). Needs a GPU with FP8 (H100).

    VLLM_OMNI_GOLDEN=../shared/golden python benchmarks/fp8_agreement.py --json out.json

Per family: the cases in one batch, greedy, ``ignore_eos``; per case the
fraction of positions whose token agrees, and whether the whole output does.
Tiny random-weight checkpoints are a harsh test (peaked, untrained logits
with small margins); the speed of FP8 at 8B is ``throughput.py
--quantization fp8``.
"""

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def run(family: str, quantization: str | None) -> tuple[list[str], list[list[int]]]:
    from vllm import LLM, SamplingParams

    from conftest import ASSETS, golden_cases, llada_knobs
    from vllm_omni.worker import WORKER_CLS

    llm = LLM(model=str(ASSETS / f"{family}-tiny"), worker_cls=WORKER_CLS, dtype="bfloat16",
              quantization=quantization, max_model_len=512, seed=0,
              gpu_memory_utilization=0.3)
    if family == "llada":
        cases = golden_cases("llada_cases.json")["cases"]
        params = [SamplingParams(temperature=0, max_tokens=c["gen_length"], ignore_eos=True,
                                 extra_args=llada_knobs(c)) for c in cases]
    else:
        cases = [c for c in golden_cases("dream_cases.json")["cases"] if c["temperature"] == 0]
        params = [SamplingParams(temperature=0, max_tokens=c["max_new_tokens"], ignore_eos=True,
                                 extra_args={"algorithm": c["alg"], "steps": c["steps"],
                                             "eps": c["eps"], "top_k": c["top_k"],
                                             "top_p": c["top_p"]}) for c in cases]
    outs = llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in cases], params,
                        use_tqdm=False)
    return [c["name"] for c in cases], [list(o.outputs[0].token_ids) for o in outs]


def child(family: str, quantization: str | None, out: str) -> None:
    names, ids = run(family, quantization)
    Path(out).write_text(json.dumps({"names": names, "ids": ids}))
    os._exit(0)  # an engine's atexit would wait on its processes


def main() -> None:
    import multiprocessing as mp
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["llada", "dream"])
    ap.add_argument("--json")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for family in args.families:
        got = {}
        for quant in (None, "fp8"):
            out = tempfile.mktemp(suffix=".json")
            proc = ctx.Process(target=child, args=(family, quant, out))
            proc.start()
            proc.join()
            got[quant] = json.loads(Path(out).read_text())
        names, bf16, fp8 = got[None]["names"], got[None]["ids"], got["fp8"]["ids"]
        same = [sum(a == b for a, b in zip(x, y)) / max(len(x), 1) for x, y in zip(bf16, fp8)]
        row = {"family": family, "cases": len(names),
               "exact_cases": sum(x == y for x, y in zip(bf16, fp8)),
               "token_agreement": round(sum(same) / len(same), 4),
               "per_case": dict(zip(names, (round(s, 4) for s in same)))}
        print(row, flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
