"""Image requests through vLLM's pooling front doors: the IO processor plugin.

vLLM selects this plugin by itself for a Qwen-Image engine: the model config
(``config_format="qwen_image"``) carries ``io_processor_plugin =
"vllm_omni_image"``, the name of our ``vllm.io_processor_plugins`` entry point
(pyproject.toml), whose function ``plugin()`` returns this module's
``ImageIOProcessor`` by qualified name.

Offline::

    llm = LLM(model=DIR, worker_cls="vllm_omni.worker.DiffusionGPUWorker",
              config_format="qwen_image", dtype="float32")
    out = llm.encode({"data": {"prompt": "a red apple", "height": 64, "width": 64,
                               "num_inference_steps": 8, "seed": 0}},
                     pooling_task="plugin")
    to_pil(out[0].outputs).save("apple.png")    # outputs.data: base64 PNG

Online: ``POST /pooling`` with ``{"model": ..., "data": {...}}``; the answer is
``{"request_id", "created_at", "data": {"data": <image>, "format", "height",
"width", "seed"}}`` (vLLM's ``IOProcessorResponse`` around our ``ImageOutput``).

The request (``data``) takes ``prompt`` (required), ``negative_prompt`` (None),
``height``/``width`` (the model's default size: diffusers' 128 *
vae_scale_factor; a multiple of 2 * vae_scale_factor up to ``max_image_side``),
``num_inference_steps`` (50), ``true_cfg_scale`` (4.0, diffusers' default; true
CFG runs when it is > 1 and there is a negative prompt), ``seed`` (None: one is
drawn per request and reported back in ``ImageOutput.seed``) and ``output``:
``"png"`` (a base64 PNG string, as diffusers' PIL output would make it) or
``"tensor"`` (float32 [H, W, 3] in [0, 1], diffusers' ``output_type="np"``
layout; offline a torch tensor, online nested JSON lists). A bad value raises
vLLM's validation error naming the field (HTTP 400 online).

How one request's settings reach the engine. vLLM asks a plugin for the
prompt (``pre_process``) and for the request's ``PoolingParams``
(``merge_pooling_params``) in two calls, and online the second has no
argument. ``pre_process`` leaves the params it built in a context variable
(``contextvars``) and ``merge_pooling_params`` takes them from there. On both
vLLM builds the two calls run back to back in one execution context, with
nothing in between that could run another request's ``pre_process`` there:

- vLLM 0.26: ``PluginWithIOProcessorPlugins.pre_process_online`` (parse_data,
  pre_process, render, merge_pooling_params) is one synchronous function, run
  as a whole on a thread of the renderer's pool (``make_async``; the thread's
  context, so the variable acts as a thread-local);
- vLLM 0.27.1: ``get_request_factory_online`` (parse_data, pre_process,
  merge_pooling_params) runs synchronously on the event loop inside the
  request's own asyncio task (each task has its own copy of the context, so
  this would hold even if vLLM awaited between the two calls);
- offline (both): ``get_request_factory_offline`` calls them in a row on the
  caller's thread.

``merge_pooling_params`` refuses to run without a pending ``pre_process`` in
its context (never sends a request without its settings). What
``post_process`` needs (the output format, the seed) travels keyed by vLLM's
request id online (``pre_process`` and ``post_process`` get the same
``ctx.request_id`` on both builds, on different threads) and in the context
variable offline (no id; ``LLM.encode`` runs both on the caller's thread).
"""

from __future__ import annotations

import base64
import contextvars
import io
import math
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, field_serializer
from vllm.logger import init_logger
from vllm.plugins.io_processors.interface import IOProcessor
from vllm.pooling_params import PoolingParams

from vllm_omni.compat import RequestError
from vllm_omni.models.qwen_image.config import IO_PROCESSOR
from vllm_omni.models.qwen_image.pipeline_math import (PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP,
                                                       TOKENIZER_MAX_LENGTH)

logger = init_logger(__name__)

# The entry point's name (pyproject.toml), which the model config names.
PLUGIN_NAME = IO_PROCESSOR

FIELDS = ("prompt", "negative_prompt", "height", "width", "num_inference_steps",
          "true_cfg_scale", "seed", "output")
OUTPUTS = ("png", "tensor")
DEFAULT_STEPS = 50
DEFAULT_TRUE_CFG_SCALE = 4.0  # QwenImagePipeline.__call__'s default
MAX_SEED = 2**63 - 1  # what secrets.randbits(63) draws; fits int64 everywhere
# The keys of PoolingParams.extra_kwargs the runner reads.
EXTRA_KWARGS = ("height", "width", "num_inference_steps", "true_cfg_scale", "seed",
                "negative_prompt_token_ids")
