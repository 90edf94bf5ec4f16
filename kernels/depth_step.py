"""One codebook step of the depth transformer in one persistent launch: the previous token's embedding,
L layers (RMSNorm -> qkv -> attention over this frame's steps -> out + residual -> RMSNorm -> gate_up ->
SiLU gate -> down + residual) and the step's head, with the step's own weights.

Shapes (D = H x hd, Hd the FFN width, L layers, S = the frame's codebook steps, card the head's width):
    x              [B, D]          fp32 or bf16 (the activation dtype), any row stride, unit last stride:
                                   in_proj[step](h) on entry, the step's residual stream on exit
    previous       [B]             int64 or int32, contiguous: the token the step embeds
    embed_table    [R, D]          x's dtype, contiguous: the depth transformer's embedding tables
                                   concatenated (FastLM.prepare)
    embed_row_offset  [1]          int64 or int32, on the device: token t is row embed_row_offset[0] + t
    norm1, norm2   [L, D]          RMSNorm weights, any layer stride, unit last stride
    qkv            [L, 3D, D]      the step's weights, x's dtype, any layer stride, contiguous rows
    out_proj       [L, D, D]       (views such as stacked[:, step] of a [L, S, ...] tensor)
    gate_up        [L, 2Hd, D]     gate rows, then up rows
    down           [L, D, Hd]
    head           [card, D]       contiguous rows
    k_cache        [L, B, H, S, hd]  contiguous, x's dtype: the depth keys and values of this frame
    v_cache        [L, B, H, S, hd]
    step                           Python int in [0, S): fixed per call site (graph-safe)
    logits_out     [B, card]       x's dtype, any row stride, unit last stride
    scratch        DepthStepScratch (`depth_step_scratch`), allocated once for (B, D, Hd, H)

Semantics, exactly those of the unfused op sequence `depth_step_ref` (the spec) up to the order of fp32
sums: x += embed_table[embed_row_offset + previous] rounded to x's dtype; per layer l,
qkv = RMSNorm(x) @ qkv[l].T (RMSNorm in fp32, the normalised rows rounded to x's dtype before the
product, the product in fp32 rounded once); keys and values written into the caches at `step`;
attention of each head over positions 0..step (no RoPE, scale 1/sqrt(hd), fp32 softmax, the output
rounded); x = round(attention @ out_proj[l].T + x) with the residual added in fp32; hidden =
round(silu(gate) * up) from the two fp32 accumulators of RMSNorm(x) @ gate_up[l].T; x = round(hidden @
down[l].T + x); finally logits_out = round(x @ head.T). Cache positions past step are never read.

Phases (one per `_phase` index, 4L + 2 in all, each separated from the next by a grid-wide barrier):
    0            embedding add
    1 + 4l       qkv of layer l. Each program first computes the RMS scale of all B rows itself (x is
                 small: B x D), then owns 16-row output blocks in turn; a block's rounded values go to
                 the qkv scratch and, for key and value rows, into the cache at `step`. A head's
                 attention needs 3 hd / 16 blocks (its q, k and v rows): each block arrives on the
                 head's counter, and the program that completes a head computes its attention for all
                 B rows into the attention scratch and resets the counter (graph-safe). This saves a
                 phase (and a barrier) per layer over a separate attention phase.
    2 + 4l       out projection + residual (x in place: a block's program alone reads and writes its
                 columns of x)
    3 + 4l       gate_up + SiLU gate into the hidden scratch (RMS scale of x recomputed per program)
    4 + 4l       down + residual
    4L + 1       head
Every product phase deals 16-row output blocks round-robin to the programs and streams each block's
weight slice in BLOCK_K chunks through a pipelined loop of tl.dot with the batch padded to BLOCK_M >= 16
rows (bf16 operands natively; fp32 ones in tf32x3 on the GPU).

Launch: on CUDA, one launch of grid = the number of SMs (never more, so that every program is resident
at once: a spinning barrier with a program still waiting for an SM would never complete) runs every
phase, with a sense-reversal barrier on two int32 counters of the scratch between phases. The flag's
value is read at the start, so consecutive launches need no reset between them (graph-safe). Data that
other programs wrote during the launch (x, the scratch, the caches) is read with ".cg" (at L2, never
from a possibly stale L1 line: L1 is not coherent across SMs). Where the software pipeliner turns such
a load into an 8-byte cp.async (sm_90 PTX at D = 1024: the padded x chunks of the products, the
attention's cache tiles), it issues cp.async.ca, since cp.async.cg takes 16 bytes only; those reads
still follow the program's acquire (the barrier's flag or the head counter), after which the PTX memory
model has weak loads observe the released writes. With `phases` given, or under
TRITON_INTERPRET=1 (whose programs run one after another, so that a spinning barrier would hang), each
phase is a launch of its own of the same kernel with the barrier compiled out; the math is the same
code, and results are bitwise those of the single launch.

Floor at Moshi's config (bf16, D = 1024, Hd = 2816, L = 6, card = 2048), the step's weights: a layer's
qkv 6,291,456 + out 2,097,152 + gate_up 11,534,336 + down 5,767,168 = 25,690,112 bytes, 6 layers
154,140,672 bytes, head 4,194,304, RMSNorm weights 24,576: 158,359,552 bytes a step (plus the
activations, under 1 MB at B = 64), 1,266,876,416 bytes for the frame's 8 steps: 300 us at the H200's
measured 4.23 TB/s copy bandwidth. Barriers: 25 a step, 200 a frame; one costs an L2 atomic round trip
per program plus the flag's propagation, expected about 1 us at 132 programs (unmeasured): ~0.2 ms a
frame, which the 0.6 ms target for the 8 steps at B = 1 leaves room for. Load balance: the out and down
phases have 64 blocks of 16 rows for 132 programs (about half the SMs stream them), qkv 192 and gate_up
176 (two rounds for some programs); the attention of a head is done by one program, in chunks of rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import check_launch_devices, dot_precision, interpreting, next_pow2, sm_count
from .depth_attention import depth_attention_ref
from .embed_sum import embed_sum_ref
from .skinny_linear import skinny_linear_ref

DTYPES = (torch.float32, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)
MAX_BATCH = 64
"""Rows the product tiles take at once (BLOCK_M <= 64): the batch buckets of the engine."""
BLOCK_N = 16
"""Output rows of a product block: the tensor cores' smallest N, for the most blocks to deal out."""
BLOCK_K = {16: 512, 32: 256, 64: 128}
"""Weight chunk length by BLOCK_M: the pipeline's stages (x chunk + one or two weight chunks each) stay
within Hopper's shared memory at NUM_STAGES = 3 (compiled for sm_90: 114 KB at BLOCK_M = 16, 73 KB at
64), while a program keeps 16-32 KB of weight (two chunks) in flight. Unmeasured."""
NUM_STAGES = 3
NUM_WARPS = 8
"""Compiled for sm_90 at D = 1024 (bf16): 182-184 registers at B <= 16 and 240 at B = 64 without
spills (255 with 8 bytes spilled at B = 32), against 255 and spills at 4 warps (the statistics,
attention and pipeline tiles of every phase live in one function); 8 x 32 x 255 registers still fit one
program an SM."""
RMS_STATS_ELEMENTS = 8192
"""x elements a program squares per step of its RMS statistics (32 fp32 registers a thread at 8 warps)."""
ATTENTION_ELEMENTS = 4096
"""Cached key (and value) elements a program holds per chunk of rows of one head's attention."""
INTERPRETER_PROGRAMS = 3
"""Programs under the interpreter: more than one, so that the round-robin loops and the head counters
are exercised, while the programs still run one after another."""
COUNTERS = 2
"""Barrier words at the head of scratch.counters: the arrival count and the sense flag."""


