"""Triton kernel: bidirectional (non-causal) attention over packed sequences.

Same contract as ``bidirectional_attention_reference``: q is
[q_tokens, num_heads, head_dim], k/v are [kv_tokens, num_kv_heads, head_dim]
(GQA: query head h reads kv head h // (num_heads // num_kv_heads)). Sequence
i owns q rows batch.starts[i]:+batch.lens[i] and k/v rows
kv_batch.starts[i]:+kv_batch.lens[i] (kv_batch None: the same rows as batch,
q/k/v then all have batch's layout); every query attends to every key of its
own sequence. Separate layouts serve the KV-cached denoising modes, where a
block's queries attend to cached prefix/suffix keys plus their own fresh keys.
A sequence may have no queries (it gets no tiles); one with queries must have
keys.

Tiling. Each sequence is cut into query tiles of BLOCK_M rows; the tiles of
all sequences are listed in one int32 table (query start, query length, tile
offset inside the sequence, and with a kv_batch also key start and key
length), built once per (batch, kv_batch, BLOCK_M, device) and cached. The
kernel is launched once, on a grid of (query heads, tiles), the head varying
fastest so that the programs reading one KV head's keys run together and
share them in L2. With GQA packing (``packs``: a power-of-two group, not the
long-sequence tiles) a program takes a KV head instead: its BLOCK_M rows are
BLOCK_M / group tokens times the group's query heads, so a 4-token block of
a KV-cached step fills a 16-row tile and its keys are read once, not once
per query head. A program loads its [BLOCK_M, head_dim] query tile, walks the keys and values of its own
sequence in blocks of BLOCK_N rows and keeps a flash-attention online
softmax (running max m, running sum l, fp32 accumulator), rescaling the
accumulator whenever the max grows; it divides by l once at the end. Rows past
the end of a sequence are masked on load (query tile tails, key block tails:
lengths need not be multiples of the tiles, 1-token sequences work), masked
keys get -inf scores, and only real rows are stored; the key blocks before
the tail are whole, so they load and score without masks. Softmax runs in base 2
with log2(e) folded into the scale. float32 inputs use IEEE fp32 dots (no
TF32), so they match the fp32 reference to ~1e-5; bf16/fp16 inputs use the
tensor cores with fp32 accumulation.

Inputs may be strided views (e.g. q/k/v split out of one packed qkv tensor):
token and head strides are passed explicitly; the last dim must have stride 1
(it is copied otherwise). ``out`` may be given (any strided [tokens, heads,
head_dim] view with a unit last stride); rows of no sequence are not written.
head_dim must be a power of two in 16..256. Offsets inside one sequence are
int32: seq_len * token_stride (for q, k, v and out) must stay below 2**31.
Without a kv_batch the kernel is compiled without the key columns (SEP_KV
False) and does exactly what it did before they existed.

Paged prefix (``prefix``, a ``PagedPrefix``): sequence i's queries also attend
to its first ``prefix.lens[i]`` positions' keys and values in vLLM's paged KV
cache (``[num_pages, num_kv_heads, page_size, 2 * head_dim]``, K then V),
found through row i of ``prefix.block_table``. The tile rows then also carry
the prefix length and the sequence's block-table row; a program first walks
the prefix in BLOCK_N-position blocks (positions may straddle pages: each
position's page is looked up on its own), then its local keys, one online
softmax over both. Compiled in only when given (PAGED).

Split keys. A launch of few programs (tiles times programs per tile, below
two per SM: a batch-1 block step is 32 of them on 132 SMs) would walk each
tile's keys serially, thousands of them under a long prefix, latency-bound.
Then each tile's key blocks (its prefix blocks, then its local blocks) are
cut into S contiguous chunks of ceil(blocks / S) blocks, one per program on
a third grid axis (SPLIT): a program runs the same online softmax over its
chunk only (a chunk past the last block has no keys) and stores its partial
(base-2 row max m, row sum l, unnormalised fp32 accumulator) in scratch; a
second kernel (``triton_split.py``) merges a tile's S partials, out =
sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i with M = max_i m_i, and
stores the real rows. S (``splits_of``, a power of two up to 16) is the
largest that keeps the launch within two programs per SM and every chunk at
256 keys or more, from the launch's tile count, programs per tile and most
keys of a sequence: pure host arithmetic, so a CUDA graph decides it when it
builds its shape (``kernels.tile_splits``), and the scratch is allocated
inside the capture, from the graph's pool. S = 1 runs the unsplit kernel,
compiled as it was before splits existed.
"""