# What pre_process hands to merge_pooling_params (and, offline, to
# post_process) in the same execution context: (processor, params, pending).
_HANDOVER: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "vllm_omni_image_handover", default=None)
# Online requests whose post_process has not come yet (an entry is left behind
# only by a request that failed between the two); the oldest go beyond this.
_MAX_PENDING_ONLINE = 65536


@dataclass(frozen=True)
class ImageLimits:
    """The model's request limits (``hf_config.qwen_image``).

    ``min_inference_steps``: 2 when the scheduler has a ``shift_terminal``
    (Qwen-Image's has 0.02): with one step diffusers' schedule divides 0 by 0
    and denoises with NaN sigmas, and the runner refuses that mid-step. Taken
    from ``qwen_image["min_inference_steps"]`` when the config gives it, else
    from ``hf_config.scheduler_config``."""

    vae_scale_factor: int
    default_size: int
    max_image_side: int
    max_inference_steps: int
    min_inference_steps: int = 1

    @classmethod
    def from_hf_config(cls, hf_config) -> ImageLimits:
        limits = getattr(hf_config, "qwen_image", None)
        if not isinstance(limits, Mapping):
            raise ValueError(
                "the model config has no 'qwen_image' limits: start the engine on a "
                "Qwen-Image diffusers folder with config_format='qwen_image'")
        min_steps = limits.get("min_inference_steps")
        if min_steps is None:
            scheduler = getattr(hf_config, "scheduler_config", None)
            terminal = scheduler.get("shift_terminal") if isinstance(scheduler, Mapping) else None
            min_steps = 2 if terminal else 1
        return cls(**{k: int(limits[k]) for k in
                      ("vae_scale_factor", "default_size", "max_image_side",
                       "max_inference_steps")}, min_inference_steps=int(min_steps))

    @property
    def size_multiple(self) -> int:
        # The VAE downsamples by vae_scale_factor, the transformer packs 2x2 latents.
        return 2 * self.vae_scale_factor


@dataclass
class ImageRequest:
    """One image: what ``parse_data`` makes of a request's ``data``."""

    prompt: str
    negative_prompt: str | None = None
    height: int = 0  # 0 only before parsing fills in the model's default
    width: int = 0
    num_inference_steps: int = DEFAULT_STEPS
    true_cfg_scale: float = DEFAULT_TRUE_CFG_SCALE
    seed: int | None = None
    output: str = "png"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(data: Mapping, name: str, default: int, lo: int, hi: int, note: str = "") -> int:
    value = data.get(name, default)
    if not _is_int(value) or not lo <= value <= hi:
        raise RequestError(f"{name} must be an integer from {lo} to {hi}{note}, "
                           f"got {_show(value)}", parameter=name)
    return value


def _side(data: Mapping, name: str, limits: ImageLimits) -> int:
    value = data.get(name, limits.default_size)
    m, hi = limits.size_multiple, limits.max_image_side
    if not _is_int(value) or not m <= value <= hi or value % m:
        raise RequestError(
            f"{name} must be an integer multiple of {m} (2 * the VAE's scale factor "
            f"{limits.vae_scale_factor}) from {m} to {hi}, got {_show(value)}", parameter=name)
    return value


