"""Streaming attention over a ring KV cache for Mimi's transformers: RoPE, the ring write and the
sliding-window causal attention of T new steps in one launch.

Shapes:
    qkv      [B, T, 3 * H * D]   projections of the T new steps, laid out (q | k | v), each (head, dim);
                                 T <= MAX_STEPS
    ring_k   [B, H, R, D]        keys after RoPE, at slot position % R (R = the attention context)
    ring_v   [B, H, R, D]
    frame    [B] int             frames this slot has processed: the new steps sit at positions
                                 frame * T + t (absolute positions, as Kyutai's RoPE uses)
    out      [B, T, H * D]

Semantics (Kyutai's RingKVCache with capacity = context): the T new keys are written before
attending, so ring slot s holds the newest position p = s (mod R) with p < frame * T + T. A query
at position q sees keys p with p written and 0 <= q - p < R. RoPE rotates interleaved pairs
(x[2i], x[2i+1]) by position * max_period^(-2i/D), in fp32.

Design, for Mimi's regime (T = 2 new steps, R = 250, D = 64, H = 8, fp32): per (slot, head) the work
is one pass over 2 * R * D floats of ring with T query vectors: far too little for tensor cores
(tl.dot pads the T rows to 16 and takes three tf32 passes) and too little per program for a loop of
dependent blocks. So:
  * Grid (SPLITS, B * H). Program (split, slot * H + head) loads ring rows [split * BLOCK_R,
    split * BLOCK_R + BLOCK_R) of K and V as two [BLOCK_R, D] tiles, both requested at once together
    with the frame counter (one memory latency, no chain). SPLITS = cdiv(R, BLOCK_R): the whole ring
    in one program when B * H alone fills the GPU, narrower blocks when it does not. On an H200
    (132 SMs): B = 1: BLOCK_R = 16, 1 warp, grid (16, 8); B = 8: BLOCK_R = 64, 4 warps, grid (4, 64);
    B = 64: BLOCK_R = 256, 16 warps, grid (1, 512). `tiles` overrides this for a sweep
    (ring_attention_candidate_tiles).
  * Exact fp32 on the CUDA cores: a query against the key tile is a broadcast multiply and a row
    sum, the weighted values a broadcast multiply and a column sum. The T query rows are unrolled (a
    static loop) over the same tiles in registers. Few warps per program keep these reductions within
    a warp (shuffles instead of shared-memory round trips).
  * The stored keys are already rotated (interleaved pairs), so q_rot . k_rot is a plain dot over D:
    the query is rotated like the new key (element d with its partner d ^ 1), and the ring rows load
    contiguously (16-byte vectors), not as strided even/odd halves.
  * The tile becomes the ring after this call's write: step t replaces, in registers, the row it
    overwrites, and the visibility rule is then one rule for all rows. After the write, slot s holds
    position newest - age(s) with newest = frame * T + T - 1 and age = (newest - s) mod R; query t sees
    the rows that were written (age <= newest) and are not later than itself (age >= T - 1 - t). Rows
    of the tile that are not visible old entries are never trusted: scores masked, values zeroed
    (a reused slot's ring can hold anything, even NaN).
  * The ring write: the program whose block holds the row stores the step's rotated key and value
    into it, after a barrier that orders the block's loads first. Blocks are disjoint, so no other
    program reads that memory.
  * Splits combine through a SplitWorkspace: each split stores its per-query (max, sum, weighted
    values); the last to arrive for a (slot, head) rescales and sums the SPLITS partials in split
    order (deterministic), writes `out` and resets the counter to 0.
Graph-safe: every per-slot value (frame) comes from device memory; tiles and splits depend only on
shapes and the device. A slot that does not execute (frame not advanced) rewrites the same ring rows
next time, before they can be read, so no execution mask is needed.

Floor: the whole ring is read at steady state: 2 * R * D * H * 4 bytes per slot (1 MB for Mimi), plus
qkv and out: about 15 us of DRAM time at B = 64 on an H200. At B = 1 (0.25 us of bytes) the launch
and a couple of memory latencies (ring, then the partials of a split ring) are the floor.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import (SplitWorkspace, await_previous_kernel, combine_softmax_partials, next_pow2, parallel_sms, pdl,
                     split_buffers)
from .tuned import shape_key, tuned_tiles

MAX_STEPS = 4
"""New steps per call: the query rows are unrolled, one copy of the attention code each."""
MIN_BLOCK_R = 16
"""Narrowest ring block the launcher picks by itself (more splits add partials to combine)."""
MAX_TILE_ELEMENTS = 256 * 64
"""fp32 elements of the K tile (and of the V tile) a program holds: Mimi's whole ring of one head."""
TILE_PER_THREAD = 32
"""fp32 registers a thread gives to each of the K and V tiles when the launcher picks the warps: few
warps keep the per-query reductions inside a warp (shuffles, no shared-memory round trips)."""
MAX_WARPS = 16
"""Most warps a program takes (512 threads: a 256-row tile at 32 elements a thread)."""


