"""Decode attention of Helium (one new token per slot) over a paged KV cache: RoPE, the write of the new
key and value into their page, and sliding-window attention over the slot's live window, in one launch.

Shapes (S slots in the cache, the first B of them in this call; slot b is row b everywhere):
    qkv         [B, 3 * H * D]       the new token's fused projection, laid out (q | k | v), each (head, dim)
    k_pool      [P, H, PAGE, D]      one layer's key pages (after RoPE), shared by every slot: qkv's dtype,
                                     another float dtype, or float8_e4m3fn (an 8-bit cache, see below)
    v_pool      [P, H, PAGE, D]      the same layer's value pages, same layout and dtype
    page_table  [S, N] int32         slot b's ring of N pages: position p lives in page
                                     page_table[b, (p // PAGE) % N] at row p % PAGE
    positions   [S] int32/int64      the new token's absolute position per slot
    exec_mask   [S] bool             slots that run this step; the others write nothing and read nothing
    out         [B, H * D]           qkv's dtype; rows of slots that do not run are left as they are

Semantics (Kyutai's RingKVCache + window mask with absolute positions): the query at position q sees the
key at position p iff 0 <= q - p < context, and that includes its own new key (causal, delta 0): the new
key is written before attending. So the live window is positions [max(0, q - context + 1), q], that is
min(q + 1, context) keys, and only those are read. The ring must hold the window (N * PAGE >= context):
then the window's positions sit in distinct rows, and the row the new key takes held position
q - N * PAGE, which no query sees again. RoPE rotates interleaved pairs (x[2i], x[2i+1]) by
position * max_period^(-2i/D) in fp32 and casts back to the activation dtype, for q and the new k (the
reference's rounding); scale 1/sqrt(D); scores, softmax and the weighted sum in fp32. The new key and value
enter the pools as reference.attention.to_cache_dtype rounds them from the activation dtype (for an 8-bit
cache: saturated to +-448, then rounded to e4m3), and the new token attends to itself through those stored
values too, as the reference reads them back.

Design, for Helium's regime (H = 32, D = 128, context 3000, bf16, B = 1..64):
  * Grid (SPLITS, B * H). Program (split, slot * H + head) takes a contiguous run of the live window:
    split s covers positions first + [s * chunk, (s + 1) * chunk) with chunk = cdiv(live, SPLITS) rounded
    up to BLOCK_N, so a short window spreads over fewer, still full, blocks, and programs past the window
    exit at once. SPLITS is fixed at launch from static sizes (B, H, the context and the device); only
    chunk comes from device data, so a CUDA graph stays valid as positions grow. Defaults on an H200
    (132 SMs, up to PROGRAMS_PER_SM programs each): B = 1: 16 splits, grid (16, 32); B = 8: 2 splits, grid
    (2, 256); B = 64: no split, grid (1, 2048). `tiles` overrides them for a sweep
    (paged_attention_candidate_tiles).
  * One pass with an online softmax over blocks of BLOCK_N positions. Each position's row is found
    through the page table (one int32 per position, cached), so blocks need not align with pages. For
    T = 1 there is one query row per head. With 16-bit pools (the default there) scores and weighted
    values go through tl.dot on the query repeated to 16 rows: the wasted tensor-core work is free, and
    Triton then copies the gathered K and V tiles into shared memory asynchronously (cp.async); below 5
    stages its pipeline holds one block of them, requesting a program's next block after the current
    block's products (Nsight Compute at B = 1: 55% of DRAM bandwidth). Deeper pipelines (faster alone at
    B = 8) and the next block loaded into registers ahead of the products were each slower in the frame, or
    no faster (bench/RESULTS.md, 2026-12-06 eleventh session). Otherwise (fp32 pools, or
    tiles' "dot": False) scores are a broadcast multiply and a row sum over D, and the weighted values
    a broadcast multiply and a column sum, each block's loads waited for in turn. tiles' "dot_values":
    False keeps the scores on the tensor cores and the weighted values on the FMA path: an 8-bit value
    tile as tl.dot's right operand runs along K across rows, which Triton reads from shared memory a
    byte at a time, while the broadcast multiply loads it in 16-byte vectors (the sweep decides).
  * The new token does not go through memory on its way to its own query: the program whose run holds
    position q starts its softmax state from the new key and value in registers and stores them into
    their row. No other program reads that row this step, so the store races with nothing.
  * Splits combine through a SplitWorkspace: each split stores its (max, sum, unnormalised weighted
    values); the last to arrive for a (slot, head) rescales and sums the partials in split order
    (deterministic), writes `out` and resets the counter to 0. The number of arrivals waited for is the
    number of splits that hold live keys, which every program of the pair computes alike. A window that
    fits one split skips the workspace.
Graph-safe: positions, page tables and the execution mask are read from device memory; nothing is
allocated when `out` and `workspace` are given. The position advance is not done here: every layer of a
step reads the same positions, and the cache adds the execution mask once after the last layer
(moshi_fast.cache.PagedKVCache.advance).

Floor, per layer and step: live keys and values (min(q + 1, context) x H x D x 2 x 2 bytes in bf16: 49 MB
a slot at a full window of 3000; half that with an 8-bit cache, whose tiles widen exactly to fp16 in
registers before the tensor-core products) + qkv + out. On an H200 (~4.2 TB/s copy) that is ~12 us per slot
and layer at a full window, ~0.4 ms for the 32 layers; B = 64 full windows: ~0.75 ms per layer. At 100 live keys
(1.6 MB a slot) the launch and the chain of dependent loads (position, page table, keys, then the
partials) dominate.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moshi_fast.reference.attention import to_cache_dtype

from ._utils import (SplitWorkspace, await_previous_kernel, combine_softmax_partials, interpreting, next_pow2,
                     parallel_sms, pdl, split_buffers)
from .ring_attention import _rope
from .tuned import shape_key, tuned_tiles

PROGRAMS_PER_SM = 4
"""Programs per SM the default split count aims for: enough resident (slot, head) runs to keep HBM busy."""
MIN_SPLIT_KEYS = 128
"""Fewest window positions per split at a full window: shorter runs cost more in partials than they save."""
MAX_BLOCK_N = 64
"""Default block of positions per loop iteration: K and V tiles of 64 x 128 elements (64 fp32 registers a
thread each at 4 warps)."""
TILE_PER_THREAD = 64
"""Tile elements a thread holds when the launcher picks the warps."""
DOT_ROWS: tl.constexpr = tl.constexpr(16)
"""tl.dot's fewest rows: the tensor-core path repeats the query this many times."""


