"""The text-diffusion decoding knobs, declared once.

Each ``Knob`` below is the one place its name, type, allowed values, default
(per family where it differs) and meaning are written. The table drives the
checks of a request's knobs (``params.check_knobs``), the defaults
(``params.resolve_params``) and the README's table (``scripts/knob_table.py``
prints it; ``tests/test_knobs.py`` keeps the README equal to it). How knobs,
families and algorithms fit together: ``docs/architecture/overview.md``
("Knobs and algorithms").

Knob names and values are public API (``extra_args``, ``vllm_xargs``,
``additional_config["diffusion"]``): renaming one breaks clients.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_omni.compat import RequestError


def fail(field: str, message: str):
    """Refuse a request: vLLM's validation error, naming the field (HTTP 400)."""
    raise RequestError(f"{field} {message}", parameter=field)


def _algorithms_of(family: str) -> tuple[str, ...]:
    # The registry imports this module (to check what algorithms declare), so
    # it is read when a request is checked, not at import.
    from vllm_omni.diffusion.algorithms import algorithms_for

    return algorithms_for(family)


@dataclass(frozen=True)
class Knob:
    name: str
    type: type  # int, float or str
    doc: str  # one line of meaning (the README's)
    # A value, or {family name: value}. None: off, or computed per request
    # (``none_doc`` says which, for the README).
    default: Any = None
    families: tuple[str, ...] | None = None  # the families that take it; None: all
    # Allowed values: a tuple, or a function of the family's name.
    choices: tuple | Callable[[str], tuple] | None = None
    low: float | None = None  # numbers: the bounds, and whether each is allowed
    high: float | None = None
    closed: tuple[bool, bool] = (True, True)
    # Whether a request may pass None ("off"), and the value it stands for
    # (also the value of this knob in a family that does not take it).
    nullable: bool = False
    off: Any = None
    none_doc: str = "off"
    # For a SamplingParams field of the same name (top_k, top_p): whether its
    # value there is set. A family that takes the knob reads it from there;
    # one that does not refuses a request that sets it.
    sampling_field_set: Callable[[Any], bool] | None = None
    # Read by the denoising loop (its canvas, schedule, caches) rather than
    # by the algorithms, so no algorithm declares it.
    loop: bool = False

    def applies_to(self, family: str) -> bool:
        return self.families is None or family in self.families

    def default_for(self, family: str) -> Any:
        if isinstance(self.default, dict):
            return self.default.get(family)
        return self.default

    def allowed_values(self, family: str) -> tuple | None:
        return self.choices(family) if callable(self.choices) else self.choices

    def check(self, value: Any, family: str) -> Any:
        """The value if it is allowed; otherwise the request is refused with
        a message naming the field and what is allowed."""
        if value is None and self.nullable:
            return None
        if self.choices is not None:
            allowed = self.allowed_values(family)
            if value not in allowed:
                where = f" for {family}" if callable(self.choices) else ""
                fail(self.name, f"must be one of {list(allowed)}{where}, got {value!r}")
            return value
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                fail(self.name, f"must be an integer, got {value!r}")
            if self.low is not None and value < self.low:
                fail(self.name, f"must be >= {self.low}, got {value}")
            if self.high is not None and value > self.high:
                fail(self.name, f"must be <= {self.high}, got {value}")
            return value
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        ok = ok and (self.low <= value if self.closed[0] else self.low < value)
        ok = ok and (value <= self.high if self.closed[1] else value < self.high)
        if not ok:
            fail(self.name, f"must be a number in {self.interval()}, got {value!r}")
        return float(value)

    def interval(self) -> str:
        return (f"{'[' if self.closed[0] else '('}{self.low}, "
                f"{self.high}{']' if self.closed[1] else ')'}")


# The cache modes of each family that has them (the ``cache`` knob).
_CACHES = {"llada": ("none", "prefix", "dual"), "dream": ("none", "prefix", "dual"),
           "fast_dllm_v2": ("none", "block")}

