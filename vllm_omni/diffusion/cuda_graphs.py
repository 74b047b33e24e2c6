"""A denoiser's forwards: CUDA graphs where they fit, eager otherwise.

At batch 1 a denoising forward is a few milliseconds of GPU work, and
launching its 400-600 kernels one by one from Python costs more (12 ms for an
8B model, 16 ms for a 4B block-causal step on an H100): eager, the GPU waits
on the host. So every forward of at most ``MAX_GRAPH_TOKENS`` query tokens
replays a graph, whatever its kind: exact steps, the cache modes' refreshes
and block steps, a block-causal family's stores and block steps, mixed.

Both paths run the same plan (``models/attention_plan.py``). The eager one
moves the plan's arrays to the device; a graph's ``PlanTensors`` are slices
of fixed buffers (``StaticInputs``) into which a step copies the plan's
arrays, padded (two host-to-device copies, and the block table when it
changed; none when the plan is the one already there, as in a block's later
steps). Inside the graph:
- input ids are gathered from the caller's token buffer at the plan's rows
  (the commits update that buffer in place);
- keys go to vLLM's pages (``page_writes``) before each layer's attention, so
  a block-causal store and the next block's first step share one replay;
- the attention kernel reads the tile table from the device: no host-side
  work depends on the data.
A graph serves every plan of its ``GraphShape``: query tokens, logits rows
and tiles rounded up to buckets, whether it writes pages, uses the key arena
or the long-sequence tiles, and the attention's key splits per tile
(``kernels.tile_splits`` of the padded tile count and the plan's most keys).
Padding: token rows gather the token buffer's spare row (and write their
keys to the arena's spare row); tile rows have no queries; logits rows read
row 0; page writes go to page 0, vLLM's null block, which no request reads.

Graphs are captured lazily, the first time a shape is needed, all in one
memory pool (they never run concurrently); the logits land in a buffer
shared by the graphs with the same number of rows. Off the GPU
(``capture=False``) the same static forward runs uncaptured: the tests check
it there token for token.

Under tensor parallelism each rank captures the same graphs in the same order
(every rank runs the same loop), inside vLLM's ``graph_capture`` context: it
puts the capture on vLLM's stream and registers the buffers that vLLM's custom
all-reduce reads inside the graph with the peer ranks once the capture ends.
The warm-up forward before a capture runs outside that context, where the
custom all-reduce really reduces.

Not graphed: forwards over ``MAX_GRAPH_TOKENS`` tokens (the GPU is busy
anyway) or with more requests or pages than the static block table holds.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
from vllm.distributed.parallel_state import graph_capture

from vllm_omni.kernels import tile_block_m, tile_splits
from vllm_omni.models.attention_plan import AttentionPlan, KeyArena, PlanTensors

MAX_GRAPH_TOKENS = 2048


def token_bucket(tokens: int) -> int:
    """Query tokens a graph is captured for: powers of two up to 64, then
    multiples of 64 (a 384-token canvas pads nothing). LLaDA/Dream's: a
    group keeps its canvases for many steps, so few sizes come up."""
    if tokens <= 64:
        return max(1, 1 << (tokens - 1).bit_length())
    return -(-tokens // 64) * 64


def geometric_bucket(tokens: int) -> int:
    """Powers of two and 1.5 times them (8, 12, 16, 24, ...): at most a third
    is padding. Block-causal forwards' sizes follow the number of requests
    decoding, which changes often (prompts arriving in chunks, requests
    finishing), so each size class should stay few graphs."""
    if tokens <= 8:
        return max(1, 1 << (tokens - 1).bit_length())
    power = 1 << (tokens - 1).bit_length()
    return power * 3 // 4 if tokens <= power * 3 // 4 else power


@dataclass(frozen=True)
class GraphShape:
    tokens: int
    logits: int  # 0: the forward computes no logits
    tiles: int
    writes: bool  # writes pages (as many rows as tokens, padding to page 0)
    arena: bool
    long: bool
    splits: int = 1

    @staticmethod
    def of(plan: AttentionPlan, block_m: int, bucket=token_bucket,
           splits=None) -> "GraphShape":
        """``splits``: (tiles, max keys, long) -> key splits per tile (None: 1)."""
        tiles = 1 << max(len(plan.tiles(block_m)) - 1, 0).bit_length()
        return GraphShape(bucket(plan.num_tokens),
                          bucket(plan.num_logits) if plan.num_logits else 0,
                          tiles, plan.num_writes > 0, plan.arena is not None, plan.long,
                          splits(tiles, plan.max_keys, plan.long) if splits else 1)

    def sections(self) -> list[int]:
        """As ``AttentionPlan.sections``."""
        writes = self.tokens if self.writes else 0
        return [self.tokens, self.tokens, self.logits] + [writes] * 3


class StaticInputs:
    """The fixed buffers every graph reads its plan from (a graph replays
    the addresses it captured): one int64 buffer for the plan's ``host``
    arrays, one int32 buffer for the tile table and the block table."""

    def __init__(self, max_tiles: int, table_rows: int, max_pages: int, spare_row: int,
                 page_size: int, device: torch.device):
        self.max_tiles, self.spare_row, self.page_size = max_tiles, spare_row, page_size
        self.i64 = torch.zeros(6 * MAX_GRAPH_TOKENS, dtype=torch.long, device=device)
        self.i32 = torch.zeros(7 * max_tiles + table_rows * max_pages, dtype=torch.int32,
                               device=device)
        self.block_table = self.i32[7 * max_tiles :].view(table_rows, max_pages)
        self.loaded: tuple[AttentionPlan, GraphShape] | None = None
        self.loaded_table = None

    def fits(self, plan: AttentionPlan, block_m: int) -> bool:
        rows, width = plan.table.host.shape
        return (plan.num_tokens <= MAX_GRAPH_TOKENS and plan.num_logits <= MAX_GRAPH_TOKENS
                and len(plan.tiles(block_m)) <= self.max_tiles
                and rows <= self.block_table.shape[0] and width <= self.block_table.shape[1])

    def tensors(self, shape: GraphShape, arena: KeyArena | None) -> PlanTensors:
        sections = shape.sections()
        parts = self.i64[: sum(sections)].split(sections)
        tiles = self.i32[: 7 * shape.tiles].view(shape.tiles, 7)
        return PlanTensors(*parts, tiles, self.block_table, arena, shape.long, shape.splits)

    def load(self, plan: AttentionPlan, shape: GraphShape, block_m: int) -> None:
        """Copy the plan in, padded to the shape, unless it is there already."""
        if self.loaded is not None and self.loaded[0] is plan and self.loaded[1] == shape:
            return
        pads = [self.spare_row, 0, 0, 0, 0, None]  # None: spread over page 0's rows
        host = np.empty(sum(shape.sections()), np.int64)
        src = dst = 0
        for n, size, pad in zip(plan.sections(), shape.sections(), pads):
            host[dst : dst + n] = plan.host[src : src + n]
            host[dst + n : dst + size] = (np.arange(size - n) % self.page_size
                                          if pad is None else pad)
            src, dst = src + n, dst + size
        self._copy(self.i64, host)
        tiles = np.zeros((shape.tiles, 7), np.int32)  # no-query rows do nothing
        plan_tiles = plan.tiles(block_m)
        tiles[: len(plan_tiles)] = plan_tiles
        self._copy(self.i32, tiles.reshape(-1))
        if plan.table is not self.loaded_table:
            # Rows and columns past the plan's are never read (its tiles and
            # writes index only its requests' pages).
            rows, width = plan.table.host.shape
            self.block_table[:rows, :width].copy_(plan.table.on(self.block_table.device))
            self.loaded_table = plan.table
        self.loaded = (plan, shape)

    @staticmethod
    def _copy(buffer: torch.Tensor, host: np.ndarray) -> None:
        source = torch.from_numpy(host)
        if buffer.is_cuda:  # pinned: the host does not wait for the GPU
            source = source.pin_memory()
        buffer[: len(host)].copy_(source, non_blocking=True)


@dataclass
class CapturedStep:
    tensors: PlanTensors
    graph: torch.cuda.CUDAGraph | None = None  # None: run uncaptured (off the GPU)
    logits: torch.Tensor | None = None  # the graph's output, shared by same-sized graphs


def forward(model, tensors: PlanTensors, tokens: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor | None:
    """A plan's forward: its logits rows (None: it has none). Everything it
    reads is in ``tensors`` and the token buffer."""
    ids = tokens.index_select(0, tensors.rows)
    logits = model.denoise_logits(ids, tensors.positions, tensors, tensors.logit_rows,
                                  shift=False)
    if out is not None and logits is not None:
        out.copy_(logits)
    return logits


class StepGraphs:
    """The graphs of one denoiser, by ``GraphShape``."""

    def __init__(self, model, tokens: torch.Tensor, spare_row: int, max_pages: int,
                 table_rows: int, block_m: int, device: torch.device, capture: bool = True,
                 bucket=token_bucket, splits=None):
        self.model = model
        self.bucket = bucket  # of query tokens and logits rows
        self.splits = splits  # ``GraphShape.of``'s
        self.tokens = tokens  # the denoiser's token buffer; row spare_row is padding's
        self.device = device
        self.capture = capture
        max_tiles = 1 << (-(-MAX_GRAPH_TOKENS // block_m) + MAX_GRAPH_TOKENS - 1).bit_length()
        self.inputs = StaticInputs(max_tiles, table_rows, max_pages, spare_row,
                                   model.kv_cache_page_size(), device)
        self.steps: dict[GraphShape, CapturedStep] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # logits buffers by row count
        self.pool = None
        self.capture_s = 0.0

    def run(self, plan: AttentionPlan, block_m: int) -> torch.Tensor | None:
        """The plan's logits rows, through the graph of its shape."""
        shape = GraphShape.of(plan, block_m, self.bucket, self.splits)
        self.inputs.load(plan, shape, block_m)
        step = self.steps.get(shape)
        if step is None:
            step = self.steps[shape] = self._build(shape, plan.arena)
        if step.graph is None:
            logits = forward(self.model, step.tensors, self.tokens)
        else:
            step.graph.replay()
            logits = step.logits
        return None if logits is None else logits[: plan.num_logits]

    def _build(self, shape: GraphShape, arena: KeyArena | None) -> CapturedStep:
        tensors = self.inputs.tensors(shape, arena)
        if not self.capture:
            return CapturedStep(tensors)
        start = time.perf_counter()
        # Warm up off the capture (Triton compiles, lazy state settles), then
        # capture; the plan is loaded, so both run real rows.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = forward(self.model, tensors, self.tokens)
        torch.cuda.current_stream().wait_stream(side)
        out = None if logits is None else self._output(logits)
        graph = torch.cuda.CUDAGraph()
        with graph_capture(self.device) as context, torch.cuda.graph(
                graph, pool=self.pool, stream=context.stream):
            forward(self.model, tensors, self.tokens, out)
        self.pool = graph.pool()
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - start
        return CapturedStep(tensors, graph, out)

    def _output(self, logits: torch.Tensor) -> torch.Tensor:
        out = self.outputs.get(logits.shape[0])
        if out is None:
            out = self.outputs[logits.shape[0]] = torch.empty_like(logits)
        return out


