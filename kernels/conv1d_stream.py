"""Streaming causal Conv1d with carried input history, fused input ELU and residual add.

Shapes (one call = the new samples of every slot):
    x        [B, C_in, T]          new input samples (any strides)
    state    [2, B, C_in, H]       the last H = K - S input samples of each slot, double-buffered by parity
    frame    [B] int               frames this slot has processed; reads state[frame % 2], writes state[(frame + 1) % 2]
    weight   [C_out, C_in, K]      bias [C_out] (optional)
    residual [B, C_out, T / S]     optional, added to the output
    out      [B, C_out, T / S]     (any strides)

    out[b, o, t] = bias[o] + residual[b, o, t] + sum_{i, k} weight[o, i, k] * act(v[b, i, t * S + k])
    v = concat(history, x) along time; act = ELU (alpha 1) when elu_input, else identity.

The history holds raw input samples (ELU is applied on read, and ELU(0) = 0, so a zero history
is causal zero padding). With `replicate`, a slot's first frame (frame == 0) uses copies of its first
sample as history (Kyutai's downsample conv). The kernel writes the next history into the other
parity buffer, so reads and writes never touch the same memory: no concat, no copy, no race, and a
slot that does not execute (its frame counter not advanced) keeps its history. Graph-safe: every
per-slot value comes from device memory.

As a GEMM: out[o, n] = sum_r W[o, r] V[r, n] with rows r = i * K + k (R = C_in K, the weight as a
[C_out, R] matrix) and columns n = b * T_out + t (N = B T_out) across slots, V gathered from
concat(history, x) at time t S + k - H (per-column slot, parity and first-frame flag). A program owns
a [BLOCK_CO x BLOCK_N] output tile, so the weights are read once per column tile rather than once per
slot (Mimi's 25 Hz convs have T_out = 2: 64 slots are 128 columns, two tiles of 64). With too few
tiles to fill the GPU the reduction is split into SPLIT contiguous chunks (split-K): each program
stores its fp32 partial tile in a `SplitWorkspace`, the last of a tile's SPLIT programs to arrive
(an acq_rel counter) sums the partials in the fixed order 0..SPLIT-1 (deterministic, no float
atomics), adds bias and residual, stores `out` and resets the counter to 0. Slot b's next history is
written by exactly one program, the one with flat index b mod (number of programs).

History-free tiles: a column tile inside one slot whose first step reads at time >= 0 of x (at long T all
of a slot's tiles but the first) runs the reduction loop without the per-element history test, the
second (history) load and the select. Measured on an H100 against the loop with them (same plans, fp32,
CUDA graphs): 64 > 1 channels k7 at T 1920, B = 64, 862 -> 196 us (B = 1: 22.4 -> 10.7); 128 > 256 k10
stride 5 at T 480, B = 64, 393 -> 336 us; the other SEANet shapes within 3% either way.

Columns first (a plan's columns_first, dot plans only): the same GEMM taken transposed, act(V)^T [columns x r]
times W^T [r x C_out], both tiles loaded in that orientation and the accumulator [BLOCK_N, BLOCK_CO] transposed once
for the epilogue, as conv_transpose1d_stream's columns-first plans (2-4x faster there at the decoder's B = 64 shapes).
Here it does not carry over: on an H100 at B = 64 (bench/RESULTS.md, 2026-12-07 twenty-second session) the tuned
plans in this order ran 3.5% and 6% faster at enc.down1 (128 > 256 k10 s5) and enc.res0.conv1 (64 > 32 k3), which
take it, and 3-14% slower at the other four shapes timed; no other tile of the grid tried beat the tuned plans.
A columns-first plan may also take split_weight (as conv_transpose1d_stream's): the weight read as its two tf32
parts (split_tf32, made once), only the input tile split on each step, the cross products in an accumulator of
their own (_utils.dot_split_weight). At B = 64 on an H100 (bench/RESULTS.md, twenty-fifth session) it took enc.down2
from 106.6 to 88.1 µs (another tile) and lost at enc.down1 and enc.down0; not in the table until its error against
the float64 product is measured.

Floor: the bytes are weights + x + out + residual + 2 x history (+ 2 x SPLIT x the padded output
tiles of partials, L2-resident). Mimi's largest weights are the encoder's last down conv (1024 x 512
x 16, 33.5 MB fp32) and the decoder's conv_in (14.7 MB); at B = 1 the floor is those weights read
once at HBM bandwidth (~4 TB/s: 8 us and 3.7 us). The dots are fp32 operands with tf32x3
(_utils.dot_precision). At most FMA_MAX_COLUMNS output columns (the 25 and 12.5 Hz convs of one
conversation) the products are fp32 FMAs instead, a weight-streaming loop (_fma_plan).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import (SplitWorkspace, await_previous_kernel, dot_precision, dot_split_weight, elu, fma_reduction_step,
                     next_pow2, pdl, split_tf32)
from .tuned import shape_key, tuned_tiles


def conv1d_stream_ref(x, state, frame, weight, bias, stride, elu_input=False, residual=None, replicate=False,
                      out=None):
    """Torch reference (same state convention)."""
    history = state.shape[-1]
    parity = (frame % 2).long()
    batch = torch.arange(x.shape[0], device=x.device)
    previous = state[parity, batch]
    if replicate:
        first = (frame == 0).view(-1, 1, 1)
        previous = torch.where(first, x[..., :1].expand_as(previous), previous)
    full = torch.cat([previous, x], dim=-1)
    state[1 - parity, batch] = full[..., full.shape[-1] - history:]
    y = F.conv1d(F.elu(full) if elu_input else full, weight, bias, stride=stride)
    if residual is not None:
        y = y + residual
    if out is None:
        return y
    out.copy_(y)
    return out


@triton.jit
def _finish_tile(acc, offs_co, mask_co, slot, step, mask_n, bias_ptr, res_ptr, out_ptr,
                 stride_rb, stride_rc, stride_rt, stride_ob, stride_oc, stride_ot,
                 HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_co, mask=mask_co, other=0.0)[:, None]
    mask = mask_co[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs_co[:, None] * stride_rc + (slot * stride_rb + step * stride_rt)[None, :],
                       mask=mask, other=0.0)
    tl.store(out_ptr + offs_co[:, None] * stride_oc + (slot * stride_ob + step * stride_ot)[None, :], acc, mask=mask)


@triton.jit
def _write_history(x_ptr, state_ptr, frame_ptr, slot, C_IN, T_IN,
                   stride_xb, stride_xc, stride_xt, stride_sp, stride_sb, stride_sc,
                   HISTORY: tl.constexpr, REPLICATE: tl.constexpr, BLOCK_HC: tl.constexpr, BLOCK_H: tl.constexpr):
    """state[1 - parity, slot] = the last HISTORY samples of concat(state[parity, slot], x[slot])."""
    frame = tl.load(frame_ptr + slot)
    parity = frame % 2
    x_base = x_ptr + slot * stride_xb
    read_base = state_ptr + parity * stride_sp + slot * stride_sb
    write_base = state_ptr + (1 - parity) * stride_sp + slot * stride_sb
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HISTORY
    # Source time in concat(history, x) coordinates relative to x: negative reads the old history
    # (only when T_IN < HISTORY).
    source = T_IN - HISTORY + offs_h
    from_x = (source >= 0)[None, :]
    from_history = (source < 0)[None, :]
    for c0 in range(0, C_IN, BLOCK_HC):
        offs_c = c0 + tl.arange(0, BLOCK_HC)
        mask = (offs_c < C_IN)[:, None] & mask_h[None, :]
        new_v = tl.load(x_base + offs_c[:, None] * stride_xc + source[None, :] * stride_xt,
                        mask=mask & from_x, other=0.0)
        old_h = tl.load(read_base + offs_c[:, None] * stride_sc + (source + HISTORY)[None, :],
                        mask=mask & from_history, other=0.0)
        if REPLICATE:
            first_x = tl.load(x_base + offs_c[:, None] * stride_xc, mask=mask & from_history, other=0.0)
            old_h = tl.where(frame == 0, first_x, old_h)
        tl.store(write_base + offs_c[:, None] * stride_sc + offs_h[None, :], tl.where(from_x, new_v, old_h), mask=mask)


@triton.jit
def _outer_sum(row_part, column_part, COLUMNS_FIRST: tl.constexpr):
    """row_part[r] + column_part[n] as an [R, N] tile, or as [N, R] with COLUMNS_FIRST."""
    if COLUMNS_FIRST:
        return column_part[:, None] + row_part[None, :]
    else:
        return row_part[:, None] + column_part[None, :]


@triton.jit
def _outer_and(row_part, column_part, COLUMNS_FIRST: tl.constexpr):
    """row_part[r] & column_part[n] as an [R, N] tile, or as [N, R] with COLUMNS_FIRST."""
    if COLUMNS_FIRST:
        return column_part[:, None] & row_part[None, :]
    else:
        return row_part[:, None] & column_part[None, :]


@triton.jit
def _accumulate(acc, acc_small, x_ptr, state_ptr, w_ptr, w_low_ptr, r_begin, r_end, offs_co, mask_co, mask_n, slot,
                step, first,
                x_columns, history_columns, stride_xb, stride_xc, stride_xt, stride_sc, stride_wo,
                STRIDE: tl.constexpr, KERNEL: tl.constexpr, HISTORY: tl.constexpr, ELU_INPUT: tl.constexpr,
                REPLICATE: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                READS_HISTORY: tl.constexpr, DOT: tl.constexpr, EVEN_R: tl.constexpr, COLUMNS_FIRST: tl.constexpr,
                SPLIT_WEIGHT: tl.constexpr):
    """W[offs_co, r_begin:r_end] @ act(V[r_begin:r_end, columns]) added to acc. READS_HISTORY: some columns read
    concat(history, x) before x (time j < 0); without it every V element comes from x. DOT: acc [BLOCK_CO,
    BLOCK_N] takes each step's tl.dot (INPUT_PRECISION); else acc [BLOCK_CO, BLOCK_R, BLOCK_N] takes the fp32
    products elementwise, each at its offset in the step, for the caller to sum over that axis once. EVEN_R (FMA
    plans whose reduction is a multiple of BLOCK_R): every step is whole, and the weight rows load unmasked along
    it, in 16-byte pieces. COLUMNS_FIRST (dot plans): acc is [BLOCK_N, BLOCK_CO] and takes act(V)^T W^T, both
    tiles loaded in that orientation (not transposed in registers); with SPLIT_WEIGHT w_ptr and w_low_ptr hold the
    weight's high and low tf32 parts (split_tf32) and the cross products go to acc_small (_utils.dot_split_weight).
    Returns (acc, acc_small); acc_small is passed through untouched without SPLIT_WEIGHT."""
    for r0 in range(r_begin, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < r_end
        ci = offs_r // KERNEL
        k = offs_r % KERNEL
        # Columns first, every tile is loaded in the orientation the dot takes it: [BLOCK_R, BLOCK_CO] weights and
        # [BLOCK_N, BLOCK_R] inputs.
        if EVEN_R:
            w_mask = mask_co[:, None]  # FMA plans only, never columns first
        else:
            w_mask = _outer_and(mask_co, mask_r, COLUMNS_FIRST)
        w = tl.load(w_ptr + _outer_sum(offs_co * stride_wo, offs_r, COLUMNS_FIRST), mask=w_mask, other=0.0)
        valid = _outer_and(mask_r, mask_n, COLUMNS_FIRST)
        x_rows = ci * stride_xc + (k - HISTORY) * stride_xt
        if READS_HISTORY:
            j = _outer_sum(k - HISTORY, step * STRIDE, COLUMNS_FIRST)
            from_x = j >= 0
            v = tl.load(x_ptr + _outer_sum(x_rows, x_columns, COLUMNS_FIRST), mask=valid & from_x, other=0.0)
            h = tl.load(state_ptr + _outer_sum(ci * stride_sc + k, history_columns, COLUMNS_FIRST),
                        mask=valid & (j < 0), other=0.0)
            if REPLICATE:
                x0 = tl.load(x_ptr + _outer_sum(ci * stride_xc, slot * stride_xb, COLUMNS_FIRST),
                             mask=valid & (j < 0), other=0.0)
                h = tl.where(_outer_and(mask_r, first, COLUMNS_FIRST), x0, h)
            v = tl.where(from_x, v, h)
        else:
            v = tl.load(x_ptr + _outer_sum(x_rows, x_columns, COLUMNS_FIRST), mask=valid, other=0.0)
        if ELU_INPUT:
            v = elu(v)
        if SPLIT_WEIGHT:
            w_low = tl.load(w_low_ptr + _outer_sum(offs_co * stride_wo, offs_r, COLUMNS_FIRST), mask=w_mask, other=0.0)
            acc, acc_small = dot_split_weight(v, w, w_low, acc, acc_small)
        elif COLUMNS_FIRST:
            acc = tl.dot(v, w, acc, input_precision=INPUT_PRECISION)
        elif DOT:
            acc += tl.dot(w, v, input_precision=INPUT_PRECISION)
        else:
            acc += w[:, :, None] * v[None, :, :]
    return acc, acc_small


@triton.jit
def _conv1d_stream_kernel(
    x_ptr, state_ptr, frame_ptr, w_ptr, w_low_ptr, bias_ptr, res_ptr, out_ptr, partials_ptr, counters_ptr,
    BATCH, C_IN, C_OUT, T_IN, T_OUT, CHUNK,
    stride_xb, stride_xc, stride_xt,
    stride_sp, stride_sb, stride_sc,
    stride_wo,
    stride_rb, stride_rc, stride_rt,
    stride_ob, stride_oc, stride_ot,
    STRIDE: tl.constexpr, KERNEL: tl.constexpr, HISTORY: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ELU_INPUT: tl.constexpr, REPLICATE: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
    TILES_WITHIN_SLOTS: tl.constexpr, BLOCK_HC: tl.constexpr, BLOCK_H: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT: tl.constexpr, EVEN_R: tl.constexpr, PDL: tl.constexpr, COLUMNS_FIRST: tl.constexpr,
    SPLIT_WEIGHT: tl.constexpr,
):
    await_previous_kernel(PDL)
    pid_n = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_s = tl.program_id(2)

    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_co = offs_co < C_OUT
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < BATCH * T_OUT
    if TILES_WITHIN_SLOTS:
        # Written so that the compiler sees one slot and consecutive steps: vectorized x / out access
        # at unit time strides, one frame load per tile.
        slot = (pid_n * BLOCK_N) // T_OUT + tl.zeros((BLOCK_N,), dtype=tl.int32)
        step = (pid_n * BLOCK_N) % T_OUT + tl.arange(0, BLOCK_N)
    else:
        slot = offs_n // T_OUT
        step = offs_n % T_OUT
    frame = tl.load(frame_ptr + slot, mask=mask_n, other=1)
    parity = frame % 2
    first = frame == 0
    # Gather addresses split into a per-column part (slot, step) and a per-row part (channel, tap):
    # v[r, n] sits at time j = step * STRIDE + k - HISTORY of concat(history, x).
    x_columns = slot * stride_xb + step * (STRIDE * stride_xt)
    history_columns = parity * stride_sp + slot * stride_sb + step * STRIDE

    reduction = C_IN * KERNEL
    r_begin = pid_s * CHUNK
    r_end = tl.minimum(r_begin + CHUNK, reduction)
    if COLUMNS_FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_CO), dtype=tl.float32)
    elif DOT:
        acc = tl.zeros((BLOCK_CO, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_CO, BLOCK_R, BLOCK_N), dtype=tl.float32)
    if SPLIT_WEIGHT:
        acc_small = tl.zeros((BLOCK_N, BLOCK_CO), dtype=tl.float32)
    else:
        acc_small = tl.zeros((1,), dtype=tl.float32)
    # A tile inside one slot whose first step reads at time >= 0 of x reads no history: it takes the loop without
    # the per-element history test, second load and select (most tiles of the long-T convs).
    reads_history = False
    if HISTORY > 0:
        reads_history = True
        if TILES_WITHIN_SLOTS:
            reads_history = ((pid_n * BLOCK_N) % T_OUT) * STRIDE < HISTORY
    if reads_history:
        acc, acc_small = _accumulate(acc, acc_small, x_ptr, state_ptr, w_ptr, w_low_ptr, r_begin, r_end, offs_co,
                                     mask_co, mask_n, slot, step, first, x_columns, history_columns, stride_xb,
                                     stride_xc, stride_xt, stride_sc, stride_wo, STRIDE, KERNEL, HISTORY, ELU_INPUT,
                                     REPLICATE, BLOCK_R, INPUT_PRECISION, True, DOT, EVEN_R, COLUMNS_FIRST,
                                     SPLIT_WEIGHT)
    else:
        acc, acc_small = _accumulate(acc, acc_small, x_ptr, state_ptr, w_ptr, w_low_ptr, r_begin, r_end, offs_co,
                                     mask_co, mask_n, slot, step, first, x_columns, history_columns, stride_xb,
                                     stride_xc, stride_xt, stride_sc, stride_wo, STRIDE, KERNEL, HISTORY, ELU_INPUT,
                                     REPLICATE, BLOCK_R, INPUT_PRECISION, False, DOT, EVEN_R, COLUMNS_FIRST,
                                     SPLIT_WEIGHT)
    if not DOT:
        acc = tl.sum(acc, axis=1)
    if SPLIT_WEIGHT:
        acc += acc_small
    if COLUMNS_FIRST:
        acc = tl.trans(acc)

    if SPLIT == 1:
        _finish_tile(acc, offs_co, mask_co, slot, step, mask_n, bias_ptr, res_ptr, out_ptr,
                     stride_rb, stride_rc, stride_rt, stride_ob, stride_oc, stride_ot, HAS_BIAS, HAS_RESIDUAL)
    else:
        tile = pid_co * tl.num_programs(0) + pid_n
        tile_offsets = tl.arange(0, BLOCK_CO)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_partials = partials_ptr + tile * (SPLIT * BLOCK_CO * BLOCK_N) + tile_offsets
        # ".cg" keeps partials out of the (non-coherent) L1: they are exchanged between SMs through L2.
        tl.store(tile_partials + pid_s * (BLOCK_CO * BLOCK_N), acc, cache_modifier=".cg")
        # The counter's atomic is issued by one thread: the barrier orders every thread's partial
        # store before it, and its release publishes them; the acquire side reads after the atomic's
        # result is broadcast to the CTA.
        tl.debug_barrier()
        arrived = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = tl.zeros((BLOCK_CO, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                total += tl.load(tile_partials + s * (BLOCK_CO * BLOCK_N), cache_modifier=".cg")
            _finish_tile(total, offs_co, mask_co, slot, step, mask_n, bias_ptr, res_ptr, out_ptr,
                         stride_rb, stride_rc, stride_rt, stride_ob, stride_oc, stride_ot, HAS_BIAS, HAS_RESIDUAL)
            # Every program of this tile has arrived, so nothing else touches the counter in this launch.
            tl.store(counters_ptr + tile, 0)

    if HISTORY > 0:
        # The history write reads x and state[parity] and writes state[1 - parity], which no program
        # of this launch reads: slots are dealt round-robin over all programs, one writer per slot.
        programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
        program = pid_n + tl.num_programs(0) * (pid_co + tl.num_programs(1) * pid_s)
        for history_slot in range(program, BATCH, programs):
            _write_history(x_ptr, state_ptr, frame_ptr, history_slot, C_IN, T_IN,
                           stride_xb, stride_xc, stride_xt, stride_sp, stride_sb, stride_sc,
                           HISTORY, REPLICATE, BLOCK_HC, BLOCK_H)


class ConvTiles(NamedTuple):
    """A launch plan: [block_co x block_n] output tiles, block_r reduction rows per step, the reduction
    split over `split` programs per tile, Triton's num_warps / num_stages, and whether the steps' products
    run on the tensor cores (dot) or as fp32 FMAs, and for dot whether the columns are the product's first
    operand (columns_first, see the module doc) and, columns first, whether the weight is read as its two tf32
    parts (split_weight: split_tf32, made once; only the inputs are split on each step). Block sizes are powers of
    two, >= 16 with dot (tl.dot), >= 2 without; `split` is rounded to what whole block_r steps allow."""
    block_co: int
    block_n: int
    block_r: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    dot: bool = True
    columns_first: bool = False
    split_weight: bool = False


class _Grid(NamedTuple):
    tiles: ConvTiles
    co_tiles: int
    n_tiles: int
    chunk: int  # reduction rows per split, a multiple of block_r

    def workspace_size(self) -> tuple[int, int]:
        """(partial floats, counters) this launch needs; (0, 0) without a split."""
        if self.tiles.split == 1:
            return 0, 0
        tile = self.tiles.block_co * self.tiles.block_n
        return self.co_tiles * self.n_tiles * self.tiles.split * tile, self.co_tiles * self.n_tiles


def _is_block(n: int, smallest: int = 16) -> bool:
    return n >= smallest and n & (n - 1) == 0


def _grid(tiles: ConvTiles, batch: int, c_in: int, c_out: int, kernel: int, stride: int, t_in: int) -> _Grid:
    smallest = 16 if tiles.dot else 2
    if not all(_is_block(size, smallest) for size in (tiles.block_co, tiles.block_n, tiles.block_r)):
        raise ValueError(f"block sizes must be powers of two >= {smallest}{' (tl.dot)' if tiles.dot else ''}: "
                         f"{tiles}")
    if tiles.split < 1 or tiles.num_warps < 1 or tiles.num_stages < 1:
        raise ValueError(f"split, num_warps and num_stages must be positive: {tiles}")
    if tiles.columns_first and not tiles.dot:
        raise ValueError(f"columns_first is a layout of the tensor-core product: it needs dot: {tiles}")
    if tiles.split_weight and not tiles.columns_first:
        raise ValueError(f"split_weight reads the weight as the product's second operand: it needs columns_first: "
                         f"{tiles}")
    steps = triton.cdiv(c_in * kernel, tiles.block_r)
    steps_per_split = triton.cdiv(steps, tiles.split)
    # No empty splits: a split of 4 over 6 steps becomes 3 chunks of 2 steps.
    tiles = tiles._replace(split=triton.cdiv(steps, steps_per_split))
    return _Grid(tiles, triton.cdiv(c_out, tiles.block_co), triton.cdiv(batch * (t_in // stride), tiles.block_n),
                 steps_per_split * tiles.block_r)


_TARGET_PROGRAMS = 256
_MIN_STEPS_PER_SPLIT = 4
_MAX_SPLIT = 16
FMA_MAX_COLUMNS = 4
"""Output columns (B T_out) up to which a conv takes the FMA plan (_fma_plan): the codec's 25 and 12.5 Hz convs at
one conversation (T_out 2 and 1)."""
_FMA_TARGET_PROGRAMS = 512
_FMA_MIN_STEPS_PER_SPLIT = 2


def _fma_plan(batch: int, c_in: int, c_out: int, kernel: int, stride: int, t_in: int) -> ConvTiles:
    """The plan of a conv with at most FMA_MAX_COLUMNS output columns: a weight-streaming GEMV more than a GEMM.
    Under Nsight Compute (H100, bench/results/2026-12-06_H100_65d15fd_ncu_convs_samplers_b1.json) the tf32x3 tile
    plans of these shapes ran one or two warps a scheduler at 140-193 registers, issuing an instruction every 4.6
    cycles, L1/TEX 57-70% busy and DRAM 8-30%: a 16-column tl.dot tile of which 2 columns are used, split into
    three tf32 passes, is many instructions per weight byte. Here one column tile holds every column (2 or 4),
    the products are fp32 FMAs (exact fp32 products, as tf32x3 approximates), and the weight streams in
    [16 x 128] tiles (8 KB, 512-byte rows; narrower steps where they divide the reduction and 128 does not) over
    about _FMA_TARGET_PROGRAMS programs of 4 warps: channel tiles of
    16 and the reduction split while each split keeps _FMA_MIN_STEPS_PER_SPLIT steps, so that several small
    programs per SM keep weight loads in flight where one program's loop waits for its own."""
    columns = batch * (t_in // stride)
    reduction = c_in * kernel
    block_r = fma_reduction_step(reduction)
    block_co = min(16, next_pow2(c_out, minimum=2))
    block_n = next_pow2(columns, minimum=2)
    steps = triton.cdiv(reduction, block_r)
    co_tiles = triton.cdiv(c_out, block_co)
    split = max(1, min(_MAX_SPLIT, steps // _FMA_MIN_STEPS_PER_SPLIT, triton.cdiv(_FMA_TARGET_PROGRAMS, co_tiles)))
    tiles = ConvTiles(block_co, block_n, block_r, split, num_warps=4, num_stages=3, dot=False)
    return _grid(tiles, batch, c_in, c_out, kernel, stride, t_in).tiles


def _plan(batch: int, c_in: int, c_out: int, kernel: int, stride: int, t_in: int) -> ConvTiles:
    """The default tiles for a shape: _fma_plan's at most FMA_MAX_COLUMNS output columns, else _dot_plan's."""
    if batch * (t_in // stride) <= FMA_MAX_COLUMNS:
        return _fma_plan(batch, c_in, c_out, kernel, stride, t_in)
    return _dot_plan(batch, c_in, c_out, kernel, stride, t_in)


def _dot_plan(batch: int, c_in: int, c_out: int, kernel: int, stride: int, t_in: int) -> ConvTiles:
    """The tensor-core tiles for a shape: the measured plan where kernels/tuned.py has one, else these
    heuristics. Start from the widest useful tiles (64 x 64, or smaller when
    C_out or N = B T_out is), then, while the grid has fewer than _TARGET_PROGRAMS programs (about 2
    per SM on an H200's 132, so that each SM has loads in flight from two CTAs), double the program
    count by the step that adds the fewest bytes:
      - halve block_n: one more read of the weights (W = 4 C_out C_in K bytes) per added column tile;
      - halve block_co: one more gather of the input (X = 4 B C_in T_in) per added channel tile;
      - double the split: 2 x 4 bytes of partials per padded output element and split (write + read),
        only while each split keeps >= _MIN_STEPS_PER_SPLIT block_r steps (the partial store, counter
        and the last program's sum cost a few memory latencies; a short chunk would not pay for them)
        and at most _MAX_SPLIT partials (the last program sums them serially).
    When no doubling is left, the split takes whatever of the remaining factor its limits allow
    (not only powers of two). So weight-heavy convs at small N (the 25 Hz convs, T_out = 2) narrow
    their channel tiles and split the reduction, each program streaming a distinct slice of the
    weights once: at B = 1, dec.conv_in (512 -> 1024 k7) runs 64 channel tiles x 4 splits of 14
    steps, enc.down3 (512 -> 1024 k16) 32 x 8; at B = 64 their 128 columns are 2 tiles of 64 and
    they still split (64 and 32 output tiles). Long-T convs at B = 1 (T_out = 1920, tiny weights)
    narrow their column tiles instead (1920 / 16 = 120) and never split; at B = 64 they have
    thousands of 64 x 64 tiles. block_r is 64 for long reductions (fewer, larger weight loads), 32
    below 1024, 16 for tiny ones (conv_in, R = 7). 4 warps: the gathers keep these kernels at
    ~150-250 registers per thread (sm_90 ptxas), which still fits the ~2 CTAs per SM of these grids."""
    measured = tuned_tiles("conv1d", shape_key(c_in, c_out, kernel, stride, t_in), batch)
    if measured is not None:
        return _grid(ConvTiles(**measured), batch, c_in, c_out, kernel, stride, t_in).tiles
    t_out = t_in // stride
    columns = batch * t_out
    reduction = c_in * kernel
    block_r = 16 if reduction <= 16 else 32 if reduction < 1024 else 64
    block_co = min(64, next_pow2(c_out))
    block_n = min(64, next_pow2(columns))
    weight_bytes = 4 * c_out * reduction
    input_bytes = 4 * batch * c_in * t_in
    steps = triton.cdiv(reduction, block_r)
    max_split = max(1, min(_MAX_SPLIT, steps // _MIN_STEPS_PER_SPLIT))
    split = 1

    def tile_count() -> int:
        return triton.cdiv(c_out, block_co) * triton.cdiv(columns, block_n)

    while tile_count() * split < _TARGET_PROGRAMS:
        options = []
        n_tiles, co_tiles = triton.cdiv(columns, block_n), triton.cdiv(c_out, block_co)
        if block_n > 16 and triton.cdiv(columns, block_n // 2) > n_tiles:
            options.append(((triton.cdiv(columns, block_n // 2) - n_tiles) * weight_bytes, "n"))
        if block_co > 16 and triton.cdiv(c_out, block_co // 2) > co_tiles:
            options.append(((triton.cdiv(c_out, block_co // 2) - co_tiles) * input_bytes, "co"))
        if 2 * split <= max_split:
            options.append((tile_count() * block_co * block_n * 8 * split, "split"))
        if not options:
            split = min(max_split, triton.cdiv(_TARGET_PROGRAMS, tile_count()))
            break
        _, step = min(options)
        if step == "n":
            block_n //= 2
        elif step == "co":
            block_co //= 2
        else:
            split *= 2
    return _grid(ConvTiles(block_co, block_n, block_r, split), batch, c_in, c_out, kernel, stride, t_in).tiles


def conv1d_stream_workspace_size(batch: int, c_in: int, c_out: int, kernel: int, stride: int, t_in: int,
                                 tiles: ConvTiles | None = None) -> tuple[int, int]:
    """(partial floats, counters) of a SplitWorkspace that the default plan of this shape (or `tiles`)
    needs; (0, 0) when it does not split. A cache shared by several convs allocates the maximum of each."""
    if tiles is None:
        tiles = _plan(batch, c_in, c_out, kernel, stride, t_in)
    return _grid(tiles, batch, c_in, c_out, kernel, stride, t_in).workspace_size()


WIDE_COLUMNS = 8192
"""Columns (B T_out) from which the sweep also tries wide column tiles with 8 warps (_wide_column_tiles)."""


def _wide_column_tiles(base: ConvTiles, columns: int) -> list[ConvTiles]:
    """Two knobs moved at once, which the one-knob neighbours never reach: column tiles of 128 and 256 with 8 warps,
    unsplit. For the long-T convs at many slots (the 24 kHz SEANet convs at B = 64 have 122,880 columns and ran at
    2-12% of their floor on an H200 with 32-64 wide tiles): a program then streams more of its input per weight tile
    and there are fewer, longer programs."""
    if columns < WIDE_COLUMNS:
        return []
    return [base._replace(block_n=block_n, num_warps=8, split=1, num_stages=stages)
            for block_n in (128, 256) for stages in (2, 3)]


LIGHT_TILE_COLUMNS = 128
"""Columns (B T_out) from which the sweep also tries lighter tensor-core plans (_light_tiles): the 12.5 Hz convs at
64 slots and everything wider."""


def _light_tiles(base: ConvTiles, columns: int) -> list[ConvTiles]:
    """Two knobs moved at once toward more warps resident an SM: one pipeline stage less with 8 warps, a halved
    channel tile or reduction step with one stage less. Under Nsight Compute at B = 64 on an H100
    (bench/results/2026-12-06_H100_ed2db73_ncu_codec_b64.json) the tuned plans of enc.stages.1.down and dec.conv_in
    held 8 warps an SM (182-253 registers, 57-90 KB of shared memory a block) and left 72-76% of the cycles without a
    warp ready to issue; cuDNN ran those shapes faster."""
    if columns < LIGHT_TILE_COLUMNS:
        return []
    stages = max(1, base.num_stages - 1)
    return [base._replace(num_warps=8, num_stages=stages),
            base._replace(block_co=max(16, base.block_co // 2), num_stages=stages),
            base._replace(block_r=max(16, base.block_r // 2), num_stages=stages)]


def _with_neighbours(candidates: list[ConvTiles], neighbours: list[ConvTiles], fits, batch: int, c_in: int,
                     c_out: int, kernel: int, stride: int, t_in: int) -> list[ConvTiles]:
    """The candidates so far, then each neighbour that `fits` (a predicate on the tiles), its split rounded by _grid,
    without repeats."""
    candidates = list(candidates)
    for tiles in neighbours:
        if fits(tiles):
            tiles = _grid(tiles, batch, c_in, c_out, kernel, stride, t_in).tiles
            if tiles not in candidates:
                candidates.append(tiles)
    return candidates


def _fma_candidates(base: ConvTiles, batch: int, c_in: int, c_out: int, kernel: int, stride: int,
                    t_in: int) -> list[ConvTiles]:
    """The FMA plan first, then its one-knob neighbours, then the tensor-core plan of the shape (_dot_plan)."""
    neighbours = [
        base._replace(split=base.split * 2), base._replace(split=max(1, base.split // 2)),
        base._replace(block_co=base.block_co // 2), base._replace(block_co=base.block_co * 2),
        base._replace(block_r=base.block_r // 2), base._replace(block_r=base.block_r * 2),
        base._replace(num_warps=2), base._replace(num_warps=8), base._replace(num_stages=2),
        base._replace(num_stages=1),
    ]
    def fits(tiles: ConvTiles) -> bool:
        return (2 <= tiles.block_co <= min(64, 2 * next_pow2(c_out, minimum=2))
                and 2 <= tiles.block_r <= min(512, 2 * next_pow2(c_in * kernel, minimum=2))
                and 1 <= tiles.split <= 2 * _MAX_SPLIT)

    candidates = _with_neighbours([base], neighbours, fits, batch, c_in, c_out, kernel, stride, t_in)
    return candidates + [_dot_plan(batch, c_in, c_out, kernel, stride, t_in)]


def conv1d_stream_candidate_tiles(batch: int, c_in: int, c_out: int, kernel: int, stride: int,
                                  t_in: int) -> list[ConvTiles]:
    """The default plan first, then up to 11 neighbours of it (each changes one knob: the other operand order first),
    then, from LIGHT_TILE_COLUMNS columns on, up to 3 lighter plans (_light_tiles) and from WIDE_COLUMNS columns on
    up to 4 wide column tiles (_wide_column_tiles), for a GPU sweep. An FMA plan (few columns) has its own
    neighbours and the tensor-core plan (_fma_candidates)."""
    base = _plan(batch, c_in, c_out, kernel, stride, t_in)
    if not base.dot:
        return _fma_candidates(base, batch, c_in, c_out, kernel, stride, t_in)
    columns = batch * (t_in // stride)
    widest_co = min(128, next_pow2(c_out))
    widest_n = min(128, next_pow2(columns))
    widest_r = min(64, next_pow2(c_in * kernel))
    neighbours = [
        base._replace(columns_first=not base.columns_first),
        base._replace(split=1), base._replace(split=base.split * 2), base._replace(split=base.split // 2),
        base._replace(block_co=base.block_co // 2), base._replace(block_co=base.block_co * 2),
        base._replace(block_n=base.block_n // 2), base._replace(block_n=base.block_n * 2),
        base._replace(block_r=base.block_r // 2), base._replace(block_r=base.block_r * 2),
        base._replace(num_warps=2), base._replace(num_stages=2), base._replace(num_warps=8),
        base._replace(num_stages=4),
    ]
    def fits(tiles: ConvTiles) -> bool:
        return (16 <= tiles.block_co <= widest_co and 16 <= tiles.block_n <= widest_n
                and 16 <= tiles.block_r <= widest_r and 1 <= tiles.split <= 2 * _MAX_SPLIT)

    shape = (batch, c_in, c_out, kernel, stride, t_in)
    candidates = _with_neighbours([base], neighbours, fits, *shape)[:12]
    candidates = _with_neighbours(candidates, _light_tiles(base, columns), fits, *shape)
    # The wide column tiles are past widest_n on purpose.
    return _with_neighbours(candidates, _wide_column_tiles(base, columns), lambda tiles: True, *shape)


def conv1d_stream(x: torch.Tensor, state: torch.Tensor, frame: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, stride: int, elu_input: bool = False,
                  residual: torch.Tensor | None = None, replicate: bool = False,
                  out: torch.Tensor | None = None, workspace: SplitWorkspace | None = None,
                  tiles: ConvTiles | None = None, weight_parts: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher. float32 tensors; state [2, B, C_in, K - S] contiguous in its last dim; see module doc.
    `tiles` overrides the default plan (_plan). A plan that splits the reduction uses `workspace`
    (sized with conv1d_stream_workspace_size; its counters must be zero, as every call leaves them), or
    allocates a fresh one for this call when it is None. The weight is read as a [C_out, C_in * K] matrix with
    unit stride in its rows: a view when it is contiguous in its last two dims, otherwise a copy per call.
    weight_parts: split_tf32(weight), [2, C_out, C_in, K] contiguous, read by plans with split_weight (split per
    call when None, correct but a pass over the weight) and by no other."""
    batch, c_in, t_in = x.shape
    c_out, _, kernel = weight.shape
    history = kernel - stride
    if t_in % stride:
        raise ValueError(f"input length {t_in} is not a multiple of the stride {stride}")
    if state.shape != (2, batch, c_in, history) or state.stride(-1) != 1:
        raise ValueError(f"state must be [2, {batch}, {c_in}, {history}] with unit stride in time")
    t_out = t_in // stride
    if out is None:
        out = torch.empty(batch, c_out, t_out, device=x.device, dtype=torch.float32)
    grid = _grid(tiles if tiles is not None else _plan(batch, c_in, c_out, kernel, stride, t_in),
                 batch, c_in, c_out, kernel, stride, t_in)
    plan = grid.tiles
    if plan.split > 1:
        needs = grid.workspace_size()
        if workspace is None:
            workspace = SplitWorkspace(*needs, device=x.device)
        workspace.check(*needs)
        partials, counters = workspace.partials, workspace.counters
    else:
        partials, counters = out, frame  # never dereferenced without a split
    if weight_parts is not None and (weight_parts.shape != (2, *weight.shape) or not weight_parts.is_contiguous()):
        raise ValueError(f"weight_parts must be split_tf32(weight): contiguous [2, {c_out}, {c_in}, {kernel}], got "
                         f"{tuple(weight_parts.shape)}")
    weight_rows = weight.reshape(c_out, c_in * kernel)
    if weight_rows.stride(1) != 1:
        weight_rows = weight_rows.contiguous()
    weight_low_rows = weight_rows
    if plan.split_weight:
        parts = (split_tf32(weight_rows) if weight_parts is None else weight_parts).view(2, c_out, c_in * kernel)
        weight_rows, weight_low_rows = parts[0], parts[1]
    res = residual if residual is not None else out
    # A k = 1 conv has an empty history; any valid pointer stands in for it (never dereferenced).
    state_arg = state if state.numel() else x
    use_pdl = pdl(x.device, "conv1d_stream")
    _conv1d_stream_kernel[(grid.n_tiles, grid.co_tiles, plan.split)](
        x, state_arg, frame, weight_rows, weight_low_rows, bias if bias is not None else weight_rows, res, out,
        partials, counters,
        batch, c_in, c_out, t_in, t_out, grid.chunk,
        x.stride(0), x.stride(1), x.stride(2),
        state.stride(0), state.stride(1), state.stride(2),
        weight_rows.stride(0),
        res.stride(0), res.stride(1), res.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        STRIDE=stride, KERNEL=kernel, HISTORY=history,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ELU_INPUT=elu_input, REPLICATE=replicate,
        BLOCK_CO=plan.block_co, BLOCK_N=plan.block_n, BLOCK_R=plan.block_r, SPLIT=plan.split,
        TILES_WITHIN_SLOTS=t_out % plan.block_n == 0,
        BLOCK_HC=min(64, next_pow2(c_in)), BLOCK_H=next_pow2(max(history, 1)),
        INPUT_PRECISION=dot_precision(), DOT=plan.dot, EVEN_R=not plan.dot and (c_in * kernel) % plan.block_r == 0,
        PDL=use_pdl, COLUMNS_FIRST=plan.columns_first, SPLIT_WEIGHT=plan.split_weight,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        launch_pdl=use_pdl,
    )
    return out