from functools import lru_cache

import torch
import triton
import triton.language as tl

from vllm_omni.kernels.paged_kv import PagedPrefix, check_kv_cache
from vllm_omni.kernels.reference import SequenceBatch, check_kv_batch, long_tiles, tile_rows
from vllm_omni.kernels.triton_split import (
    max_keys, merge_splits, partials, sm_count, split_count)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # true fp32 products (no TF32) for float32 inputs
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _online_softmax_step(q, k, v, n_mask, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr,
                         MASKED: tl.constexpr = True):
    """Fold one block of keys ([HEAD_DIM, BLOCK_N]) and values ([BLOCK_N,
    HEAD_DIM]) into the running max, sum and accumulator. MASKED False: every
    key of the block is real (no select on the scores)."""
    s = _dot(q, k, None, IEEE) * qk_scale
    if MASKED:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    # A program's first block (of its sequence, or of its key split) holds a
    # real key (a tile exists only where there are keys, a split's blocks
    # are the sequence's), so m_new is finite from the first block on.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return m_new, l_i, acc


@triton.jit
def _bidir_attn_kernel(
    Q, K, V, O, Tiles, scale,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
    KVC, BlockTable, s_cp, s_ch, s_ct, s_bt, PartML, PartAcc,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    SEP_KV: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PACK: tl.constexpr, SPLIT: tl.constexpr,
):
    # Programs of one tile are adjacent (the head varies fastest): the query
    # heads of a KV head read its keys while they are in L2.
    tile = tl.program_id(1)
    if PACK:  # a program per KV head: row r is token r // GROUP of query head r % GROUP
        kv_head = tl.program_id(0)
        row_tok = tl.arange(0, BLOCK_M) // GROUP
        row_head = kv_head * GROUP + tl.arange(0, BLOCK_M) % GROUP
    else:  # a program per query head
        kv_head = tl.program_id(0) // GROUP
        row_tok = tl.arange(0, BLOCK_M)
        row_head = tl.program_id(0) + tl.zeros([BLOCK_M], dtype=tl.int32)
    if PAGED:  # rows (q start, q len, tile offset, kv start, kv len, prefix len, seq)
        row = Tiles + 7 * tile
    elif SEP_KV:  # rows (q start, q len, tile offset, kv start, kv len)
        row = Tiles + 5 * tile
    else:  # rows (start, len, tile offset): keys share the query rows
        row = Tiles + 3 * tile
    seq_start = tl.load(row).to(tl.int64)
    seq_len = tl.load(row + 1)
    m_off = tl.load(row + 2)
    if SEP_KV:
        kv_start = tl.load(row + 3).to(tl.int64)
        kv_len = tl.load(row + 4)
    else:
        kv_start = seq_start
        kv_len = seq_len

    offs_m = m_off + row_tok  # each row's token in the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < seq_len

    q_ptrs = (Q + (seq_start + offs_m)[:, None] * s_qt + row_head[:, None] * s_qh
              + offs_d[None, :])
    q = tl.load(q_ptrs, mask=m_mask[:, None], other=0.0)
    qk_scale = scale * 1.4426950408889634  # log2(e): softmax in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    prefix_len = 0
    if PAGED:
        prefix_len = tl.load(row + 5)
    # Whole blocks of local keys load and score without masks; the tail
    # block (if any) after them. Same order of blocks as one masked loop:
    # same sums.
    full = kv_len - kv_len % BLOCK_N
    # This program's keys: prefix positions [p_lo, p_hi), whole local blocks
    # from row n_lo to n_end, the tail block if ``tail``. Unsplit: all.
    p_lo, p_hi, n_lo, n_end, tail = 0, prefix_len, 0, full, full < kv_len
    if SPLIT:  # key blocks [lo, hi) of the prefix's blocks then the local ones
        prefix_blocks = (prefix_len + BLOCK_N - 1) // BLOCK_N
        blocks = prefix_blocks + (kv_len + BLOCK_N - 1) // BLOCK_N
        chunk = (blocks + tl.num_programs(2) - 1) // tl.num_programs(2)
        lo = tl.program_id(2) * chunk
        hi = tl.minimum(lo + chunk, blocks)
        p_lo, p_hi = lo * BLOCK_N, tl.minimum(hi * BLOCK_N, prefix_len)
        n_lo = tl.maximum(lo - prefix_blocks, 0) * BLOCK_N
        n_hi = tl.minimum(tl.maximum(hi - prefix_blocks, 0) * BLOCK_N, kv_len)
        n_end = tl.minimum(n_hi, full)
        # (an empty split past the last block has n_lo > full)
        tail = (full < n_hi) & (n_lo <= full)

    if PAGED:  # first the sequence's paged prefix: position p at page table[p // PAGE_SIZE]
        table = BlockTable + tl.load(row + 6).to(tl.int64) * s_bt
        c_base = KVC + kv_head * s_ch
        for n0 in range(p_lo, p_hi, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < prefix_len
            page = tl.load(table + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
            slot = c_base + page * s_cp + (pos % PAGE_SIZE) * s_ct  # [BLOCK_N] row pointers
            k = tl.load(slot[None, :] + offs_d[:, None], mask=n_mask[None, :], other=0.0)
            v = tl.load(slot[:, None] + HEAD_DIM + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            m_i, l_i, acc = _online_softmax_step(
                q, k.to(q.dtype), v.to(q.dtype), n_mask, m_i, l_i, acc, qk_scale, IEEE)

    k_base = K + kv_start * s_kt + kv_head * s_kh
    v_base = V + kv_start * s_vt + kv_head * s_vh
    for n0 in range(n_lo, n_end, BLOCK_N):
        rows = n0 + offs_n
        k = tl.load(k_base + rows[None, :] * s_kt + offs_d[:, None])  # [HEAD_DIM, BLOCK_N]
        v = tl.load(v_base + rows[:, None] * s_vt + offs_d[None, :])  # [BLOCK_N, HEAD_DIM]
        m_i, l_i, acc = _online_softmax_step(q, k, v, offs_n, m_i, l_i, acc, qk_scale, IEEE,
                                             False)
    if tail:
        rows = full + offs_n
        n_mask = rows < kv_len
        k = tl.load(k_base + rows[None, :] * s_kt + offs_d[:, None],
                    mask=n_mask[None, :], other=0.0)
        v = tl.load(v_base + rows[:, None] * s_vt + offs_d[None, :],
                    mask=n_mask[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step(q, k, v, n_mask, m_i, l_i, acc, qk_scale, IEEE)

    if SPLIT:  # this split's partial, for ``triton_split``'s merge
        part = (((tl.program_id(2) * tl.num_programs(1) + tile) * tl.num_programs(0)
                 + tl.program_id(0)) * BLOCK_M + tl.arange(0, BLOCK_M))
        ml_half = tl.num_programs(2) * tl.num_programs(1) * tl.num_programs(0) * BLOCK_M
        tl.store(PartML + part, m_i, mask=m_mask)
        tl.store(PartML + ml_half + part, l_i, mask=m_mask)
        tl.store(PartAcc + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=m_mask[:, None])
    else:
        out = acc / l_i[:, None]
        o_ptrs = (O + (seq_start + offs_m)[:, None] * s_ot + row_head[:, None] * s_oh
                  + offs_d[None, :])
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None])


@lru_cache(maxsize=256)
def _tile_table(batch: SequenceBatch, block_m: int, device: torch.device) -> torch.Tensor:
    rows = [
        (start, n, off)
        for start, n in zip(batch.starts, batch.lens)
        for off in range(0, n, block_m)
    ]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 3).to(device)


@lru_cache(maxsize=256)
def _kv_tile_table(
    batch: SequenceBatch, kv_batch: SequenceBatch, prefix_lens: tuple[int, ...] | None,
    block_m: int, device: torch.device,
) -> tuple[torch.Tensor, int]:
    """Tiles with key columns, and the number of k/v rows the layout needs."""
    check_kv_batch(batch, kv_batch, prefix_lens)
    rows = tile_rows(batch, kv_batch, prefix_lens, block_m)
    kv_end = max((s + n for s, n in zip(kv_batch.starts, kv_batch.lens)), default=0)
    width = 5 if prefix_lens is None else 7
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, width).to(device), kv_end


# Sequences of LONG_SEQ tokens on average (``reference.long_tiles``: an
# image's joint attention) take LONG_CONFIGS: bigger query tiles pay off once
# every sequence fills many of them; the text models' 128-600-token sequences
# keep _config.
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head_dim, 16-bit dtypes;
# picked by a sweep on an H100 (benchmarks/attention_kernel.py --sweep).
LONG_CONFIGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 4)}


