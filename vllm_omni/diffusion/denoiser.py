"""The denoising loop: decode the current block of every ready request.

Runner-agnostic: it sees token ids and a ``DiffusionLM``, nothing of vLLM's
scheduler. Requests in different settings, cache modes and at different steps
share each batched forward; a request leaves the loop as soon as its block is
decided.

Cache modes (Fast-dLLM, NVlabs/Fast-dLLM ``llada/generate.py``):
- ``none``: every step runs the whole canvas.
- ``prefix``: the block's first step runs the whole canvas and writes the keys
  of the positions before the block into the request's pages of vLLM's KV
  cache (those positions are tokens vLLM scheduled, so their pages are
  allocated); later steps run the block and everything after it, reading the
  prefix keys from the pages.
- ``dual``: as ``prefix``, but later steps run only the block; the keys after
  the block (masks: vLLM has no pages for them) stay in the runner's key
  arena (``models/attention_plan.py``) for the block's steps.
Each forward is one ``AttentionPlan`` (``models/attention_plan.py``), built when
the group's layout changes (a new block, a refresh, a request leaving) and
reused by the steps in between; on CUDA the forwards of small groups replay
CUDA graphs of it (``cuda_graphs.py``).
Prefix keys depend on the whole canvas (attention is bidirectional), so they
are rewritten at every block and mean nothing to another request: the engine
config turns vLLM's prefix caching off. Nothing outlives the engine step, so
a finished, aborted or preempted request leaves nothing behind.

Memory: requests are decoded in groups whose canvases add up to at most the
engine's token budget (``max_num_batched_tokens``, what vLLM profiled a
forward at), so a forward never packs more tokens than that (unless one canvas
alone is longer), and the arena, one row per canvas position of a group,
is sized to the budget (or one canvas) and allocated while vLLM profiles
memory, so the KV cache is sized around it.

Under tensor parallelism every rank runs this loop on the same (all-gathered,
bit-identical) logits, so deterministic commits (greedy, or drawn from the
request's own seeded generator, which every rank seeds alike) are identical on
every rank by construction; only a step with a job that draws from the global
RNG broadcasts the first rank's blocks (``docs/architecture/overview.md``).
"""

import time
import zlib
from array import array
from dataclasses import asdict, dataclass

import torch
from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

from vllm_omni.diffusion.algorithms import (ALGORITHMS, apply_commit, counts_masks, draws_random,
                                            ends_on_schedule)
from vllm_omni.diffusion.cuda_graphs import Forwards
from vllm_omni.diffusion.params import DiffusionParams
from vllm_omni.models.attention_plan import AttentionPlan, KeyArena, SequencePlan


@dataclass
class BlockJob:
    """One request's current block: its canvas (prompt, committed blocks,
    masks) and where the block sits in it."""

    req_id: str
    canvas: torch.Tensor  # [prompt + canvas_length] token ids (on the device while decoded)
    block_start: int
    params: DiffusionParams
    generator: torch.Generator | None = None
    step: int = 0  # denoising steps taken on this block
    pages: list[int] | None = None  # the request's KV-cache pages (prefix/dual caches)
    arena_start: int = 0  # its rows in the key arena (dual cache), set per group
    # Masked positions left in the block, as last counted on the host (kept
    # only for algorithms that ask for it, ``counts_masks``); None: not yet.
    num_masked: int | None = None

    @property
    def block_end(self) -> int:
        return self.block_start + self.params.block_length

    @property
    def block(self) -> torch.Tensor:
        return self.canvas[self.block_start : self.block_end]

    def plan(self, logit_shift: int) -> SequencePlan:
        """Which positions this step runs and which keys it reads or keeps.
        A family whose logits are shifted also runs the position before the
        block (its output predicts the block's first token)."""
        length = len(self.canvas)
        mode = self.params.cache
        # The outputs predicting the block's tokens.
        logits_at = range(self.block_start - logit_shift, self.block_end - logit_shift)
        if mode == "none":
            return SequencePlan(length, 0, length, arena_start=self.arena_start,
                                logits_at=logits_at)
        reused = self.block_start - logit_shift  # the prefix later steps read from pages
        dual_keys = length if mode == "dual" else None  # the arena keeps the suffix
        if self.step == 0:  # the block's refresh: the whole canvas
            return SequencePlan(length, 0, length, self.pages, write=(0, reused),
                                keys_end=dual_keys, arena_start=self.arena_start,
                                logits_at=logits_at)
        q_end = length if mode == "prefix" else self.block_end
        return SequencePlan(length, reused, q_end, self.pages,  # reads [0, reused) from pages
                            keys_end=dual_keys, arena_start=self.arena_start,
                            logits_at=logits_at)


