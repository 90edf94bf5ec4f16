"""Linear layer for few rows (streaming decode): optional LayerNorm of the input rows, the product with
the weight, bias, exact GELU and residual add, in one launch.

Shapes:
    x          [M, K]   fp32 or bf16; any row stride, unit stride along K
    weight     [N, K]   fp32 or bf16, contiguous (nn.Linear's layout)
    bias       [N]      optional
    norm       optional (norm_weight [K], norm_bias [K] or None, eps): LayerNorm of each x row
    residual   [M, N]   optional; may be `out` itself (an in-place x += f(x))
    out        [M, N]   fp32 or bf16 (default: x's dtype); any row stride, unit stride along N

    out = act(LN(x) @ weight.T + bias) + residual, act = exact (erf) GELU or identity,

all in fp32 (LN: mean and biased variance over K, as F.layer_norm), rounded once to out's dtype.
Mimi's transformer layers (M = 2 x slots, K and N of 512 / 1536 / 2048, fp32) and the language
model's decode linears (M = batch, bf16, K and N up to 11264) are the shapes this is planned for.

Work split: a program owns an output tile [BLOCK_M, BLOCK_N] (and, with split-K, one K range) and
streams its [BLOCK_N, K] weight slice in BLOCK_K chunks. At small M the weight is the whole cost, so
the tiles are chosen for enough programs to keep every SM streaming; each program re-reads its rows of
x (BLOCK_M x K, from L1/L2: at most the size of its weight slice where BLOCK_N >= BLOCK_M). With a
norm, a program first computes the mean and 1/std of its rows over the whole K (one read of the
rows), then normalises each chunk of x as it loads it.

Products, two paths (the tiles' `dot` flag):
  FMA   the chunk products x[m, k] * w[n, k] accumulate elementwise in a [BLOCK_M, BLOCK_N, BLOCK_K]
        fp32 tile, summed over K once at the end: exact fp32 products, no cross-thread traffic inside
        the loop, and no padding of M to tl.dot's 16 rows. By default below the dot path's M.
  dot   tl.dot on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] (block dims >= 16): bf16 operands natively
        when x and the weight are both bf16, else fp32 operands in "tf32x3" (_utils.dot_precision).
        By default from M = 16 with fp32 weights, M = 8 with bf16: the FMA time over the weight
        stream's time grows as M / (bytes a weight), and on an H200 (~33 T fp32 FMA/s against ~3-4.8
        TB/s) it reaches about 0.4 there, too much to hide behind the loads.
  split-K (split_k > 1, needs a SplitWorkspace): program s of a tile covers K range s; each stores its
        fp32 partial tile, and the tile's last-arriving program sums the partials in split order
        (deterministic), applies bias, GELU and residual, writes out and resets the tile's counter
        (graph-safe). Only that program reads the residual and writes out, so out may alias the
        residual; with a norm every split program computes its rows' statistics over the whole K.

Default tiles (`skinny_linear_tiles`; `tiles=` overrides, `skinny_linear_candidate_tiles` lists
alternatives to time). Target: about two programs per SM (at least 1.5 x SMs, so that 256 programs
count on 132 SMs): one program streams one slice at a time, and a second one per SM keeps loads in
flight while the other reduces or writes.
  FMA   BLOCK_M = M rounded up to a power of two (one row tile: the weight is read once). BLOCK_N = the
        widest power of two (<= 64, and leaving BLOCK_K >= 128) that still gives the target (wider
        slices re-read x less often); BLOCK_K = as much of K as fits 64 fp32 accumulators a thread
        (4 warps), so that at Mimi's shapes a program loads its whole weight slice at once.
  dot   BLOCK_M = min(64, M rounded up), BLOCK_K = 64 (fp32) / 128 (bf16); BLOCK_N the widest of
        16..64 giving the target, then BLOCK_M halved down to 16 while short of it (re-reads of the
        weight tile then come from L2); with a workspace, split-K doubled while still short of the
        target and every split keeps at least one BLOCK_K chunk.
Grids on an H200 (132 SMs), fp32, (N tiles, M tiles, splits):
  M = 2    qkv 512->1536 (384, 1, 1) BLOCK_N 4, BLOCK_K 512; out 512->512 (256, 1, 1) BLOCK_N 2, BLOCK_K 512;
           fc1 512->2048 (256, 1, 1) BLOCK_N 8, BLOCK_K 512; fc2 2048->512 (256, 1, 1) BLOCK_N 2, BLOCK_K 2048
  M = 16   dot 16 x 16 x 64: qkv (96, 1, 1), out (32, 1, 1), fc1 (128, 1, 1), fc2 (32, 1, 1);
           with a workspace qkv (96, 1, 4), out (32, 1, 8), fc1 (128, 1, 2), fc2 (32, 1, 8)
  M = 128  dot: qkv 32 x 16 (96, 4, 1), out 16 x 16 (32, 8, 1), fc1 64 x 16 (128, 2, 1),
           fc2 16 x 16 (32, 8, 1)
and bf16 for the language model: 4096->12288 at M = 1 (384, 1, 1) BLOCK_N 32, BLOCK_K 256, at M = 8 and
64 dot 16 / 64 x 32 x 128 (384, 1, 1); 11264->4096 at M = 1 (256, 1, 1) BLOCK_N 16, BLOCK_K 512, at
M = 8 and 64 dot 16 / 64 x 16 x 128 (256, 1, 1).

Floor: weight + x + out (+ residual) bytes, the weight dominating at small M. Mimi fp32 at M = 2: qkv
3.1 MB, out 1.0 MB, fc1 and fc2 4.2 MB each: 12.6 MB a layer, 4.5 us at the H200's measured 2.77 TB/s
(36 us per 8-layer transformer). Graph-safe: no host values depend on the data.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import SplitWorkspace, can_launch, dot_precision, interpreting, next_pow2
from .rvq_encode import _sm_count
from .tuned import shape_key, tuned_tiles

DOT_MIN_ROWS = {torch.float32: 16, torch.bfloat16: 8}
"""By weight dtype: from this M on the default tiles use tl.dot; below, exact FMAs (see the module doc)."""
MIN_PROGRAMS_PER_SM = 1.5
"""Programs the default tiles aim for, per SM (see the module doc)."""
FMA_ACCUMULATORS_PER_THREAD = 64
"""fp32 registers a thread gives to the FMA path's [BLOCK_M, BLOCK_N, BLOCK_K] accumulator."""
MIN_FMA_BLOCK_K = 128
"""The FMA path keeps chunks at least this long (coalesced rows) before narrowing BLOCK_N."""
H200_SMS = 132
"""SMs the tiles are planned for when no CUDA device is present (the target GPU)."""
DTYPES = (torch.float32, torch.bfloat16)


