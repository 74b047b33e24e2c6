"""A block-causal request's part of an engine step (``block_causal.py``):
``BlockWork``."""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_omni.diffusion.algorithms import RefineState
from vllm_omni.diffusion.params import DiffusionParams


@dataclass
class BlockWork:
    """One request's part of an engine step."""

    req_id: str
    tokens: np.ndarray  # the tokens vLLM holds for it (prompt, then outputs)
    store_start: int  # the KV frontier: the pages hold final K/V before it
    store_end: int  # store the blocks of [store_start, store_end)
    decode: bool  # decode the block at store_end (all its tokens are in)
    params: DiffusionParams
    generator: torch.Generator | None
    pages: list[int]  # the request's KV pages, in position order
    max_new: int | None = None  # tokens vLLM still takes (max_tokens); None: any
    block: torch.Tensor | None = field(default=None, repr=False)  # on the device
    step: int = 0  # denoising steps taken on the block
    first_mask: int = 0  # the block's first masked position (block_length: none)
    arena_row: int = 0  # block cache: the arena row of the block's first position
    # Set when the block starts (``BlockCausalDenoiser._start_block``):
    min_steps: int = 1  # steps before which the block cannot be finished
    commit_key: tuple = ()  # what its algorithm's commit reads (batches share it)
    # The stop token a refining algorithm may end a block on (None: ignore_eos).
    eos_token_id: int | None = None
    refine: RefineState | None = None  # a refining algorithm's block state
    # Multi-block (``multi_block.py``): the blocks of token rows its decode
    # reserves (its block and the later ones in flight); where its decode
    # sequence's local keys start (None: at its block; a later block in
    # flight reads the earlier ones' from the key arena); its commit when
    # not its algorithm's (None: the algorithm's).
    flight_blocks: int = 1
    keys_from: int | None = None
    rule: Callable | None = None

    @property
    def block_length(self) -> int:
        return self.params.block_length

    @property
    def num_known(self) -> int:
        """Known tokens inside the decoded block (a prompt's partial block)."""
        return len(self.tokens) - self.store_end

    @property
    def block_cache(self) -> bool:
        return self.params.cache == "block"

    def store_blocks(self) -> range:
        return range(self.store_start, self.store_end, self.block_length)

    def num_tokens(self) -> int:
        """Query tokens of its forwards, at most (its first one's, and with
        multi-block the later blocks it may add)."""
        decoded = self.block_length * self.flight_blocks if self.decode else 0
        return self.store_end - self.store_start + decoded

    def window(self) -> tuple[int, int]:
        """The block positions whose logits this step reads: the sub-block
        holding the first mask (the whole block without sub-blocks)."""
        size = self.params.small_block_size or self.block_length
        # A refining block goes on after its last mask (first_mask = block length).
        start = min(self.first_mask, self.block_length - 1) // size * size
        return start, start + size

    def batch_key(self) -> tuple:
        """Works that share this commit in one batch: the same algorithm and
        knobs, step and window width (its last item)."""
        lo, hi = self.window()
        return (*self.commit_key, self.step, hi - lo)

    def sub_block_step(self) -> bool:
        """Block cache: this step runs only its sub-block (the reference runs
        the whole block at a block's first step and while the sub-block's
        first token is masked)."""
        return self.block_cache and self.step > 0 and self.first_mask != self.window()[0]