@dataclass
class StepStats:
    """Where the denoising loop's time goes. A step is one batched forward
    plus the commit of every job in it. ``host_s``: from a step's start until
    its last kernel is queued (Python, vLLM's layers, kernel launches), i.e.
    the host-side cost; ``wall_s``: until the host moves on, which is after
    the result is on the host where the step looks at the blocks (and for
    steps that need no look, right away: ``wall_s`` then also counts the
    final copy of the blocks, which waits for their last steps). host_s
    close to wall_s means the GPU waits on the host. The ``graph_`` fields
    count the subset of steps whose forward ran through the step graphs
    (``cuda_graphs.py``: a replay, or in tests off the GPU its static forward)."""

    steps: int = 0
    forward_tokens: int = 0
    # Engine steps that scheduled tokens (the runner counts them): a batch in
    # lockstep takes one per block (overview.md, "Arrival skew").
    engine_steps: int = 0
    # The runner's whole execute_model in those steps (``wall_s`` and the
    # runner's own work: vLLM's _update_states, the works, the bookkeeping);
    # the rest of an engine step is vLLM's (scheduling, outputs, IPC).
    runner_s: float = 0.0
    host_s: float = 0.0
    wall_s: float = 0.0
    graph_steps: int = 0
    graph_host_s: float = 0.0
    graph_wall_s: float = 0.0
    capture_s: float = 0.0  # capturing graphs (inside the steps' times)
    # Steps that waited for the device to count masked positions (one look
    # for the whole batch each); 0 when every job ends on schedule and
    # draws nothing whose shape depends on the count (Dream greedy).
    looks: int = 0
    # Commits of a block made inside a batch of blocks (``_step_batch``).
    batched_commits: int = 0
    # CRC-32 of every block this rank decided, in order: under tensor
    # parallelism equal on every rank (tests/test_parallel.py).
    blocks_crc: int = 0

    def record(self, graphed: bool, host_s: float, wall_s: float) -> None:
        self.steps += 1
        self.host_s += host_s
        self.wall_s += wall_s
        if graphed:
            self.graph_steps += 1
            self.graph_host_s += host_s
            self.graph_wall_s += wall_s

    def as_dict(self) -> dict:
        return asdict(self)


# A batch's commit allocates a few [rows, vocab] temporaries; this many rows
# keep them near what one long block's commit took alone.
MAX_BATCH_ROWS = 512


