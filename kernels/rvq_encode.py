"""Split residual VQ encode (Mimi's quantizer): both input projections, the nearest-codeword search
of every level and the residual updates, in one launch.

Shapes (one call = one latent vector per row, e.g. one 80 ms frame per slot):
    latent      [B, D]          fp32 (Mimi: D = 512)
    input_proj  [2, DC, D]      1x1 input projections (semantic, acoustic); the reference model
                                stores them as Conv1d weights [DC, D, 1], stacked here once
    codebooks   [NQ, N, DC]     semantic levels first (Mimi: NQ = 8, N = 2048, DC = 256)
    norms       [NQ, N]         ||codeword||^2, precomputed once
    scratch     int64 [1 + R, NQ + DC] from `rvq_encode_scratch` (R >= B rows), see below
    out (codes) [B, NQ]         int64

    x0[r] = latent @ input_proj[r].T; levels l < n_semantic quantize x0[0], the others x0[1]. Level l
    of an RVQ takes residual = x0 - (the codewords chosen at that RVQ's earlier levels, subtracted in
    level order) and picks argmin_n norms[l, n] - 2 residual . codebooks[l, n] (|residual|^2 is
    dropped: the argmin is unchanged), ties going to the smallest index as torch's argmin.

Design: a persistent grid of G = ROW_GROUPS x NUM_SLICES programs; a program owns a strided set of
BLOCK_N-codeword chunks (its slice) and a strided set of BLOCK_B-row tiles (its row group), so the
codebooks (16 MB in Mimi, the whole cost at small B) are streamed by G SMs at once instead of one.
  phase 0    the programs split the two input projections into x0 (scratch); program 0 resets the
             argmin keys; grid barrier.
  step s     semantic level s and acoustic level n_semantic + s together (the RVQs are independent:
             max(n_semantic, NQ - n_semantic) steps, 7 in Mimi). Each program rebuilds the residual of
             its rows from x0 and the earlier winners (read from the keys), scores its chunk, and
             folds (distance, index) into keys[row, level] with one atomic_min per row: key =
             order-preserving int32 of the fp32 distance << 32 | index, so the int64 minimum is the
             smallest distance, then the smallest index. Grid barrier between steps.
  finish     the program that arrives last after the final step copies the keys' indices to `out`;
             the others exit without waiting.

Grid barrier: scratch[0, 0] counts arrivals and only ever grows; scratch[0, 1] holds its value at the
start of the next launch, written by the last program of a launch. A launch's barrier k waits for
base + G * (k + 1) arrivals, so nothing is reset between launches, G may change from launch to launch
(batch sizes sharing a scratch), and no per-frame value comes from the host: a CUDA graph can capture
the launch. All G programs must be resident at once (they spin on each other): G <= the number of SMs
and one program fits an SM, so run it where no other persistent kernel holds SMs. Triton's interpreter
runs programs one after another, so there G = 1 and every barrier passes at once.

Products (two paths, a constexpr flag):
  B < DOT_ROWS   exact fp32 products: a program keeps its codeword chunk [BLOCK_N, DC] (or projection
                 slice) in registers and takes its MAX_ROWS rows one at a time, unrolled, the products
                 summed across the threads (tl.sum). tl.dot would pad the rows to 16, and its exact
                 fp32 mode runs on CUDA cores through shared memory: at B = 1 on an H200 that took
                 about 7 us a level instead of about 2, and 80 us a launch instead of 20.
  B >= DOT_ROWS  16-row tiles through tl.dot in _utils.dot_precision ("tf32x3": close to fp32, not
                 exact; a near tie between two codewords may then resolve differently). Measured with the
                 exact "ieee" dot (2026-11-22), it already beat the row-at-a-time path from there (B = 64:
                 145 us against 270 on an H200); with tf32x3 the B = 64 frame's profile on an H100
                 (2026-12-06) has it at 114 us of end step.

Scratch rows 1.. hold per row: keys [NQ] int64, then x0 of both RVQs [2 * DC] fp32 (DC int64 words);
row 0 holds the two barrier words. The scratch is zero-initialised once and reused for every launch.

Floor: the codebooks, norms, input projections and latents are read once: 16.1 MB + 1 MB for Mimi,
about 5 us at H100 bandwidth, plus max(n_semantic, NQ - n_semantic) + 1 grid barriers (about 1 us
each). The search is B x N x DC multiply-adds per level (34 M at B = 64): compute-bound from B ~ 8 on
the CUDA cores. Measured on an H200 with the exact dot at B = 64 (2026-11-22): 20 / 52 / 145 us at B = 1
/ 8 / 64 (torch: 234 / 350 / 347 us).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import await_previous_kernel, dot_precision, next_pow2, parallel_sms, pdl

DOT_ROWS = 16
"""From this batch size on, row tiles of 16 rows (tl.dot's smallest M) go through tl.dot."""
MAX_ROWS = 2
"""Below DOT_ROWS: rows per tile (BLOCK_B, unrolled one row at a time); more rows take more tiles."""
MIN_SLICES = 16
"""Codeword slices a row group keeps: more row groups only while each keeps this many slices."""
TILE_PER_THREAD = 64
"""fp32 registers a thread gives to the tile a program keeps (codeword chunk, projection slice): the
launcher adds warps (4 to 16) rather than spill."""
INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)
"""The empty argmin key (no distance yet)."""


