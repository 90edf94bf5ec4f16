"""Linear layer for few rows (streaming decode): optional LayerNorm or RMSNorm of the input rows, the
product with the weight, bias, exact GELU or a SiLU gate, and residual add, in one launch.

Shapes (H = N / 2 with the SiLU gate):
    x          [M, K]   fp32 or bf16; any row stride, unit stride along K
    weight     [N, K]   fp32 or bf16, contiguous (nn.Linear's layout); with the SiLU gate the gate rows
                        then the up rows (the language model's gate_up [2H, K])
    bias       [N]      optional; not with the SiLU gate
    norm       optional `Norm`: LayerNorm (weight [K], bias [K] or None, eps) or RMSNorm (weight [K],
               eps) of each x row
    residual   [M, N]   ([M, H] with the gate) optional; may be `out` itself (an in-place x += f(x))
    out        [M, N]   ([M, H] with the gate) fp32 or bf16 (default: x's dtype); any row stride, unit
                        stride along N

    out = act(norm(x) @ weight.T + bias) + residual, act = exact (erf) GELU or identity;
    activation="silu_gate": out = silu(norm(x) @ gate.T) * (norm(x) @ up.T) + residual,

all in fp32 (the gate on the two fp32 accumulators), rounded once to out's dtype. LayerNorm: mean and
biased variance over K, as F.layer_norm, the normalised rows kept in fp32. RMSNorm: x * weight /
sqrt(eps + mean(x^2)) in fp32, rounded to x's dtype before the product, because the language model's
reference RMSNorm (moshi_fast/reference/lm.py) returns x's dtype to its bf16 F.linear: the fast path
then multiplies the same bf16 rows. Mimi's transformer layers (M = 2 x slots, K and N of 512 / 1536 /
2048, fp32) and the language model's decode linears (M = batch <= 64, bf16: Helium's qkv, out, gate_up,
down and text head at dim 4096, the depth transformer's per-codebook ones at dim 1024) are the shapes
this is planned for.

Work split: a program owns an output tile [BLOCK_M, BLOCK_N] (and, with split-K, one K range) and
streams its [BLOCK_N, K] weight slice in BLOCK_K chunks; with the gate, its gate rows n and the up rows
H + n (two slices) into two accumulators. At small M the weight is the whole cost, so the tiles are
chosen for enough programs, and enough weight bytes in flight, to keep the memory system busy; each
program re-reads its rows of x (BLOCK_M x K, from L2). With a norm, a program first computes its rows'
statistics over the whole K (one more read of the rows), then normalises each chunk of x as it loads it.

Products, two paths (the tiles' `dot` flag):
  FMA   the chunk products x[m, k] * w[n, k] accumulate elementwise in a [BLOCK_M, BLOCK_N, BLOCK_K]
        fp32 tile, summed over K once at the end: exact fp32 products, no cross-thread traffic inside
        the loop, and no padding of M to tl.dot's 16 rows. By default below the dot path's M, with
        fp32 weights.
  dot   tl.dot on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] (block dims >= 16): bf16 operands natively
        when x and the weight are both bf16, else fp32 operands in "tf32x3" (_utils.dot_precision).
        fp32 weights: from M = 16; the FMA time over the weight stream's time grows as M / (bytes a
        weight), and on an H200 (~33 T fp32 FMA/s against ~3-4.8 TB/s) it reaches about 0.4 there.
        bf16 weights: from M = 1. Triton software-pipelines a loop's loads unasked only when they feed
        a tl.dot, so this loop keeps num_stages - 1 chunks in flight a program where the FMA loop
        waits for each; the padded rows cost only tensor-core time, idle here. Measured on an H200 at
        4096->12288: dot 16 x 32 x 128 at M = 8 26.9 us (3.75 TB/s), FMA at M = 1 30.3 us.
  split-K (split_k > 1, needs a SplitWorkspace): program s of a tile covers K range s; each stores its
        fp32 partial tile (two with the gate), and the tile's last-arriving program sums the partials
        in split order (deterministic), applies bias, GELU or the gate and residual, writes out and
        resets the tile's counter (graph-safe). Only that program reads the residual and writes out,
        so out may alias the residual; with a norm every split program computes its rows' statistics
        over the whole K.

Default tiles (`skinny_linear_tiles`; `tiles=` overrides, `skinny_linear_candidate_tiles` lists
alternatives to time). Programs: at least 1.5 x SMs (so that 256 count on 132 SMs) where the shape
allows: one program streams one slice at a time, and a second one per SM keeps loads in flight while
the other reduces or writes. With the gate, N below is the output width H and every accumulator count
is doubled.
  FMA   BLOCK_M = M rounded up to a power of two (one row tile: the weight is read once). BLOCK_N = the
        widest power of two (<= 64, and leaving BLOCK_K >= 128) that still gives the target (wider
        slices re-read x less often); BLOCK_K = as much of K as fits 64 fp32 accumulators a thread
        (4 warps), so that at Mimi's shapes a program loads its whole weight slice at once.
  dot   BLOCK_M = min(64, M rounded up). BLOCK_N = the widest of 16..64 giving the target, but no
        narrower than M / 2 (M / 4 with the gate's two slices), so that the rows of x, which each N
        tile re-reads from L2, stay within twice its weight bytes. While short of the target, K is split
        where a workspace allows it and the fp32 partials stay within a quarter of the weight's bytes
        (a split re-reads nothing of the weight), else BLOCK_M is halved down to 16 (the row tiles
        re-read their weight tile, from L2 when they run together). Then, while the weight bytes in
        flight (programs x (num_stages - 1) x chunk bytes) fall short of 40 KB a SM (or of the whole
        weight), BLOCK_K, from 128 (bf16) / 64 (fp32), is doubled as long as the pipeline buffers stay
        within 96 KB a program (two programs an SM), then K split further on the same conditions.
        Every split keeps a non-empty K range. Measured on an H200, bf16, num_stages 3: 46 KB a SM in
        flight (16 x 32 x 128 tiles, 384 programs) streamed 3.75 TB/s, 15.5 KB (16 x 16 x 128, 256
        programs) 2.2 TB/s.
  The statistics pass of an RMSNorm squares up to RMS_STATS_ELEMENTS of x a step (of the M rows
  only, where a lone row tile is padded beyond M), its loads pipelined num_stages deep; a LayerNorm's
  takes BLOCK_K chunks of the tile's rows (the code measured for Mimi).
Mimi's plans on an H200 (132 SMs), fp32, as measured (kernels/tuned_tiles.json); grids (N tiles, M
tiles, splits):
  M = 2    qkv 512->1536 (384, 1, 1) BLOCK_N 4, BLOCK_K 512; out 512->512 (256, 1, 1) BLOCK_N 2, BLOCK_K 512;
           fc1 512->2048 (256, 1, 1) BLOCK_N 8, BLOCK_K 512; fc2 2048->512 (256, 1, 1) BLOCK_N 2, BLOCK_K 2048
  M = 16   with the workspace, dot 16 x 32 x 64: qkv (48, 1, 4), out (16, 1, 8), fc1 (64, 1, 2),
           fc2 (16, 1, 8)
  M = 128  dot BLOCK_M x BLOCK_N x BLOCK_K: qkv 32 x 64 x 32 (24, 4, 4), out 64 x 32 x 32 (16, 2, 4), fc1
           64 x 32 x 64 (64, 2, 1), fc2 64 x 32 x 32 (16, 2, 4) (bench/sweep_wide_linear.py on an H100: 8.6,
           5.5, 8.8 and 12.5 us against 10.0, 6.2, 8.8 and 13.2 for the previous plans, 16 x 32 x 64 tiles)
The language model's, bf16, from the heuristics with a workspace, dot tiles BLOCK_M x BLOCK_N x BLOCK_K:
  Helium   M = 1, 8: qkv 16 x 32 x 128 (384, 1, 1); out, down 16 x 16 x 512 (256, 1, 1);
           gate_up 16 x 32 x 128 (352, 1, 1); text head 16 x 64 x 128 (500, 1, 1)
           M = 64: qkv 64 x 32 x 128 (384, 1, 1); out, down 64 x 32 x 128 (128, 1, 4) (without a
           workspace 32 x 32 x 256 (128, 2, 1)); gate_up 64 x 32 x 128 (352, 1, 1); text head
           64 x 64 x 128 (500, 1, 1)
  depth    M = 1, 8: qkv 16 x 16 x 256 (192, 1, 2); out 16 x 16 x 128 (64, 1, 4); gate_up 16 x 16 x 128
           (176, 1, 2); down 16 x 16 x 256 (64, 1, 4) (without a workspace no splits: 64 to 192
           programs, BLOCK_K 256 or 512)
           M = 64: qkv 16 x 32 x 128 (96, 4, 1); out 16 x 32 x 128 (32, 4, 1); gate_up 32 x 16 x 128
           (176, 2, 1); down 16 x 32 x 256 (32, 4, 2)

Floor: weight + x + out (+ residual) bytes, the weight dominating at small M. Mimi fp32 at M = 2: qkv
3.1 MB, out 1.0 MB, fc1 and fc2 4.2 MB each: 12.6 MB a layer, 4.5 us at the H200's measured 2.77 TB/s
(36 us per 8-layer transformer). The language model, bf16 at M = 1: a Helium layer's qkv 100.7 MB, out
33.6 MB, gate_up 184.5 MB, down 92.3 MB (411 MB, 117 us at 3.5 TB/s; 32 layers 3.8 ms), the text head
262 MB (75 us); a depth-transformer step's layer 6.3 + 2.1 + 11.5 + 5.8 MB (25.7 MB). Graph-safe: no
host values depend on the data.

Programmatic dependent launch (Hopper; _utils.pdl): a program first asks L2 for the first PREFETCH_CHUNKS
chunks of its weight rows (prefetch hints, no registers), then waits for the previous kernel, and lets the
next kernel start once its own weights are streamed (LAUNCH_DEPENDENTS_AFTER_STREAM); at one conversation a
Helium product is ~25 us of streaming, and the previous kernel's tail and this one's first memory round trip
are what the overlap hides.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import (SplitWorkspace, await_previous_kernel, check_launch_devices, dot_precision,
                     interpreting, launch_dependents, max_offset, next_pow2, parallel_sms, pdl, prefetch_l2,
                     sm_count, spans_overlap)
from .tuned import shape_key, tuned_tiles

DOT_MIN_ROWS = {torch.float32: 16, torch.bfloat16: 1}
"""By weight dtype: from this M on the default tiles use tl.dot; below, exact FMAs (see the module doc)."""
WIDE_TILE_MIN_ROWS = 32
"""From this M on, the candidates for a sweep include N tiles past 64 wide (_wide_dot_tiles)."""
MIN_PROGRAMS_PER_SM = 1.5
"""Programs the default tiles aim for, per SM (see the module doc)."""
FMA_ACCUMULATORS_PER_THREAD = 64
"""fp32 registers a thread gives to the FMA path's [BLOCK_M, BLOCK_N, BLOCK_K] accumulators."""
MIN_FMA_BLOCK_K = 128
"""The FMA path keeps chunks at least this long (coalesced rows) before narrowing BLOCK_N."""
DOT_BLOCK_K = {torch.float32: 64, torch.bfloat16: 128}
"""By weight dtype: the dot path's default chunk before it grows (256 bytes of a weight row)."""
DOT_STAGES = 3
"""The dot path's default pipeline depth: two chunks in flight while a third is multiplied."""
WEIGHT_BYTES_IN_FLIGHT_PER_SM = 40 * 1024
"""Weight bytes the default dot tiles aim to have requested at once, per SM (see the module doc)."""
SPLIT_PARTIALS_SHARE = 0.25
"""The default tiles split K only while the fp32 partials (written and read once per split) stay within
this share of the weight's bytes: at Mimi's M = 128 they would match the weight (the plans measured
there split K all the same: a sweep's finding, kernels/tuned_tiles.json)."""
DOT_SHARED_MEMORY = 96 * 1024
"""Pipeline buffers (x and weight chunks, num_stages of each) the default dot tiles allow a program:
two programs an SM within Hopper's 227 KB, with room left for the epilogue's layout conversions."""
RMS_STATS_ELEMENTS = 8192
"""x elements a program squares per step of its RMSNorm statistics (64 fp32 registers a thread at 4
warps): at M = 1 and K = 4096 one step, so that the statistics cost about one L2 round trip before
the weight starts streaming."""
PREFETCH_CHUNKS = 2
"""With programmatic dependent launch (_utils.pdl), each program asks L2 for the first PREFETCH_CHUNKS
chunks (BLOCK_K each) of its weight rows before it waits for the previous kernel: what its pipeline
requests first, so that the loop starts on L2 hits instead of a memory round trip. 0: no prefetch."""
LAUNCH_DEPENDENTS_AFTER_STREAM = True
"""With programmatic dependent launch: a program lets the next kernel start once it has streamed its
weights (before the split-K sum and the epilogue) rather than right after its wait, so that the next
kernel's programs land on SMs as this kernel's leave. Launched early, they land wherever this kernel
left room, unevenly, and the next bandwidth-bound kernel then streams from fewer SMs: measured on an
H100 (bench/pdl_sweep.py, git 4082571, LM step at ctx 3000), early 7.62 / 12.48 ms at B = 1 / 8, after
the stream 6.97 / 10.96 ms, without PDL 7.39 / 11.25 ms."""
MAX_PREFETCH_LINES = 32
"""At most this many 128-byte lines a weight row are prefetched (4 KB)."""
CACHE_LINE_BYTES = 128
"""The span of one L2 prefetch hint."""
H200_SMS = 132
"""SMs the tiles are planned for when no CUDA device is present (the target GPU)."""
DTYPES = (torch.float32, torch.bfloat16)
ACTIVATIONS = (None, "gelu", "silu_gate")


