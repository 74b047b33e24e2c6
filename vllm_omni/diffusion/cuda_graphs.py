"""CUDA graphs of the dual cache's hot step.

In the dual cache, all but the first step of a block run only the block
(plus, for shifted-logit families, the position before it) over keys that
stay where they are: the prefix in vLLM's KV pages, the suffix in the key
arena. The forward's shapes then depend only on the number of sequences and
the block length, so it can be captured once and replayed: at batch 1 an 8B
model's step is a few milliseconds of GPU work, and launching its ~500
kernels one by one from Python costs as much again.

A graph is captured lazily for each (batch bucket, query rows per sequence)
the first time a group of that size needs one; a group is padded to the
bucket with sequences that have no queries (their rows compute garbage that
nothing reads, and their fresh keys go to the arena's spare row). Every
tensor the graph reads is kept alive with it (a freed one would be reused
under the graph's feet); the ones that change are refilled before each
replay: the input ids
and positions, the arena rows of the fresh keys, the attention kernel's tile
rows and the block table. The kernel does all data-dependent work on the
device (``paged_attention_with_tiles``).

Not graphed: refresh steps (whole canvases, variable shapes), the prefix
cache and exact mode (query counts vary), tensor parallelism (vLLM's
all-reduce needs its own capture context), CPU.
"""

from dataclasses import dataclass

import torch

from vllm_omni.kernels.reference import SequenceBatch
from vllm_omni.kernels.triton_attention import (
    block_m_of,
    paged_attention_with_tiles,
    tile_rows,
)
from vllm_omni.models.attention_plan import KeyArena, SequencePlan

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class StaticPlan:
    """The attention plan of a graphed step: fixed device buffers."""

    def __init__(self, num_seqs: int, q_len: int, max_pages: int, arena: KeyArena,
                 block_m: int, device: torch.device):
        self.arena = arena
        self.q_len = q_len
        self.block_m = block_m
        tiles_per_seq = -(-q_len // block_m)
        self.fresh_rows = torch.full((num_seqs * q_len,), arena.spare_row, dtype=torch.long,
                                     device=device)
        self.tiles = torch.zeros((num_seqs * tiles_per_seq, 7), dtype=torch.int32, device=device)
        self.block_table = torch.zeros((num_seqs, max_pages), dtype=torch.int32, device=device)

    def fill(self, seqs: list[SequencePlan]) -> None:
        """Point the buffers at these sequences (the rest: no-query padding)."""
        n = len(seqs)
        queries = SequenceBatch.from_lengths([self.q_len] * n)
        local = SequenceBatch(tuple(s.arena_start + s.q_start for s in seqs),
                              tuple(s.keys_end - s.q_start for s in seqs))
        rows = tile_rows(queries, local, tuple(s.q_start for s in seqs), self.block_m)
        self.tiles.zero_()
        self.tiles[: len(rows)].copy_(torch.tensor(rows, dtype=torch.int32))
        fresh = torch.cat([torch.arange(s.arena_start + s.q_start, s.arena_start + s.q_end)
                           for s in seqs])
        self.fresh_rows.fill_(self.arena.spare_row)
        self.fresh_rows[: len(fresh)].copy_(fresh)
        width = self.block_table.shape[1]
        table = [list(s.pages[:width]) + [0] * (width - len(s.pages[:width])) for s in seqs]
        self.block_table[:n].copy_(torch.tensor(table, dtype=torch.int32))

    def attend(self, layer: int, q, k, v, scale: float, kv_cache: torch.Tensor) -> torch.Tensor:
        arena_k, arena_v = self.arena.k[layer], self.arena.v[layer]
        arena_k.index_copy_(0, self.fresh_rows, k)
        arena_v.index_copy_(0, self.fresh_rows, v)
        return paged_attention_with_tiles(q, arena_k, arena_v, self.tiles, scale, kv_cache,
                                          self.block_table)


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    plan: StaticPlan
    input_ids: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor  # read by the graph: must live as long as it
    logits: torch.Tensor  # [num_seqs * block rows, vocab]


class DualStepGraphs:
    def __init__(self, model, arena: KeyArena, max_pages: int, max_seqs: int,
                 device: torch.device):
        self.model = model
        self.arena = arena
        self.max_pages = max_pages
        self.buckets = [b for b in BUCKETS if b < max_seqs] + [max_seqs]
        self.device = device
        attn = model.model.layers[0].self_attn
        self.block_m = block_m_of(attn.head_dim, model.lm_head.weight.dtype)
        self.steps: dict[tuple[int, int], CapturedStep] = {}
        self.pool = None

    def fits(self, num_seqs: int, seqs: list[SequencePlan]) -> bool:
        q_len = seqs[0].q_end - seqs[0].q_start
        return num_seqs <= self.buckets[-1] and all(
            s.q_end - s.q_start == q_len and len(s.pages) <= self.max_pages for s in seqs
        )

    def run(self, seqs: list[SequencePlan], input_ids: torch.Tensor, positions: torch.Tensor,
            block_len: int) -> torch.Tensor:
        """Logits of every sequence's block rows, from a replay."""
        n = len(seqs)
        q_len = seqs[0].q_end - seqs[0].q_start
        bucket = next(b for b in self.buckets if b >= n)
        step = self.steps.get((bucket, q_len))
        if step is None:
            step = self._capture(bucket, q_len, block_len, seqs, input_ids, positions)
            self.steps[(bucket, q_len)] = step
        step.plan.fill(seqs)
        step.input_ids[: len(input_ids)].copy_(input_ids)
        step.positions[: len(positions)].copy_(positions)
        step.graph.replay()
        return step.logits[: n * block_len]

    def _capture(self, bucket, q_len, block_len, seqs, input_ids, positions) -> CapturedStep:
        plan = StaticPlan(bucket, q_len, self.max_pages, self.arena, self.block_m, self.device)
        ids = torch.zeros(bucket * q_len, dtype=torch.long, device=self.device)
        pos = torch.zeros_like(ids)
        shift = q_len - block_len  # rows before each block (the logit shift)
        rows = (torch.arange(bucket)[:, None] * q_len + shift + torch.arange(block_len)).flatten()
        rows = rows.to(self.device)
        plan.fill(seqs)
        ids[: len(input_ids)].copy_(input_ids)
        pos[: len(positions)].copy_(positions)
        # Warm up off the capture (Triton compiles, lazy state settles), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.denoise_logits(ids, pos, plan, rows)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.denoise_logits(ids, pos, plan, rows)
        self.pool = graph.pool()
        return CapturedStep(graph, plan, ids, pos, rows, logits)