def packs(group: int, long: bool = False) -> bool:
    """Whether a program takes all query heads of one KV head (GQA packing):
    a tile is then ``BLOCK_M // group`` tokens by ``group`` heads, so the
    short query blocks of the KV-cached modes (4-32 tokens) fill its rows and
    each KV head's keys are read once per tile, not once per query head.
    Needs a power-of-two group; long sequences (images, no GQA) keep theirs."""
    return group > 1 and group & (group - 1) == 0 and not long


def splits_of(num_tiles: int, num_heads: int, num_kv_heads: int, max_keys: int,
              device: torch.device, long: bool = False) -> int:
    """Key splits per tile of a launch (Split keys, above); a tile takes a
    program per KV head if GQA-packed, else per query head."""
    programs = num_kv_heads if packs(num_heads // num_kv_heads, long) else num_heads
    return split_count(num_tiles, programs, max_keys, sm_count(device))


def block_m_of(head_dim: int, dtype: torch.dtype, long: bool = False, group: int = 1) -> int:
    """Query tokens per tile, for building tile rows ahead of a launch."""
    block_m = _config(head_dim, dtype, long, group)[0]
    return block_m // group if packs(group, long) else block_m


def _config(head_dim: int, dtype: torch.dtype, long: bool = False,
            group: int = 1) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), picked by a sweep on an H100."""
    if packs(group, long):  # 4 tokens of every query head of a KV head (>= 16 rows)
        rows = min(max(16, 4 * group), 128)
        return (rows, 32, 4, 2) if dtype == torch.float32 else (rows, 64, 4, 3)
    if dtype == torch.float32:  # IEEE fp32 dots run on CUDA cores: small tiles
        return (32, 32, 4, 2) if head_dim > 64 else (64, 64, 4, 2)
    if long and head_dim in LONG_CONFIGS:
        return LONG_CONFIGS[head_dim]
    return (64, 32, 4, 2) if head_dim > 128 else (64, 64, 4, 3)


def bidirectional_attention_triton(
    q: torch.Tensor,  # [q_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [kv_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [kv_tokens, num_kv_heads, head_dim]
    batch: SequenceBatch,
    scale: float,
    kv_batch: SequenceBatch | None = None,
    out: torch.Tensor | None = None,
    prefix: PagedPrefix | None = None,
    config: tuple[int, int, int, int] | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """``config``: (BLOCK_M, BLOCK_N, num_warps, num_stages), for sweeps;
    default ``_config``'s choice. ``splits``: key splits per tile (1: the
    unsplit kernel); default ``splits_of``'s choice."""
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == v.shape and k.shape[2] == head_dim
    assert kv_batch is not None or k.shape[0] == tokens, \
        "without kv_batch, k/v must have q's rows"
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert q.dtype == k.dtype == v.dtype, "q, k, v must share a dtype"
    assert 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0, \
        "head_dim must be a power of two in 16..256"
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(-1) == 1
    group = num_heads // num_kv_heads
    long = prefix is None and kv_batch is None and long_tiles(sum(batch.lens), len(batch.lens))
    if config is None:
        config = _config(head_dim, q.dtype, long, group)
    # Query tokens per tile (GQA packing: ``packs``).
    block_m = config[0] // group if packs(group, long) else config[0]
    if prefix is not None and kv_batch is None:
        kv_batch = batch
    if kv_batch is None:
        tiles = _tile_table(batch, block_m, q.device)
    else:
        tiles, kv_end = _kv_tile_table(
            batch, kv_batch, prefix.lens if prefix else None, block_m, q.device)
        assert k.shape[0] >= kv_end, f"kv_batch needs {kv_end} k/v rows, got {k.shape[0]}"
    if tiles.shape[0] == 0:
        return out
    if splits is None:
        splits = splits_of(tiles.shape[0], num_heads, num_kv_heads,
                           max_keys(batch, kv_batch, prefix.lens if prefix else None),
                           q.device, long)
    if prefix is None:
        return _launch(q, k, v, out, tiles, scale, kv_batch is not None, config=config,
                       long=long, splits=splits)
    return _launch(q, k, v, out, tiles, scale, True, prefix.kv_cache, prefix.block_table,
                   config, long, splits)