@dataclass
class DepthStepScratch:
    """Device buffers of `depth_step`, allocated once (`depth_step_scratch`) and reused by every step and
    frame: the activations that pass between phases and the int32 counters (the grid barrier's arrival
    count and flag, then one arrival counter per head), which every launch leaves as it found them; and the
    CUDA kernel's barrier count (moshi_fast.cuda_ext.depth_step), which only grows."""
    qkv: torch.Tensor
    """[B, 3D] the layer's projections."""
    attention: torch.Tensor
    """[B, D] the layer's attention output."""
    hidden: torch.Tensor
    """[B, Hd] the layer's gated FFN activations."""
    counters: torch.Tensor
    """[2 + H] int32."""
    arrivals: torch.Tensor
    """[1] int64: the CUDA kernel's grid-barrier arrivals, a multiple of its grid between launches."""


def depth_step_scratch(batch: int, dim: int, hidden: int, heads: int, dtype: torch.dtype,
                       device: torch.device | str) -> DepthStepScratch:
    """The scratch of `depth_step` for B = batch rows at D = dim, Hd = hidden, H = heads."""
    return DepthStepScratch(qkv=torch.empty(batch, 3 * dim, dtype=dtype, device=device),
                            attention=torch.empty(batch, dim, dtype=dtype, device=device),
                            hidden=torch.empty(batch, hidden, dtype=dtype, device=device),
                            counters=torch.zeros(COUNTERS + heads, dtype=torch.int32, device=device),
                            arrivals=torch.zeros(1, dtype=torch.int64, device=device))