class SkinnyTiles(NamedTuple):
    """One tiling (see the module doc). Block sizes are powers of two, >= 16 when `dot`; split_k > 1
    needs a SplitWorkspace; num_warps and num_stages are Triton's launch options (num_stages also
    pipelines RMSNorm's statistics loop)."""
    block_m: int
    block_n: int
    block_k: int
    dot: bool
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


class Norm(NamedTuple):
    """A normalisation of each x row over K, in fp32, before the product (see the module doc).

    kind "layer": LayerNorm, as F.layer_norm(x, (K,), weight, bias, eps); bias [K] or None.
    kind "rms": RMSNorm, as the language model's: (x * (weight / sqrt(eps + mean(x^2)))) rounded to
    x's dtype; bias must be None.

    `norm=` also takes the tuples (weight, bias, eps) for LayerNorm and ("rms", weight, eps)."""
    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float


def as_norm(norm) -> Norm | None:
    """`norm=` as a checked Norm (None stays None)."""
    if norm is None:
        return None
    if not isinstance(norm, Norm):
        if not isinstance(norm, tuple) or len(norm) != 3:
            raise ValueError("norm must be a Norm, (weight, bias, eps) or ('rms', weight, eps)")
        norm = Norm(norm[0], norm[1], None, norm[2]) if isinstance(norm[0], str) else Norm("layer", *norm)
    if norm.kind not in ("layer", "rms"):
        raise ValueError(f"norm kind must be 'layer' or 'rms', got {norm.kind!r}")
    if norm.kind == "rms" and norm.bias is not None:
        raise ValueError("RMSNorm takes no bias")
    return norm