def rvq_encode_scratch(batch: int, nq: int, dc: int, device) -> torch.Tensor:
    """Zeroed scratch for up to `batch` rows; allocate once and pass it to every launch (graph-safe)."""
    return torch.zeros(1 + batch, nq + dc, dtype=torch.int64, device=device)


def rvq_encode_ref(latent, input_proj, codebooks, norms, n_semantic, scratch=None, out=None):
    """Torch reference, the reference model's semantics (cdist + argmin per level, residual updates).
    `norms` and `scratch` are accepted for the kernel's signature; cdist recomputes the distances."""
    nq = codebooks.shape[0]
    codes = []
    for rvq, levels in enumerate((range(n_semantic), range(n_semantic, nq))):
        residual = F.linear(latent, input_proj[rvq])
        for level in levels:
            index = torch.cdist(residual[None], codebooks[level][None])[0].argmin(-1)
            residual = residual - F.embedding(index, codebooks[level])
            codes.append(index)
    codes = torch.stack(codes, dim=1)
    if out is None:
        return codes
    out.copy_(codes)
    return out


@triton.jit
def _matvec(matrix, vector):
    """matrix [P, K] . vector [K] -> [P] in fp32 (exact products, summed across the threads of K)."""
    return tl.sum(matrix * vector[None, :], axis=1)


@triton.jit
def _grid_barrier(counter_ptr, target):
    """Arrive, then wait until the arrival counter reaches `target` (see the module doc)."""
    # Every thread's stores and atomics are issued before the program's single release arrival.
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release")
    while tl.atomic_add(counter_ptr, 0, sem="acquire") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _keys(distance, codes, code_mask):
    """(distance, index) packed so that the int64 order is the (distance, index) order; masked codes
    get the empty key."""
    # fp32 -> int32 with the same order: negative floats count down from -1.
    bits = distance.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(code_mask, (ordered.to(tl.int64) << 32) | codes.to(tl.int64), INT64_MAX)