def parse_image_request(data: Any, limits: ImageLimits) -> ImageRequest:
    """Validate a request's ``data`` (a JSON object) into an ``ImageRequest``.

    Raises vLLM's validation error (``RequestError``) naming the field and
    what it allows."""
    if not isinstance(data, Mapping):
        raise RequestError(f"data must be an object with the fields {', '.join(FIELDS)}; "
                           f"got {type(data).__name__}", parameter="data")
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}; allowed fields: {', '.join(FIELDS)}",
                           parameter=str(unknown[0]))
    if "prompt" not in data:
        raise RequestError("prompt is required (a non-empty string)", parameter="prompt")
    prompt = data["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"prompt must be a non-empty string, got {_show(prompt)}",
                           parameter="prompt")
    negative = data.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise RequestError(f"negative_prompt must be a string or null, got {_show(negative)}",
                           parameter="negative_prompt")
    height = _side(data, "height", limits)
    width = _side(data, "width", limits)
    steps = _int_in(data, "num_inference_steps", DEFAULT_STEPS, limits.min_inference_steps,
                    limits.max_inference_steps,
                    note=(" (the scheduler's shift_terminal makes a 1-step schedule NaN)"
                          if limits.min_inference_steps == 2 else ""))
    cfg = data.get("true_cfg_scale", DEFAULT_TRUE_CFG_SCALE)
    if (isinstance(cfg, bool) or not isinstance(cfg, (int, float))
            or not math.isfinite(cfg) or cfg < 0):
        raise RequestError(f"true_cfg_scale must be a finite number >= 0 (true CFG runs when it "
                           f"is > 1 and there is a negative_prompt), got {_show(cfg)}",
                           parameter="true_cfg_scale")
    seed = data.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise RequestError(f"seed must be null or an integer from 0 to {MAX_SEED}, "
                           f"got {_show(seed)}", parameter="seed")
    output = data.get("output", "png")
    if output not in OUTPUTS:
        raise RequestError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, "
                           f"got {_show(output)}", parameter="output")
    return ImageRequest(prompt=prompt, negative_prompt=negative, height=height, width=width,
                        num_inference_steps=steps, true_cfg_scale=float(cfg), seed=seed,
                        output=output)


# Fast tokenizers are not safe to call from two threads at once (truncation
# settings live in the Rust object); vLLM's renderer runs plugins on a pool.
_TOKENIZER_LOCK = threading.Lock()


def prompt_token_ids(tokenizer, text: str) -> list[int]:
    """The ids diffusers' ``QwenImagePipeline._get_qwen_prompt_embeds`` gives
    one prompt: the templated text, at most 1024 tokens past the template."""
    with _TOKENIZER_LOCK:
        ids = tokenizer(PROMPT_TEMPLATE.format(text),
                        max_length=TOKENIZER_MAX_LENGTH + PROMPT_TEMPLATE_DROP,
                        truncation=True)["input_ids"]
    return list(ids)


class ImageOutput(BaseModel):
    """One generated image: ``data`` is a base64 PNG string (``format ==
    "png"``) or a float32 tensor [height, width, 3] in [0, 1] (``"tensor"``;
    nested lists once serialized to JSON)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    data: Any
    format: Literal["png", "tensor"]
    height: int
    width: int
    seed: int

    @field_serializer("data")
    def _serialize_data(self, value: Any):
        return value.tolist() if isinstance(value, torch.Tensor) else value


@dataclass(frozen=True)
class _Pending:
    output: str
    height: int
    width: int
    seed: int


def image_to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[H, W, 3] in [0, 1] to uint8 as diffusers' ``numpy_to_pil`` does:
    ``(x * 255).round()`` in float32."""
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(image, dtype=np.float32)
    return np.clip((arr * 255).round(), 0, 255).astype(np.uint8)