def _check_activation(activation: str | None, bias: torch.Tensor | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'gelu' or 'silu_gate', got {activation!r}")
    if activation == "silu_gate" and bias is not None:
        raise ValueError("silu_gate takes no bias (the language model's gate_up has none)")


def normalize_rows_ref(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The rows the product multiplies, the spec of the fused norm (and of kernels/norm_rows.py): LayerNorm in
    fp32, as F.layer_norm, returned in fp32; RMSNorm as the language model's, (x * (weight * rsqrt(eps +
    mean(x^2)))) in fp32, returned rounded to x's dtype. x [..., K]."""
    hidden = x.float()
    if norm.kind == "layer":
        return F.layer_norm(hidden, (hidden.shape[-1],), norm.weight.float(),
                            None if norm.bias is None else norm.bias.float(), norm.eps)
    scale = torch.rsqrt(norm.eps + torch.mean(hidden ** 2, dim=-1, keepdim=True))
    return (hidden * (norm.weight.float() * scale)).to(x.dtype)


def skinny_linear_ref(x, weight, *, bias=None, norm=None, activation=None, residual=None, out=None,
                      tiles=None, workspace=None):
    """Torch reference, the spec: fp32 math on the given values, rounded once to out's dtype (x's by
    default); an RMSNorm's rows are rounded to x's dtype before the product, as the kernel's (module
    doc). `tiles` and `workspace` are accepted for the kernel's signature."""
    _check_activation(activation, bias)
    norm = as_norm(norm)
    hidden = x.float() if norm is None else normalize_rows_ref(x, norm).float()
    y = F.linear(hidden, weight.float(), None if bias is None else bias.float())
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "silu_gate":
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
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
def _row_rms_scale(x_ptr, offs_m, mask_m, stride_xm, K, eps, BLOCK_M: tl.constexpr,
                   STATS_BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """1 / sqrt(eps + mean(x^2)) over K of the rows offs_m, in fp32 (RMSNorm's scale). The squares
    accumulate elementwise and are summed once at the end, so that no step waits on a reduction; the
    explicit num_stages lets Triton pipeline the loads (unasked, it pipelines only loads feeding a dot)."""
    offs_k = tl.arange(0, STATS_BLOCK_K)
    squares = tl.zeros((BLOCK_M, STATS_BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, STATS_BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + offs_k
        values = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :],
                         mask=mask_m[:, None] & (ks < K)[None, :], other=0.0).to(tl.float32)
        squares += values * values
    return tl.rsqrt(eps + tl.sum(squares, axis=1) / K)


@triton.jit
def _load_rows(x_ptr, offs_m, mask_m, stride_xm, ks, mask_k, mean, rstd, norm_w_ptr, norm_b_ptr,
               HAS_NORM: tl.constexpr, RMS_NORM: tl.constexpr, NORM_HAS_BIAS: tl.constexpr):
    """x[offs_m, ks] ([BLOCK_M, BLOCK_K]) in x's dtype; with a LayerNorm normalised in fp32, with an
    RMSNorm normalised and rounded back to x's dtype; 0 where k is masked (the norm's weight and bias
    load as 0 there)."""
    rows = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :], mask=mask_m[:, None] & mask_k[None, :],
                   other=0.0)
    if HAS_NORM:
        gamma = tl.load(norm_w_ptr + ks, mask=mask_k, other=0.0).to(tl.float32)
        if RMS_NORM:
            # The reference's order of operations, x * (weight * scale), so that the rounding matches.
            rows = (rows.to(tl.float32) * (gamma[None, :] * rstd[:, None])).to(x_ptr.dtype.element_ty)
        else:
            rows = (rows.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :]
            if NORM_HAS_BIAS:
                rows += tl.load(norm_b_ptr + ks, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    return rows


@triton.jit
def _dot_step(rows, w, acc, BF16_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + rows @ w on the tensor cores: bf16 operands natively, else fp32 ones in INPUT_PRECISION."""
    if BF16_DOT:
        acc = tl.dot(rows.to(tl.bfloat16), w, acc)
    else:
        acc = tl.dot(rows.to(tl.float32), w.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _silu_gate(gate, up):
    return gate * tl.sigmoid(gate) * up


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
    HAS_NORM: tl.constexpr, RMS_NORM: tl.constexpr, NORM_HAS_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr, GATED: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DOT: tl.constexpr,
    BF16_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STATS_BLOCK_M: tl.constexpr,
    STATS_BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr,
    LINE_ELEMENTS: tl.constexpr, LATE_LAUNCH: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if GATED:
        # N is the output width: the up rows start N rows into the weight.
        up_ptr = w_ptr + N * stride_wn
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if PDL and PREFETCH_LINES > 0:
        # The first lines of this program's weight rows are requested while the previous kernel still
        # runs (weights are never written by a step's kernels); the loop below then finds them in L2.
        weight_rows = tl.minimum(offs_n, N - 1)
        line_offsets = tl.minimum(k_begin + tl.arange(0, PREFETCH_LINES) * LINE_ELEMENTS, k_end - 1)
        prefetch_l2(w_ptr + weight_rows[:, None] * stride_wn + line_offsets[None, :])
        if GATED:
            prefetch_l2(up_ptr + weight_rows[:, None] * stride_wn + line_offsets[None, :])
    await_previous_kernel(PDL, not LATE_LAUNCH)
    # Unused without a norm (and the mean without a LayerNorm); _load_rows takes them either way.
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = mean
    if HAS_NORM:
        if RMS_NORM:
            if STATS_BLOCK_M < BLOCK_M:
                # A lone row tile padded beyond M: the statistics cover the first STATS_BLOCK_M rows only
                # (in longer steps), and row i of the tile takes scale i % STATS_BLOCK_M (right below M;
                # the rows from M on load as 0).
                stats_rows = tl.arange(0, STATS_BLOCK_M)
                scale = _row_rms_scale(x_ptr, stats_rows, stats_rows < M, stride_xm, K, eps, STATS_BLOCK_M,
                                       STATS_BLOCK_K, NUM_STAGES)
                rstd = tl.reshape(tl.broadcast_to(scale[None, :], (BLOCK_M // STATS_BLOCK_M, STATS_BLOCK_M)),
                                  (BLOCK_M,))
            else:
                rstd = _row_rms_scale(x_ptr, offs_m, mask_m, stride_xm, K, eps, BLOCK_M, STATS_BLOCK_K,
                                      NUM_STAGES)
        else:
            mean, rstd = _row_statistics(x_ptr, offs_m, mask_m, stride_xm, K, eps, BLOCK_M, STATS_BLOCK_K)

    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            up_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + offs_k
            mask_k = ks < k_end
            rows = _load_rows(x_ptr, offs_m, mask_m, stride_xm, ks, mask_k, mean, rstd, norm_w_ptr,
                              norm_b_ptr, HAS_NORM, RMS_NORM, NORM_HAS_BIAS)
            # Weight chunks as [BLOCK_K, BLOCK_N]: K-major, the operand layout the tensor cores take.
            w_mask = mask_n[None, :] & mask_k[:, None]
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)
            acc = _dot_step(rows, w, acc, BF16_DOT, INPUT_PRECISION)
            if GATED:
                w_up = tl.load(up_ptr + offs_n[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)
                up_acc = _dot_step(rows, w_up, up_acc, BF16_DOT, INPUT_PRECISION)
    else:
        products = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        if GATED:
            up_products = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + offs_k
            mask_k = ks < k_end
            rows = _load_rows(x_ptr, offs_m, mask_m, stride_xm, ks, mask_k, mean, rstd, norm_w_ptr,
                              norm_b_ptr, HAS_NORM, RMS_NORM, NORM_HAS_BIAS).to(tl.float32)
            w_mask = mask_n[:, None] & mask_k[None, :]
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + ks[None, :], mask=w_mask,
                        other=0.0).to(tl.float32)
            products += rows[:, None, :] * w[None, :, :]
            if GATED:
                w_up = tl.load(up_ptr + offs_n[:, None] * stride_wn + ks[None, :], mask=w_mask,
                               other=0.0).to(tl.float32)
                up_products += rows[:, None, :] * w_up[None, :, :]
        acc = tl.sum(products, axis=2)
        if GATED:
            up_acc = tl.sum(up_products, axis=2)

    if LATE_LAUNCH:
        launch_dependents(PDL)
    if SPLIT_K > 1:
        tile = pid_m * tl.num_programs(0) + pid_n
        tile_offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        # A tile's partials: [SPLIT_K, BLOCK_M, BLOCK_N] of the product, then as many of the up product.
        tile_partials = partials_ptr + tile * (SPLIT_K * BLOCK_M * BLOCK_N * (2 if GATED else 1))
        tl.store(tile_partials + pid_k * (BLOCK_M * BLOCK_N) + tile_offsets, acc)
        if GATED:
            up_partials = tile_partials + SPLIT_K * BLOCK_M * BLOCK_N
            tl.store(up_partials + pid_k * (BLOCK_M * BLOCK_N) + tile_offsets, up_acc)
        # Every thread's partial stores are issued before the program's single release arrival.
        tl.debug_barrier()
        arrived = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if GATED:
                up_total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                # ".cg": read at L2, where the other programs' partials are, never a stale L1 line.
                total += tl.load(tile_partials + split * (BLOCK_M * BLOCK_N) + tile_offsets,
                                 cache_modifier=".cg")
                if GATED:
                    up_total += tl.load(up_partials + split * (BLOCK_M * BLOCK_N) + tile_offsets,
                                        cache_modifier=".cg")
            if GATED:
                total = _silu_gate(total, up_total)
            _epilogue(total, offs_m, offs_n, mask_m, mask_n, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                      HAS_BIAS, GELU, HAS_RESIDUAL)
            tl.store(counters_ptr + tile, 0)
    else:
        if GATED:
            acc = _silu_gate(acc, up_acc)
        _epilogue(acc, offs_m, offs_n, mask_m, mask_n, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                  HAS_BIAS, GELU, HAS_RESIDUAL)


def _is_pow2(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def _prev_pow2(value: int) -> int:
    return 1 << (max(value, 1).bit_length() - 1)


def _default_sms(sms: int | None) -> int:
    if sms is not None:
        return sms
    return sm_count(torch.device("cuda")) if torch.cuda.is_available() else H200_SMS


def _widest_block(count: int, other_tiles: int, min_programs: int, smallest: int, largest: int) -> int:
    """The widest power-of-two block in [smallest, largest] that splits `count` into enough tiles that
    other_tiles x tiles >= min_programs (`smallest` when none does)."""
    block = largest
    while block > smallest and other_tiles * triton.cdiv(count, block) < min_programs:
        block //= 2
    return block


def _k_per_split(k: int, splits: int, block_k: int) -> int:
    return triton.cdiv(triton.cdiv(k, splits), block_k) * block_k


def _splits_fit(k: int, splits: int, block_k: int) -> bool:
    """Whether `splits` K ranges of whole BLOCK_K chunks are all non-empty, and a chunk no longer than
    a range rounded up to a power of two."""
    return (block_k <= next_pow2(triton.cdiv(k, splits))
            and (splits - 1) * _k_per_split(k, splits, block_k) < k)


def _fma_tiles(m: int, n: int, k: int, min_programs: int, num_warps: int = 4, parts: int = 1) -> SkinnyTiles:
    """parts: accumulators a program keeps (2 with the gate), sharing the register budget."""
    block_m = next_pow2(m, minimum=1)
    accumulators = FMA_ACCUMULATORS_PER_THREAD * 32 * num_warps // parts
    largest_n = min(64, next_pow2(n, minimum=1), _prev_pow2(accumulators // (block_m * MIN_FMA_BLOCK_K)))
    block_n = _widest_block(n, 1, min_programs, 1, largest_n)
    block_k = min(next_pow2(k), max(16, accumulators // (block_m * block_n)))
    return SkinnyTiles(block_m, block_n, block_k, dot=False, num_warps=num_warps)


def _dot_tiles(m: int, n: int, k: int, dtype: torch.dtype, sms: int, split_k: bool,
               parts: int = 1) -> SkinnyTiles:
    """The dot path's default tiles (module doc); parts: weight slices a program streams (2 with the gate)."""
    min_programs = math.ceil(MIN_PROGRAMS_PER_SM * sms)
    element = dtype.itemsize
    weight_bytes = parts * n * k * element
    block_m = min(64, next_pow2(m))
    x_floor = next_pow2(triton.cdiv(min(m, block_m), 2 * parts))
    block_n = min(64, next_pow2(n), max(x_floor, _widest_block(n, triton.cdiv(m, block_m), min_programs, 16,
                                                                min(64, next_pow2(n)))))
    block_k = DOT_BLOCK_K[dtype]
    splits = 1

    def programs() -> int:
        return triton.cdiv(m, block_m) * triton.cdiv(n, block_n) * splits

    def can_split_more() -> bool:
        # Twice the splits: their fp32 partials of the padded rows, each written and read once.
        padded_rows = triton.cdiv(m, block_m) * block_m
        partial_bytes = 2 * splits * padded_rows * parts * n * 4 * 2
        return (split_k and partial_bytes <= SPLIT_PARTIALS_SHARE * weight_bytes
                and _splits_fit(k, 2 * splits, block_k))

    while programs() < min_programs and (can_split_more() or block_m > 16):
        if can_split_more():
            splits *= 2
        else:
            block_m //= 2

    def in_flight() -> int:
        return programs() * (DOT_STAGES - 1) * parts * block_n * block_k * element

    wanted = min(WEIGHT_BYTES_IN_FLIGHT_PER_SM * sms, weight_bytes)
    # Longer chunks for bf16 only: fp32 operands go through tf32x3, which holds high and low parts of
    # both tiles, and 256-deep fp32 chunks spilled (measured on an H200 at M = 16, N, K of 512 and 2048:
    # 80 and 313 us against 6.7 and 21 us with 64-deep chunks).
    while (dtype == torch.bfloat16 and in_flight() < wanted and _splits_fit(k, splits, 2 * block_k)
           and DOT_STAGES * (block_m + parts * block_n) * 2 * block_k * element <= DOT_SHARED_MEMORY):
        block_k *= 2
    while in_flight() < wanted and can_split_more():
        splits *= 2
    return SkinnyTiles(block_m, block_n, block_k, dot=True, split_k=splits, num_stages=DOT_STAGES)


def linear_plan_key(n: int, k: int, dtype: torch.dtype, gated: bool = False) -> str:
    """The tuned table's key of a product: output width, input width, dtype, and "silu_gate" for the gated FFN
    input (its weight has 2n rows, and its tiles hold both halves: a plan of its own)."""
    return shape_key(n, k, dtype, *(("silu_gate",) if gated else ()))


def skinny_linear_tiles(m: int, n: int, k: int, dtype: torch.dtype, *, sms: int | None = None,
                        split_k: bool = False, gated: bool = False) -> SkinnyTiles:
    """The default tiles for x [m, k] @ weight[n, k].T with `dtype` weights on `sms` SMs (default: the
    current CUDA device's, else an H200's); split_k: whether a workspace allows splitting K; gated: the
    SiLU gate, n then being the output width (the weight has 2n rows). The measured plan where
    kernels/tuned.py has one for this shape and row count (linear_plan_key; if it splits K, split_k
    allows it), else the heuristics above."""
    if dtype not in DTYPES:
        raise TypeError(f"weights must be float32 or bfloat16, got {dtype}")
    measured = tuned_tiles("linear", linear_plan_key(n, k, dtype, gated), m)
    if measured is not None and (split_k or measured.get("split_k", 1) == 1):
        return SkinnyTiles(**measured)
    sms = _default_sms(sms)
    parts = 2 if gated else 1
    if m < DOT_MIN_ROWS[dtype]:
        return _fma_tiles(m, n, k, math.ceil(MIN_PROGRAMS_PER_SM * sms), parts=parts)
    return _dot_tiles(m, n, k, dtype, sms, split_k, parts)


def _wide_dot_tiles(m: int, n: int, k: int, min_programs: int, parts: int, block_n: int, block_k: int,
                    num_stages: int) -> SkinnyTiles:
    """A tl.dot tiling of all M rows (up to 64) and BLOCK_N output columns (at most the output width rounded up), K
    split until the grid reaches min_programs or each split holds a single chunk. Gated, a stage fewer: its two
    weight slices double the pipeline's buffers (128 x 128 chunks, 3 stages would take 240 KB of shared memory)."""
    block_m = min(64, next_pow2(m))
    block_n = min(block_n, max(16, next_pow2(n)))
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = max(1, min(triton.cdiv(min_programs, tiles), triton.cdiv(k, block_k)))
    return SkinnyTiles(block_m, block_n, block_k, True, split_k=split, num_warps=4 * parts,
                       num_stages=num_stages - (parts - 1))


def skinny_linear_candidate_tiles(m: int, n: int, k: int, dtype: torch.dtype, *, sms: int | None = None,
                                  split_k: bool = False, gated: bool = False) -> list[SkinnyTiles]:
    """At most 10 plausible tilings to time, the default first; split_k: include split-K tilings (the
    calls then need a workspace); gated: as in skinny_linear_tiles."""
    sms = _default_sms(sms)
    min_programs = math.ceil(MIN_PROGRAMS_PER_SM * sms)
    parts = 2 if gated else 1
    base = skinny_linear_tiles(m, n, k, dtype, sms=sms, split_k=split_k, gated=gated)
    fma = _fma_tiles(m, n, k, min_programs, parts=parts)
    dot = _dot_tiles(m, n, k, dtype, sms, split_k, parts)
    # FMA: narrower and wider weight slices, shorter chunks, twice the warps (and chunk).
    fma_variants = [_fma_tiles(m, n, k, 2 * min_programs, parts=parts),
                    _fma_tiles(m, n, k, min_programs // 2, parts=parts),
                    fma._replace(block_k=min(fma.block_k, 256), num_stages=3),
                    _fma_tiles(m, n, k, min_programs, num_warps=8, parts=parts)]
    # dot: 16 x 16 tiles (most programs), longer chunks, wider tiles (fewer re-reads of x), a deeper
    # pipeline, narrower tiles (more programs).
    dot_variants = [dot._replace(block_m=16, block_n=16, split_k=1), dot._replace(block_k=2 * dot.block_k),
                    dot._replace(block_n=min(64, 2 * dot.block_n)), dot._replace(num_stages=4),
                    dot._replace(block_n=max(16, dot.block_n // 2))]
    fma_split = [fma._replace(block_n=min(64, 4 * fma.block_n), block_k=max(16, fma.block_k // 4), split_k=4)]
    dot_split = [dot._replace(split_k=2 * dot.split_k)]
    # Many rows: N tiles past 64 wide, K split back up to the program target. Each N tile re-reads all of its
    # K range of x (at M = 64, as many bytes from L2 as its weights when 64 wide), so wider tiles read less of x.
    wide = [_wide_dot_tiles(m, n, k, min_programs, parts, block_n, block_k, num_stages)
            for block_n, block_k, num_stages in ((128, 64, 4), (128, 128, 3), (256, 64, 3))]
    if not split_k:
        fma_split = dot_split = []
        wide = [t._replace(split_k=1) for t in wide]
    if m < DOT_MIN_ROWS[dtype]:
        candidates = [base, *fma_variants, *fma_split, *dot_split, dot, *dot_variants,
                      base._replace(num_stages=1)]
    else:
        # FMAs cost M x N x K on the CUDA cores: only worth timing while M is small.
        few_rows = [fma, *fma_split, *fma_variants[:2]] if m <= 32 else []
        many_rows = wide if m >= WIDE_TILE_MIN_ROWS else []
        candidates = [base, *dot_variants[:4], *dot_split, dot_variants[4], *few_rows, *many_rows]
    unique = []
    for tiles in candidates:
        if tiles not in unique:
            unique.append(tiles)
    return unique[:10]


def skinny_linear_workspace_size(m: int, n: int, tiles: SkinnyTiles, *,
                                 gated: bool = False) -> tuple[int, int]:
    """(fp32 partial floats, counters) a SplitWorkspace needs for these tiles, n the output width;
    (0, 0) without split-K. The gate doubles the partials (two accumulators a tile)."""
    if tiles.split_k == 1:
        return 0, 0
    output_tiles = triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n)
    parts = 2 if gated else 1
    return output_tiles * tiles.split_k * parts * tiles.block_m * tiles.block_n, output_tiles


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


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                  norm: Norm | tuple | None = None, activation: str | None = None,
                  residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  tiles: SkinnyTiles | None = None, workspace: SplitWorkspace | None = None) -> torch.Tensor:
    """Launcher; see the module doc. norm: a Norm, (weight, bias, eps) for LayerNorm or ("rms", weight,
    eps) for RMSNorm; activation: None, "gelu" or "silu_gate" (weight = [gate | up], no bias, out and
    residual [M, N / 2]). `tiles` overrides the default tiling; `workspace` enables split-K (in the
    default tiles where they would otherwise leave SMs idle or too few bytes in flight; required by
    split_k > 1 tiles)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {list(x.shape)} and weight {list(weight.shape)} do not match [M, K] and [N, K]")
    _check_activation(activation, bias)
    gated = activation == "silu_gate"
    if gated and weight.shape[0] % 2:
        raise ValueError(f"silu_gate needs the weight's gate rows then its up rows, an even count, "
                         f"got {weight.shape[0]}")
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    if min(m, n, k) == 0:
        raise ValueError(f"empty product: M = {m}, N = {n}, K = {k}")
    norm = as_norm(norm)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    norm_weight, norm_bias = (norm.weight, norm.bias) if norm is not None else (None, None)
    operands = {"x": x, "weight": weight, "out": out, "residual": residual, "bias": bias,
                "norm weight": norm_weight, "norm bias": norm_bias}
    given = {name: t for name, t in operands.items() if t is not None}
    for name, t in given.items():
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32 or bfloat16, got {t.dtype}")
        if not _unit_stride(t):
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")
        # Offsets are computed in int32 in the kernel.
        if max_offset(t) >= 2 ** 31:
            raise ValueError(f"{name} spans more than 2**31 elements")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous [N, K]")
    expected = {"out": (m, n), "residual": (m, n), "bias": (n,), "norm weight": (k,), "norm bias": (k,)}
    for name, shape in expected.items():
        if name in given and tuple(given[name].shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(given[name].shape)}")
    check_launch_devices(*given.values())
    for name, t in given.items():
        if name != "out" and spans_overlap(t, out):
            # Other programs still read x (and the rest) while a program writes its output tile; only
            # the residual's own tile may be out's, element for element.
            same_view = t.data_ptr() == out.data_ptr() and t.stride() == out.stride() and t.dtype == out.dtype
            if name != "residual" or not same_view:
                detail = " without being out itself (same pointer, strides, dtype)"
                raise ValueError(f"{name} overlaps out" + (detail if name == "residual" else ""))

    if tiles is None:
        sms = parallel_sms(x.device)
        tiles = skinny_linear_tiles(m, n, k, weight.dtype, sms=sms, split_k=workspace is not None,
                                    gated=gated)
    _check_tiles(tiles)
    if tiles.split_k > 1:
        if workspace is None:
            raise ValueError(f"split_k = {tiles.split_k} needs a SplitWorkspace")
        workspace.check(*skinny_linear_workspace_size(m, n, tiles, gated=gated))
        partials, counters = workspace.partials, workspace.counters
    else:
        # Never dereferenced without split-K; any valid pointers stand in.
        partials, counters = out, out
    rms = norm is not None and norm.kind == "rms"
    # RMSNorm's statistics over the rows there are (a lone row tile may be padded beyond M) in long steps
    # of RMS_STATS_ELEMENTS; LayerNorm's over the tile's rows in the product's chunks.
    stats_block_m = min(tiles.block_m, next_pow2(m, minimum=1)) if rms else tiles.block_m
    stats_block_k = min(next_pow2(k), max(16, RMS_STATS_ELEMENTS // stats_block_m)) if rms else tiles.block_k
    residual_arg = residual if residual is not None else out
    # Triton's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits (triton-lang/triton
    # #11584): there the dot path takes the exact fp32 upcast of bf16 operands instead.
    bf16_dot = x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and not interpreting()
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(m, tiles.block_m), tiles.split_k)
    k_per_split = _k_per_split(k, tiles.split_k, tiles.block_k)
    use_pdl = pdl(x.device, "linear", weight.numel() * weight.element_size())
    line_elements = CACHE_LINE_BYTES // weight.element_size()
    # Without PDL nothing is prefetched: a constant 0 keeps one compiled variant per tiling.
    prefetch_lines = 0
    if use_pdl and PREFETCH_CHUNKS:
        prefetch_lines = _prev_pow2(min(MAX_PREFETCH_LINES, triton.cdiv(
            min(k_per_split, PREFETCH_CHUNKS * tiles.block_k), line_elements)))
    _skinny_linear_kernel[grid](
        x, weight, bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight, norm_bias if norm_bias is not None else weight,
        residual_arg, out, partials, counters,
        m, n, k, k_per_split, float(norm.eps) if norm is not None else 0.0,
        x.stride(0), weight.stride(0), residual_arg.stride(0), out.stride(0),
        HAS_NORM=norm is not None, RMS_NORM=rms, NORM_HAS_BIAS=norm_bias is not None,
        HAS_BIAS=bias is not None, GELU=activation == "gelu", GATED=gated, HAS_RESIDUAL=residual is not None,
        DOT=tiles.dot, BF16_DOT=bf16_dot, INPUT_PRECISION=dot_precision(), SPLIT_K=tiles.split_k,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        STATS_BLOCK_M=stats_block_m, STATS_BLOCK_K=stats_block_k,
        NUM_STAGES=tiles.num_stages, PDL=use_pdl, PREFETCH_LINES=prefetch_lines, LINE_ELEMENTS=line_elements,
        LATE_LAUNCH=LAUNCH_DEPENDENTS_AFTER_STREAM,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, launch_pdl=use_pdl,
    )
    return out