class SkinnyTiles(NamedTuple):
    """One tiling (see the module doc). Block sizes are powers of two, >= 16 when `dot`; split_k > 1
    needs a SplitWorkspace; num_warps and num_stages are Triton's launch options."""
    block_m: int
    block_n: int
    block_k: int
    dot: bool
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def skinny_linear_ref(x, weight, *, bias=None, norm=None, activation=None, residual=None, out=None,
                      tiles=None, workspace=None):
    """Torch reference, the spec: fp32 math on the given values, rounded once to out's dtype (x's by
    default). `tiles` and `workspace` are accepted for the kernel's signature."""
    hidden = x.float()
    if norm is not None:
        norm_weight, norm_bias, eps = norm
        hidden = F.layer_norm(hidden, (hidden.shape[-1],), norm_weight.float(),
                              None if norm_bias is None else norm_bias.float(), eps)
    y = F.linear(hidden, weight.float(), None if bias is None else bias.float())
    if activation == "gelu":
        y = F.gelu(y)
    if residual is not None:
        y = y + residual.float()
    if out is None:
        return y.to(x.dtype)
    out.copy_(y)
    return out


@triton.jit
def _row_statistics(x_ptr, offs_m, mask_m, stride_xm, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean and 1/std over K of the rows offs_m, in fp32: per-chunk mean and squared deviations merged
    with Chan's parallel update, so the rows are read once and a large mean does not cancel (as a sum
    of squares minus the squared sum would)."""
    offs_k = tl.arange(0, BLOCK_K)
    count = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    squared_deviations = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        values = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :],
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        chunk_count = tl.minimum(K - k0, BLOCK_K).to(tl.float32)
        chunk_mean = tl.sum(values, axis=1) / chunk_count
        centered = tl.where(mask_k[None, :], values - chunk_mean[:, None], 0.0)
        chunk_deviations = tl.sum(centered * centered, axis=1)
        merged_count = count + chunk_count
        delta = chunk_mean - mean
        mean += delta * (chunk_count / merged_count)
        squared_deviations += chunk_deviations + delta * delta * (count * chunk_count / merged_count)
        count = merged_count
    return mean, tl.rsqrt(squared_deviations / K + eps)


@triton.jit
def _load_rows(x_ptr, offs_m, mask_m, stride_xm, ks, mask_k, mean, rstd, norm_w_ptr, norm_b_ptr,
               HAS_NORM: tl.constexpr, NORM_HAS_BIAS: tl.constexpr):
    """x[offs_m, ks] ([BLOCK_M, BLOCK_K]), layer-normalised in fp32 with a norm; 0 where k is masked
    (the norm's weight and bias load as 0 there)."""
    rows = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :], mask=mask_m[:, None] & mask_k[None, :],
                   other=0.0)
    if HAS_NORM:
        gamma = tl.load(norm_w_ptr + ks, mask=mask_k, other=0.0).to(tl.float32)
        rows = (rows.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :]
        if NORM_HAS_BIAS:
            rows += tl.load(norm_b_ptr + ks, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    return rows


@triton.jit
def _epilogue(acc, offs_m, offs_n, mask_m, mask_n, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
              HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        # With out aliasing the residual, this program is the only one to read or write these elements.
        acc += tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _skinny_linear_kernel(
    x_ptr, w_ptr, bias_ptr, norm_w_ptr, norm_b_ptr, res_ptr, out_ptr, partials_ptr, counters_ptr,
    M, N, K, k_per_split, eps,
    stride_xm, stride_wn, stride_rm, stride_om,
    HAS_NORM: tl.constexpr, NORM_HAS_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, DOT: tl.constexpr, BF16_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_NORM:
        mean, rstd = _row_statistics(x_ptr, offs_m, mask_m, stride_xm, K, eps, BLOCK_M, BLOCK_K)
    else:
        # Unused without a norm; _load_rows takes them either way.
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        rstd = mean
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)

    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + offs_k
            mask_k = ks < k_end
            rows = _load_rows(x_ptr, offs_m, mask_m, stride_xm, ks, mask_k, mean, rstd, norm_w_ptr,
                              norm_b_ptr, HAS_NORM, NORM_HAS_BIAS)
            # The weight chunk as [BLOCK_K, BLOCK_N]: K-major, the operand layout the tensor cores take.
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + ks[:, None],
                        mask=mask_n[None, :] & mask_k[:, None], other=0.0)
            if BF16_DOT:
                acc = tl.dot(rows.to(tl.bfloat16), w, acc)
            else:
                acc = tl.dot(rows.to(tl.float32), w.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    else:
        products = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + offs_k
            mask_k = ks < k_end
            rows = _load_rows(x_ptr, offs_m, mask_m, stride_xm, ks, mask_k, mean, rstd, norm_w_ptr,
                              norm_b_ptr, HAS_NORM, NORM_HAS_BIAS).to(tl.float32)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + ks[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            products += rows[:, None, :] * w[None, :, :]
        acc = tl.sum(products, axis=2)

    if SPLIT_K > 1:
        tile = pid_m * tl.num_programs(0) + pid_n
        tile_offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_partials = partials_ptr + tile * (SPLIT_K * BLOCK_M * BLOCK_N)
        tl.store(tile_partials + pid_k * (BLOCK_M * BLOCK_N) + tile_offsets, acc)
        # Every thread's partial stores are issued before the program's single release arrival.
        tl.debug_barrier()
        arrived = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                # ".cg": read at L2, where the other programs' partials are, never a stale L1 line.
                total += tl.load(tile_partials + split * (BLOCK_M * BLOCK_N) + tile_offsets,
                                 cache_modifier=".cg")
            _epilogue(total, offs_m, offs_n, mask_m, mask_n, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                      HAS_BIAS, GELU, HAS_RESIDUAL)
            tl.store(counters_ptr + tile, 0)
    else:
        _epilogue(acc, offs_m, offs_n, mask_m, mask_n, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                  HAS_BIAS, GELU, HAS_RESIDUAL)


def _is_pow2(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def _prev_pow2(value: int) -> int:
    return 1 << (max(value, 1).bit_length() - 1)


def _default_sms(sms: int | None) -> int:
    if sms is not None:
        return sms
    return _sm_count(torch.device("cuda")) if torch.cuda.is_available() else H200_SMS


def _widest_block(count: int, other_tiles: int, min_programs: int, smallest: int, largest: int) -> int:
    """The widest power-of-two block in [smallest, largest] that splits `count` into enough tiles that
    other_tiles x tiles >= min_programs (`smallest` when none does)."""
    block = largest
    while block > smallest and other_tiles * triton.cdiv(count, block) < min_programs:
        block //= 2
    return block


def _fma_tiles(m: int, n: int, k: int, min_programs: int, num_warps: int = 4) -> SkinnyTiles:
    block_m = next_pow2(m, minimum=1)
    accumulators = FMA_ACCUMULATORS_PER_THREAD * 32 * num_warps
    largest_n = min(64, next_pow2(n, minimum=1), _prev_pow2(accumulators // (block_m * MIN_FMA_BLOCK_K)))
    block_n = _widest_block(n, 1, min_programs, 1, largest_n)
    block_k = min(next_pow2(k), max(16, accumulators // (block_m * block_n)))
    return SkinnyTiles(block_m, block_n, block_k, dot=False, num_warps=num_warps)


def _dot_tiles(m: int, n: int, k: int, dtype: torch.dtype, min_programs: int, split_k: bool) -> SkinnyTiles:
    block_k = 128 if dtype == torch.bfloat16 else 64
    block_m = min(64, next_pow2(m))
    block_n = _widest_block(n, triton.cdiv(m, block_m), min_programs, 16, min(64, next_pow2(n)))
    block_m = _widest_block(m, triton.cdiv(n, block_n), min_programs, 16, block_m)
    splits = 1
    if split_k:
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        while tiles * splits < min_programs and 2 * splits <= triton.cdiv(k, block_k):
            splits *= 2
    return SkinnyTiles(block_m, block_n, block_k, dot=True, split_k=splits, num_stages=3)


def skinny_linear_tiles(m: int, n: int, k: int, dtype: torch.dtype, *, sms: int | None = None,
                        split_k: bool = False) -> SkinnyTiles:
    """The default tiles for x [m, k] @ weight[n, k].T with `dtype` weights on `sms` SMs (default: the
    current CUDA device's, else an H200's); split_k: whether a workspace allows splitting K. The
    measured plan where kernels/tuned.py has one for this shape and row count (and, if it splits K,
    split_k allows it), else the heuristics above."""
    if dtype not in DTYPES:
        raise TypeError(f"weights must be float32 or bfloat16, got {dtype}")
    measured = tuned_tiles("linear", shape_key(n, k, dtype), m)
    if measured is not None and (split_k or measured.get("split_k", 1) == 1):
        return SkinnyTiles(**measured)
    min_programs = math.ceil(MIN_PROGRAMS_PER_SM * _default_sms(sms))
    if m < DOT_MIN_ROWS[dtype]:
        return _fma_tiles(m, n, k, min_programs)
    return _dot_tiles(m, n, k, dtype, min_programs, split_k)


def skinny_linear_candidate_tiles(m: int, n: int, k: int, dtype: torch.dtype, *, sms: int | None = None,
                                  split_k: bool = False) -> list[SkinnyTiles]:
    """At most 10 plausible tilings to time, the default first; split_k: include split-K tilings (the
    calls then need a workspace)."""
    min_programs = math.ceil(MIN_PROGRAMS_PER_SM * _default_sms(sms))
    base = skinny_linear_tiles(m, n, k, dtype, sms=sms, split_k=split_k)
    fma = _fma_tiles(m, n, k, min_programs)
    dot = _dot_tiles(m, n, k, dtype, min_programs, split_k)
    # FMA: narrower and wider weight slices, shorter pipelined chunks, twice the warps (and chunk).
    fma_variants = [_fma_tiles(m, n, k, 2 * min_programs), _fma_tiles(m, n, k, min_programs // 2),
                    fma._replace(block_k=min(fma.block_k, 256), num_stages=3),
                    _fma_tiles(m, n, k, min_programs, num_warps=8)]
    # dot: 16 x 16 tiles (most programs), longer chunks, wider tiles (fewer re-reads), deeper pipeline.
    dot_variants = [dot._replace(block_m=16, block_n=16, split_k=1), dot._replace(block_k=2 * dot.block_k),
                    dot._replace(block_n=min(64, 2 * dot.block_n)), dot._replace(num_stages=4)]
    fma_split = fma._replace(block_n=min(64, 4 * fma.block_n), block_k=max(16, fma.block_k // 4), split_k=4)
    split_variants = [fma_split, dot._replace(split_k=2 * dot.split_k)] if split_k else []
    if m < DOT_MIN_ROWS[dtype]:
        candidates = [base, *fma_variants, *split_variants, dot, *dot_variants, base._replace(num_stages=1)]
    else:
        # FMAs cost M x N x K on the CUDA cores: only worth timing while M is small.
        few_rows = [fma, *fma_variants[:2]] if m <= 32 else []
        candidates = [base, *dot_variants, *split_variants, *few_rows]
    unique = []
    for tiles in candidates:
        if tiles not in unique:
            unique.append(tiles)
    return unique[:10]


def skinny_linear_workspace_size(m: int, n: int, tiles: SkinnyTiles) -> tuple[int, int]:
    """(fp32 partial floats, counters) a SplitWorkspace needs for these tiles; (0, 0) without split-K."""
    if tiles.split_k == 1:
        return 0, 0
    output_tiles = triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n)
    return output_tiles * tiles.split_k * tiles.block_m * tiles.block_n, output_tiles


def _check_tiles(tiles: SkinnyTiles) -> None:
    blocks = (tiles.block_m, tiles.block_n, tiles.block_k)
    if not all(_is_pow2(b) for b in blocks):
        raise ValueError(f"tile sizes must be powers of two: {tiles}")
    if tiles.dot and min(blocks) < 16:
        raise ValueError(f"tl.dot needs block_m, block_n and block_k >= 16: {tiles}")
    if tiles.split_k < 1:
        raise ValueError(f"split_k must be >= 1: {tiles}")


def _unit_stride(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 or t.shape[-1] == 1


def _max_offset(t: torch.Tensor) -> int:
    """Element offset of a non-empty tensor's last element from its first."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges that the two tensors' elements span intersect."""
    a_end = a.data_ptr() + (_max_offset(a) + 1) * a.element_size()
    b_end = b.data_ptr() + (_max_offset(b) + 1) * b.element_size()
    return a.data_ptr() < b_end and b.data_ptr() < a_end


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                  norm: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
                  activation: str | None = None,
                  residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  tiles: SkinnyTiles | None = None, workspace: SplitWorkspace | None = None) -> torch.Tensor:
    """Launcher; see the module doc. `tiles` overrides the default tiling; `workspace` enables split-K
    (in the default tiles where they would otherwise leave SMs idle; required by split_k > 1 tiles)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {list(x.shape)} and weight {list(weight.shape)} do not match [M, K] and [N, K]")
    m, k = x.shape
    n = weight.shape[0]
    if min(m, n, k) == 0:
        raise ValueError(f"empty product: M = {m}, N = {n}, K = {k}")
    if activation not in (None, "gelu"):
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    norm_weight, norm_bias, eps = norm if norm is not None else (None, None, 0.0)
    operands = {"x": x, "weight": weight, "out": out, "residual": residual, "bias": bias,
                "norm weight": norm_weight, "norm bias": norm_bias}
    given = {name: t for name, t in operands.items() if t is not None}
    for name, t in given.items():
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32 or bfloat16, got {t.dtype}")
        if not _unit_stride(t):
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")
        # Offsets are computed in int32 in the kernel.
        if _max_offset(t) >= 2 ** 31:
            raise ValueError(f"{name} spans more than 2**31 elements")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous [N, K]")
    expected = {"out": (m, n), "residual": (m, n), "bias": (n,), "norm weight": (k,), "norm bias": (k,)}
    for name, shape in expected.items():
        if name in given and tuple(given[name].shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(given[name].shape)}")
    if not can_launch(*given.values()) or len({t.device for t in given.values()}) > 1:
        raise ValueError("all tensors must be on one CUDA device (or on the CPU under TRITON_INTERPRET=1)")
    for name, t in given.items():
        if name != "out" and _overlap(t, out):
            # Other programs still read x (and the rest) while a program writes its output tile; only
            # the residual's own tile may be out's, element for element.
            same_view = t.data_ptr() == out.data_ptr() and t.stride() == out.stride() and t.dtype == out.dtype
            if name != "residual" or not same_view:
                detail = " without being out itself (same pointer, strides, dtype)"
                raise ValueError(f"{name} overlaps out" + (detail if name == "residual" else ""))

    if tiles is None:
        sms = 1 if interpreting() else _sm_count(x.device)
        tiles = skinny_linear_tiles(m, n, k, weight.dtype, sms=sms, split_k=workspace is not None)
    _check_tiles(tiles)
    if tiles.split_k > 1:
        if workspace is None:
            raise ValueError(f"split_k = {tiles.split_k} needs a SplitWorkspace")
        workspace.check(*skinny_linear_workspace_size(m, n, tiles))
        partials, counters = workspace.partials, workspace.counters
    else:
        # Never dereferenced without split-K; any valid pointers stand in.
        partials, counters = out, out
    k_per_split = triton.cdiv(triton.cdiv(k, tiles.split_k), tiles.block_k) * tiles.block_k
    residual_arg = residual if residual is not None else out
    # Triton's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits (triton-lang/triton
    # #11584): there the dot path takes the exact fp32 upcast of bf16 operands instead.
    bf16_dot = x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and not interpreting()
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(m, tiles.block_m), tiles.split_k)
    _skinny_linear_kernel[grid](
        x, weight, bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight, norm_bias if norm_bias is not None else weight,
        residual_arg, out, partials, counters,
        m, n, k, k_per_split, float(eps),
        x.stride(0), weight.stride(0), residual_arg.stride(0), out.stride(0),
        HAS_NORM=norm is not None, NORM_HAS_BIAS=norm_bias is not None, HAS_BIAS=bias is not None,
        GELU=activation == "gelu", HAS_RESIDUAL=residual is not None, DOT=tiles.dot,
        BF16_DOT=bf16_dot, INPUT_PRECISION=dot_precision(),
        SPLIT_K=tiles.split_k, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