def ring_attention_ref(qkv, ring_k, ring_v, frame, max_period, out=None):
    """Torch reference (same ring convention): explicit positions, ring write, masked SDPA."""
    batch, steps, width = qkv.shape
    heads, capacity, head_dim = ring_k.shape[1:]
    q, k, v = qkv.view(batch, steps, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    positions = frame.long()[:, None] * steps + torch.arange(steps, device=qkv.device)
    q, k = _rope(q, positions, max_period), _rope(k, positions, max_period)
    newest = positions[:, -1:]
    slots = torch.arange(capacity, device=qkv.device)
    key_pos = newest - (newest - slots[None, :]) % capacity
    index = (positions % capacity)[:, None, :, None].expand(-1, heads, -1, head_dim)
    ring_k.scatter_(2, index, k)
    ring_v.scatter_(2, index, v.contiguous())
    delta = positions[:, :, None] - key_pos[:, None, :]
    visible = (key_pos[:, None, :] >= 0) & (delta >= 0) & (delta < capacity)
    y = torch.nn.functional.scaled_dot_product_attention(q, ring_k, ring_v, visible[:, None])
    y = y.transpose(1, 2).reshape(batch, steps, heads * head_dim)
    if out is None:
        return y
    out.copy_(y)
    return out


def _rope(x, positions, max_period):
    head_dim = x.shape[-1]
    freqs = torch.exp(torch.arange(head_dim // 2, device=x.device, dtype=torch.float32)
                      * (-math.log(max_period) * 2 / head_dim))
    angles = freqs * positions.float()[:, None, :, None]
    cos, sin = torch.cos(angles), torch.sin(angles)
    pairs = x.float().view(*x.shape[:-1], head_dim // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).view(x.shape).to(x.dtype)


@triton.jit
def _load_rotated(row_ptr, offs_d, cos, sin):
    """Loads one row of D interleaved pairs and returns it rotated, in the same interleaved layout:
    element d turns with its partner d ^ 1 (even: re cos - im sin, odd: im cos + re sin)."""
    x = tl.load(row_ptr + offs_d)
    partner = tl.load(row_ptr + (offs_d ^ 1))
    return x * cos + tl.where(offs_d % 2 == 1, partner, -partner) * sin


@triton.jit
def _ring_attention_kernel(
    qkv_ptr, ring_k_ptr, ring_v_ptr, frame_ptr, out_ptr, partials_ptr, counters_ptr,
    CAPACITY,
    stride_qb, stride_qt,
    stride_rb, stride_rh, stride_rs,
    stride_ob, stride_ot,
    STEPS: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, LOG_PERIOD: tl.constexpr,
    SCALE: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    split = tl.program_id(0)
    pair = tl.program_id(1)
    pid_b = pair // HEADS
    pid_h = pair % HEADS
    slots = split * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    ring_k = ring_k_ptr + pid_b * stride_rb + pid_h * stride_rh
    ring_v = ring_v_ptr + pid_b * stride_rb + pid_h * stride_rh
    ring_offsets = slots[:, None] * stride_rs + offs_d[None, :]
    # The whole block is requested first, together with the frame counter rather than after it: which
    # rows count depends on the counter and is applied to the scores and values instead (the program
    # pays one memory latency, not two).
    keys = tl.load(ring_k + ring_offsets, mask=(slots < CAPACITY)[:, None], other=0.0)
    values = tl.load(ring_v + ring_offsets, mask=(slots < CAPACITY)[:, None], other=0.0)
    frame = tl.load(frame_ptr + pid_b).to(tl.int64)
    # The new rows are stored into this block below: every thread's loads of it come first. No other
    # program reads this block, so the ring write races with nothing.
    tl.debug_barrier()

    # After this call's write, slot s holds position newest - age(s), age = (newest - s) mod R. Ages in
    # int32 from one int64 modulo per program (positions outgrow int32, ages stay below R).
    first_new = frame * STEPS
    newest = first_new + STEPS - 1
    newest_slot = (newest % CAPACITY).to(tl.int32)
    oldest_written_age = tl.minimum(newest, CAPACITY - 1).to(tl.int32)
    age = tl.where(slots <= newest_slot, newest_slot - slots, newest_slot - slots + CAPACITY)
    written = (slots < CAPACITY) & (age <= oldest_written_age)
    # Rows that are not old visible entries (never written, or about to be overwritten) can hold
    # anything, e.g. NaN left by a previous session in this slot: their scores are masked, and zeroed
    # values keep 0 * NaN out of the weighted sums until the new rows replace theirs.
    values = tl.where((written & (age >= STEPS))[:, None], values, 0.0)

    freqs = tl.exp((offs_d // 2).to(tl.float32) * (-LOG_PERIOD * 2.0 / HEAD_DIM))
    step_row = qkv_ptr + pid_b * stride_qb + pid_h * HEAD_DIM
    stats_ptr = partials_ptr + tl.num_programs(1) * SPLITS * STEPS * HEAD_DIM
    for t in tl.static_range(STEPS):
        position = first_new + t
        angles = position.to(tl.float32) * freqs
        cos, sin = tl.cos(angles), tl.sin(angles)
        query = _load_rotated(step_row + t * stride_qt, offs_d, cos, sin) * SCALE
        key = _load_rotated(step_row + t * stride_qt + HEADS * HEAD_DIM, offs_d, cos, sin)
        value = tl.load(step_row + t * stride_qt + 2 * HEADS * HEAD_DIM + offs_d)
        # Step t replaces the row of age T - 1 - t, in registers and (by the program whose block holds
        # it) in the ring. A [D] mask: Triton's interpreter mishandles scalar masks.
        keys = tl.where((age == STEPS - 1 - t)[:, None], key[None, :], keys)
        values = tl.where((age == STEPS - 1 - t)[:, None], value[None, :], values)
        write_slot = (position % CAPACITY).to(tl.int32)
        holds_row = tl.full([HEAD_DIM], write_slot // BLOCK_R, tl.int32) == split
        tl.store(ring_k + write_slot * stride_rs + offs_d, key, mask=holds_row)
        tl.store(ring_v + write_slot * stride_rs + offs_d, value, mask=holds_row)

        # Query t sees the written rows up to its own position: ages >= T - 1 - t.
        visible = written & (age >= STEPS - 1 - t)
        scores = tl.where(visible, tl.sum(keys * query[None, :], axis=1), float("-inf"))
        row_max = tl.max(scores, axis=0)
        # A block that sees no key has row_max = -inf: shifting by 0 gives it weights exp(-inf) = 0, not NaN.
        weights = tl.exp(scores - tl.where(row_max == float("-inf"), 0.0, row_max))
        weight_sum = tl.sum(weights, axis=0)
        weighted = tl.sum(weights[:, None] * values, axis=0)
        if SPLITS == 1:
            tl.store(out_ptr + pid_b * stride_ob + t * stride_ot + pid_h * HEAD_DIM + offs_d,
                     weighted / weight_sum)
        else:
            partial = (pair * SPLITS + split) * STEPS + t
            tl.store(partials_ptr + partial * HEAD_DIM + offs_d, weighted)
            tl.store(stats_ptr + 2 * partial, row_max)
            tl.store(stats_ptr + 2 * partial + 1, weight_sum)

    if SPLITS > 1:
        # Every thread's partial stores precede the program's single release arrival.
        tl.debug_barrier()
        arrived = tl.atomic_add(counters_ptr + pair, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            offs_s = tl.arange(0, BLOCK_S)
            has_split = offs_s < SPLITS
            for t in tl.static_range(STEPS):
                # The block holding the query's own key makes the maximum finite.
                combined = combine_softmax_partials(stats_ptr, partials_ptr, (pair * SPLITS + offs_s) * STEPS + t,
                                                    has_split, offs_d, HEAD_DIM, False)
                tl.store(out_ptr + pid_b * stride_ob + t * stride_ot + pid_h * HEAD_DIM + offs_d, combined)
            tl.store(counters_ptr + pair, 0)


def _widest_block(head_dim: int, capacity: int) -> int:
    return min(triton.next_power_of_2(capacity), max(MIN_BLOCK_R, MAX_TILE_ELEMENTS // head_dim))


def _warps_for(block_r: int, head_dim: int) -> int:
    return min(MAX_WARPS, max(1, block_r * head_dim // (32 * TILE_PER_THREAD)))


def _resolve_tiles(batch: int, heads: int, head_dim: int, capacity: int, tiles: dict | None,
                   programs_wanted: int) -> tuple[int, int]:
    """(BLOCK_R, num_warps): `tiles` entries override the defaults, which are the measured plan where
    kernels/tuned.py has one for this shape and batch, else these heuristics: the widest ring block
    (the whole ring, up to MAX_TILE_ELEMENTS), halved down to MIN_BLOCK_R while B * H * splits is below
    one program per SM; warps so that each thread holds TILE_PER_THREAD elements of each tile."""
    if tiles is None:
        tiles = tuned_tiles("ring", shape_key(heads, head_dim, capacity), batch) or {}
    block_r = tiles.get("block_r")
    if block_r is None:
        block_r = _widest_block(head_dim, capacity)
        while block_r > MIN_BLOCK_R and batch * heads * triton.cdiv(capacity, block_r) < programs_wanted:
            block_r //= 2
    if block_r < 2 or block_r & (block_r - 1):
        raise ValueError(f"block_r must be a power of two >= 2, got {block_r}")
    return block_r, tiles.get("num_warps") or _warps_for(block_r, head_dim)


def _workspace_size(batch: int, heads: int, steps: int, head_dim: int, splits: int) -> tuple[int, int]:
    if splits == 1:
        return 0, 0
    return batch * heads * splits * steps * (head_dim + 2), batch * heads


def ring_attention_workspace_size(batch: int, heads: int, steps: int, head_dim: int, capacity: int,
                                  tiles: dict | None = None) -> tuple[int, int]:
    """(partial floats, counters) for SplitWorkspace: the launcher's tiles on the current device (or
    `tiles`). (0, 0) when the ring is not split: no workspace is needed."""
    block_r, _ = _resolve_tiles(batch, heads, head_dim, capacity, tiles, parallel_sms())
    return _workspace_size(batch, heads, steps, head_dim, triton.cdiv(capacity, block_r))


def ring_attention_candidate_tiles(batch: int, heads: int, steps: int, head_dim: int,
                                   capacity: int) -> list[dict]:
    """At most 8 tile configs for a GPU sweep (T does not change them): the current device's default,
    the same block with half and twice the warps, then every other ring block from 8 rows to the whole
    ring with its default warps."""
    programs_wanted = parallel_sms()
    block_r, num_warps = _resolve_tiles(batch, heads, head_dim, capacity, None, programs_wanted)
    candidates = [{"block_r": block_r, "num_warps": warps}
                  for warps in (num_warps, num_warps // 2, num_warps * 2) if 1 <= warps <= MAX_WARPS]
    other = 8
    while other <= _widest_block(head_dim, capacity):
        if other != block_r:
            candidates.append({"block_r": other, "num_warps": _warps_for(other, head_dim)})
        other *= 2
    return candidates[:8]


def ring_attention(qkv: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, frame: torch.Tensor,
                   max_period: float, out: torch.Tensor | None = None,
                   workspace: SplitWorkspace | None = None, tiles: dict | None = None) -> torch.Tensor:
    """Launcher (float32). The context equals the ring capacity R = ring_k.shape[2]. `workspace` (from
    ring_attention_workspace_size) is used when the ring is split; a fresh one is allocated if it is
    None. `tiles` ({"block_r", "num_warps"}, see ring_attention_candidate_tiles) overrides the defaults."""
    batch, steps, width = qkv.shape
    _, heads, capacity, head_dim = ring_k.shape
    if width != 3 * heads * head_dim or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [B, T, {3 * heads * head_dim}] with unit stride in its last dim")
    if steps > capacity:
        raise ValueError("more new steps than ring slots")
    if steps > MAX_STEPS:
        raise ValueError(f"at most {MAX_STEPS} new steps per call, got {steps}")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    if ring_k.stride(-1) != 1 or ring_v.stride() != ring_k.stride():
        raise ValueError("ring_k and ring_v must share a layout with unit stride in the head dim")
    if out is None:
        out = torch.empty(batch, steps, heads * head_dim, device=qkv.device, dtype=torch.float32)
    if out.stride(-1) != 1:
        raise ValueError("out must have unit stride in its last dim")
    block_r, num_warps = _resolve_tiles(batch, heads, head_dim, capacity, tiles, parallel_sms(qkv.device))
    splits = triton.cdiv(capacity, block_r)
    partials, arrivals = split_buffers(workspace, *_workspace_size(batch, heads, steps, head_dim, splits), splits,
                                       out)
    use_pdl = pdl(qkv.device, "ring_attention")
    _ring_attention_kernel[(splits, batch * heads)](
        qkv, ring_k, ring_v, frame, out, partials, arrivals,
        capacity,
        qkv.stride(0), qkv.stride(1),
        ring_k.stride(0), ring_k.stride(1), ring_k.stride(2),
        out.stride(0), out.stride(1),
        STEPS=steps, HEADS=heads, HEAD_DIM=head_dim, LOG_PERIOD=math.log(max_period), SCALE=head_dim ** -0.5,
        BLOCK_R=block_r, SPLITS=splits,
        BLOCK_S=next_pow2(splits, minimum=2), PDL=use_pdl, num_warps=num_warps, launch_pdl=use_pdl,
    )
    return out