@triton.jit
def _search_level(
    step, row_group, code_slice, codebooks_ptr, norms_ptr, keys_ptr, x0_ptr,
    BATCH, CODE_DIM, NUM_CODES,
    stride_codebooks_q, stride_codebooks_n, stride_codebooks_c, stride_norms_q, stride_keys_b, stride_x0_b,
    RVQ: tl.constexpr, FIRST: tl.constexpr, DEPTH: tl.constexpr,
    ROW_GROUPS: tl.constexpr, NUM_SLICES: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Level FIRST + step of the RVQ whose levels are FIRST .. FIRST + DEPTH - 1 (if it has that many):
    this program's rows and codeword chunks, folded into keys[row, level] by atomic_min.

    The residual: x0 minus the codewords this RVQ chose at its earlier levels (final since the last
    barrier), subtracted one level at a time in level order as the reference does; levels not reached
    yet load zeros (x - 0 is exact). Data that other SMs wrote in this launch (x0, keys) is read from
    L2 (.cg): L1 is not coherent."""
    if step < DEPTH:
        level = FIRST + step
        offs_b = tl.arange(0, BLOCK_B)
        for row_tile in range(row_group, tl.cdiv(BATCH, BLOCK_B), ROW_GROUPS):
            rows = row_tile * BLOCK_B + offs_b
            row_mask = rows < BATCH
            for chunk in range(code_slice, tl.cdiv(NUM_CODES, BLOCK_N), NUM_SLICES):
                codes = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
                code_mask = codes < NUM_CODES
                norms = tl.load(norms_ptr + level * stride_norms_q + codes, mask=code_mask, other=0.0)
                if USE_DOT:
                    scores = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
                    for k0 in range(0, BLOCK_DC, BLOCK_K):
                        offs_k = k0 + tl.arange(0, BLOCK_K)
                        k_mask = offs_k < CODE_DIM
                        tile_mask = row_mask[:, None] & k_mask[None, :]
                        residual = tl.load(x0_ptr + rows[:, None] * stride_x0_b + RVQ * CODE_DIM
                                           + offs_k[None, :], mask=tile_mask, other=0.0, cache_modifier=".cg")
                        for j in tl.static_range(DEPTH - 1):
                            winner = tl.load(keys_ptr + rows * stride_keys_b + FIRST + j,
                                             mask=row_mask & (j < step), other=0, cache_modifier=".cg")
                            index = winner & 0xFFFFFFFF
                            residual -= tl.load(codebooks_ptr + (FIRST + j) * stride_codebooks_q
                                                + index[:, None] * stride_codebooks_n
                                                + offs_k[None, :] * stride_codebooks_c,
                                                mask=tile_mask & (j < step), other=0.0)
                        codewords = tl.load(codebooks_ptr + level * stride_codebooks_q
                                            + codes[None, :] * stride_codebooks_n
                                            + offs_k[:, None] * stride_codebooks_c,
                                            mask=k_mask[:, None] & code_mask[None, :], other=0.0)
                        scores += tl.dot(residual, codewords, input_precision=INPUT_PRECISION)
                    distance = norms[None, :] - 2.0 * scores
                    best = tl.min(_keys(distance, codes[None, :], code_mask[None, :]), axis=1)
                else:
                    # The chunk stays in registers; the rows are unrolled, and their keys gathered for
                    # one atomic after the loop, so that no store or branch keeps their loads apart.
                    offs_k = tl.arange(0, BLOCK_DC)
                    codewords = tl.load(codebooks_ptr + level * stride_codebooks_q
                                        + codes[:, None] * stride_codebooks_n
                                        + offs_k[None, :] * stride_codebooks_c,
                                        mask=code_mask[:, None] & (offs_k < CODE_DIM)[None, :], other=0.0)
                    best = tl.full((BLOCK_B,), INT64_MAX, tl.int64)
                    for b in tl.static_range(BLOCK_B):
                        row = row_tile * BLOCK_B + b
                        valid = row < BATCH
                        # A row past the batch loads nothing: its masks' bounds drop to 0.
                        row_k_mask = offs_k < tl.where(valid, CODE_DIM, 0)
                        residual = tl.load(x0_ptr + row * stride_x0_b + RVQ * CODE_DIM + offs_k,
                                           mask=row_k_mask, other=0.0, cache_modifier=".cg")
                        for j in tl.static_range(DEPTH - 1):
                            index = tl.load(keys_ptr + row * stride_keys_b + FIRST + j,
                                            mask=j < tl.where(valid, step, 0), other=0,
                                            cache_modifier=".cg") & 0xFFFFFFFF
                            residual -= tl.load(codebooks_ptr + (FIRST + j) * stride_codebooks_q
                                                + index * stride_codebooks_n + offs_k * stride_codebooks_c,
                                                mask=row_k_mask & (j < step), other=0.0)
                        key = _keys(norms - 2.0 * _matvec(codewords, residual), codes, code_mask)
                        best = tl.where(offs_b == b, tl.min(key), best)
                tl.atomic_min(keys_ptr + rows * stride_keys_b + level, best, mask=row_mask, sem="relaxed")


@triton.jit
def _rvq_encode_kernel(
    latent_ptr, proj_ptr, codebooks_ptr, norms_ptr, barrier_ptr, keys_ptr, x0_ptr, codes_ptr,
    BATCH, DIM, CODE_DIM, NUM_CODES,
    stride_latent_b, stride_latent_d,
    stride_proj_r, stride_proj_c, stride_proj_d,
    stride_codebooks_q, stride_codebooks_n, stride_codebooks_c,
    stride_norms_q,
    stride_keys_b, stride_x0_b,
    stride_codes_b, stride_codes_q,
    NUM_LEVELS: tl.constexpr, N_SEMANTIC: tl.constexpr,
    ROW_GROUPS: tl.constexpr, NUM_SLICES: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_L: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    NUM_PROGRAMS: tl.constexpr = ROW_GROUPS * NUM_SLICES
    STEPS: tl.constexpr = max(N_SEMANTIC, NUM_LEVELS - N_SEMANTIC)
    pid = tl.program_id(0)
    # Arrivals before this launch: written by the previous launch's last program, so every program
    # reads it before its first arrival and it cannot change during this launch.
    base = tl.load(barrier_ptr + 1, volatile=True)
    offs_l = tl.arange(0, BLOCK_L)
    row_tiles = tl.cdiv(BATCH, BLOCK_B)

    # Phase 0: keys reset and x0 = latent @ input_proj[r].T, tiles (rvq, row tile, BLOCK_C columns)
    # spread over all programs.
    if pid == 0:
        for b0 in range(0, BATCH, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            tl.store(keys_ptr + rows[:, None] * stride_keys_b + offs_l[None, :],
                     tl.full((BLOCK_B, BLOCK_L), INT64_MAX, tl.int64),
                     mask=(rows < BATCH)[:, None] & (offs_l < NUM_LEVELS)[None, :])
    column_tiles = tl.cdiv(CODE_DIM, BLOCK_C)
    offs_b = tl.arange(0, BLOCK_B)
    for tile in range(pid, 2 * row_tiles * column_tiles, NUM_PROGRAMS):
        rvq = tile % 2
        rows = (tile // 2 // column_tiles) * BLOCK_B + offs_b
        cols = (tile // 2 % column_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_mask = rows < BATCH
        col_mask = cols < CODE_DIM
        if USE_DOT:
            projected = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
            for d0 in range(0, BLOCK_DIM, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < DIM
                x = tl.load(latent_ptr + rows[:, None] * stride_latent_b + offs_d[None, :] * stride_latent_d,
                            mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                w = tl.load(proj_ptr + rvq * stride_proj_r + cols[None, :] * stride_proj_c
                            + offs_d[:, None] * stride_proj_d,
                            mask=d_mask[:, None] & col_mask[None, :], other=0.0)
                projected += tl.dot(x, w, input_precision=INPUT_PRECISION)
        else:
            # The projection slice stays in registers; the rows are unrolled (as in the search).
            offs_d = tl.arange(0, BLOCK_DIM)
            weights = tl.load(proj_ptr + rvq * stride_proj_r + cols[:, None] * stride_proj_c
                              + offs_d[None, :] * stride_proj_d,
                              mask=col_mask[:, None] & (offs_d < DIM)[None, :], other=0.0)
            projected = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
            for b in tl.static_range(BLOCK_B):
                row = (tile // 2 // column_tiles) * BLOCK_B + b
                # A row past the batch loads nothing: its mask's bound drops to 0.
                x = tl.load(latent_ptr + row * stride_latent_b + offs_d * stride_latent_d,
                            mask=offs_d < tl.where(row < BATCH, DIM, 0), other=0.0)
                projected = tl.where((offs_b == b)[:, None], _matvec(weights, x)[None, :], projected)
        tl.store(x0_ptr + rows[:, None] * stride_x0_b + rvq * CODE_DIM + cols[None, :], projected,
                 mask=row_mask[:, None] & col_mask[None, :])
    _grid_barrier(barrier_ptr, base + NUM_PROGRAMS)

    row_group = pid // NUM_SLICES
    code_slice = pid % NUM_SLICES
    for step in range(STEPS):
        for rvq in tl.static_range(2):
            _search_level(
                step, row_group, code_slice, codebooks_ptr, norms_ptr, keys_ptr, x0_ptr,
                BATCH, CODE_DIM, NUM_CODES,
                stride_codebooks_q, stride_codebooks_n, stride_codebooks_c, stride_norms_q,
                stride_keys_b, stride_x0_b,
                rvq, rvq * N_SEMANTIC, N_SEMANTIC + rvq * (NUM_LEVELS - 2 * N_SEMANTIC),
                ROW_GROUPS, NUM_SLICES, USE_DOT, BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_DC, INPUT_PRECISION,
            )
        if step + 1 < STEPS:
            _grid_barrier(barrier_ptr, base + NUM_PROGRAMS * (step + 2))

    # The last arrival sees every program's keys (acquire); nobody else needs to wait.
    total = NUM_PROGRAMS * (STEPS + 1)
    tl.debug_barrier()
    if tl.atomic_add(barrier_ptr, 1, sem="acq_rel") == base + total - 1:
        tl.debug_barrier()
        for b0 in range(0, BATCH, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            mask = (rows < BATCH)[:, None] & (offs_l < NUM_LEVELS)[None, :]
            keys = tl.load(keys_ptr + rows[:, None] * stride_keys_b + offs_l[None, :], mask=mask,
                           cache_modifier=".cg")
            tl.store(codes_ptr + rows[:, None] * stride_codes_b + offs_l[None, :] * stride_codes_q,
                     keys & 0xFFFFFFFF, mask=mask)
        tl.store(barrier_ptr + 1, base + total)


def _warps_for(tile_elements: int) -> int:
    """Warps (4 to 16) that hold a tile of this many fp32 in TILE_PER_THREAD registers a thread."""
    return min(16, max(4, next_pow2(triton.cdiv(tile_elements, 32 * TILE_PER_THREAD), minimum=1)))


def _layout(batch: int, num_codes: int, device: torch.device,
            max_programs: int | None) -> tuple[bool, int, int, int, int]:
    """(tl.dot path, BLOCK_B, row groups, codeword slices, BLOCK_N) for at most min(SMs, max_programs)
    co-resident programs: codeword slices first (the codebooks are the bytes), row groups as rows grow."""
    budget = min(parallel_sms(device), max_programs or parallel_sms(device))
    use_dot = batch >= DOT_ROWS
    block_b = DOT_ROWS if use_dot else min(MAX_ROWS, next_pow2(batch, minimum=1))
    row_groups = max(1, min(triton.cdiv(batch, block_b), budget // MIN_SLICES))
    block_n = min(64, next_pow2(triton.cdiv(num_codes, budget // row_groups), minimum=1))
    return use_dot, block_b, row_groups, min(budget // row_groups, triton.cdiv(num_codes, block_n)), block_n


def rvq_encode(latent: torch.Tensor, input_proj: torch.Tensor, codebooks: torch.Tensor, norms: torch.Tensor,
               n_semantic: int, scratch: torch.Tensor, out: torch.Tensor | None = None,
               max_programs: int | None = None) -> torch.Tensor:
    """Launcher. float32 tensors, codebooks and norms contiguous in their last dim; see module doc.
    `max_programs` caps the persistent grid (default: one program per SM at most)."""
    batch, dim = latent.shape
    nq, num_codes, dc = codebooks.shape
    if input_proj.shape != (2, dc, dim):
        raise ValueError(f"input_proj must be [2, {dc}, {dim}], got {list(input_proj.shape)}")
    if norms.shape != (nq, num_codes) or norms.stride(-1) != 1:
        raise ValueError(f"norms must be [{nq}, {num_codes}] with unit stride")
    if not 0 < n_semantic < nq:
        raise ValueError(f"need 0 < n_semantic < {nq}, got {n_semantic}")
    if scratch.dtype != torch.int64 or scratch.shape[0] <= batch or scratch.shape[1] != nq + dc \
            or not scratch.is_contiguous():
        raise ValueError(f"scratch must come from rvq_encode_scratch(>= {batch}, {nq}, {dc})")
    if out is None:
        out = torch.empty(batch, nq, dtype=torch.int64, device=latent.device)
    keys = scratch[1:, :nq]
    x0 = scratch[1:, nq:].view(torch.float32)
    use_dot, block_b, row_groups, num_slices, block_n = _layout(batch, num_codes, latent.device, max_programs)
    programs = row_groups * num_slices
    block_dc, block_dim = next_pow2(dc, minimum=1), next_pow2(dim, minimum=1)
    if use_dot:
        num_warps, block_c = 4, 16
    else:
        num_warps = _warps_for(block_n * block_dc)
        # About one BLOCK_C-column slice of a projection per program, within the same registers.
        slices_per_program = triton.cdiv(2 * dc * triton.cdiv(batch, block_b), programs)
        block_c = min(block_dc, next_pow2(slices_per_program, minimum=1),
                      max(1, num_warps * 32 * TILE_PER_THREAD // block_dim))
    use_pdl = pdl(latent.device, "rvq_encode")
    _rvq_encode_kernel[(programs,)](
        latent, input_proj, codebooks, norms, scratch, keys, x0, out,
        batch, dim, dc, num_codes,
        latent.stride(0), latent.stride(1),
        input_proj.stride(0), input_proj.stride(1), input_proj.stride(2),
        codebooks.stride(0), codebooks.stride(1), codebooks.stride(2),
        norms.stride(0),
        keys.stride(0), x0.stride(0),
        out.stride(0), out.stride(1),
        NUM_LEVELS=nq, N_SEMANTIC=n_semantic, ROW_GROUPS=row_groups, NUM_SLICES=num_slices, USE_DOT=use_dot,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=min(128, block_dc), BLOCK_DC=block_dc, BLOCK_C=block_c,
        BLOCK_D=min(64, block_dim), BLOCK_DIM=block_dim, BLOCK_L=next_pow2(nq, minimum=2),
        INPUT_PRECISION=dot_precision(), PDL=use_pdl, num_warps=num_warps, launch_pdl=use_pdl,
    )
    return out