def encode_png(image: torch.Tensor | np.ndarray) -> str:
    """A [H, W, 3] image in [0, 1] as a base64 PNG string."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_to_uint8(image)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def to_pil(output: Any):
    """A PIL image from what the plugin returns: an ``ImageOutput``, a
    ``PoolingRequestOutput`` holding one, a base64 PNG string, or a [H, W, 3]
    tensor/array in [0, 1]. A list gives a list."""
    from PIL import Image

    if isinstance(output, (list, tuple)):
        return [to_pil(o) for o in output]
    if isinstance(output, ImageOutput):
        output = output.data
    elif hasattr(output, "outputs") and isinstance(output.outputs, ImageOutput):
        output = output.outputs.data
    if isinstance(output, str):
        image = Image.open(io.BytesIO(base64.b64decode(output)))
        image.load()
        return image
    if isinstance(output, (torch.Tensor, np.ndarray)):
        return Image.fromarray(image_to_uint8(output))
    raise TypeError(f"to_pil: cannot make an image of {type(output).__name__}")


class ImageIOProcessor(IOProcessor[ImageRequest, ImageOutput]):
    """vLLM IO processor for Qwen-Image: ``data`` -> templated prompt ids +
    ``PoolingParams(task="plugin", extra_kwargs=...)``; the runner's
    [H, W, 3] tensor -> ``ImageOutput``. See the module docstring."""

    def __init__(self, vllm_config, renderer):
        super().__init__(vllm_config, renderer)
        self.renderer = renderer
        self.limits = ImageLimits.from_hf_config(vllm_config.model_config.hf_config)
        self._online: OrderedDict[str, _Pending] = OrderedDict()
        self._online_lock = threading.Lock()

    # -- building a request (also used by the images endpoint)

    @property
    def tokenizer(self):
        tokenizer = self.renderer.tokenizer
        if tokenizer is None:
            raise ValueError("Qwen-Image requests need the pipeline's tokenizer; "
                             "do not start the engine with skip_tokenizer_init")
        return tokenizer

    def build(self, request: ImageRequest) -> tuple[dict, PoolingParams, int]:
        """The engine prompt, the params and the seed of one image."""
        seed = secrets.randbits(63) if request.seed is None else request.seed
        ids = prompt_token_ids(self.tokenizer, request.prompt)
        negative = (None if request.negative_prompt is None
                    else prompt_token_ids(self.tokenizer, request.negative_prompt))
        params = PoolingParams(task="plugin", extra_kwargs={
            "height": request.height, "width": request.width,
            "num_inference_steps": request.num_inference_steps,
            "true_cfg_scale": float(request.true_cfg_scale), "seed": seed,
            "negative_prompt_token_ids": negative})
        return {"prompt_token_ids": ids}, params, seed

    def to_output(self, result, output: str, height: int, width: int, seed: int) -> ImageOutput:
        """The runner's pooler output of one request as an ``ImageOutput``."""
        image = getattr(result, "outputs", result)
        image = getattr(image, "data", image)
        if not isinstance(image, torch.Tensor) or tuple(image.shape) != (height, width, 3):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise RuntimeError(f"the model returned {shape} for a {height}x{width} image; "
                               f"expected a [{height}, {width}, 3] tensor")
        image = image.detach().to("cpu", torch.float32).contiguous()
        data = image if output == "tensor" else encode_png(image)
        return ImageOutput(data=data, format=output, height=height, width=width, seed=seed)

    # -- vLLM's IOProcessor interface

    def parse_data(self, data: object) -> ImageRequest:
        return parse_image_request(data, self.limits)

    def pre_process(self, prompt: ImageRequest, request_id: str | None = None, **kwargs):
        if not isinstance(prompt, ImageRequest):
            prompt = self.parse_data(prompt)
        engine_prompt, params, seed = self.build(prompt)
        pending = _Pending(prompt.output, prompt.height, prompt.width, seed)
        # Offline (no request id), post_process takes `pending` from here too.
        _HANDOVER.set((self, params, pending if request_id is None else None))
        if request_id is not None:
            with self._online_lock:
                self._online[request_id] = pending
                while len(self._online) > _MAX_PENDING_ONLINE:
                    dropped, _ = self._online.popitem(last=False)
                    logger.warning("vllm_omni: dropped the output settings of request %s "
                                   "(never post-processed)", dropped)
        return engine_prompt

    def merge_pooling_params(self, params: PoolingParams | None = None) -> PoolingParams:
        handover = _HANDOVER.get()
        if handover is None or handover[0] is not self or handover[1] is None:
            raise RuntimeError("ImageIOProcessor.merge_pooling_params: no pre_process ran in "
                               "this context for this request")
        _HANDOVER.set((self, None, handover[2]))
        ours = handover[1]
        if params is None:
            return ours
        if params.task not in (None, "plugin"):
            raise RequestError(f"image requests run the 'plugin' pooling task, got "
                               f"{params.task!r}", parameter="task")
        if params.extra_kwargs:
            raise RequestError("image settings go in the prompt's 'data', not in "
                               "PoolingParams.extra_kwargs", parameter="extra_kwargs")
        merged = params.clone()
        merged.task = "plugin"
        merged.extra_kwargs = ours.extra_kwargs
        return merged

    def post_process(self, model_output: Sequence, request_id: str | None = None,
                     **kwargs) -> ImageOutput:
        if request_id is None:
            handover = _HANDOVER.get()
            pending = handover[2] if handover is not None and handover[0] is self else None
            _HANDOVER.set(None)
        else:
            with self._online_lock:
                pending = self._online.pop(request_id, None)
        if pending is None:
            raise RuntimeError(f"ImageIOProcessor.post_process: no pre_process recorded for "
                               f"request {request_id!r}")
        if len(model_output) != 1:
            raise RuntimeError(f"one image request gave {len(model_output)} outputs")
        return self.to_output(model_output[0], pending.output, pending.height, pending.width,
                              pending.seed)


def plugin() -> str:
    """The ``vllm.io_processor_plugins`` entry point: the processor's qualname."""
    return f"{ImageIOProcessor.__module__}.{ImageIOProcessor.__qualname__}"