def depth_step_phases(layers: int) -> int:
    """Phases of one step of `layers` layers (module doc): `phases` takes sub-ranges of range(this)."""
    return 4 * layers + 2


def depth_step_ref(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down, head,
                   k_cache, v_cache, step, eps, logits_out, scratch=None, phases=None):
    """Torch reference, the spec: the unfused op sequence from the ops' references (scratch and phases
    are accepted for the kernel's signature). Returns logits_out."""
    embed_sum_ref(previous[:, None], embed_table, embed_row_offset.reshape(1), out=x, accumulate=True)
    for layer in range(norm1.shape[0]):
        projected = skinny_linear_ref(x, qkv[layer], norm=("rms", norm1[layer], eps))
        attended = depth_attention_ref(projected, k_cache[layer], v_cache[layer], step)
        skinny_linear_ref(attended, out_proj[layer], residual=x, out=x)
        hidden = skinny_linear_ref(x, gate_up[layer], norm=("rms", norm2[layer], eps), activation="silu_gate")
        skinny_linear_ref(hidden, down[layer], residual=x, out=x)
    return skinny_linear_ref(x, head, out=logits_out)


@triton.jit
def _grid_barrier(counters_ptr, sense, programs):
    """Waits until every program has arrived; returns the next barrier's sense. The program's stores are
    all issued before its one acq_rel arrival (debug_barrier), which releases them at GPU scope; the
    last arriver resets the count before its release of the flipped flag, so that arrivals at the next
    barrier, which follow the waiters' acquire of the flag, count from 0."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counters_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == programs - 1:
        tl.atomic_xchg(counters_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(counters_ptr + 1, 1 - sense, sem="release", scope="gpu")
    else:
        # Spin on plain volatile reads (served by L2, no read-modify-write traffic that would queue
        # behind the last arrival's atomics), then one acquire to order the phase's loads after the flip.
        flag = tl.load(counters_ptr + 1, volatile=True)
        while flag == sense:
            flag = tl.load(counters_ptr + 1, volatile=True)
        tl.atomic_add(counters_ptr + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    return 1 - sense


@triton.jit
def _rms_scale(x_ptr, stride_x, rows, K, eps, BLOCK_M: tl.constexpr, STATS_BLOCK_K: tl.constexpr,
               NUM_STAGES: tl.constexpr):
    """1 / sqrt(eps + mean(x^2)) of the first `rows` rows (of BLOCK_M), in fp32."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, STATS_BLOCK_K)
    squares = tl.zeros((BLOCK_M, STATS_BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, STATS_BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + offs_k
        values = tl.load(x_ptr + offs_m[:, None] * stride_x + ks[None, :],
                         mask=(offs_m < rows)[:, None] & (ks < K)[None, :], other=0.0,
                         cache_modifier=".cg").to(tl.float32)
        squares += values * values
    return tl.rsqrt(eps + tl.sum(squares, axis=1) / K)


@triton.jit
def _product_block(a_ptr, stride_a, rows, K, w_ptr, stride_w, n0, N, gamma_ptr, rstd,
                   HAS_NORM: tl.constexpr, GATED: tl.constexpr, BF16_DOT: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N]: a[:rows] @ w[n0:n0 + BLOCK_N].T, a's rows RMS-normalised (gamma, rstd)
    and rounded to a's dtype first when HAS_NORM; with GATED, silu(gate) * up of the gate rows n and
    the up rows N + n, on the fp32 accumulators."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < rows
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + offs_k
        mask_k = ks < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_a + ks[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0, cache_modifier=".cg")
        if HAS_NORM:
            gamma = tl.load(gamma_ptr + ks, mask=mask_k, other=0.0).to(tl.float32)
            # The reference's order, x * (weight * scale), so that the rounding matches.
            a = (a.to(tl.float32) * (gamma[None, :] * rstd[:, None])).to(a_ptr.dtype.element_ty)
        if not BF16_DOT:
            a = a.to(tl.float32)
        # Weight chunks as [BLOCK_K, BLOCK_N]: K-major, the operand layout the tensor cores take.
        w_mask = mask_n[None, :] & mask_k[:, None]
        w = tl.load(w_ptr + offs_n[None, :] * stride_w + ks[:, None], mask=w_mask, other=0.0)
        if BF16_DOT:
            acc = tl.dot(a, w, acc)
        else:
            acc = tl.dot(a, w.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        if GATED:
            w_up = tl.load(w_ptr + (N + offs_n)[None, :] * stride_w + ks[:, None], mask=w_mask, other=0.0)
            if BF16_DOT:
                up_acc = tl.dot(a, w_up, up_acc)
            else:
                up_acc = tl.dot(a, w_up.to(tl.float32), up_acc, input_precision=INPUT_PRECISION)
    if GATED:
        acc = acc * tl.sigmoid(acc) * up_acc
    return acc


@triton.jit
def _store_block(acc, out_ptr, stride_out, rows, n0, N, res_ptr, stride_res,
                 HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[:rows, n0:n0 + BLOCK_N] = round(acc (+ residual in fp32)); the residual may be out itself (this
    block's program alone reads and writes those elements)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask = (offs_m < rows)[:, None] & (offs_n < N)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs_m[:, None] * stride_res + offs_n[None, :], mask=mask, other=0.0,
                       cache_modifier=".cg").to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_products(a_ptr, K, weight_ptr, stride_w, x_ptr, stride_x, rows, dim, pid, programs,
                       BF16_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """x += a @ weight.T (a [rows, K] contiguous, weight [dim, K]), this program's round-robin share of the
    output blocks: the attention output and FFN output phases."""
    for nb in range(pid, tl.cdiv(dim, BLOCK_N), programs):
        acc = _product_block(a_ptr, K, rows, K, weight_ptr, stride_w, nb * BLOCK_N, dim, x_ptr,
                             tl.zeros((BLOCK_M,), dtype=tl.float32), False, False, BF16_DOT, INPUT_PRECISION,
                             BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES)
        _store_block(acc, x_ptr, stride_x, rows, nb * BLOCK_N, dim, x_ptr, stride_x, True, BLOCK_M, BLOCK_N)


@triton.jit
def _head_attention(qkv_s_ptr, k_layer_ptr, v_layer_ptr, attention_ptr, rows, head, step,
                    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, STEPS: tl.constexpr, BLOCK_S: tl.constexpr,
                    SCALE: tl.constexpr, ATTN_BLOCK_B: tl.constexpr, NUM_STAGES: tl.constexpr):
    """attention[:rows, head] from the qkv scratch's queries and the cache's positions 0..step (the
    step's own key and value included: the qkv phase stored them), ATTN_BLOCK_B rows at a time."""
    dim: tl.constexpr = HEADS * HEAD_DIM
    offs_b = tl.arange(0, ATTN_BLOCK_B)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    visible = offs_s <= step
    for b0 in tl.range(0, rows, ATTN_BLOCK_B, num_stages=NUM_STAGES):
        slots = b0 + offs_b
        live = slots < rows
        query = tl.load(qkv_s_ptr + slots[:, None] * (3 * dim) + head * HEAD_DIM + offs_d[None, :],
                        mask=live[:, None], other=0.0, cache_modifier=".cg").to(tl.float32) * SCALE
        cache = (((slots[:, None, None].to(tl.int64) * HEADS + head) * STEPS + offs_s[None, :, None]) * HEAD_DIM
                 + offs_d[None, None, :])
        # Positions past step are not loaded: they may hold another frame's keys, or NaN.
        loaded = live[:, None, None] & visible[None, :, None]
        keys = tl.load(k_layer_ptr + cache, mask=loaded, other=0.0, cache_modifier=".cg").to(tl.float32)
        values = tl.load(v_layer_ptr + cache, mask=loaded, other=0.0, cache_modifier=".cg").to(tl.float32)
        scores = tl.where(visible[None, :], tl.sum(keys * query[:, None, :], axis=2), float("-inf"))
        weights = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        attended = tl.sum(weights[:, :, None] * values, axis=1) / tl.sum(weights, axis=1)[:, None]
        tl.store(attention_ptr + slots[:, None] * dim + head * HEAD_DIM + offs_d[None, :],
                 attended.to(attention_ptr.dtype.element_ty), mask=live[:, None])


@triton.jit
def _depth_step_kernel(
    x_ptr, previous_ptr, table_ptr, row_offset_ptr,
    norm1_ptr, qkv_ptr, out_proj_ptr, norm2_ptr, gate_up_ptr, down_ptr, head_ptr,
    k_cache_ptr, v_cache_ptr, logits_ptr,
    qkv_s_ptr, attention_ptr, hidden_ptr, counters_ptr,
    B, HIDDEN, CARD, LAYERS, step, eps, phase_begin, phase_end,
    stride_x, stride_norm1, stride_norm2, stride_qkv_l, stride_qkv_n, stride_out_l, stride_out_n,
    stride_gate_up_l, stride_gate_up_n, stride_down_l, stride_down_n, stride_head_n, stride_logits,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, STEPS: tl.constexpr, BLOCK_S: tl.constexpr,
    SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STATS_BLOCK_K: tl.constexpr, ATTN_BLOCK_B: tl.constexpr, NUM_STAGES: tl.constexpr,
    BF16_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, GRID_BARRIER: tl.constexpr,
):
    dim: tl.constexpr = HEADS * HEAD_DIM
    blocks_per_head: tl.constexpr = 3 * HEAD_DIM // BLOCK_N
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    sense = 0
    if GRID_BARRIER:
        sense = tl.atomic_add(counters_ptr + 1, 0, sem="acquire", scope="gpu")
    head_counters = counters_ptr + 2
    cache_layer_elements = B * HEADS * STEPS * HEAD_DIM
    for phase in range(phase_begin, phase_end):
        layer = tl.maximum(phase - 1, 0) // 4
        part = tl.maximum(phase - 1, 0) % 4
        if phase == 0:
            d_blocks = tl.cdiv(dim, BLOCK_K)
            row_offset = tl.load(row_offset_ptr).to(tl.int64)
            for item in range(pid, B * d_blocks, programs):
                slot = item // d_blocks
                offs_d = (item % d_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
                in_dim = offs_d < dim
                row = row_offset + tl.load(previous_ptr + slot).to(tl.int64)
                term = tl.load(table_ptr + row * dim + offs_d, mask=in_dim)
                x_row = x_ptr + slot * stride_x + offs_d
                current = tl.load(x_row, mask=in_dim, cache_modifier=".cg")
                # torch's add in x's dtype: both to fp32, add, round once.
                tl.store(x_row, (current.to(tl.float32) + term.to(tl.float32)).to(x_ptr.dtype.element_ty),
                         mask=in_dim)
        elif phase == 4 * LAYERS + 1:
            for nb in range(pid, tl.cdiv(CARD, BLOCK_N), programs):
                acc = _product_block(x_ptr, stride_x, B, dim, head_ptr, stride_head_n, nb * BLOCK_N, CARD, x_ptr,
                                     tl.zeros((BLOCK_M,), dtype=tl.float32), False, False, BF16_DOT,
                                     INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES)
                _store_block(acc, logits_ptr, stride_logits, B, nb * BLOCK_N, CARD, logits_ptr, stride_logits,
                             False, BLOCK_M, BLOCK_N)
        elif part == 0:
            norm_ptr = norm1_ptr + layer * stride_norm1
            weight_ptr = qkv_ptr + layer.to(tl.int64) * stride_qkv_l
            k_layer_ptr = k_cache_ptr + layer.to(tl.int64) * cache_layer_elements
            v_layer_ptr = v_cache_ptr + layer.to(tl.int64) * cache_layer_elements
            rstd = _rms_scale(x_ptr, stride_x, B, dim, eps, BLOCK_M, STATS_BLOCK_K, NUM_STAGES)
            for nb in range(pid, 3 * dim // BLOCK_N, programs):
                n0 = nb * BLOCK_N
                acc = _product_block(x_ptr, stride_x, B, dim, weight_ptr, stride_qkv_n, n0, 3 * dim, norm_ptr,
                                     rstd, True, False, BF16_DOT, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                                     NUM_STAGES)
                _store_block(acc, qkv_s_ptr, 3 * dim, B, n0, 3 * dim, qkv_s_ptr, 3 * dim, False, BLOCK_M, BLOCK_N)
                # A block lies within one of q, k, v and within one head (HEAD_DIM % BLOCK_N == 0).
                region = n0 // dim
                head = (n0 % dim) // HEAD_DIM
                offs_m = tl.arange(0, BLOCK_M)
                offs_d = n0 % HEAD_DIM + tl.arange(0, BLOCK_N)
                cache = ((offs_m[:, None].to(tl.int64) * HEADS + head) * STEPS + step) * HEAD_DIM + offs_d[None, :]
                rounded = acc.to(k_cache_ptr.dtype.element_ty)
                in_tile = offs_d[None, :] < HEAD_DIM
                tl.store(k_layer_ptr + cache, rounded, mask=(offs_m < tl.where(region == 1, B, 0))[:, None] & in_tile)
                tl.store(v_layer_ptr + cache, rounded, mask=(offs_m < tl.where(region == 2, B, 0))[:, None] & in_tile)
                # The head's last block to arrive computes its attention: every thread's stores are
                # issued before the program's one acq_rel arrival, which the last arriver acquires.
                tl.debug_barrier()
                arrived = tl.atomic_add(head_counters + head, 1, sem="acq_rel", scope="gpu")
                if arrived == blocks_per_head - 1:
                    tl.atomic_xchg(head_counters + head, 0, sem="relaxed", scope="gpu")
                    _head_attention(qkv_s_ptr, k_layer_ptr, v_layer_ptr, attention_ptr, B, head, step, HEADS,
                                    HEAD_DIM, STEPS, BLOCK_S, SCALE, ATTN_BLOCK_B, NUM_STAGES)
        elif part == 1:
            _residual_products(attention_ptr, dim, out_proj_ptr + layer.to(tl.int64) * stride_out_l, stride_out_n,
                               x_ptr, stride_x, B, dim, pid, programs, BF16_DOT, INPUT_PRECISION, BLOCK_M, BLOCK_N,
                               BLOCK_K, NUM_STAGES)
        elif part == 2:
            norm_ptr = norm2_ptr + layer * stride_norm2
            weight_ptr = gate_up_ptr + layer.to(tl.int64) * stride_gate_up_l
            rstd = _rms_scale(x_ptr, stride_x, B, dim, eps, BLOCK_M, STATS_BLOCK_K, NUM_STAGES)
            for nb in range(pid, tl.cdiv(HIDDEN, BLOCK_N), programs):
                acc = _product_block(x_ptr, stride_x, B, dim, weight_ptr, stride_gate_up_n, nb * BLOCK_N, HIDDEN,
                                     norm_ptr, rstd, True, True, BF16_DOT, INPUT_PRECISION, BLOCK_M, BLOCK_N,
                                     BLOCK_K, NUM_STAGES)
                _store_block(acc, hidden_ptr, HIDDEN, B, nb * BLOCK_N, HIDDEN, hidden_ptr, HIDDEN, False,
                             BLOCK_M, BLOCK_N)
        else:
            _residual_products(hidden_ptr, HIDDEN, down_ptr + layer.to(tl.int64) * stride_down_l, stride_down_n,
                               x_ptr, stride_x, B, dim, pid, programs, BF16_DOT, INPUT_PRECISION, BLOCK_M, BLOCK_N,
                               BLOCK_K, NUM_STAGES)
        if GRID_BARRIER:
            if phase + 1 < phase_end:
                sense = _grid_barrier(counters_ptr, sense, programs)


def _prev_pow2(value: int) -> int:
    return 1 << (max(value, 1).bit_length() - 1)


def depth_step_meta(batch: int, dim: int, hidden: int, heads: int, steps: int, dtype: torch.dtype) -> dict:
    """The kernel's constexprs and launch options for this shape (also for compiling it without a GPU).
    Weight chunks no longer than the shorter of the two K (D, Hd), so that no chunk is mostly padding."""
    head_dim = dim // heads
    block_m = next_pow2(batch)
    block_s = next_pow2(steps, minimum=2)
    return dict(HEADS=heads, HEAD_DIM=head_dim, STEPS=steps, BLOCK_S=block_s, SCALE=head_dim ** -0.5,
                BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=min(BLOCK_K[block_m], max(16, _prev_pow2(min(dim, hidden)))),
                STATS_BLOCK_K=min(next_pow2(dim), max(16, RMS_STATS_ELEMENTS // block_m)),
                ATTN_BLOCK_B=min(next_pow2(batch, minimum=1), max(1, ATTENTION_ELEMENTS // (block_s * head_dim))),
                NUM_STAGES=NUM_STAGES, BF16_DOT=dtype == torch.bfloat16 and not interpreting(),
                INPUT_PRECISION=dot_precision(), num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _check(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down, head, k_cache,
           v_cache, step, logits_out, scratch) -> None:
    if x.dim() != 2 or k_cache.dim() != 5:
        raise ValueError(f"x must be [B, D] and k_cache [L, B, H, S, hd], got {list(x.shape)} and "
                         f"{list(k_cache.shape)}")
    layers, batch, heads, steps, head_dim = k_cache.shape
    dim = x.shape[1]
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32 or bfloat16, got {x.dtype}")
    if not 1 <= batch <= MAX_BATCH or x.shape[0] != batch:
        raise ValueError(f"x must have the caches' B rows, 1 <= B <= {MAX_BATCH}: x {list(x.shape)}, "
                         f"k_cache {list(k_cache.shape)}")
    if head_dim & (head_dim - 1) or head_dim % BLOCK_N or heads * head_dim != dim:
        raise ValueError(f"head_dim must be a power of two, a multiple of {BLOCK_N}, with H x hd = D: "
                         f"H {heads}, hd {head_dim}, D {dim}")
    hidden = down.shape[-1] if down.dim() == 3 else -1
    card = head.shape[0] if head.dim() == 2 else -1
    expected = {"norm1": (norm1, (layers, dim)), "qkv": (qkv, (layers, 3 * dim, dim)),
                "out_proj": (out_proj, (layers, dim, dim)), "norm2": (norm2, (layers, dim)),
                "gate_up": (gate_up, (layers, 2 * hidden, dim)), "down": (down, (layers, dim, hidden)),
                "head": (head, (card, dim)), "v_cache": (v_cache, tuple(k_cache.shape)),
                "logits_out": (logits_out, (batch, card)), "embed_table": (embed_table, (embed_table.shape[0], dim)),
                "previous": (previous, (batch,)), "embed_row_offset": (embed_row_offset, (1,)),
                "scratch.qkv": (scratch.qkv, (batch, 3 * dim)), "scratch.attention": (scratch.attention, (batch, dim)),
                "scratch.hidden": (scratch.hidden, (batch, hidden)),
                "scratch.counters": (scratch.counters, (COUNTERS + heads,))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape or min(shape) < 1:
            raise ValueError(f"{name} must be {list(shape)} (non-empty), got {list(tensor.shape)}")
    for name in ("norm1", "qkv", "out_proj", "norm2", "gate_up", "down", "head", "logits_out"):
        tensor = expected[name][0]
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {tensor.dtype}")
    for name in ("k_cache", "v_cache", "embed_table", "scratch.qkv", "scratch.attention", "scratch.hidden"):
        tensor = {"k_cache": k_cache, **{n: t for n, (t, _) in expected.items()}}[name]
        if tensor.dtype != x.dtype or not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous with x's dtype {x.dtype}, got {tensor.dtype} strides "
                             f"{tensor.stride()}")
    strided = {"x": x, "norm1": norm1, "norm2": norm2, "logits_out": logits_out}
    weights = {"qkv": qkv, "out_proj": out_proj, "gate_up": gate_up, "down": down, "head": head}
    for name, tensor in {**strided, **weights}.items():
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, got {tensor.stride()}")
    for name, tensor in weights.items():
        if tensor.stride(-2) != tensor.shape[-1]:
            raise ValueError(f"{name} must have contiguous rows, got strides {tensor.stride()}")
    if previous.dtype not in INDEX_DTYPES or embed_row_offset.dtype not in INDEX_DTYPES:
        raise TypeError(f"previous and embed_row_offset must be int64 or int32, got {previous.dtype} and "
                        f"{embed_row_offset.dtype}")
    if previous.stride(0) != 1 and batch > 1:
        raise ValueError(f"previous must be contiguous, got strides {previous.stride()}")
    if scratch.counters.dtype != torch.int32:
        raise TypeError(f"scratch.counters must be int32, got {scratch.counters.dtype}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < steps:
        raise ValueError(f"step must be a Python int in [0, {steps}), got {step!r}")
    operands = (x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down, head,
                k_cache, v_cache, logits_out, scratch.qkv, scratch.attention, scratch.hidden, scratch.counters)
    check_launch_devices(*operands)


def depth_step(x: torch.Tensor, previous: torch.Tensor, embed_table: torch.Tensor, embed_row_offset: torch.Tensor,
               norm1: torch.Tensor, qkv: torch.Tensor, out_proj: torch.Tensor, norm2: torch.Tensor,
               gate_up: torch.Tensor, down: torch.Tensor, head: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, step: int, eps: float, logits_out: torch.Tensor, scratch: DepthStepScratch,
               phases: range | None = None) -> torch.Tensor:
    """Launcher; see the module doc. phases: None runs every phase, in one launch on CUDA (one launch a
    phase under the interpreter); a range of phase indices (within depth_step_phases(L)) runs those, one
    launch each. Returns logits_out."""
    _check(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down, head, k_cache,
           v_cache, step, logits_out, scratch)
    layers, batch, heads, steps, _ = k_cache.shape
    dim, hidden, card = x.shape[1], down.shape[-1], head.shape[0]
    total = depth_step_phases(layers)
    if phases is not None and (phases.step != 1 or not 0 <= phases.start <= phases.stop <= total):
        raise ValueError(f"phases must be a unit-step range within range({total}), got {phases!r}")
    single_launch = phases is None and not interpreting()
    programs = INTERPRETER_PROGRAMS if interpreting() else sm_count(x.device)
    bounds = [(0, total)] if single_launch else [(p, p + 1) for p in (phases or range(total))]
    meta = depth_step_meta(batch, dim, hidden, heads, steps, x.dtype)
    for begin, end in bounds:
        _depth_step_kernel[(programs,)](
            x, previous, embed_table, embed_row_offset,
            norm1, qkv, out_proj, norm2, gate_up, down, head,
            k_cache, v_cache, logits_out,
            scratch.qkv, scratch.attention, scratch.hidden, scratch.counters,
            batch, hidden, card, layers, step, float(eps), begin, end,
            x.stride(0), norm1.stride(0), norm2.stride(0), qkv.stride(0), qkv.stride(1), out_proj.stride(0),
            out_proj.stride(1), gate_up.stride(0), gate_up.stride(1), down.stride(0), down.stride(1),
            head.stride(0), logits_out.stride(0),
            GRID_BARRIER=single_launch, **meta,
        )
    return logits_out