class Denoiser:
    def __init__(self, model, device: torch.device, token_budget: int, max_model_len: int,
                 max_num_seqs: int = 1, cuda_graphs: bool = False):
        self.stats = StepStats()
        self.model = model
        self.device = device
        self.token_budget = token_budget
        # A group's canvases fit the token budget, or it is one canvas, at
        # most 2 * max_model_len long (max_tokens rounded up to whole blocks).
        self.arena_rows = max(token_budget, 2 * max_model_len)
        self.arena: KeyArena | None = None
        # A group's canvases, position p of a job at row arena_start + p (as
        # in the arena): the plans' token buffer. The commits write into it,
        # every forward gathers its input ids from it.
        self.canvases: torch.Tensor | None = None
        self.mask_token_id = model.mask_token_id
        self.tp_size = get_tensor_model_parallel_world_size()
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        # Graphs of small groups' forwards (``cuda_graphs.py``).
        self.forwards = Forwards(model, device, max_model_len, max_num_seqs, cuda_graphs)
        # The last forward's plan, reused while its sequences stay the same
        # (a block's later steps).
        self._plan: AttentionPlan | None = None
        self._plan_seqs: list[SequencePlan] | None = None
        # A group's gathered block rows of each batch of commits (``_step_batch``).
        self._batch_rows: dict[tuple[int, ...], torch.Tensor] = {}

    def make_job(
        self,
        req_id: str,
        prompt_ids: list[int],
        output_ids: list[int],
        params: DiffusionParams,
        generator: torch.Generator | None = None,
        pages: list[int] | None = None,
    ) -> BlockJob:
        """The job for a request's next block, rebuilt from the tokens vLLM
        holds for it (so a preempted request resumes where it was). ``pages``:
        the KV-cache pages vLLM allocated for those tokens, needed by the
        prefix and dual caches."""
        num_masks = params.canvas_length - len(output_ids)
        canvas = torch.tensor(prompt_ids + output_ids + [self.mask_token_id] * num_masks)
        block_start = len(prompt_ids) + len(output_ids)
        if params.cache != "none" and len(pages or ()) * self.page_size() < block_start:
            raise RuntimeError(f"request {req_id}: KV pages do not cover its {block_start} tokens")
        # The block starts all masks (the tokens before it are the request's).
        return BlockJob(req_id, canvas, block_start, params, generator, pages=pages,
                        num_masked=params.block_length)

    def page_size(self) -> int:
        """Rows per page of vLLM's KV cache (known once it is allocated)."""
        return self.model.kv_cache_page_size()

    def allocate_arena(self) -> KeyArena:
        """The key arena, allocated on first need (the runner calls this while
        vLLM profiles memory, so the KV cache is sized around it). Its
        contents live for one engine step, so sleep mode may discard it."""
        if self.arena is None:
            kv = self.model.kv_layout()
            self.arena = KeyArena(kv.num_layers, self.arena_rows, kv.num_kv_heads, kv.head_dim,
                                  kv.dtype, self.device)
        return self.arena

    def set_step_graphs(self, enabled: bool, capture: bool = True) -> None:
        """Run small groups through CUDA graphs or not; ``capture=False``
        runs their static forward eagerly (how the tests check it off the GPU)."""
        self.forwards.set_graphs(enabled, capture)

    def run(self, jobs: list[BlockJob]) -> dict[str, list[int]]:
        """Denoise every job's block to completion; return the blocks."""
        groups, tokens = [[]], 0
        for job in jobs:
            if groups[-1] and tokens + len(job.canvas) > self.token_budget:
                groups.append([])
                tokens = 0
            groups[-1].append(job)
            tokens += len(job.canvas)
        if not jobs:
            return {}
        # Plans are reused within an engine step only: vLLM extends a running
        # request's pages list in place between steps.
        self._plan_seqs = None
        # The canvas rows are reused by the next group: keep each group's blocks.
        decided = []
        for group in groups:
            self._decode(group)
            decided.append(torch.cat([job.block for job in group]))
        # One device-to-host copy for all blocks (it waits for the last step).
        start = time.perf_counter()
        blocks = torch.cat(decided).tolist()
        self.stats.wall_s += time.perf_counter() - start
        self.stats.blocks_crc = zlib.crc32(array("q", blocks).tobytes(), self.stats.blocks_crc)
        out, offset = {}, 0
        for job in jobs:
            out[job.req_id] = blocks[offset : offset + job.params.block_length]
            offset += job.params.block_length
        return out

    def _decode(self, jobs: list[BlockJob]) -> None:
        self.allocate_arena()
        if self.canvases is None:
            # Zeros: the spare row is a valid token id for padded graph rows.
            # Allocated here, outside vLLM's sleep-mode pools, so it is never
            # discarded (a few bytes per arena row).
            self.canvases = torch.zeros(self.arena_rows + 1, dtype=torch.long,
                                        device=self.device)
        offset = 0
        for job in jobs:  # position p of a job's canvas: arena row arena_start + p
            job.arena_start = offset
            offset += len(job.canvas)
        self.canvases[:offset].copy_(torch.cat([job.canvas for job in jobs]))
        for job in jobs:
            job.canvas = self.canvases[job.arena_start : job.arena_start + len(job.canvas)]
        self._batch_rows = {}
        active = list(jobs)
        self._count_masks([j for j in active if j.num_masked is None and _counted(j)])
        while active:
            start = time.perf_counter()
            logits, graphed = self._forward(active)
            self._commit(active, logits)
            if self.tp_size > 1 and any(_draws_global_rng(j) for j in active):
                self._agree(active)
            issued = time.perf_counter()
            # Jobs that end on schedule and draw nothing shaped by the count
            # need no look: the host queues the next step while the GPU runs
            # this one (the blocks' copy in ``run`` waits).
            self._count_masks([j for j in active if _counted(j)])
            active = [j for j in active if not _done(j)]
            self.stats.record(graphed, issued - start, time.perf_counter() - start)

    def _count_masks(self, jobs: list[BlockJob]) -> None:
        """The masked positions left in each job's block: one device sync for
        the whole batch, not one per request."""
        if not jobs:
            return
        counts = torch.stack([(j.block == self.mask_token_id).sum() for j in jobs]).tolist()
        for job, count in zip(jobs, counts):
            job.num_masked = count
        self.stats.looks += 1

    def _commit(self, jobs: list[BlockJob], logits: torch.Tensor) -> None:
        """Every job's commit of this step. Consecutive jobs whose algorithm
        gives equal batch keys at the same step commit as one batch (up to
        ``MAX_BATCH_ROWS`` rows); the others one by one."""
        runs, offset = [], 0  # (key, jobs, their first logits row)
        for job in jobs:
            key = ALGORITHMS[job.params.algorithm].batch_key(job.params)
            if key is not None:
                key = (job.params.algorithm, job.step, key)
            last = runs[-1] if runs else None
            if (key is not None and last is not None and last[0] == key
                    and (len(last[1]) + 1) * job.params.block_length <= MAX_BATCH_ROWS):
                last[1].append(job)
            else:
                runs.append((key, [job], offset))
            offset += job.params.block_length
        for _, run, first in runs:
            n = run[0].params.block_length
            rows = logits[first : first + len(run) * n]
            if len(run) == 1:
                self._step(run[0], rows)
            else:
                self._step_batch(run, rows.view(len(run), n, -1))

    def _forward(self, jobs: list[BlockJob]) -> tuple[torch.Tensor, bool]:
        """One forward over every job's planned positions, packed: logits
        for the rows of each job's current block, and whether a CUDA graph
        ran it."""
        seqs = [job.plan(self.model.logit_shift) for job in jobs]
        if seqs != self._plan_seqs:  # a new block, a refresh, a request leaving
            arena = self.arena if any(s.keys_end is not None for s in seqs) else None
            self._plan = AttentionPlan(seqs, self.page_size(), self.device, arena)
            self._plan_seqs = seqs
        self.stats.forward_tokens += self._plan.num_tokens
        return self.forwards.run(self._plan, self.canvases, self.arena_rows, self.stats)

    @staticmethod
    def _agree(jobs: list[BlockJob]) -> None:
        blocks = get_tp_group().broadcast(torch.cat([j.block for j in jobs]), src=0)
        for job, block in zip(jobs, blocks.split([j.params.block_length for j in jobs])):
            job.block.copy_(block)

    def release_graphs(self) -> None:
        """Drop the step graphs and their memory pool (recaptured on next
        need), e.g. before the engine sleeps."""
        self.forwards.release()

    def _step(self, job: BlockJob, logits: torch.Tensor) -> None:
        block = job.block
        algorithm = ALGORITHMS[job.params.algorithm]
        counted = {"num_masked": job.num_masked} if algorithm.counts_masks(job.params) else {}
        positions, tokens = algorithm.commit(
            logits, block == self.mask_token_id, job.step, job.params, job.generator, **counted
        )
        apply_commit(block, positions, tokens)
        job.step += 1

    def _step_batch(self, jobs: list[BlockJob], logits: torch.Tensor) -> None:
        """One commit for the blocks of ``jobs`` (equal batch keys, no draws):
        the blocks are gathered from the canvas rows as [n, block] and written
        back with the commit's selection."""
        key = tuple(j.arena_start + j.block_start for j in jobs)
        rows = self._batch_rows.get(key)
        if rows is None:  # built once per group layout
            rows = (torch.tensor(key)[:, None] + torch.arange(jobs[0].params.block_length))
            rows = rows.flatten()
            if self.device.type == "cuda":  # pinned: the host need not wait for the GPU
                rows = rows.pin_memory()
            rows = self._batch_rows[key] = rows.to(self.device, non_blocking=True)
        blocks = self.canvases[rows].view(len(jobs), -1)
        job = jobs[0]
        selection, tokens = ALGORITHMS[job.params.algorithm].commit(
            logits, blocks == self.mask_token_id, job.step, job.params, None)
        self.canvases.index_copy_(0, rows, torch.where(selection, tokens, blocks).flatten())
        for job in jobs:
            job.step += 1
        self.stats.batched_commits += len(jobs)


def _counted(job: BlockJob) -> bool:
    """Whether the job's masked positions are counted after each step: its
    algorithm asks for the count, or it may end before its schedule does."""
    return counts_masks(job.params) or not ends_on_schedule(job.params)


def _done(job: BlockJob) -> bool:
    """A block is done after its schedule's steps, or, when counted, once no
    position is masked (an algorithm that counts masks draws and commits
    nothing then, so ending early changes nothing)."""
    if ends_on_schedule(job.params) and job.step >= job.params.steps_per_block:
        return True
    return _counted(job) and job.num_masked == 0


def _draws_global_rng(job: BlockJob) -> bool:
    """Whether the job's commit draws random numbers from the device's global
    generator (no seed of its own), which need not agree across ranks."""
    return job.generator is None and draws_random(job.params)
