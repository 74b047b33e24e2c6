"""Multi-block decoding (``max_blocks_in_flight`` > 1): several of a request's
blocks in flight at once, as D2F and Diffulex's multi-block engine decode.
What it does and where it follows which reference:
``docs/architecture/overview.md``, "Multi-block decoding". How it sits in the
engine step (``block_causal.py``):

- The first block in flight (the *lead*) is the request's ``BlockWork``
  block, decoded as without multi-block. The later ones are ``FlightBlock``s
  in the same loop: block j of the request lives at token rows
  ``arena_row + j * B`` (the work reserves ``flight_blocks`` blocks of rows),
  and its decode sequence reads its local keys from the lead's start
  (``keys_from``) through the key arena, where every sequence of a forward
  writes its fresh keys before any reads: the earlier blocks' keys of their
  current tokens, masks and all.
- Before each forward (``before_step``): the next block joins, and blocks
  become fully activated. A semi-activated block commits by ``semi_commit``.
- Each look at the device also counts every block's masks and whether it
  holds the request's eos (``tallies``). A finished later block leaves the
  denoising (a *rider*: its sequence still runs, for the keys the blocks
  after it read). When the lead is finished, the request's part of the engine
  step ends (``after_look``): it returns the lead and the finished blocks
  right after it (``BlockWork.block`` then views them all), which vLLM
  schedules back and the next step stores; the others are saved with their
  state and continue in the next step that decodes the request, the first of
  them as its lead. A finished request drops them (``forget``).
"""

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from vllm_omni.diffusion.algorithms import RefineState
from vllm_omni.diffusion.algorithms.sdar import draw
from vllm_omni.diffusion.block_work import BlockWork
from vllm_omni.models.attention_plan import to_device


def semi_commit(logits, masked, step, params, generator, state=None, *, mask_token_id: int):
    """A semi-activated block's step: every masked position whose drawn token
    is not the mask and has probability strictly above
    ``semi_active_threshold``; none if none (D2F's incomplete blocks). Greedy
    draws the argmax with its softmax probability, sampling the family's
    draw (``algorithms/sdar.py``). Batched as the algorithms are; a refining
    family's block comes alone with its state, which stays not done."""
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        probs = torch.softmax(logits.float(), dim=-1)
        confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        tokens, confidence = draw(logits, params, generator)
    if state is not None:
        state.done = False  # its algorithm decides, once it is fully activated
    return masked & (confidence > params.semi_active_threshold) & (tokens != mask_token_id), tokens


@dataclass
class FlightBlock(BlockWork):
    """A later block in flight (``store_start == store_end`` is its start)."""

    full: bool = False  # fully activated: decoded by the request's algorithm
    finished: bool = False  # done; returned once the blocks before it are
    masks: int = 0  # masked positions at the last look


@dataclass
class _Flight:
    """A request's blocks in flight during a group's loop."""

    lead: BlockWork
    blocks: list[FlightBlock]  # the later ones, in order
    limit: int  # positions from here on are not wanted (max_tokens, max_model_len)
    lead_masks: int
    eos_seen: bool = False  # a block in flight holds the eos: no block joins


@dataclass
class _Saved:
    """A request's unreturned blocks between engine steps."""

    start: int  # position of the first one
    frontier: int  # the lead's start when saved (a resume that stores below it was preempted)
    tokens: torch.Tensor  # their token rows
    blocks: list[FlightBlock]
    eos_seen: bool


STATS = ("blocks_added", "blocks_finished_early", "blocks_returned_with_predecessor",
         "flights_saved", "flights_resumed", "flights_resumed_after_preemption")


