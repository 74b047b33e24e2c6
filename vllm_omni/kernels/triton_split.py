"""Split-key attention for launches of few programs: how many splits, the
scratch for the splits' partial results, and the kernel that merges them.
``triton_attention.py``'s module docstring ("Split keys") explains when and
how a launch splits; this file only implements it.
"""

from functools import lru_cache

import torch
import triton
import triton.language as tl

from vllm_omni.kernels.reference import SequenceBatch

# A launch of fewer programs than SPLIT_BELOW_SMS per SM splits its keys.
SPLIT_BELOW_SMS = 2
# Each split should keep at least this many keys: below it, the merge's
# launch and scratch traffic cost more than a shorter serial walk saves.
MIN_SPLIT_KEYS = 256
MAX_SPLITS = 16
DEFAULT_SMS = 132  # an H100's, for launches off the GPU (the interpreter)


@lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def split_count(num_tiles: int, programs_per_tile: int, max_keys: int,
                sms: int = DEFAULT_SMS) -> int:
    """Key splits per tile (a power of two; 1: the unsplit kernel) for a
    launch of ``num_tiles`` tiles of ``programs_per_tile`` programs whose
    tiles have at most ``max_keys`` keys (paged prefix plus local keys)."""
    programs = num_tiles * programs_per_tile
    if programs == 0 or programs >= SPLIT_BELOW_SMS * sms:
        return 1
    by_programs = _pow2_floor(SPLIT_BELOW_SMS * sms // programs)
    by_keys = _pow2_floor(max_keys // MIN_SPLIT_KEYS)
    return min(by_programs, by_keys, MAX_SPLITS)


@lru_cache(maxsize=256)
def max_keys(batch: SequenceBatch, kv_batch: SequenceBatch | None,
             prefix_lens: tuple[int, ...] | None) -> int:
    """The most keys (paged prefix and local) a sequence with queries has
    (``kv_batch`` None: its own rows)."""
    kv_lens = (kv_batch or batch).lens
    prefix_lens = prefix_lens or (0,) * len(kv_lens)
    return max((p + n for q, n, p in zip(batch.lens, kv_lens, prefix_lens) if q), default=0)


def partials(splits: int, num_tiles: int, programs_per_tile: int, block_m: int, head_dim: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for the splits' partial results: (row max and row sum, each
    [splits, tiles, programs, block_m]; accumulators [..., head_dim]), fp32.
    Allocated per launch: inside a CUDA graph capture they come from the
    graph's pool, at addresses every replay reuses."""
    rows = (splits, num_tiles, programs_per_tile, block_m)
    ml = torch.empty((2, *rows), dtype=torch.float32, device=device)
    acc = torch.empty((*rows, head_dim), dtype=torch.float32, device=device)
    return ml, acc


@triton.jit
def _merge_splits_kernel(
    O, Tiles, PartML, PartAcc, splits, s_ot, s_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    ROW_WIDTH: tl.constexpr, PACK: tl.constexpr,
):
    """One program per (program of the split launch, tile): merges its
    ``splits`` partials (base-2 row max m, row sum l, unnormalised
    accumulator) into out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i,
    M the largest m_i, and stores the tile's real rows."""
    pid, tile = tl.program_id(0), tl.program_id(1)
    if PACK:  # the tile rows as the attention kernel laid them out
        row_tok = tl.arange(0, BLOCK_M) // GROUP
        row_head = pid * GROUP + tl.arange(0, BLOCK_M) % GROUP
    else:
        row_tok = tl.arange(0, BLOCK_M)
        row_head = pid + tl.zeros([BLOCK_M], dtype=tl.int32)
    row = Tiles + ROW_WIDTH * tile
    seq_start = tl.load(row).to(tl.int64)
    seq_len = tl.load(row + 1)
    offs_m = tl.load(row + 2) + row_tok
    m_mask = offs_m < seq_len
    offs_d = tl.arange(0, HEAD_DIM)

    num_tiles, programs = tl.num_programs(1), tl.num_programs(0)
    stride = num_tiles * programs * BLOCK_M  # between splits (and m/l halves: * splits)
    part = (tile * programs + pid) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for s in range(0, splits):
        at = s * stride + part
        # Unwritten rows (past the sequence) read a neutral partial.
        m_s = tl.load(PartML + at, mask=m_mask, other=0.0)
        l_s = tl.load(PartML + splits * stride + at, mask=m_mask, other=1.0)
        a_s = tl.load(PartAcc + at[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=m_mask[:, None], other=0.0)
        # Split 0 always has keys, so m_run is finite from it on; a split
        # with none has m = -inf and weighs 0.
        m_new = tl.maximum(m_run, m_s)
        alpha = tl.exp2(m_run - m_new)
        beta = tl.exp2(m_s - m_new)
        l_run = l_run * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_run = m_new
    out = acc / l_run[:, None]
    o_ptrs = (O + (seq_start + offs_m)[:, None] * s_ot + row_head[:, None] * s_oh
              + offs_d[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None])


def merge_splits(out, tiles, ml, acc, group, pack, row_width):
    """Launch the merge of ``partials`` into ``out`` (what the split
    attention launch wrote there)."""
    splits, num_tiles, programs, block_m, head_dim = acc.shape
    _merge_splits_kernel[(programs, num_tiles)](
        out, tiles, ml, acc, splits, out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, ROW_WIDTH=row_width, PACK=pack,
        num_warps=4,
    )
    return out
