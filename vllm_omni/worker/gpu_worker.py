"""``DiffusionGPUWorker``: vLLM's GPU ``Worker`` with our V1 model runner."""

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_omni.worker.runner import DiffusionRunnerMixin


class DiffusionGPUModelRunner(DiffusionRunnerMixin, GPUModelRunner):
    pass


class DiffusionGPUWorker(Worker):
    def init_device(self) -> None:
        # vLLM builds its runner inline, with no factory to override: let it
        # set up the device, then put ours in its place. A model on vLLM's V2
        # runner (an AR model; diffusion models are switched to V1 by
        # vllm_omni.engine_config) keeps vLLM's runner.
        super().init_device()
        if not self.use_v2_model_runner:
            self.model_runner = DiffusionGPUModelRunner(self.vllm_config, self.device)

    def diffusion_step_stats(self, reset: bool = False) -> dict:
        return self.model_runner.diffusion_step_stats(reset)
