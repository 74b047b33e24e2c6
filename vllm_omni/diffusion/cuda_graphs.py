"""CUDA graphs of the denoising steps.

At batch 1 an 8B model's denoising forward is a few milliseconds of GPU work
(7 ms for a 32-token block, 10 ms for a 384-token canvas on an H100), and
launching its 400-600 kernels one by one from Python costs 12 ms: eager, the GPU
waits on the host. So every forward of a small group (at most
``MAX_GRAPH_TOKENS`` query tokens) replays a graph: exact-mode steps, the
cache modes' refresh steps and their block steps alike.

One graph serves any group with the same (sequence bucket, token bucket,
block length). Its plan lives in fixed buffers (``StaticPlan``) that are
refilled only when the group's layout changes (a new block, a request
leaving), not at every step:
- input ids are gathered inside the graph from the denoiser's canvas rows,
  which the commits update in place, so a step copies nothing in;
- every sequence's fresh keys go to the key arena (row = its arena start +
  position) and its local keys are read back from there; its prefix comes
  from vLLM's KV pages through a block-table buffer;
- the attention kernel runs on a prebuilt tile table
  (``kernels.attention_with_tiles``): no host-side work depends on the data;
- padding (sequences up to the bucket, tokens up to the bucket) has no tile
  rows, writes its keys to the arena's spare row, and its logits are never
  read.
A refresh's prefix keys are copied from the arena into the pages after the
replay (``copy_prefix_to_pages``): how many there are changes every block.

Graphs are captured lazily, the first time a shape is needed, all in one
memory pool (they never run concurrently); every tensor a graph reads is
kept alive with it, and the logits land in a buffer shared by the graphs
with the same number of rows. Off the GPU (``capture=False``) the same
static forward runs eagerly: the tests check it there token for token.

Under tensor parallelism each rank captures the same graphs in the same order
(every rank runs the same loop), inside vLLM's ``graph_capture`` context: it
puts the capture on vLLM's stream and registers the buffers that vLLM's custom
all-reduce reads inside the graph with the peer ranks once the capture ends.
The warm-up forward before a capture runs outside that context, where the
custom all-reduce really reduces.

Not graphed: groups over ``MAX_GRAPH_TOKENS`` tokens (the GPU is busy anyway),
mixed block lengths.
"""

import time
from dataclasses import dataclass

import torch
from vllm.distributed.parallel_state import graph_capture

from vllm_omni.kernels import attention_with_tiles, tile_block_m
from vllm_omni.kernels.paged_kv import write_pages
from vllm_omni.kernels.reference import SequenceBatch, tile_rows
from vllm_omni.models.attention_plan import KeyArena, SequencePlan, page_writes

SEQ_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_GRAPH_TOKENS = 2048