class Flights:
    def __init__(self, denoiser, max_model_len: int):
        self.denoiser = denoiser
        self.max_model_len = max_model_len or math.inf
        self.saved: dict[str, _Saved] = {}
        self.running: list[_Flight] = []
        self.stats = {f"multi_block_{name}": 0 for name in STATS}
        self._units: list[tuple[_Flight, BlockWork]] = []  # the last tallies', in order
        self._index = None  # (their ids, device index, valid cols, eos ids)
        self._semi_rule = partial(semi_commit, mask_token_id=denoiser.mask_token_id)

    def forget(self, req_id: str) -> None:
        self.saved.pop(req_id, None)

    def _limit(self, work: BlockWork) -> int:
        wanted = math.inf if work.max_new is None else len(work.tokens) + work.max_new
        return min(wanted, self.max_model_len)

    def reserve(self, works: list[BlockWork]) -> None:
        """Each decoding multi-block work's token rows: the blocks it may
        have in flight, up to where its tokens are wanted."""
        for work in works:
            n = work.params.max_blocks_in_flight
            if work.decode and n > 1:
                wanted = math.ceil((self._limit(work) - work.store_end) / work.block_length)
                work.flight_blocks = max(1, min(n, wanted))

    def start(self, decoding: list[BlockWork]) -> list[FlightBlock]:
        """A group's flights, their leads' blocks started; returns the later
        blocks restored from the last step, to join the denoising."""
        self.running, joining = [], []
        self._index = None  # rows move between groups (and ids may be reused)
        for lead in decoding:
            saved = self.saved.pop(lead.req_id, None)
            if saved is not None and (saved.start != lead.store_end or lead.num_known):
                saved = None  # vLLM holds other tokens than it assumed: start afresh
            if lead.flight_blocks == 1 and saved is None:
                continue  # one block left to want, none saved: decoded alone
            lead.min_steps = 1  # every block's masks are read every step
            flight = _Flight(lead, [], self._limit(lead), lead.block_length - lead.num_known)
            self.running.append(flight)
            if saved is not None:
                joining += self._restore(flight, saved)
        return joining

    def _restore(self, flight: _Flight, saved: _Saved) -> list[FlightBlock]:
        lead, first = flight.lead, saved.blocks[0]
        rows = lead.arena_row
        self.denoiser.plans.tokens[rows : rows + len(saved.tokens)].copy_(saved.tokens)
        # The first saved block is the lead now, fully activated (the one
        # before it is stored): its step count and state go on, unless it was
        # semi-activated (then it starts as the lead block did).
        if first.full:
            lead.step, lead.refine = first.step, first.refine
        lead.first_mask, flight.lead_masks = first.first_mask, first.masks
        flight.eos_seen = saved.eos_seen
        flight.blocks = saved.blocks[1:]
        for j, block in enumerate(flight.blocks, 1):
            self._seat(block, lead, j)
        self.stats["multi_block_flights_resumed"] += 1
        if lead.store_start < saved.frontier:
            self.stats["multi_block_flights_resumed_after_preemption"] += 1
        return [b for b in flight.blocks if not b.finished]

    def _seat(self, block: FlightBlock, lead: BlockWork, j: int) -> None:
        """Block j of the lead's request in this group: its rows, its keys."""
        block.tokens, block.pages, block.generator = lead.tokens, lead.pages, lead.generator
        block.arena_row = lead.arena_row + j * lead.block_length
        block.block = self.denoiser.plans.block(block)
        block.keys_from = lead.store_end

    def reads_arena(self) -> bool:
        return any(f.blocks for f in self.running)

    def before_step(self, active: list[BlockWork]) -> list[FlightBlock]:
        """At each step's start, as D2F: the next block joins when the last
        one is decided enough (at most one a step), then blocks whose
        predecessor is decided enough become fully activated. Returns the
        riders (finished later blocks)."""
        riders = []
        for flight in self.running:
            lead, blocks = flight.lead, flight.blocks
            params, length = lead.params, lead.block_length
            last = blocks[-1].masks if blocks else flight.lead_masks
            start = lead.store_end + (1 + len(blocks)) * length
            if (1 + len(blocks) < lead.flight_blocks and not flight.eos_seen
                    and start < flight.limit
                    and (length - last) / length >= params.block_add_threshold):
                block = FlightBlock(lead.req_id, lead.tokens, start, start, True, params,
                                    lead.generator, lead.pages,
                                    eos_token_id=lead.eos_token_id, masks=length)
                self._seat(block, lead, 1 + len(blocks))
                block.first_mask = 0
                self._semi(block)
                blocks.append(block)
                active.append(block)
                self.stats["multi_block_blocks_added"] += 1
            before = flight.lead_masks
            for block in blocks:
                if block.finished:
                    riders.append(block)
                elif not block.full:
                    if (length - before) / length >= params.decoded_token_threshold:
                        self.denoiser._use_algorithm(block, 0)
                        block.full, block.step, block.min_steps = True, 0, 1
                    else:
                        block.step = 0  # its schedule starts once it is fully activated
                before = block.masks
        return riders

    def _semi(self, block: FlightBlock) -> None:
        """The block commits by ``semi_commit`` until it is fully activated."""
        params, generator = block.params, block.generator
        block.rule, block.refine, block.min_steps = self._semi_rule, None, 1
        block.commit_key = ("semi", params.temperature, params.top_k, params.top_p,
                            params.semi_active_threshold, generator and id(generator))
        if self.denoiser._settings_of(params)[0].refines:
            # Alone, with a block state that says "not done" meanwhile.
            block.refine = RefineState(0, block.eos_token_id, self.denoiser.mask_token_id)
            block.commit_key += (id(block),)

    def tallies(self) -> torch.Tensor:
        """For the step's look: each block in flight's masks, then whether it
        holds the eos at a generated position (the running flights' leads and
        unfinished later blocks, in order)."""
        units = [(f, u) for f in self.running for u in [f.lead, *f.blocks] if
                 not getattr(u, "finished", False)]
        self._units = units
        key = tuple(id(u) for _, u in units)
        if self._index is None or self._index[0] != key:
            lengths = np.array([u.block_length for _, u in units])
            cols = np.arange(int(lengths.max()))
            known = np.array([max(u.num_known, 0) if u is f.lead else 0 for f, u in units])
            valid = cols < lengths[:, None]
            rows = np.where(valid, np.array([u.arena_row for _, u in units])[:, None] + cols, 0)
            eos = np.array([-1 if u.eos_token_id is None else u.eos_token_id for _, u in units])
            device = self.denoiser.device
            self._index = (key, to_device(rows, device), to_device(valid, device),
                           to_device(valid & (cols >= known[:, None]), device),
                           to_device(eos, device))
        _, rows, valid, generated, eos = self._index
        tokens = self.denoiser.plans.tokens[rows]
        masks = ((tokens == self.denoiser.mask_token_id) & valid).sum(1)
        holds_eos = ((tokens == eos[:, None]) & generated).any(1)
        return torch.cat([masks, holds_eos.long()])

    def after_look(self, finished: set, tallies: list[int], active: list) -> list:
        """After the step's look: the counts read, finished later blocks
        become riders, and a request whose lead is finished leaves the
        loop (module docstring). Returns the blocks still denoising."""
        n = len(self._units)
        for (flight, unit), masks, eos in zip(self._units, tallies[:n], tallies[n:]):
            if unit is flight.lead:
                flight.lead_masks = masks
            else:
                unit.masks = masks
            flight.eos_seen |= bool(eos)
        leaving, running = set(), []
        for flight in self.running:
            for block in flight.blocks:
                if id(block) in finished and not block.finished:
                    block.finished = True
                    self.stats["multi_block_blocks_finished_early"] += 1
            if id(flight.lead) in finished:
                leaving.update(map(id, self._land(flight)))
            else:
                running.append(flight)
        self.running = running
        return [w for w in active if id(w) not in leaving] if leaving else active

    def _land(self, flight: _Flight) -> list[FlightBlock]:
        """The lead is finished: it is returned with the finished blocks
        right after it; the rest is saved. Returns the rest."""
        lead, blocks = flight.lead, flight.blocks
        done = 0
        while done < len(blocks) and blocks[done].finished:
            done += 1
        length, tokens = lead.block_length, self.denoiser.plans.tokens
        end = lead.arena_row + (1 + done) * length
        lead.block = tokens[lead.arena_row : end]
        self.stats["multi_block_blocks_returned_with_predecessor"] += done
        rest = blocks[done:]
        if rest:
            self.saved[lead.req_id] = _Saved(
                rest[0].store_end, lead.store_end, tokens[end : end + len(rest) * length].clone(),
                rest, flight.eos_seen)
            self.stats["multi_block_flights_saved"] += 1
        return rest
