"""OpenAI's ``POST /v1/images/generations`` on vLLM's own server.

An endpoint plugin (``vllm.endpoint_plugins`` entry point ``vllm_omni_images``
in pyproject.toml). vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names
them, and ``VLLM_PLUGINS`` filters every plugin group, so a server with this
route lists all three of ours::

    VLLM_PLUGINS=vllm_omni,vllm_omni_image,vllm_omni_images \\
        python -m vllm.entrypoints.openai.api_server --model DIR \\
        --worker-cls vllm_omni.worker.DiffusionGPUWorker --config-format qwen_image

(``vllm_omni``: the general plugin that registers the model; ``vllm_omni_image``:
the IO processor, also behind ``/pooling``; ``vllm_omni_images``: this route.)
The plugin loads only on a server whose model supports the ``plugin`` pooling
task.

Request (JSON object; any other field is a 400 naming it):

- ``prompt`` (required), ``model`` (optional; a served model name, else 404),
- ``n``: images, 1 to the engine's ``max_num_seqs`` (default 1),
- ``size``: ``"WIDTHxHEIGHT"`` or ``"auto"`` (the model's default size),
- ``response_format``: ``"b64_json"`` only (``"url"`` is a 400: nothing is
  stored server-side),
- extensions: ``negative_prompt``, ``num_inference_steps``, ``true_cfg_scale``,
  ``seed``.

Each image is its own pooling request (``engine_client.encode``) with the
``PoolingParams`` the IO processor builds, so vLLM batches them with every other
request. With a ``seed``, image ``i`` of ``n`` uses ``seed + i`` (so image
``i`` equals a single-image request with seed ``seed + i``); without one, each
image draws its own seed. Fields are validated by the IO processor's own
parser (``image_io.parse_image_request``), so ``/pooling`` and this route refuse
the same values with the same messages (``size`` stands for height/width here).

Response: ``{"created": <unix time>, "data": [{"b64_json": <PNG>}, ...]}``.
Errors: OpenAI-style ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from http import HTTPStatus

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.utils.api_utils import with_cancellation
from vllm.entrypoints.serve.utils.error_response import create_error_response
from vllm.logger import init_logger
from vllm.utils import random_uuid
from vllm.utils.async_utils import merge_async_iterators

from vllm_omni.compat import RequestError
from vllm_omni.entrypoints.image_io import MAX_SEED, ImageIOProcessor, parse_image_request

logger = init_logger(__name__)

PLUGIN_NAME = "vllm_omni_images"
ROUTE = "/v1/images/generations"
# The request's fields: OpenAI's, then ours (passed to the IO processor's parser).
OPENAI_FIELDS = ("model", "prompt", "n", "size", "response_format")
EXTENSION_FIELDS = ("negative_prompt", "num_inference_steps", "true_cfg_scale", "seed")
FIELDS = OPENAI_FIELDS + EXTENSION_FIELDS
_SIZE = re.compile(r"^(\d+)x(\d+)$")

router = APIRouter()


def _error(message: str, param: str | None, status: HTTPStatus = HTTPStatus.BAD_REQUEST,
           err_type: str = "BadRequestError") -> JSONResponse:
    err = create_error_response(message, err_type=err_type, status_code=status, param=param)
    return JSONResponse(err.model_dump(), status_code=status.value)


def _message(exc: RequestError) -> str:
    # vLLM's str() appends "(parameter=...)" (0.26 and 0.27.1); the JSON has a param field.
    return str(exc.args[0]) if exc.args else str(exc)


@dataclasses.dataclass
class ImagesJob:
    request: object  # image_io.ImageRequest (seed of image 0)
    n: int


class ImagesService:
    """Per-server state of the route: the engine, and an IO processor for
    parsing and for building each image's prompt and params."""

    def __init__(self, engine_client, state):
        self.engine_client = engine_client
        self.models = getattr(state, "openai_serving_models", None)
        vllm_config = engine_client.vllm_config
        self.model_config = vllm_config.model_config
        self.max_n = vllm_config.scheduler_config.max_num_seqs
        self.processor = ImageIOProcessor(vllm_config, engine_client.renderer)

    def check_model(self, body: dict) -> JSONResponse | None:
        model = body.get("model")
        if model is None or self.models is None or self.models.is_base_model(model):
            return None
        return _error(f"The model `{model}` does not exist.", "model", HTTPStatus.NOT_FOUND,
                      "NotFoundError")

    def parse(self, body) -> ImagesJob:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object", parameter="body")
        unknown = [k for k in body if k not in FIELDS]
        if unknown:
            raise RequestError(f"unknown field {unknown[0]!r}; allowed fields: "
                               f"{', '.join(FIELDS)}", parameter=str(unknown[0]))
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError("model must be a string", parameter="model")
        n = body.get("n")
        n = 1 if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_n:
            raise RequestError(f"n must be an integer from 1 to {self.max_n} (the server's "
                               f"max_num_seqs), got {n!r}", parameter="n")
        fmt = body.get("response_format")
        if fmt == "url":
            raise RequestError("response_format 'url' is not supported: only 'b64_json' "
                               "(images are returned inline, nothing is stored)",
                               parameter="response_format")
        if fmt not in (None, "b64_json"):
            raise RequestError(f"response_format must be 'b64_json', got {fmt!r}",
                               parameter="response_format")
        data = {k: body[k] for k in ("prompt",) + EXTENSION_FIELDS if k in body}
        size = body.get("size")
        if size not in (None, "auto"):
            match = _SIZE.match(size) if isinstance(size, str) else None
            if match is None:
                raise RequestError(f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', "
                                   f"got {size!r}", parameter="size")
            data["width"], data["height"] = int(match[1]), int(match[2])
        try:
            request = parse_image_request(data, self.processor.limits)
        except RequestError as exc:
            if exc.parameter in ("height", "width"):
                raise RequestError(f"size {size!r}: {_message(exc)}", parameter="size") from None
            raise
        if request.seed is not None and request.seed + n - 1 > MAX_SEED:
            raise RequestError(f"seed + n - 1 must be at most {MAX_SEED} (image i uses "
                               f"seed + i)", parameter="seed")
        return ImagesJob(request=request, n=n)

    def _build_all(self, job: ImagesJob):
        req = job.request
        return [self.processor.build(dataclasses.replace(
                    req, seed=None if req.seed is None else req.seed + i))
                for i in range(job.n)]

    async def generate(self, job: ImagesJob, raw_request: Request) -> JSONResponse:
        req = job.request
        built = await asyncio.to_thread(self._build_all, job)
        renderer = self.engine_client.renderer
        engine_inputs = await renderer.render_cmpl_async([prompt for prompt, _, _ in built])
        base_id = f"imggen-{random_uuid()}"
        generators = []
        for i, (engine_input, (_, params, _)) in enumerate(zip(engine_inputs, built)):
            params.verify(self.model_config)
            generators.append(self.engine_client.encode(
                prompt=engine_input, pooling_params=params, request_id=f"{base_id}-{i}"))
        finals = [None] * job.n
        async for i, out in merge_async_iterators(*generators):
            finals[i] = out
        if any(f is None for f in finals):
            raise RuntimeError("an image request ended without output")

        def encode_all():
            return [self.processor.to_output(out, "png", req.height, req.width, seed).data
                    for out, (_, _, seed) in zip(finals, built)]

        images = await asyncio.to_thread(encode_all)
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": b64} for b64 in images]})