def token_bucket(tokens: int) -> int:
    """Query tokens a graph is captured for: powers of two up to 64, then
    multiples of 64 (a 384-token canvas pads nothing)."""
    if tokens <= 64:
        return max(1, 1 << (tokens - 1).bit_length())
    return -(-tokens // 64) * 64


class StaticPlan:
    """An attention plan in fixed device buffers, for a graph's forward."""

    def __init__(self, num_seqs: int, tokens: int, block_len: int, max_pages: int,
                 arena: KeyArena, block_m: int, logit_shift: int, device: torch.device):
        self.arena = arena
        self.block_m = block_m
        self.block_len = block_len
        self.logit_shift = logit_shift
        self.fresh_rows = torch.full((tokens,), arena.spare_row, dtype=torch.long, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.long, device=device)
        self.tiles = torch.zeros((-(-tokens // block_m) + num_seqs, 7), dtype=torch.int32,
                                 device=device)
        self.block_table = torch.zeros((num_seqs, max_pages), dtype=torch.int32, device=device)
        # Packed query rows whose outputs predict the block tokens (padding:
        # any valid row).
        self.logit_rows = torch.full((num_seqs * block_len,), logit_shift, dtype=torch.long,
                                     device=device)
        self.layout = None

    def fill(self, seqs: list[SequencePlan], block_starts: list[int]) -> None:
        """Point the buffers at these sequences, unless they already are."""
        layout = [(s.q_start, s.q_end, s.keys_end, s.arena_start, tuple(s.pages or ()), b)
                  for s, b in zip(seqs, block_starts)]
        if layout == self.layout:
            return
        queries = SequenceBatch.from_lengths([s.num_queries for s in seqs])
        local = SequenceBatch(tuple(s.arena_start + s.q_start for s in seqs),
                              tuple((s.keys_end or s.q_end) - s.q_start for s in seqs))
        rows = tile_rows(queries, local, tuple(s.q_start for s in seqs), self.block_m)
        self._fill(self.tiles, torch.tensor(rows, dtype=torch.int32).reshape(-1, 7), 0)
        self._fill(self.fresh_rows, torch.cat([
            torch.arange(s.arena_start + s.q_start, s.arena_start + s.q_end) for s in seqs]),
            self.arena.spare_row)
        self._fill(self.positions, torch.cat([torch.arange(s.q_start, s.q_end) for s in seqs]), 0)
        # A block's rows sit block_start - q_start into its sequence's queries.
        self._fill(self.logit_rows, torch.cat([
            torch.arange(b, b + self.block_len) - s.q_start + start
            for s, b, start in zip(seqs, block_starts, queries.starts)]), self.logit_shift)
        table = torch.zeros(self.block_table.shape, dtype=torch.int32)
        for i, s in enumerate(seqs):
            table[i, : len(s.pages or ())] = torch.tensor(s.pages or [], dtype=torch.int32)
        self.block_table.copy_(table)
        self.layout = layout

    @staticmethod
    def _fill(buffer: torch.Tensor, values: torch.Tensor, pad: int) -> None:
        host = torch.full(buffer.shape, pad, dtype=buffer.dtype)
        host[: len(values)] = values
        buffer.copy_(host)

    def attend(self, layer: int, q, k, v, scale: float, kv_cache: torch.Tensor) -> torch.Tensor:
        arena_k, arena_v = self.arena.k[layer], self.arena.v[layer]
        arena_k.index_copy_(0, self.fresh_rows, k)
        arena_v.index_copy_(0, self.fresh_rows, v)
        return attention_with_tiles(q, arena_k, arena_v, self.tiles, scale, kv_cache,
                                    self.block_table)


@dataclass
class CapturedStep:
    plan: StaticPlan
    graph: torch.cuda.CUDAGraph | None = None  # None: run uncaptured (off the GPU)
    logits: torch.Tensor | None = None  # the graph's output, shared by same-sized graphs


class StepGraphs:
    """The graphs of one denoiser, by (sequence bucket, token bucket, block length)."""

    def __init__(self, model, arena: KeyArena, canvases: torch.Tensor, max_pages: int,
                 max_seqs: int, device: torch.device, capture: bool = True):
        self.model = model
        self.arena = arena
        self.canvases = canvases  # the denoiser's canvas rows, one per arena row
        self.max_pages = max_pages
        self.seq_buckets = [b for b in SEQ_BUCKETS if b < max_seqs] + [max_seqs]
        self.device = device
        self.capture = capture
        kv = model.kv_layout()
        self.block_m = tile_block_m(kv.head_dim, kv.dtype, device)
        self.steps: dict[tuple[int, int, int], CapturedStep] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # logits buffers by row count
        self.pool = None
        self.capture_s = 0.0

    def fits(self, seqs: list[SequencePlan], tokens: int, block_lens: list[int]) -> bool:
        return (len(seqs) <= self.seq_buckets[-1] and len(set(block_lens)) == 1
                and tokens <= MAX_GRAPH_TOKENS
                and all(len(s.pages or ()) <= self.max_pages for s in seqs))

    def run(self, seqs: list[SequencePlan], tokens: int, block_starts: list[int],
            block_len: int):
        """Logits of every sequence's block rows ([len(seqs) * block_len, vocab])
        for a forward of ``tokens`` query tokens."""
        key = (next(b for b in self.seq_buckets if b >= len(seqs)), token_bucket(tokens),
               block_len)
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = self._build(*key, seqs, block_starts)
        step.plan.fill(seqs, block_starts)
        if step.graph is None:
            return self._forward(step.plan)[: len(seqs) * block_len]
        step.graph.replay()
        return step.logits[: len(seqs) * block_len]

    def _forward(self, plan: StaticPlan, out: torch.Tensor | None = None) -> torch.Tensor:
        """The graphed forward: everything it reads is in ``plan`` and the canvases."""
        ids = self.canvases.index_select(0, plan.fresh_rows)
        logits = self.model.denoise_logits(ids, plan.positions, plan, plan.logit_rows)
        if out is not None:
            out.copy_(logits)
        return logits

    def _build(self, num_seqs, tokens, block_len, seqs, block_starts) -> CapturedStep:
        start = time.perf_counter()
        plan = StaticPlan(num_seqs, tokens, block_len, self.max_pages, self.arena, self.block_m,
                          self.model.logit_shift, self.device)
        if not self.capture:
            return CapturedStep(plan)
        plan.fill(seqs, block_starts)
        # Warm up off the capture (Triton compiles, lazy state settles), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._forward(plan)
        torch.cuda.current_stream().wait_stream(side)
        out = self._output(logits)
        graph = torch.cuda.CUDAGraph()
        with graph_capture(self.device) as context, torch.cuda.graph(
                graph, pool=self.pool, stream=context.stream):
            self._forward(plan, out)
        self.pool = graph.pool()
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - start
        return CapturedStep(plan, graph, out)

    def _output(self, logits: torch.Tensor) -> torch.Tensor:
        out = self.outputs.get(logits.shape[0])
        if out is None:
            out = self.outputs[logits.shape[0]] = torch.empty_like(logits)
        return out


def copy_prefix_to_pages(model, arena: KeyArena, seqs: list[SequencePlan]) -> None:
    """After a graphed forward: the keys of each refreshing sequence's prefix
    (its ``write`` positions), left in the arena, into its KV pages."""
    writes = page_writes(seqs, [s.arena_start for s in seqs], model.kv_cache_page_size(),
                         arena.k.device)
    if writes is None:
        return
    rows, page_rows = writes
    for layer, kv_cache in enumerate(model.kv_caches()):
        write_pages(kv_cache, page_rows, arena.k[layer, rows], arena.v[layer, rows])
