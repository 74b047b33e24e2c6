"""What our GPU and CPU workers share (``docs/architecture/overview.md``,
"What we override in vLLM")."""


class DiffusionWorkerMixin:
    """In front of vLLM's ``Worker`` (GPU) or ``CPUWorker``; ``runner_class``
    is our runner for that platform."""

    runner_class: type

    def init_device(self) -> None:
        # vLLM builds its runner inline, with no factory to override: let it
        # set up the device, then put ours in its place. A model on vLLM's V2
        # runner (an AR model; diffusion models are switched to V1 by
        # vllm_omni.engine_config) keeps vLLM's runner.
        super().init_device()
        if not self.use_v2_model_runner:
            self.model_runner = self.runner_class(self.vllm_config, self.device)

    def diffusion_step_stats(self, reset: bool = False) -> dict:
        """``LLM.collective_rpc("diffusion_step_stats")``: the denoiser's
        ``StepStats`` (``diffusion/denoiser.py``)."""
        return self.model_runner.diffusion_step_stats(reset)