@router.post(ROUTE)
async def create_images(raw_request: Request):
    service: ImagesService | None = getattr(raw_request.app.state, "vllm_omni_images", None)
    if service is None:
        return _error("this server does not serve an image model (no engine, or a model "
                      "that is not Qwen-Image)", None,
                      HTTPStatus.NOT_IMPLEMENTED, "NotImplementedError")
    try:
        body = json.loads(await raw_request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _error(f"the request body must be JSON: {exc}", "body")
    try:
        job = service.parse(body)
        if (not_found := service.check_model(body)):
            return not_found
        # The body is read: from here a client disconnect cancels the images.
        return await with_cancellation(service.generate)(job, raw_request)
    except RequestError as exc:
        return _error(_message(exc), exc.parameter)


class ImagesEndpointPlugin:
    """The ``vllm.endpoint_plugins`` entry point (vLLM's ``EndpointPlugin``
    protocol; the class is the zero-argument factory)."""

    name = PLUGIN_NAME
    required_tasks = ("plugin",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        state.vllm_omni_images = None
        if engine_client is None:  # vLLM's render-only server
            return
        try:
            state.vllm_omni_images = ImagesService(engine_client, state)
        except ValueError as exc:  # a pooling model that is not Qwen-Image
            logger.warning("vllm_omni: %s is off (%s)", ROUTE, exc)