# The families that decode several blocks of a request at once (multi-block):
# Fast-dLLM v2 cannot, each block starts with the token its predecessor's
# last forward gives.
_MULTI_BLOCK = ("sdar", "llada2")
MAX_BLOCKS_IN_FLIGHT = 8  # bounds the token rows a group reserves

# SDAR's defaults are its official sampler's command line (block 4, 4 steps,
# low_confidence_dynamic at 0.85; JetAstra/SDAR generate.py). Fast-dLLM v2's
# are its model card's call of the checkpoint's generate (sub-blocks of 8,
# threshold 0.9; top_p is generate's own default). LLaDA2's are diffusers'
# LLaDA2Pipeline's (block 32, 32 steps, threshold 0.7, editing 0.5, 16 post steps).
KNOBS: tuple[Knob, ...] = (
    Knob("algorithm", str, "which masked positions a step commits, with which tokens "
         "(`vllm_omni/diffusion/algorithms/`, one file each)",
         default={"llada": "low_confidence", "dream": "maskgit_plus",
                  "sdar": "low_confidence_dynamic", "fast_dllm_v2": "parallel_threshold",
                  "llada2": "block_refinement"},
         choices=_algorithms_of),
    Knob("steps", int, "denoising steps over all blocks; must divide evenly across the "
         "blocks and be at most the canvas length",
         families=("llada", "dream"), low=1, none_doc="the canvas length (1 token/step)",
         loop=True),
    Knob("block_length", int, "block size. LLaDA, Dream: semi-autoregressive blocks after "
         "the prompt, at most `max_tokens` (a default larger than `max_tokens` shrinks to "
         "it); SDAR: blocks counted from position 0, must divide the KV page size "
         "(`block_size`, 32 unless set), and be the engine's while prefix caching is on "
         "(LLaDA2 likewise). Fast-dLLM v2 takes none: its blocks are the "
         "checkpoint's `bd_size` (32)",
         default={"llada": 32, "sdar": 4, "llada2": 32},
         families=("llada", "dream", "sdar", "llada2"), low=1,
         none_doc="the whole canvas", loop=True),
    Knob("cache", str, "`none`: exact, each step runs the whole canvas (Fast-dLLM v2: the "
         "whole block over the stored blocks); `prefix`, `dual`: Fast-dLLM's caches, refreshed "
         "at each block start (the prefix's keys go to the request's pages of vLLM's KV "
         "cache); `block`: Fast-dLLM v2's `use_block_cache`, a step whose sub-block starts "
         "with a decided token runs only the sub-block, over the block's keys and values "
         "from its last whole-block step",
         default="none", families=("llada", "dream", "fast_dllm_v2"),
         choices=_CACHES.__getitem__, loop=True),
    Knob("threshold", float, "confidence-threshold parallel decoding (Fast-dLLM)",
         families=("llada",), low=0, high=1, closed=(False, True), nullable=True),
    Knob("denoising_steps_per_block", int, "denoising steps of each block (SDAR's "
         "`denoising_steps`, LLaDA2's `num_inference_steps`): step i commits "
         "`block_length // steps` masked positions, one more for i < `block_length % steps`; "
         "at most `block_length` (LLaDA2: also capped at `max_tokens`, as the reference caps it "
         "at `gen_length`)",
         default={"sdar": 4, "llada2": 32}, families=("sdar", "llada2"), low=1),
    Knob("confidence_threshold", float, "`low_confidence_dynamic`: a step commits every "
         "masked position whose drawn token's probability is strictly above it when they "
         "are at least the step's quota, else the quota's most confident (LLaDA2's `threshold`; "
         "1: always the quota)",
         default={"sdar": 0.85, "llada2": 0.7}, families=("sdar", "llada2"), low=0, high=1),
    Knob("editing_threshold", float, "LLaDA2's editing: every step also replaces each decided "
         "(not prompt) token of the block whose newly drawn token differs and has probability "
         "strictly above it; after the last mask the block goes on while a step edits, up to "
         "`max_post_steps` + 1 more steps; 0 or null: off (LLaDA2.0 checkpoints)",
         default={"llada2": 0.5}, families=("llada2",), low=0, high=1, nullable=True, off=0.0),
    Knob("max_post_steps", int, "LLaDA2's editing: steps after the block's last mask is "
         "committed, at most this + 1 (the reference's `max_post_steps`)",
         default={"llada2": 16}, families=("llada2",), low=0),
    Knob("small_block_size", int, "Fast-dLLM v2's sub-block: a block's sub-blocks of this "
         "many tokens are decoded left to right, each step reading only the current one's "
         "logits; must divide the block length",
         default={"fast_dllm_v2": 8}, families=("fast_dllm_v2",), low=1, loop=True),
    Knob("unmask_threshold", float, "`parallel_threshold` (Fast-dLLM v2's `threshold`): a "
         "step commits every masked position of the sub-block whose confidence is strictly "
         "above it, plus the most confident one; 1: one token per step",
         default={"fast_dllm_v2": 0.9}, families=("fast_dllm_v2",), low=0, high=1),
    Knob("eps", float, "last time of the schedule `linspace(1, eps, steps+1)`",
         default=1e-3, families=("dream",), low=0, high=1, closed=(False, False),
         nullable=True, off=1e-3),
    # Dream's generation config carries top_k=50, top_p=1.0 (see
    # ../shared/golden/README.md): the reference filters to the top 50.
    Knob("top_k", int, "filter to the k most likely tokens before drawing (Dream: also at "
         "temperature 0); 0: off; `SamplingParams.top_k` sets it too",
         default={"dream": 50}, families=("dream", "sdar", "llada2"), low=0, nullable=True, off=0,
         sampling_field_set=lambda v: v > 0),
    Knob("top_p", float, "nucleus filtering before drawing; 1: off; "
         "`SamplingParams.top_p` sets it too",
         default={"fast_dllm_v2": 0.95}, families=("dream", "sdar", "fast_dllm_v2", "llada2"),
         low=0,
         high=1, closed=(False, True), nullable=True,
         sampling_field_set=lambda v: v < 1),
    # Multi-block decoding (D2F; docs/architecture/overview.md, "Multi-block
    # decoding"): Diffulex's defaults (buffer_size aside: off here).
    Knob("max_blocks_in_flight", int, "multi-block decoding (D2F, Diffulex's `buffer_size`): "
         "up to this many of a request's blocks are decoded at once, a later one attending to "
         "the earlier unfinished ones; a block is returned (and stored) once it and every "
         "earlier one are finished; 1: off, one block at a time",
         default=1, families=_MULTI_BLOCK, low=1, high=MAX_BLOCKS_IN_FLIGHT,
         off=1, loop=True),
    Knob("block_add_threshold", float, "multi-block: the next block joins when the last one in "
         "flight has at least this fraction of its positions decided (D2F's "
         "`block_add_threshold`, Diffulex's `add_block_threshold`)",
         default=0.1, families=_MULTI_BLOCK, low=0, high=1, loop=True),
    Knob("decoded_token_threshold", float, "multi-block: a block in flight is fully activated "
         "(decoded by `algorithm`) once the block before it has at least this fraction of its "
         "positions decided, semi-activated before (D2F's `decoded_token_threshold`, Diffulex's "
         "`semi_complete_threshold`)",
         default=0.9, families=_MULTI_BLOCK, low=0, high=1, loop=True),
    Knob("semi_active_threshold", float, "multi-block: a semi-activated block commits only the "
         "masked positions whose drawn token's probability is strictly above this (D2F's "
         "`skip_threshold`, Diffulex's `accept_threshold`)",
         default=0.9, families=_MULTI_BLOCK, low=0, high=1, loop=True),
    Knob("alg_temp", float, "sample the committed positions from "
         "softmax(confidence / alg_temp); 0: the most confident",
         default=0.0, families=("dream",), low=0, high=math.inf, closed=(True, False),
         nullable=True, off=0.0),
)

KNOBS_BY_NAME: dict[str, Knob] = {k.name: k for k in KNOBS}


def knobs_of(family: str) -> tuple[Knob, ...]:
    """The knobs a family takes, in table order."""
    return tuple(k for k in KNOBS if k.applies_to(family))
