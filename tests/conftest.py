"""Shared fixtures: few engine starts per suite (each costs ~15-25 s on CPU)."""

import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

# vLLM on CPU: a small KV cache and no reserved core keep a tiny engine quick.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
# apply_model ships a test function to the worker process.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# On a GPU, engines start in spawned processes: forking the test process once
# an engine's threads run in it can deadlock the child (seen on an H100: the
# second LLaDA2 engine of a module never came up). On CPU fork has been fine.
if torch.cuda.is_available():
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

from vllm_omni.worker import WORKER_CLS as WORKER  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "vllm_omni" / "assets"
# The official code's outputs on the tiny checkpoints (read-only, beside the repo).
GOLDEN = Path(os.environ.get("VLLM_OMNI_GOLDEN", REPO.parent / "shared" / "golden"))


def golden_cases(name: str) -> dict:
    path = GOLDEN / name
    if not path.exists():
        pytest.skip(f"golden data not found at {path}")
    return json.loads(path.read_text())


LLADA_CACHE = {"exact": "none", "prefix_cache": "prefix", "dual_cache": "dual"}


def llada_knobs(case: dict) -> dict:
    """A LLaDA golden case's decoding knobs (``extra_args``)."""
    knobs = {"steps": case["steps"], "block_length": case["block_length"],
             "cache": LLADA_CACHE[case["mode"]]}
    if case["threshold"] is not None:
        knobs["threshold"] = case["threshold"]
    return knobs


def generate_llada_cases(llm, cases: list[dict]) -> list[list[int]]:
    """Greedy, ``ignore_eos`` token ids of LLaDA golden cases, in one batch."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=c["gen_length"], ignore_eos=True,
                             extra_args=llada_knobs(c)) for c in cases]
    outs = llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in cases], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _set_step_graphs(worker, enabled: bool, capture: bool):
    worker.model_runner.denoiser.set_step_graphs(enabled, capture)


@contextmanager
def graph_shaped_steps(llm):
    """Inside: the denoiser runs small groups through ``StepGraphs``' static
    forward (what its CUDA graphs capture) without capturing, on any device.
    After: the engine's default again (graphs on CUDA, none elsewhere)."""
    llm.collective_rpc(_set_step_graphs, args=(True, False))
    try:
        yield
    finally:
        cuda = torch.cuda.is_available()
        llm.collective_rpc(_set_step_graphs, args=(cuda, True))


def _watch_bookkeeping(worker, on: bool):
    """On: after every ``execute_model``, compare each request's row of the
    runner's persistent batch with what the request holds (vLLM's
    ``_bookkeeping_sync`` keeps them equal for sampled tokens; our runner
    must for blocks). Off: stop, and return what was seen."""
    runner = worker.model_runner
    if not on:
        del runner.execute_model  # the class's again
        return runner.__dict__.pop("bookkeeping_log")
    log = runner.bookkeeping_log = {"steps": 0, "mismatches": [], "rows": {}}
    execute = runner.execute_model

    def checked(*args, **kwargs):
        out = execute(*args, **kwargs)
        batch = runner.input_batch
        for index, req_id in enumerate(batch.req_ids):
            state = runner.requests[req_id]
            n = int(batch.num_tokens_no_spec[index])
            row = batch.token_ids_cpu[index, :n].tolist()
            held = list(state.prompt_token_ids) + list(state.output_token_ids)
            if row != held or not batch.is_token_ids[index, :n].all():
                log["mismatches"].append((log["steps"], req_id, len(row), len(held)))
            log["rows"][req_id] = row
        log["steps"] += 1
        return out

    runner.execute_model = checked


@contextmanager
def checked_bookkeeping(llm):
    """Inside: every engine step checks that the runner's persistent batch
    holds each request's prompt and output tokens. The dict it yields gets
    ``steps``, ``mismatches`` and each request's last ``rows`` on exit."""
    log = {}
    llm.collective_rpc(_watch_bookkeeping, args=(True,))
    try:
        yield log
    finally:
        log.update(llm.collective_rpc(_watch_bookkeeping, args=(False,))[0])


def block_causal_forward(model, input_ids, block_length):
    """A block-causal model's logits for every position of ``input_ids``
    under its block mask: one store sequence per block (each writes its
    block to the pages, then attends to the pages before it and to itself).
    The pages are page 0, vLLM's null block, which no request owns. Run in
    the worker (``LLM.apply_model``)."""
    from vllm_omni.models.attention_plan import AttentionPlan, SequencePlan

    device = next(model.parameters()).device
    n, page = input_ids.numel(), model.kv_cache_page_size()
    assert n <= page
    seqs = [SequencePlan(s + block_length, s, s + block_length, [0], write=(s, s + block_length))
            for s in range(0, n, block_length)]
    with torch.inference_mode():
        plan = AttentionPlan(seqs, page, device)
        rows = torch.arange(n, device=device)
        return model.denoise_logits(input_ids.to(device), rows, plan, rows).cpu()


def in_lockstep(llm, prompts, sampling_params):
    """vLLM's offline API for adding a batch before the engine steps: sleep
    level 0 pauses scheduling and keeps accepting requests; waking resumes it
    (``docs/architecture/overview.md``, "Arrival skew"). Outputs in order."""
    llm.sleep(level=0, mode="keep")
    llm.enqueue(prompts, sampling_params, use_tqdm=False)
    llm.wake_up(tags=["scheduling"])
    return llm.wait_for_completion(use_tqdm=False)


def start_engine(model: str, **kwargs):
    from vllm import LLM

    # Three engines may be alive at once (the two session fixtures and a
    # module's): each takes a modest share of the device (of RAM on CPU; on a
    # GPU each process also holds its CUDA context and graphs beside it).
    share = 0.2 if torch.cuda.is_available() else 0.3
    kwargs = {"gpu_memory_utilization": share, "dtype": "float32", "max_model_len": 512,
              "seed": 0, **kwargs}
    return LLM(model=model, worker_cls=WORKER, **kwargs)


@pytest.fixture(scope="session")
def llada_llm():
    # Small token budget: a batch's prompts arrive in chunks (the runner's
    # wait-for-the-whole-input path), and the denoiser decodes a batch in
    # groups of at most 128 canvas tokens (two or three requests each).
    llm = start_engine(str(ASSETS / "llada-tiny"), max_num_batched_tokens=128)
    yield llm
    del llm


@pytest.fixture(scope="session")
def dream_llm():
    llm = start_engine(str(ASSETS / "dream-tiny"))
    yield llm
    del llm


class Server:
    """A real OpenAI-compatible vLLM server in a subprocess on 127.0.0.1."""

    def __init__(self, model: str, *extra_args: str, env: dict | None = None):
        import socket
        import subprocess
        import sys
        import time

        import requests

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # vllm-cpu cannot run the `vllm` CLI (see README); this is `vllm serve`.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", model, "--worker-cls", WORKER, "--dtype", "float32",
               "--max-model-len", "512", "--gpu-memory-utilization", "0.3",
               "--host", "127.0.0.1", "--port", str(self.port), "--seed", "0", *extra_args]
        self.log = open(REPO / f".server-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError("server did not come up in 240 s")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
        self.log.close()


@contextmanager
def one_rank():
    """vLLM's parallel layers in this process: one rank (gloo on a free
    local port), torn down on exit so that later engines start clean. Also
    what the CPU microbenchmarks build a denoiser under (benchmarks/host_bench.py)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


@pytest.fixture(scope="module")
def single_rank():
    with one_rank():
        yield