def paged_attention_ref(qkv, k_pool, v_pool, page_table, positions, exec_mask, context, max_period, out=None):
    """Torch reference, the spec: RoPE, the page write of the running slots, then SDPA in fp32 over the
    window gathered through the page table and masked by 0 <= q - p < context."""
    batch = qkv.shape[0]
    _, heads, page_size, head_dim = k_pool.shape
    pages_per_slot = page_table.shape[1]
    if out is None:
        out = torch.zeros(batch, heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    running = exec_mask[:batch].bool().nonzero()[:, 0]
    if running.numel() == 0:
        return out
    tables = page_table[running].long()
    query_pos = positions[running].long()
    q, k, v = qkv[running].view(-1, 3, heads, 1, head_dim).unbind(1)
    q, k = _rope(q, query_pos[:, None], max_period), _rope(k, query_pos[:, None], max_period)

    def locate(key_pos):
        return tables.gather(1, (key_pos // page_size) % pages_per_slot), key_pos % page_size

    new_page, new_row = locate(query_pos[:, None])
    k_pool[new_page[:, 0], :, new_row[:, 0]] = to_cache_dtype(k[:, :, 0], k_pool.dtype)
    v_pool[new_page[:, 0], :, new_row[:, 0]] = to_cache_dtype(v[:, :, 0], v_pool.dtype)
    key_pos = query_pos[:, None] - torch.arange(context, device=qkv.device)
    visible = key_pos >= 0
    page, row = locate(key_pos.clamp(min=0))
    keys = k_pool[page, :, row].transpose(1, 2).float()
    values = v_pool[page, :, row].transpose(1, 2).float()
    y = torch.nn.functional.scaled_dot_product_attention(q.float(), keys, values, visible[:, None, None, :])
    out[running] = y.reshape(-1, heads * head_dim).to(out.dtype)
    return out


@triton.jit
def _to_cache(x, cache_dtype: tl.constexpr, E4M3: tl.constexpr):
    """x (the activation dtype) as the cache stores it (reference.attention.to_cache_dtype): a cast, or for an
    e4m3 cache saturation to +-448 and rounding to nearest even on the e4m3 grid in fp32 (then the cast is
    exact: Triton's interpreter rounds fp8 casts otherwise than the GPU and torch)."""
    if E4M3:
        x = tl.clamp(x.to(tl.float32), -448.0, 448.0)
        bits = x.to(tl.int32, bitcast=True)
        # Three mantissa bits: the grid step is 2^(e - 3) for magnitudes in [2^e, 2^(e+1)), e >= -6, and 2^-9
        # below 2^-6 (subnormals). Steps are powers of two, so scaling by them is exact.
        exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
        step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
        inverse_step = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
        # Round half to even to an integer: adding and removing 1.5 * 2^23 (|x| / step is at most 16).
        magnitude = ((tl.abs(x) * inverse_step + 12582912.0) - 12582912.0) * step
        x = (magnitude.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return x.to(cache_dtype)


@triton.jit
def _window_block(k_pool_ptr, v_pool_ptr, table, key_pos, stop, head_offset, stride_pool_page, stride_pool_row,
                  offs_d, PAGE_SIZE: tl.constexpr, PAGES_PER_SLOT: tl.constexpr):
    """Keys and values [BLOCK_N, D] of window positions key_pos (those < stop; the others read as 0), each
    row found through the slot's page table, and the mask of the positions read."""
    mask_n = key_pos < stop
    pages = tl.load(table + (key_pos // PAGE_SIZE) % PAGES_PER_SLOT, mask=mask_n, other=0).to(tl.int64)
    rows = pages * stride_pool_page + head_offset + (key_pos % PAGE_SIZE) * stride_pool_row
    keys = tl.load(k_pool_ptr + rows[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
    values = tl.load(v_pool_ptr + rows[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
    return keys, values, mask_n


@triton.jit
def _dot_queries(query_rounded, HEAD_DIM: tl.constexpr, E4M3: tl.constexpr):
    """The query row repeated over tl.dot's DOT_ROWS rows, in the dtype of the tensor-core operands: the activation
    dtype, or fp16 with an e4m3 cache. e4m3 widens to fp16 in one packed conversion a pair of values (to bf16 it
    takes a second, quarter-rate one per value, and those conversions, not the bytes, then bound the loop); fp16
    holds every e4m3 value and every bf16 query in [2^-17, 65504] exactly, so the products are the same. Queries
    beyond fp16's range saturate there."""
    if E4M3:
        query_rounded = tl.clamp(query_rounded.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return tl.broadcast_to(query_rounded[None, :], (DOT_ROWS, HEAD_DIM))


@triton.jit
def _paged_attention_kernel(
    qkv_ptr, k_pool_ptr, v_pool_ptr, page_table_ptr, positions_ptr, exec_mask_ptr, out_ptr,
    partials_ptr, counters_ptr,
    stride_qkv_b, stride_out_b, stride_table_b,
    stride_pool_page, stride_pool_head, stride_pool_row,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, CONTEXT: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGES_PER_SLOT: tl.constexpr, LOG_PERIOD: tl.constexpr, QK_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, DOT: tl.constexpr, DOT_VALUES: tl.constexpr,
    E4M3: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    split = tl.program_id(0)
    pair = tl.program_id(1)
    pid_b = pair // HEADS
    pid_h = pair % HEADS
    runs = tl.load(exec_mask_ptr + pid_b).to(tl.int32)
    position = tl.load(positions_ptr + pid_b)
    first = tl.maximum(position - CONTEXT + 1, 0)
    live = position - first + 1
    # cdiv written out: each jitted helper call costs milliseconds in the interpreter.
    chunk = ((live + SPLITS - 1) // SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    active_splits = (live + chunk - 1) // chunk
    if (runs == 0) | (split >= active_splits):
        return
    start = first + split * chunk
    holds_new = start + chunk > position
    # [D] mask for the new row's store: Triton's interpreter mishandles scalar masks.
    offs_d = tl.arange(0, HEAD_DIM)
    mask_new = offs_d < tl.where(holds_new, HEAD_DIM, 0)

    freqs = tl.exp((offs_d // 2).to(tl.float32) * (-LOG_PERIOD * 2.0 / HEAD_DIM))
    angles = position.to(tl.float32) * freqs
    cos, sin = tl.cos(angles), tl.sin(angles)
    # Interleaved pairs: element d turns with its partner d ^ 1 (even: re cos - im sin, odd: im cos + re sin).
    # Rows load contiguously, not as strided even/odd halves; the partner load hits the same lines.
    signed_sin = tl.where(offs_d % 2 == 1, sin, -sin)
    token_row = qkv_ptr + pid_b * stride_qkv_b + pid_h * HEAD_DIM
    key_row = token_row + HEADS * HEAD_DIM
    query = tl.load(token_row + offs_d).to(tl.float32) * cos + tl.load(token_row + (offs_d ^ 1)) * signed_sin
    key_new = tl.load(key_row + offs_d).to(tl.float32) * cos + tl.load(key_row + (offs_d ^ 1)) * signed_sin
    # RoPE's result is rounded to the activation / cache dtype, as the reference stores and attends with it;
    # QK_SCALE folds 1/sqrt(D) and log2(e) into the query so the softmax runs on exp2.
    query_rounded = query.to(qkv_ptr.dtype.element_ty)
    query = query_rounded.to(tl.float32) * QK_SCALE
    key_new = _to_cache(key_new.to(qkv_ptr.dtype.element_ty), k_pool_ptr.dtype.element_ty, E4M3)
    value_new = _to_cache(tl.load(token_row + 2 * HEADS * HEAD_DIM + offs_d), v_pool_ptr.dtype.element_ty, E4M3)

    table = page_table_ptr + pid_b * stride_table_b
    head_offset = pid_h * stride_pool_head
    # int64 page offsets: one layer's pool of Helium pages passes 2^31 elements beyond ~170 slots.
    new_page = tl.load(table + (position // PAGE_SIZE) % PAGES_PER_SLOT).to(tl.int64)
    new_offset = new_page * stride_pool_page + head_offset + (position % PAGE_SIZE) * stride_pool_row + offs_d
    tl.store(k_pool_ptr + new_offset, key_new, mask=mask_new)
    tl.store(v_pool_ptr + new_offset, value_new, mask=mask_new)

    # The softmax state starts from the new key where this run holds it (weight exp2(0) = 1), else empty.
    # Every other run holds at least one old key, so its running max is finite after the first block.
    score_new = tl.sum(query * key_new.to(tl.float32), axis=0)
    m_i = tl.where(holds_new, score_new, float("-inf"))
    l_i = tl.where(holds_new, 1.0, 0.0)
    acc = tl.where(mask_new, value_new.to(tl.float32), 0.0)
    stop = tl.minimum(start + chunk, position)
    offs_n = tl.arange(0, BLOCK_N)
    if DOT and DOT_VALUES:
        # The one query row repeated over tl.dot's 16-row minimum: every row carries the same softmax
        # state, and row 0 is kept at the end. The tensor cores have time to spare at T = 1; what this
        # buys is that Triton copies the K and V loads that feed tl.dot asynchronously through shared memory
        # (cp.async; one block in flight below 5 stages), where the FMA loop below waits for each block's
        # loads in registers.
        is_row0 = tl.arange(0, DOT_ROWS) == 0
        queries = _dot_queries(query_rounded, HEAD_DIM, E4M3)
        m_rows = tl.broadcast_to(m_i, (DOT_ROWS,))
        l_rows = tl.broadcast_to(l_i, (DOT_ROWS,))
        acc_rows = tl.broadcast_to(acc[None, :], (DOT_ROWS, HEAD_DIM))
        for block_start in range(start, stop, BLOCK_N):
            keys, values, mask_n = _window_block(k_pool_ptr, v_pool_ptr, table, block_start + offs_n, stop,
                                                 head_offset, stride_pool_page, stride_pool_row, offs_d,
                                                 PAGE_SIZE, PAGES_PER_SLOT)
            # An 8-bit cache's tiles widen (exactly) to the operands' dtype for the tensor cores.
            keys = keys.to(queries.dtype)
            values = values.to(queries.dtype)
            scores = tl.dot(queries, tl.trans(keys)) * QK_SCALE
            scores = tl.where(mask_n[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_rows, tl.max(scores, axis=1))
            rescale = tl.exp2(m_rows - m_new)
            weights = tl.exp2(scores - m_new[:, None])
            acc_rows = acc_rows * rescale[:, None] + tl.dot(weights.to(values.dtype), values)
            l_rows = l_rows * rescale + tl.sum(weights, axis=1)
            m_rows = m_new
        acc = tl.sum(tl.where(is_row0[:, None], acc_rows, 0.0), axis=0)
        l_i = tl.sum(tl.where(is_row0, l_rows, 0.0), axis=0)
        m_i = tl.max(tl.where(is_row0, m_rows, float("-inf")), axis=0)
    else:
        if DOT:
            queries = _dot_queries(query_rounded, HEAD_DIM, E4M3)
        for block_start in range(start, stop, BLOCK_N):
            keys, values, mask_n = _window_block(k_pool_ptr, v_pool_ptr, table, block_start + offs_n, stop,
                                                 head_offset, stride_pool_page, stride_pool_row, offs_d,
                                                 PAGE_SIZE, PAGES_PER_SLOT)
            if DOT:
                # Scores on the tensor cores (the keys' rows are the K-contiguous operand they want, and their
                # loads pipeline); every row of the product is the one query's, so the max over rows is row 0.
                scores = tl.max(tl.dot(queries, tl.trans(keys.to(queries.dtype))), axis=0) * QK_SCALE
            else:
                scores = tl.sum(keys.to(tl.float32) * query[None, :], axis=1)
            scores = tl.where(mask_n, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            rescale = tl.exp2(m_i - m_new)
            weights = tl.exp2(scores - m_new)
            acc = acc * rescale + tl.sum(weights[:, None] * values.to(tl.float32), axis=0)
            l_i = l_i * rescale + tl.sum(weights, axis=0)
            m_i = m_new

    out_row = out_ptr + pid_b * stride_out_b + pid_h * HEAD_DIM + offs_d
    if SPLITS == 1:
        tl.store(out_row, (acc / l_i).to(out_ptr.dtype.element_ty))
    else:
        if active_splits == 1:
            tl.store(out_row, (acc / l_i).to(out_ptr.dtype.element_ty))
        else:
            stats_ptr = partials_ptr + tl.num_programs(1) * SPLITS * HEAD_DIM
            partial = pair * SPLITS + split
            tl.store(partials_ptr + partial * HEAD_DIM + offs_d, acc)
            tl.store(stats_ptr + 2 * partial, m_i)
            tl.store(stats_ptr + 2 * partial + 1, l_i)
            # Every thread's partial stores precede the program's single release arrival.
            tl.debug_barrier()
            arrived = tl.atomic_add(counters_ptr + pair, 1, sem="acq_rel", scope="gpu")
            if arrived == active_splits - 1:
                offs_s = tl.arange(0, BLOCK_S)
                has_split = offs_s < active_splits
                # Every active split holds a key, so every max is finite and so is their maximum.
                combined = combine_softmax_partials(stats_ptr, partials_ptr, pair * SPLITS + offs_s, has_split,
                                                    offs_d, HEAD_DIM, True)
                tl.store(out_row, combined.to(out_ptr.dtype.element_ty))
                tl.store(counters_ptr + pair, 0)


def _programs_wanted(device: torch.device | None = None) -> int:
    """PROGRAMS_PER_SM per SM; one where programs run one after another (the interpreter)."""
    sms = parallel_sms(device)
    return PROGRAMS_PER_SM * sms if sms > 1 else 1


def _default_block_n(context: int) -> int:
    return min(MAX_BLOCK_N, triton.next_power_of_2(context))


def _warps_for(block_n: int, head_dim: int) -> int:
    return min(8, max(1, block_n * head_dim // (32 * TILE_PER_THREAD)))


def tuned_plan(batch: int, heads: int, head_dim: int, context: int, kv_dtype: torch.dtype | None = None) -> dict:
    """The measured plan (kernels/tuned.py) for this shape and batch, {} where there is none. An 8-bit cache
    moves half the bytes per block and has plans of its own (key: the shape and the pools' dtype); where it has
    none it takes the 16-bit cache's."""
    if kv_dtype is not None and kv_dtype.itemsize == 1:
        plan = tuned_tiles("paged_attention", shape_key(heads, head_dim, context, kv_dtype), batch)
        if plan is not None:
            return plan
    return tuned_tiles("paged_attention", shape_key(heads, head_dim, context), batch) or {}


def _resolve_tiles(batch: int, heads: int, head_dim: int, context: int, tiles: dict | None,
                   programs_wanted: int, kv_dtype: torch.dtype | None = None) -> tuple[int, int, int, int | None]:
    """(BLOCK_N, SPLITS, num_warps, num_stages or None): `tiles` entries override the defaults, which are
    the measured plan where kernels/tuned.py has one for this shape, batch and pool dtype (tuned_plan), else
    these heuristics: as many splits as keep B * H * splits within the programs wanted, but no run shorter
    than MIN_SPLIT_KEYS at a full window; blocks of MAX_BLOCK_N positions; warps for TILE_PER_THREAD."""
    if tiles is None:
        tiles = tuned_plan(batch, heads, head_dim, context, kv_dtype)
    block_n = tiles.get("block_n") or _default_block_n(context)
    if block_n < 2 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 2, got {block_n}")
    splits = tiles.get("splits")
    if splits is None:
        splits = min(programs_wanted // (batch * heads), triton.cdiv(context, MIN_SPLIT_KEYS))
    splits = max(1, splits)
    return block_n, splits, tiles.get("num_warps") or _warps_for(block_n, head_dim), tiles.get("num_stages")


def _use_dot(dtype: torch.dtype, block_n: int, head_dim: int, tiles: dict) -> bool:
    """The tensor-core loop for 16-bit activations (dtype; the pools are the same, or e4m3, widened to fp16;
    the plan's "dot" overrides it); tl.dot needs blocks of 16, and Triton's interpreter multiplies bf16
    tl.dot operands wrongly, so there bf16 takes the FMA loop."""
    dot = tiles.get("dot")
    if dot is None:
        dot = dtype in (torch.bfloat16, torch.float16) and not (interpreting() and dtype == torch.bfloat16)
    if dot and (block_n < 16 or head_dim < 16 or dtype == torch.float32):
        if tiles.get("dot"):
            raise ValueError(f"the tensor-core loop needs 16-bit activations and block_n, head_dim >= 16 "
                             f"(got {dtype}, {block_n}, {head_dim})")
        return False
    return dot


def _workspace_size(batch: int, heads: int, head_dim: int, splits: int) -> tuple[int, int]:
    if splits == 1:
        return 0, 0
    return batch * heads * splits * (head_dim + 2), batch * heads


def paged_attention_workspace_size(batch: int, heads: int, head_dim: int, context: int,
                                   tiles: dict | None = None, kv_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(partial floats, counters) for SplitWorkspace: the launcher's plan on the current device for pools of
    kv_dtype (None: a 16-bit cache), or `tiles`. (0, 0) when the window is not split: no workspace is needed."""
    programs_wanted = _programs_wanted()
    _, splits, _, _ = _resolve_tiles(batch, heads, head_dim, context, tiles, programs_wanted, kv_dtype)
    return _workspace_size(batch, heads, head_dim, splits)


def paged_attention_candidate_tiles(batch: int, heads: int, head_dim: int, context: int) -> list[dict]:
    """At most 10 plans for a GPU sweep: the current device's default, then one knob moved at a time:
    half and twice the splits, half and twice the block, half and twice the warps, 2 and 4 pipeline
    stages, the FMA loop instead of the tensor-core one (16-bit pools)."""
    block_n, splits, num_warps, _ = _resolve_tiles(batch, heads, head_dim, context, None,
                                                   _programs_wanted())
    default = {"block_n": block_n, "splits": splits, "num_warps": num_warps}
    candidates = [default]
    for key, value in (("splits", max(1, splits // 2)), ("splits", splits * 2), ("block_n", block_n // 2),
                       ("block_n", block_n * 2), ("num_warps", num_warps // 2), ("num_warps", num_warps * 2),
                       ("num_stages", 2), ("num_stages", 4), ("dot", False)):
        candidate = {**default, key: value}
        usable = (key == "dot" or value >= 1) and candidate["block_n"] >= 2 and candidate["num_warps"] <= 16
        if usable and candidate not in candidates:
            candidates.append(candidate)
    return candidates[:10]


def paged_attention(qkv: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, page_table: torch.Tensor,
                    positions: torch.Tensor, exec_mask: torch.Tensor, context: int, max_period: float,
                    out: torch.Tensor | None = None, workspace: SplitWorkspace | None = None,
                    tiles: dict | None = None) -> torch.Tensor:
    """Launcher. Shapes in the module docstring; k_pool/v_pool are one layer's pools (e.g.
    PagedKVCache.layer(i)). `workspace` (from paged_attention_workspace_size) is used when the window is
    split; a fresh one is allocated if it is None. `tiles` ({"block_n", "splits", "num_warps",
    "num_stages", "dot", "dot_values"}, see paged_attention_candidate_tiles and the module docstring) overrides
    the defaults."""
    batch, width = qkv.shape
    _, heads, page_size, head_dim = k_pool.shape
    slots, pages_per_slot = page_table.shape
    if width != 3 * heads * head_dim or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [B, {3 * heads * head_dim}] with unit stride in its last dim")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    if k_pool.stride(-1) != 1 or v_pool.shape != k_pool.shape or v_pool.stride() != k_pool.stride():
        raise ValueError("k_pool and v_pool must share a shape and layout with unit stride in the head dim")
    if v_pool.dtype != k_pool.dtype:
        raise ValueError(f"k_pool and v_pool must share a dtype, got {k_pool.dtype} and {v_pool.dtype}")
    if pages_per_slot * page_size < context:
        raise ValueError(f"a ring of {pages_per_slot} pages of {page_size} cannot hold a window of {context}")
    if page_table.dtype != torch.int32 or page_table.stride(-1) != 1:
        raise ValueError("page_table must be int32 with unit stride in its last dim")
    if positions.dtype not in (torch.int32, torch.int64) or exec_mask.dtype != torch.bool:
        raise ValueError("positions must be int32 or int64 and exec_mask bool")
    if min(slots, positions.numel(), exec_mask.numel()) < batch:
        raise ValueError(f"page_table, positions and exec_mask must cover the {batch} slots of qkv")
    if out is None:
        out = torch.empty(batch, heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    if out.shape != (batch, heads * head_dim) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{batch}, {heads * head_dim}] with unit stride in its last dim")
    if tiles is None:
        tiles = tuned_plan(batch, heads, head_dim, context, k_pool.dtype)
    block_n, splits, num_warps, num_stages = _resolve_tiles(batch, heads, head_dim, context, tiles,
                                                            _programs_wanted(qkv.device))
    dot = _use_dot(qkv.dtype, block_n, head_dim, tiles)
    partials, arrivals = split_buffers(workspace, *_workspace_size(batch, heads, head_dim, splits), splits, out)
    launch_options = {"num_warps": num_warps}
    if num_stages is not None:
        launch_options["num_stages"] = num_stages
    use_pdl = pdl(qkv.device, "paged_attention")
    _paged_attention_kernel[(splits, batch * heads)](
        qkv, k_pool, v_pool, page_table, positions, exec_mask, out, partials, arrivals,
        qkv.stride(0), out.stride(0), page_table.stride(0),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        HEADS=heads, HEAD_DIM=head_dim, CONTEXT=context, PAGE_SIZE=page_size, PAGES_PER_SLOT=pages_per_slot,
        LOG_PERIOD=math.log(max_period), QK_SCALE=head_dim ** -0.5 * math.log2(math.e),
        BLOCK_N=block_n, SPLITS=splits, BLOCK_S=next_pow2(splits, minimum=2), DOT=dot,
        DOT_VALUES=bool(tiles.get("dot_values", True)),
        E4M3=k_pool.dtype == torch.float8_e4m3fn, PDL=use_pdl, launch_pdl=use_pdl, **launch_options,
    )
    return out
