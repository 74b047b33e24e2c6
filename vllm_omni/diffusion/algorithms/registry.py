"""The algorithm registry: each algorithm file registers its commit function
with ``@register_algorithm`` (``docs/architecture/overview.md``, "Knobs and
algorithms").

A commit function is
``commit(logits, masked, step, params, generator) -> (positions, tokens)``:
``logits`` are the block's rows [block_length, vocab] (a block-causal
family with sub-blocks: the current sub-block's rows only, the "window";
``diffusion/block_causal.py``), ``masked`` says which of those positions are
still masks, ``step`` counts the steps taken on this block, ``params`` is the
request's ``DiffusionParams``. ``positions`` are indices into those rows with
one token each, or a bool selection over them with ``tokens`` one per row
(``apply_commit``). An algorithm with ``counts_masks`` also gets
``num_masked``, the number of masked positions counted on the host; one
with a ``batch_key`` may get a batch of blocks, ``logits`` [n, block, vocab]
and ``masked`` [n, block], with no generator (``diffusion/denoiser.py``).

A block-causal family's commit (SDAR, Fast-dLLM v2) is batched: ``logits``
[n, W, vocab] and ``masked`` [n, W] hold n blocks' windows that share the
step and every knob the algorithm reads, and it returns a bool selection
[n, W] with the tokens [n, W] (``diffusion/block_causal.py``, ``_commit``).

An algorithm registered with ``refines=True`` (LLaDA2's editing) may change
decided tokens too, so a block-causal block is not done when its last mask
is committed: its commit function works on one block ([W, vocab]) and takes
a sixth argument, the block's ``RefineState`` (kept by the engine from the
block's first step; below), and says in ``state.done`` when the block is
done.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_omni.diffusion.knobs import KNOBS_BY_NAME


def never(params) -> bool:
    return False


def always(params) -> bool:
    return True


def one_step(params, num_masked: int) -> int:
    return 1


def no_batch(params) -> None:
    return None


@dataclass(frozen=True)
class Algorithm:
    name: str  # the value of the ``algorithm`` knob (public API)
    commit: Callable
    families: tuple[str, ...]  # the model families it serves
    knobs: tuple[str, ...]  # the family-specific knobs it reads
    # Whether a step draws random numbers even at temperature 0 (then, under
    # tensor parallelism without a seed, rank 0's blocks are broadcast).
    draws_random: Callable
    # Whether a block takes exactly ``steps_per_block`` steps whatever the
    # logits: the denoiser then needs no look at the device to know it is done.
    ends_on_schedule: Callable
    # Block-causal: ``min_steps(params, num_masked)``, the steps before which
    # a block with that many masks cannot be finished, so the denoiser skips
    # its look at the device until then (default: look after every step).
    min_steps: Callable
    # Whether a step must know on the host how many positions are masked
    # (its random draws take that shape): the denoiser counts them for the
    # whole batch in one look per step and passes ``num_masked``. Such a
    # step draws and commits nothing once no position is masked, so the
    # denoiser may end the block there.
    counts_masks: Callable
    # None, or what the step's commit depends on besides the logits (beyond
    # the algorithm and step index): consecutive jobs with equal keys commit
    # as one batch [n, block, vocab]. Only for steps without random draws.
    batch_key: Callable
    # Whether it may change decided tokens, so that it decides when a block is
    # done (block-causal families; module docstring).
    refines: bool = False


@dataclass
class RefineState:
    """A block's state for a refining algorithm. The engine sets ``block`` (the
    block's tokens, a device view) and ``had_masks`` (whether the block had a
    mask when the step began: known on the host from the last step's look)
    before each step; the algorithm keeps its counters and sets ``done`` (a
    device bool, read in the step's one look at the device)."""

    known: int  # the block's first positions hold known tokens (the prompt's): never edited
    eos_token_id: int | None  # a committed eos may end the block; None: never (ignore_eos)
    mask_token_id: int
    block: object = None
    had_masks: bool = True
    mask_steps: int = 0  # steps begun with a mask left
    post_steps: int = 0  # steps begun with none
    done: object = False


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(name: str, *, families: tuple[str, ...], knobs: tuple[str, ...] = (),
                       draws_random: Callable = never, ends_on_schedule: Callable = never,
                       min_steps: Callable = one_step, counts_masks: Callable = never,
                       batch_key: Callable = no_batch, refines: bool = False):
    """Decorator of a commit function: makes it the algorithm ``name`` of
    ``families``. Each knob it reads must be in the knob table
    (``diffusion/knobs.py``) and taken by each of those families."""

    def decorator(commit: Callable) -> Callable:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} registered twice")
        for knob in knobs:
            if knob not in KNOBS_BY_NAME:
                raise ValueError(f"algorithm {name!r} reads {knob!r}, which is not in the "
                                 "knob table (vllm_omni/diffusion/knobs.py)")
            missing = [f for f in families if not KNOBS_BY_NAME[knob].applies_to(f)]
            if missing:
                raise ValueError(f"algorithm {name!r} reads {knob!r}, which families "
                                 f"{missing} do not take (its Knob.families)")
        ALGORITHMS[name] = Algorithm(name, commit, tuple(families), tuple(knobs),
                                     draws_random, ends_on_schedule, min_steps, counts_masks,
                                     batch_key, refines)
        return commit

    return decorator


def algorithms_for(family: str) -> tuple[str, ...]:
    """The algorithms of a family: its default (the ``algorithm`` knob's)
    first, then the others by name."""
    default = KNOBS_BY_NAME["algorithm"].default_for(family)
    names = sorted(a.name for a in ALGORITHMS.values() if family in a.families)
    return tuple(sorted(names, key=lambda n: n != default))


def apply_commit(block: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> None:
    """Write a commit into the block (in place). A selection is applied
    without a look at the device (no count of the selected positions)."""
    if positions.dtype == torch.bool:
        block.copy_(torch.where(positions, tokens, block))
    else:
        block[positions] = tokens
