"""Shared fixtures: few engine starts per suite (each costs ~15-25 s on CPU)."""

import json
import os
from pathlib import Path

# vLLM on CPU: a small KV cache and no reserved core keep a tiny engine quick.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
# apply_model ships a test function to the worker process.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "vllm_omni" / "assets"
# The official code's outputs on the tiny checkpoints (read-only, beside the repo).
GOLDEN = Path(os.environ.get("VLLM_OMNI_GOLDEN", REPO.parent / "shared" / "golden"))
WORKER = "vllm_omni.worker.DiffusionGPUWorker"


def golden_cases(name: str) -> dict:
    path = GOLDEN / name
    if not path.exists():
        pytest.skip(f"golden data not found at {path}")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def llada_llm():
    import torch
    from vllm import LLM

    llm = LLM(
        model=str(ASSETS / "llada-tiny"),
        worker_cls=WORKER,
        dtype="float32",
        max_model_len=512,
        # Small token budget: prompts and returned blocks arrive in chunks,
        # so the runner's wait-for-the-whole-input path is exercised.
        max_num_batched_tokens=32,
        seed=0,
        # On a GPU, leave room for the other engines a test may start.
        gpu_memory_utilization=0.3 if torch.cuda.is_available() else 0.9,
    )
    yield llm
    del llm