def paged_attention_with_tiles(q, k, v, tiles, scale, kv_cache, block_table,
                               long: bool = False, splits: int = 1) -> torch.Tensor:
    """The paged variant on a prebuilt tile table (7 columns, from
    ``tile_rows`` with ``block_m_of(..., long, group)`` queries per tile; tiles with
    no queries do nothing), with no host-side work that depends on the data:
    what a CUDA graph captures. ``splits``: key splits per tile, decided by
    the caller when it built the table (``splits_of``)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    group = q.shape[1] // k.shape[1]
    return _launch(q, k, v, out, tiles, scale, True, kv_cache, block_table,
                   _config(q.shape[2], q.dtype, long, group), long, splits)


def _launch(q, k, v, out, tiles, scale, sep_kv, kv_cache=None, block_table=None, config=None,
            long=False, splits=1):
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    block_m, block_n, num_warps, num_stages = config or _config(head_dim, q.dtype, long, group)
    if kv_cache is None:  # unused pointer arguments: the kernel is compiled without them
        cache, table, cache_strides, page_size = q, tiles, (0, 0, 0, 0), 1
    else:
        cache, table = kv_cache, block_table
        check_kv_cache(cache, num_kv_heads, head_dim)
        assert cache.stride(-1) == 1, "kv_cache's last dim must be contiguous"
        assert table.dtype == torch.int32 and table.is_contiguous(), "block_table: contiguous int32"
        cache_strides = (cache.stride(0), cache.stride(1), cache.stride(2), table.stride(0))
        page_size = cache.shape[2]
    pack = packs(group, long)
    num_tiles, programs = tiles.shape[0], num_kv_heads if pack else num_heads
    assert num_tiles < 65536, "more than 65535 query tiles in one launch"
    assert 1 <= splits < 65536, f"bad key split count {splits}"
    if splits == 1:  # unused pointer arguments
        grid, (part_ml, part_acc) = (programs, num_tiles), (q, q)
    else:
        grid = (programs, num_tiles, splits)
        part_ml, part_acc = partials(splits, num_tiles, programs, block_m, head_dim, q.device)
    _bidir_attn_kernel[grid](
        q, k, v, out, tiles, float(scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        cache, table, *cache_strides, part_ml, part_acc,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, SEP_KV=sep_kv,
        PAGED=kv_cache is not None, PAGE_SIZE=page_size, PACK=pack, SPLIT=splits > 1,
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        row_width = 7 if kv_cache is not None else 5 if sep_kv else 3
        merge_splits(out, tiles, part_ml, part_acc, group, pack, row_width)
    return out