class Forwards:
    """Runs a denoiser's plans: through ``StepGraphs`` when graphs are on and
    the plan fits them, eagerly otherwise. ``tokens``: the denoiser's token
    buffer (the plans' rows index it; ``spare_row`` is padding's)."""

    def __init__(self, model, device: torch.device, max_model_len: int, max_requests: int,
                 cuda_graphs: bool, bucket=token_bucket):
        self.model = model
        self.bucket = bucket
        self.device = device
        self.max_model_len = max_model_len
        self.max_requests = max_requests
        self.use_graphs = cuda_graphs and device.type == "cuda"
        self.capture = True
        self.graphs: StepGraphs | None = None  # built on first need
        self._block_m: dict[bool, int] = {}  # queries per tile, by ``long``
        self._heads: tuple[int, int] | None = None  # (query heads, KV heads) per rank

    def set_graphs(self, enabled: bool, capture: bool = True) -> None:
        """``capture=False``: the graphs' static forward runs uncaptured (how
        the tests check it off the GPU)."""
        self.use_graphs, self.capture, self.graphs = enabled, capture, None

    def release(self) -> None:
        """Drop the graphs and their memory pool (recaptured on next need)."""
        self.graphs = None

    def run(self, plan: AttentionPlan, tokens: torch.Tensor, spare_row: int,
            stats) -> tuple[torch.Tensor | None, bool]:
        """The plan's logits rows, and whether a graph ran it."""
        block_m = self.block_m(plan.long)
        graphs = self._graphs(tokens, spare_row) if self.use_graphs else None
        if graphs is not None and graphs.inputs.fits(plan, block_m):
            captured = graphs.capture_s
            logits = graphs.run(plan, block_m)
            stats.capture_s += graphs.capture_s - captured
            return logits, True
        splits = self.splits(len(plan.tiles(block_m)), plan.max_keys, plan.long)
        return forward(self.model, plan.tensors(block_m, splits), tokens), False

    def block_m(self, long: bool) -> int:
        if long not in self._block_m:
            kv = self.model.kv_layout()
            self._block_m[long] = tile_block_m(kv.head_dim, kv.dtype, self.device, long,
                                               kv.group)
        return self._block_m[long]

    def splits(self, num_tiles: int, max_keys: int, long: bool) -> int:
        """Key splits per tile of the attention's launches (``kernels.tile_splits``)."""
        if self._heads is None:
            kv = self.model.kv_layout()
            self._heads = (kv.num_kv_heads * kv.group, kv.num_kv_heads)
        return tile_splits(num_tiles, max_keys, *self._heads, self.device, long)

    def _graphs(self, tokens: torch.Tensor, spare_row: int) -> StepGraphs:
        if self.graphs is None or self.graphs.tokens is not tokens:
            max_pages = -(-self.max_model_len // self.model.kv_cache_page_size()) + 1
            self.graphs = StepGraphs(self.model, tokens, spare_row, max_pages,
                                     self.max_requests, self.block_m(False), self.device,
                                     self.capture, self.bucket, self.splits)
        return self.graphs
