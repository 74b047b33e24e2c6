"""``DiffusionGPUWorker``: vLLM's GPU ``Worker`` with our V1 model runner,
plus what only the GPU has: sleep mode and the key arena's memory pool."""

import functools

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_omni.worker.runner import DiffusionRunnerMixin
from vllm_omni.worker.worker_base import DiffusionWorkerMixin

# The sleep-mode pool of the denoiser's key arena (``docs/architecture/overview.md``).
SCRATCH_TAG = "diffusion_scratch"


class DiffusionGPUModelRunner(DiffusionRunnerMixin, GPUModelRunner):
    pass


class DiffusionGPUWorker(DiffusionWorkerMixin, Worker):
    runner_class = DiffusionGPUModelRunner

    def init_device(self) -> None:
        super().init_device()
        if isinstance(self.model_runner, DiffusionGPUModelRunner):
            # Sleep mode discards every pool but the weights'; the
            # denoiser's key arena holds per-step scratch, so it gets a pool
            # of its own (a second "kv_cache" pool would drop vLLM's
            # reference to the first).
            self.model_runner.scratch_memory_pool = functools.partial(
                self._maybe_get_memory_pool_context, tag=SCRATCH_TAG)

    def sleep(self, level: int = 1) -> None:
        if isinstance(self.model_runner, DiffusionGPUModelRunner):
            self.model_runner.release_step_graphs()
        super().sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        # The arena is scratch beside the KV cache: it wakes with it.
        if tags is not None and "kv_cache" in tags:
            tags = [*tags, SCRATCH_TAG]
        super().wake_up(tags)
