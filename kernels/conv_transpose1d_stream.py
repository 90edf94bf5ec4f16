"""Streaming ConvTranspose1d with the overlapping tail carried to the next call, fused input ELU.

Shapes (kernel K a multiple of the stride S, TAPS = K / S >= 2; in Mimi K = 2S):
    x        [B, C_in, T]                 new input steps (any strides)
    partial  [2, B, C_out, K - S]         the carried tail, double-buffered by parity (bias not included)
    frame    [B] int                      reads partial[frame % 2], writes partial[(frame + 1) % 2]
    weight   [C_in, C_out / groups, K]    groups = 1 (dense) or C_in = C_out (depthwise)
    packed   [TAPS, C_out, S, C_in]       dense weights repacked once (pack_conv_transpose_weight):
                                          packed[r, o, p, i] = weight[i, o, r S + p]
    bias     [C_out] (optional)
    out      [B, C_out, T * S]

    full[b, o, t*S + k] += sum_i weight[i, o, k] * act(x[b, i, t])         (length (T - 1) S + K)
    out[j] = full[j] + bias + partial[j] (j < K - S);   next partial[p] = full[T S + p]

act = ELU (alpha 1) when elu_input. Output position j = t S + p (phase p < S) receives x[t - r] through
tap k = p + r S for r < TAPS, so the whole call is one GEMM with
    rows    (o, p)     C_out * S of them, row m = o S + p,
    columns (b, t)     B * STEPS of them, column n = b STEPS + t, STEPS = T + TAPS - 1,
    reduction (i, r)   C_in * TAPS, operand x[b, i, t - r] (zero outside 0 <= t - r < T):
    out[b, o, t S + p] = sum_{r, i} packed[r, o, p, i] act(x[b, i, t - r])
Columns t < T are output steps, t >= T the next tail. Rows in (o, p) order make a tile's rows of one
channel adjacent output positions, so the output, carried-tail and next-tail accesses of a tile are
contiguous runs in time; the packed weight makes each row a contiguous run of input channels, so the
[rows x channels] weight tile loads are coalesced. Flattening the slots into the columns lets one
column tile cover several slots (Mimi's first stage has STEPS = 3), so each weight tile is read once
per column tile instead of once per slot; each column loads its own slot's frame parity and x pointer.

Split-K: when there are too few output tiles to occupy the GPU (B = 1), SPLIT programs share a tile,
each reducing a contiguous range of (channel block, tap) chunks. Each writes its fp32 partial sum to
the SplitWorkspace and increments the tile's arrival counter; the last to arrive sums the SPLIT
partials in the fixed order 0..SPLIT-1 (deterministic, unlike float atomics), adds the carried
overlap and bias, writes `out` and the next tail, and resets the counter to 0. The tail is written to
the other parity buffer, so no program reads carried state that another writes (the partial sums
are ordered by the counters). Graph-safe: every per-slot value comes from device memory and the
counters are zero again when the kernel ends.

Columns first (a plan's columns_first): the same GEMM taken transposed, act(x)^T [columns x (i, r)] times the
packed weight's [(i, r) x rows], the accumulator [BLOCK_N, BLOCK_M] transposed once for the epilogue. On an H100
(bench/RESULTS.md, 2026-12-07 twenty-first session) the same tiles ran 2-4x faster this way at the decoder's B = 64
shapes (64 x 64 tiles, 32-channel steps: 386 -> 106 us at 512 > 256 k12 s6), and the B = 64 plans of the three
dense upsampling convs take it. The likely reason, from the compiled IR (not profiled): tl.dot's tf32x3 splits both
operands into tf32 parts in registers every step and writes the second operand's two parts back to shared memory
for the tensor cores, and in this order that operand is the weight tile, not the gathered, ELU'd x tile.
A columns-first plan may also take split_weight: the packed weight read as its two tf32 parts (split_tf32, made
once), so that only the x tile is split, in registers, and the weight parts go to the tensor cores as they were
staged; the cross products keep an accumulator of their own (_utils.dot_split_weight). At B = 64 on an H100
(bench/RESULTS.md, twenty-fifth session) the tuned plans took dec.up1 / up2 / up3 from 107 / 121 / 121 to 73 / 103 /
115 µs this way, their outputs 3.0e-6 / 1.7e-6 / 8.3e-7 from tf32x3's (two tf32x3 plans differ by up to 5e-7; with
one accumulator, the twenty-first session's trial, up to 4.5e-6). No tuned plan takes it until its error against
the float64 product is measured (the GPU test split_weight_is_as_close_to_float64_as_tf32x3).

Depthwise (Mimi's upsample, C = 512, K = 4, S = 2, T = 1) has no channel reduction; it reads the
[C, 1, K] weight as is (K contiguous floats per channel) and never splits.

Plans: _plan picks the tiles (reasoning in its docstring); conv_transpose1d_stream_workspace_size
gives the workspace its default plan needs, so a model allocates one shared SplitWorkspace up front;
`tiles=` overrides the plan, and conv_transpose1d_stream_candidate_tiles lists alternatives to time.

Floor: weights + x + out + 2 x tail bytes (the split partials stay in L2); latency-bound at B = 1.
Mimi's largest, 1024 -> 512 with K = 16, is 33.5 MB of fp32 weights. Each weight tile is read once per
column tile (once in all at B = 1, 3 times for that layer at B = 64), the repeats mostly from L2, as
the column tiles that share it run together.
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

SMS = 132
"""Streaming multiprocessors of the H200 the plans are tuned for."""
TARGET_PROGRAMS = 2 * SMS
"""Programs the plans aim for: at B = 1 the weights are the bytes and each program streams its slice
of them through a pipelined loop, so fewer than about two programs per SM leave bandwidth unused."""
MIN_CHUNKS_PER_SPLIT = 4
"""Reduction steps each split program keeps, so its loop still has iterations to pipeline and the
partial-sum round trip through the workspace stays small next to the weight bytes it streams."""
MAX_SPLIT = 16
"""The last-arriving program sums SPLIT partial tiles on its own; more would make it the straggler."""


class ConvTransposeTiles(NamedTuple):
    """One launch configuration. block_m: rows ((channel, phase) pairs), block_n: columns ((slot, step)
    pairs), block_ci: input channels per reduction step (dense only); all powers of two, >= 16 with dot (tl.dot),
    >= 2 without. split: programs sharing one output tile's reduction (1 = no split-K; depthwise always 1).
    dot: the dense products on the tensor cores; else fp32 FMAs (few columns, _fma_plan). columns_first (dense dot
    plans): the product taken transposed, columns as the dot's first operand and the weight as its second (see the
    module doc). split_weight (columns-first plans): the weight read as its two tf32 parts (split_tf32, made once)
    and only the columns split on each step (_utils.dot_split_weight)."""
    block_m: int
    block_n: int
    block_ci: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    dot: bool = True
    columns_first: bool = False
    split_weight: bool = False


def conv_transpose1d_stream_ref(x, partial, frame, weight, bias, stride, groups=1, elu_input=False, out=None):
    """Torch reference (same state convention)."""
    overlap = partial.shape[-1]
    parity = (frame % 2).long()
    batch = torch.arange(x.shape[0], device=x.device)
    full = F.conv_transpose1d(F.elu(x) if elu_input else x, weight, None, stride=stride, groups=groups)
    head = full[..., :overlap] + partial[parity, batch]
    partial[1 - parity, batch] = full[..., full.shape[-1] - overlap:]
    y = torch.cat([head, full[..., overlap:full.shape[-1] - overlap]], dim=-1)
    if bias is not None:
        y = y + bias[:, None]
    if out is None:
        return y
    out.copy_(y)
    return out


def pack_conv_transpose_weight(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """Dense weight [C_in, C_out, K] -> packed [K / S, C_out, S, C_in] (contiguous), the layout the kernel
    reads: packed[r, o, p, i] = weight[i, o, r S + p]. Made once when the model is prepared."""
    c_in, c_out, kernel = weight.shape
    _check_kernel(kernel, stride)
    return weight.detach().reshape(c_in, c_out, kernel // stride, stride).permute(2, 1, 3, 0).contiguous()


def _check_kernel(kernel: int, stride: int) -> None:
    if kernel % stride or kernel == stride:
        raise ValueError(f"kernel {kernel} must be a multiple (> 1) of the stride {stride}")


class _Geometry(NamedTuple):
    rows: int  # C_out * S
    cols: int  # B * (T + TAPS - 1)
    taps: int
    c_in: int
    depthwise: bool


def _geometry(batch, c_in, c_out, kernel, stride, t_in, groups) -> _Geometry:
    taps = kernel // stride
    return _Geometry(c_out * stride, batch * (t_in + taps - 1), taps, c_in, groups > 1)


def _tile_count(g: _Geometry, block_m: int, block_n: int) -> int:
    return triton.cdiv(g.rows, block_m) * triton.cdiv(g.cols, block_n)


def _chunks(g: _Geometry, block_ci: int) -> int:
    return triton.cdiv(g.c_in, block_ci) * g.taps


def _balanced_split(chunks: int, split: int) -> int:
    """The split with the same chunks per program as `split` but no program left without any."""
    split = max(1, min(split, chunks))
    return triton.cdiv(chunks, triton.cdiv(chunks, split))


def _plan(g: _Geometry, block_m: int | None = None, block_n: int | None = None) -> ConvTransposeTiles:
    """The default tiling; block_m / block_n fix those choices and plan the rest around them.

    Column tiles of up to 64 (slot, step) pairs: at Mimi's shapes STEPS is 3, 17, 97, 481, so 64-wide
    tiles keep the padding small while spanning many slots when STEPS is short. Row tiles start at 64
    and halve (down to 16, tl.dot's minimum) until there are TARGET_PROGRAMS tiles: narrower tiles
    mean each program streams a smaller weight slice, and at B = 1 the weights are all the bytes. If
    the tiles still fall short, split-K brings the program count up to the target, keeping
    MIN_CHUNKS_PER_SPLIT reduction steps per program.

    Reduction steps of 32 channels: the tf32x3 dot holds a high and a low tf32 part of both operand
    slices in registers, and 64-channel steps push most tile shapes to 200-255 registers (spilling at
    32 x 64 and up with 4 warps; measured with ptxas for sm_90), while 32 keeps them at 90-200.
    64 x 64 tiles take 8 warps for the same reason. The skinny tiles of small batches only stream
    weights, 2 KB a step: a fourth pipeline stage keeps more of those loads in flight."""
    if block_n is None:
        block_n = min(64, next_pow2(g.cols))
    if block_m is None:
        block_m = min(64, next_pow2(g.rows))
        while block_m > 16 and _tile_count(g, block_m, block_n) < TARGET_PROGRAMS:
            block_m //= 2
    num_warps = 8 if block_m * block_n >= 64 * 64 else 4
    if g.depthwise:
        return ConvTransposeTiles(block_m, block_n, 16, num_warps=num_warps)
    block_ci = min(32, next_pow2(g.c_in))
    num_stages = 4 if block_m * block_n <= 16 * 32 else 3
    tiles = _tile_count(g, block_m, block_n)
    split = 1
    if tiles < TARGET_PROGRAMS:
        chunks = _chunks(g, block_ci)
        wanted = min(MAX_SPLIT, triton.cdiv(TARGET_PROGRAMS, tiles), chunks // MIN_CHUNKS_PER_SPLIT)
        split = _balanced_split(chunks, wanted)
    return ConvTransposeTiles(block_m, block_n, block_ci, split, num_warps, num_stages)


FMA_MAX_COLUMNS = 4
"""Columns (B (T + TAPS - 1)) up to which a dense transposed conv takes the FMA plan (_fma_plan): the decoder's
first upsampling conv at one conversation (3 columns)."""
_FMA_TARGET_PROGRAMS = 512
_FMA_MIN_CHUNKS_PER_SPLIT = 2


def _fma_plan(g: _Geometry) -> ConvTransposeTiles:
    """The plan of a dense transposed conv with at most FMA_MAX_COLUMNS columns, a weight-streaming GEMV more than a
    GEMM, as conv1d_stream's _fma_plan: the weight in [16 rows x up to 128 channels] fp32 tiles with 16-byte loads,
    fp32 FMAs over the few columns, about _FMA_TARGET_PROGRAMS programs of 4 warps (the split while each keeps
    _FMA_MIN_CHUNKS_PER_SPLIT chunks)."""
    block_m = min(16, next_pow2(g.rows, minimum=2))
    block_n = next_pow2(g.cols, minimum=2)
    block_ci = fma_reduction_step(g.c_in)
    tiles = _tile_count(g, block_m, block_n)
    chunks = _chunks(g, block_ci)
    wanted = min(MAX_SPLIT, triton.cdiv(_FMA_TARGET_PROGRAMS, tiles), max(1, chunks // _FMA_MIN_CHUNKS_PER_SPLIT))
    return ConvTransposeTiles(block_m, block_n, block_ci, _balanced_split(chunks, wanted), dot=False)


def _default_plan(batch, c_in, c_out, kernel, stride, t_in, groups) -> ConvTransposeTiles:
    """_fma_plan's for a dense transposed conv with at most FMA_MAX_COLUMNS columns, else _dot_default_plan's."""
    g = _geometry(batch, c_in, c_out, kernel, stride, t_in, groups)
    if not g.depthwise and g.cols <= FMA_MAX_COLUMNS:
        return _fma_plan(g)
    return _dot_default_plan(batch, c_in, c_out, kernel, stride, t_in, groups)


def _dot_default_plan(batch, c_in, c_out, kernel, stride, t_in, groups) -> ConvTransposeTiles:
    """The measured plan where kernels/tuned.py has one for this shape and batch, else _plan's."""
    measured = tuned_tiles("convtr", shape_key(c_in, c_out, kernel, stride, t_in, groups), batch)
    if measured is not None:
        return ConvTransposeTiles(**measured)
    return _plan(_geometry(batch, c_in, c_out, kernel, stride, t_in, groups))


def _workspace_need(g: _Geometry, tiles: ConvTransposeTiles) -> tuple[int, int]:
    if tiles.split == 1:
        return 0, 0
    count = _tile_count(g, tiles.block_m, tiles.block_n)
    return count * tiles.split * tiles.block_m * tiles.block_n, count


def conv_transpose1d_stream_workspace_size(batch: int, c_in: int, c_out: int, kernel: int, stride: int, t_in: int,
                                           groups: int = 1) -> tuple[int, int]:
    """(partial floats, counters) the default plan needs in a SplitWorkspace; (0, 0) when it does not split."""
    g = _geometry(batch, c_in, c_out, kernel, stride, t_in, groups)
    return _workspace_need(g, _default_plan(batch, c_in, c_out, kernel, stride, t_in, groups))


LIGHT_TILE_COLUMNS = 128
"""Columns (B (T + TAPS - 1)) from which the sweep also tries lighter dense plans: one pipeline stage less together
with 8 warps, a halved row tile or a halved reduction step (conv1d_stream._light_tiles says why: at B = 64 on an H100
cuDNN ran the decoder's upsampling convs 2-3x faster than their tuned plans)."""


def conv_transpose1d_stream_candidate_tiles(batch: int, c_in: int, c_out: int, kernel: int, stride: int, t_in: int,
                                            groups: int = 1) -> list[ConvTransposeTiles]:
    """Up to 16 tilings around the default plan (which is not among them), for tuning sweeps: row and
    column tiles halved and doubled (split re-planned for each), no split / twice the split, the
    reduction step halved and doubled, half and twice the warps, one pipeline stage less and more, the
    other operand order (columns_first) of a dense plan; from LIGHT_TILE_COLUMNS columns on, three
    lighter plans that move two of those knobs at once."""
    g = _geometry(batch, c_in, c_out, kernel, stride, t_in, groups)
    base = _default_plan(batch, c_in, c_out, kernel, stride, t_in, groups)
    if not base.dot:
        return _fma_candidates(g, base, _dot_default_plan(batch, c_in, c_out, kernel, stride, t_in, groups))
    variants = [
        _plan(g, block_m=base.block_m // 2, block_n=base.block_n),
        _plan(g, block_m=base.block_m * 2, block_n=base.block_n),
        _plan(g, block_m=base.block_m, block_n=base.block_n // 2),
        _plan(g, block_m=base.block_m, block_n=base.block_n * 2),
        base._replace(num_warps=max(1, base.num_warps // 2)),
        base._replace(num_warps=min(8, 2 * base.num_warps)),
    ]
    if not g.depthwise:
        chunks = _chunks(g, base.block_ci)
        variants += [
            base._replace(split=1) if base.split > 1 else base._replace(split=_balanced_split(chunks, 2)),
            base._replace(split=_balanced_split(chunks, 2 * base.split)),
            base._replace(block_ci=base.block_ci // 2,
                          split=_balanced_split(_chunks(g, base.block_ci // 2), base.split)),
            base._replace(block_ci=base.block_ci * 2,
                          split=_balanced_split(_chunks(g, base.block_ci * 2), base.split)),
            base._replace(num_stages=base.num_stages - 1),
            base._replace(num_stages=base.num_stages + 1),
            base._replace(columns_first=not base.columns_first),
        ]
        if g.cols >= LIGHT_TILE_COLUMNS:
            lighter = max(1, base.num_stages - 1)
            variants += [
                base._replace(num_warps=8, num_stages=lighter),
                _plan(g, block_m=max(16, base.block_m // 2), block_n=base.block_n)._replace(num_stages=lighter),
                base._replace(block_ci=max(16, base.block_ci // 2), num_stages=lighter,
                              split=_balanced_split(_chunks(g, max(16, base.block_ci // 2)), base.split)),
            ]
    def pads_only(tiles: ConvTransposeTiles) -> bool:
        return (tiles.block_m > next_pow2(g.rows) or tiles.block_n > next_pow2(g.cols)
                or (not g.depthwise and tiles.block_ci > next_pow2(g.c_in)))

    return _distinct_valid(g, base, variants, lambda tiles: not pads_only(tiles))


def _fma_candidates(g: _Geometry, base: ConvTransposeTiles, dot_plan: ConvTransposeTiles) -> list[ConvTransposeTiles]:
    """Up to 12 tilings around an FMA plan (which is not among them): its one-knob neighbours, then the tensor-core
    plan of the shape."""
    chunks = _chunks(g, base.block_ci)
    variants = [
        base._replace(block_m=base.block_m // 2), base._replace(block_m=base.block_m * 2),
        base._replace(split=_balanced_split(chunks, 2 * base.split)),
        base._replace(split=_balanced_split(chunks, max(1, base.split // 2))),
        base._replace(block_ci=base.block_ci // 2, split=_balanced_split(_chunks(g, base.block_ci // 2), base.split)),
        base._replace(block_ci=base.block_ci * 2, split=_balanced_split(_chunks(g, base.block_ci * 2), base.split)),
        base._replace(num_warps=2), base._replace(num_warps=8), base._replace(num_stages=2), dot_plan,
    ]
    def fits(tiles: ConvTransposeTiles) -> bool:
        return (tiles.block_m <= 2 * next_pow2(g.rows, minimum=2)
                and tiles.block_ci <= 2 * next_pow2(g.c_in, minimum=2))

    return _distinct_valid(g, base, variants, fits)


def _distinct_valid(g: _Geometry, base: ConvTransposeTiles, variants: list[ConvTransposeTiles],
                    keep) -> list[ConvTransposeTiles]:
    """The variants other than base that `keep` (a predicate on the tiles) and that can run (_tiles_error), in
    order, without repeats."""
    candidates = []
    for tiles in variants:
        if tiles != base and tiles not in candidates and keep(tiles) and _tiles_error(g, tiles) is None:
            candidates.append(tiles)
    return candidates


def _tiles_error(g: _Geometry, tiles: ConvTransposeTiles) -> str | None:
    """Why `tiles` cannot run at this geometry, or None."""
    smallest = 16 if tiles.dot else 2
    for name in ("block_m", "block_n", "block_ci"):
        size = getattr(tiles, name)
        if size < smallest or size & (size - 1):
            return f"{name} must be a power of two >= {smallest}, got {size}"
    if not tiles.dot and g.depthwise:
        return "depthwise transposed convs have no reduction to run on FMAs: dot must stay True"
    if tiles.columns_first and (not tiles.dot or g.depthwise):
        return "columns_first is a layout of the dense tensor-core product: it needs dot and groups = 1"
    if tiles.split_weight and not tiles.columns_first:
        return "split_weight reads the weight as the product's second operand: it needs columns_first"
    if tiles.split < 1 or (g.depthwise and tiles.split != 1):
        return f"split must be >= 1, and 1 for depthwise convs; got {tiles.split}"
    if tiles.num_warps < 1 or tiles.num_warps & (tiles.num_warps - 1) or tiles.num_stages < 1:
        return f"num_warps must be a power of two and num_stages >= 1, got {tiles.num_warps}, {tiles.num_stages}"
    return None


@triton.jit
def _finish_tile(result, offs_m, offs_n, mask_m, mask_n,
                 partial_ptr, frame_ptr, bias_ptr, out_ptr, T_IN,
                 stride_pp, stride_pb, stride_pc, stride_ob, stride_oc, stride_ot,
                 STRIDE: tl.constexpr, TAPS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Adds the carried overlap and bias to the output columns and writes the tail columns, unbiased,
    to the other parity buffer of each column's slot."""
    steps = T_IN + TAPS - 1
    channel = offs_m // STRIDE
    slot = offs_n // steps
    step = offs_n % steps
    position = step[None, :] * STRIDE + (offs_m % STRIDE)[:, None]
    parity = tl.load(frame_ptr + slot, mask=mask_n, other=0) % 2
    slot_state = slot[None, :] * stride_pb + channel[:, None] * stride_pc
    to_out = mask_m[:, None] & (mask_n & (step < T_IN))[None, :]
    to_tail = mask_m[:, None] & (mask_n & (step >= T_IN))[None, :]
    carried = tl.load(partial_ptr + parity[None, :] * stride_pp + slot_state + position,
                      mask=to_out & (position < (TAPS - 1) * STRIDE), other=0.0)
    output = result + carried
    if HAS_BIAS:
        output += tl.load(bias_ptr + channel, mask=mask_m, other=0.0)[:, None]
    tl.store(out_ptr + slot[None, :] * stride_ob + channel[:, None] * stride_oc + position * stride_ot, output,
             mask=to_out)
    tl.store(partial_ptr + (1 - parity)[None, :] * stride_pp + slot_state + (position - T_IN * STRIDE), result,
             mask=to_tail)


@triton.jit
def _conv_transpose1d_stream_kernel(
    x_ptr, partial_ptr, frame_ptr, w_ptr, w_low_ptr, bias_ptr, out_ptr, scratch_ptr, counter_ptr,
    C_IN, C_OUT, T_IN, COLS,
    stride_xb, stride_xc, stride_xt,
    stride_pp, stride_pb, stride_pc,
    stride_wtap, stride_wrow,
    stride_ob, stride_oc, stride_ot,
    STRIDE: tl.constexpr, TAPS: tl.constexpr, DEPTHWISE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ELU_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CI: tl.constexpr, SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT: tl.constexpr, EVEN_CI: tl.constexpr, PDL: tl.constexpr,
    COLUMNS_FIRST: tl.constexpr, SPLIT_WEIGHT: tl.constexpr,
):
    await_previous_kernel(PDL)
    # Column tiles vary fastest, so the programs that share a weight tile run together and the weight
    # tile is fetched from HBM about once.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    steps = T_IN + TAPS - 1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < C_OUT * STRIDE
    mask_n = offs_n < COLS
    step = offs_n % steps
    x_column = x_ptr + (offs_n // steps) * stride_xb + step * stride_xt

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DEPTHWISE:
        channel = offs_m // STRIDE
        for r in tl.static_range(TAPS):
            valid = mask_n & (step >= r) & (step - r < T_IN)
            w = tl.load(w_ptr + channel * stride_wrow + (offs_m % STRIDE) + r * STRIDE, mask=mask_m, other=0.0)
            v = tl.load(x_column[None, :] + channel[:, None] * stride_xc - r * stride_xt,
                        mask=mask_m[:, None] & valid[None, :], other=0.0)
            if ELU_INPUT:
                v = elu(v)
            acc += w[:, None] * v
    else:
        # Chunks in (channel block, tap) order: consecutive chunks read the same x rows shifted by one
        # time step (cache hits), and a split program's x reads stay within its own channel range.
        chunks = tl.cdiv(C_IN, BLOCK_CI) * TAPS
        per_split = tl.cdiv(chunks, SPLIT)
        if not DOT:
            # The FMA loop's products accumulate per channel offset, summed over that axis once after the loop.
            acc = tl.zeros((BLOCK_M, BLOCK_CI, BLOCK_N), dtype=tl.float32)
        if COLUMNS_FIRST:
            acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            if SPLIT_WEIGHT:
                acc_small = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for chunk in range(pid_k * per_split, tl.minimum(chunks, (pid_k + 1) * per_split)):
            tap = chunk % TAPS
            offs_ci = (chunk // TAPS) * BLOCK_CI + tl.arange(0, BLOCK_CI)
            mask_ci = offs_ci < C_IN
            valid = mask_n & (step >= tap) & (step - tap < T_IN)
            if COLUMNS_FIRST:
                # The columns as the dot's first operand, [BLOCK_N, BLOCK_CI], and the weight as its second.
                v_t = tl.load(x_column[:, None] + offs_ci[None, :] * stride_xc - tap * stride_xt,
                              mask=valid[:, None] & mask_ci[None, :], other=0.0)
                if ELU_INPUT:
                    v_t = elu(v_t)
                w_offsets = tap * stride_wtap + offs_m[None, :] * stride_wrow + offs_ci[:, None]
                w_t_mask = mask_m[None, :] & mask_ci[:, None]
                w_t = tl.load(w_ptr + w_offsets, mask=w_t_mask, other=0.0)
                if SPLIT_WEIGHT:
                    # w_ptr holds the weight's high tf32 part and w_low_ptr the rest.
                    w_low_t = tl.load(w_low_ptr + w_offsets, mask=w_t_mask, other=0.0)
                    acc_t, acc_small = dot_split_weight(v_t, w_t, w_low_t, acc_t, acc_small)
                else:
                    acc_t = tl.dot(v_t, w_t, acc_t, input_precision=INPUT_PRECISION)
            else:
                # EVEN_CI (FMA plans with C_in a multiple of BLOCK_CI): whole chunks, rows loaded in 16-byte pieces.
                if EVEN_CI:
                    w_mask = mask_m[:, None]
                else:
                    w_mask = mask_m[:, None] & mask_ci[None, :]
                w = tl.load(w_ptr + tap * stride_wtap + offs_m[:, None] * stride_wrow + offs_ci[None, :],
                            mask=w_mask, other=0.0)
                v = tl.load(x_column[None, :] + offs_ci[:, None] * stride_xc - tap * stride_xt,
                            mask=mask_ci[:, None] & valid[None, :], other=0.0)
                if ELU_INPUT:
                    v = elu(v)
                if DOT:
                    acc += tl.dot(w, v, input_precision=INPUT_PRECISION)
                else:
                    acc += w[:, :, None] * v[None, :, :]
        if not DOT:
            acc = tl.sum(acc, axis=1)
        if COLUMNS_FIRST:
            if SPLIT_WEIGHT:
                acc_t += acc_small
            acc = tl.trans(acc_t)

    if SPLIT == 1:
        _finish_tile(acc, offs_m, offs_n, mask_m, mask_n, partial_ptr, frame_ptr, bias_ptr, out_ptr, T_IN,
                     stride_pp, stride_pb, stride_pc, stride_ob, stride_oc, stride_ot, STRIDE, TAPS, HAS_BIAS)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        tile_floats = BLOCK_M * BLOCK_N
        tile_scratch = (scratch_ptr + tile * (SPLIT * tile_floats)
                        + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :])
        tl.store(tile_scratch + pid_k * tile_floats, acc)
        # Every thread's partial store precedes the single arrival (one thread runs a scalar atomic);
        # the release half publishes them at GPU scope, the acquire half orders the final sum's reads.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                # .cg reads at L2, where the other SMs' partials are, never a stale L1 line.
                total += tl.load(tile_scratch + s * tile_floats, cache_modifier=".cg")
            _finish_tile(total, offs_m, offs_n, mask_m, mask_n, partial_ptr, frame_ptr, bias_ptr, out_ptr, T_IN,
                         stride_pp, stride_pb, stride_pc, stride_ob, stride_oc, stride_ot, STRIDE, TAPS,
                         HAS_BIAS)
            tl.store(counter_ptr + tile, 0)


def conv_transpose1d_stream(x: torch.Tensor, partial: torch.Tensor, frame: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None, stride: int, groups: int = 1, elu_input: bool = False,
                            out: torch.Tensor | None = None, packed_weight: torch.Tensor | None = None,
                            workspace: SplitWorkspace | None = None, tiles: ConvTransposeTiles | None = None,
                            weight_parts: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher. float32; partial [2, B, C_out, K - S] with unit stride in time; see module doc.

    packed_weight: pack_conv_transpose_weight(weight, stride) for dense convs (packed per call when
    None, which is correct but adds a copy of the weights); depthwise convs read `weight` itself.
    workspace: shared split-K scratch sized by conv_transpose1d_stream_workspace_size (a fresh one is
    allocated when the plan splits and none is given). tiles: overrides the default plan. weight_parts:
    split_tf32(packed weight), [2, K / S, C_out, S, C_in], read by plans with split_weight (split per call when
    None, correct but a pass over the weights) and by no other."""
    batch, c_in, t_in = x.shape
    kernel = weight.shape[-1]
    c_out = weight.shape[1] * groups
    _check_kernel(kernel, stride)
    if groups not in (1, c_in) or (groups == c_in and c_out != c_in):
        raise ValueError("only dense (groups=1) and depthwise (groups=C_in=C_out) transposed convs are supported")
    if partial.shape != (2, batch, c_out, kernel - stride) or partial.stride(-1) != 1:
        raise ValueError(f"partial must be [2, {batch}, {c_out}, {kernel - stride}] with unit stride in time")
    g = _geometry(batch, c_in, c_out, kernel, stride, t_in, groups)
    if g.depthwise:
        if packed_weight is not None:
            raise ValueError("depthwise transposed convs read their weight as is: pass packed_weight=None")
        if weight.stride(-1) != 1:
            raise ValueError("weight must be contiguous in its kernel dimension")
        w, stride_wtap, stride_wrow = weight, 0, weight.stride(0)
    else:
        w = pack_conv_transpose_weight(weight, stride) if packed_weight is None else packed_weight
        if w.shape != (g.taps, c_out, stride, c_in) or not w.is_contiguous():
            raise ValueError(f"packed_weight must be pack_conv_transpose_weight(weight, {stride}): contiguous "
                             f"[{g.taps}, {c_out}, {stride}, {c_in}], got {tuple(w.shape)}")
        stride_wtap, stride_wrow = w.stride(0), w.stride(2)
        if weight_parts is not None and (weight_parts.shape != (2, *w.shape) or not weight_parts.is_contiguous()):
            raise ValueError(f"weight_parts must be split_tf32(packed_weight): contiguous [2, {g.taps}, {c_out}, "
                             f"{stride}, {c_in}], got {tuple(weight_parts.shape)}")
    plan = _default_plan(batch, c_in, c_out, kernel, stride, t_in, groups) if tiles is None else tiles
    problem = _tiles_error(g, plan)
    if problem is not None:
        raise ValueError(problem)
    if out is None:
        out = torch.empty(batch, c_out, t_in * stride, device=x.device, dtype=torch.float32)
    scratch, counters = out, frame  # placeholders: the kernel touches neither when it does not split
    if plan.split > 1:
        need = _workspace_need(g, plan)
        if workspace is None:
            workspace = SplitWorkspace(*need, device=x.device)
        workspace.check(*need)
        scratch, counters = workspace.partials, workspace.counters
    grid = (triton.cdiv(g.cols, plan.block_n), triton.cdiv(g.rows, plan.block_m), plan.split)
    use_pdl = pdl(x.device, "conv_transpose1d_stream")
    w_low = w
    if plan.split_weight:
        parts = split_tf32(w) if weight_parts is None else weight_parts
        w, w_low = parts[0], parts[1]
    _conv_transpose1d_stream_kernel[grid](
        x, partial, frame, w, w_low, bias if bias is not None else w, out, scratch, counters,
        c_in, c_out, t_in, g.cols,
        x.stride(0), x.stride(1), x.stride(2),
        partial.stride(0), partial.stride(1), partial.stride(2),
        stride_wtap, stride_wrow,
        out.stride(0), out.stride(1), out.stride(2),
        STRIDE=stride, TAPS=g.taps, DEPTHWISE=g.depthwise, HAS_BIAS=bias is not None, ELU_INPUT=elu_input,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_CI=plan.block_ci, SPLIT=plan.split,
        INPUT_PRECISION=dot_precision(), DOT=plan.dot, EVEN_CI=not plan.dot and c_in % plan.block_ci == 0,
        PDL=use_pdl, COLUMNS_FIRST=plan.columns_first, SPLIT_WEIGHT=plan.split_weight, num_warps=plan.num_warps,
        num_stages=plan.num_stages, launch_pdl=use_pdl,
    )
    return out
