"""Split residual VQ decode (Mimi's quantizer): codeword gathers, per-RVQ sums and both output
projections, in one launch.

Shapes (one call = one code vector per row, e.g. one 80 ms frame per slot):
    codes        [B, NQ]        any integer dtype; levels < n_semantic are semantic
    codebooks    [NQ, N, DC]    (Mimi: NQ = 8, N = 2048, DC = 256)
    output_proj  [2, D, DC]     1x1 output projections (semantic, acoustic); the reference model
                                stores them as Conv1d weights [D, DC, 1], stacked here once
    out          [B, D]         fp32 (Mimi: D = 512)

    out = output_proj[0] @ q_semantic + output_proj[1] @ q_acoustic,
    q_rvq = sum over that RVQ's levels, in level order from 0, of codebooks[l][codes[:, l]]
(the reference's order: codewords summed per RVQ, each sum projected, semantic + acoustic).

Grid (rows, output-dim tiles), at least one program per SM: each program gathers and sums the
codewords of its row (again for every output tile: NQ x DC floats, at most its projection slices'
size) and multiplies the two sums by its BLOCK_D rows of the projections, kept in registers: exact
fp32 products summed on CUDA cores, as in rvq_encode (tl.dot would pad the row to 16; one row per
program measured fastest on an H200 at B = 1, 8 and 64). Graph-safe.

Floor: both projections (1 MB for Mimi) plus the gathered codewords (B x NQ x DC x 4 bytes), codes
and out: latency-bound at small B (about 0.3 us of H100 bandwidth at B = 1). Measured on an H200:
2.2 / 3.1 / 11.4 us at B = 1 / 8 / 64 (torch: 29 / 113 / 56 us).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import await_previous_kernel, next_pow2, parallel_sms, pdl
from .rvq_encode import _matvec, _warps_for


def rvq_decode_ref(codes, codebooks, output_proj, n_semantic, out=None):
    """Torch reference (the reference model's summation order)."""
    nq = codebooks.shape[0]
    total = 0
    for rvq, levels in enumerate((range(n_semantic), range(n_semantic, nq))):
        quantized = 0
        for level in levels:
            quantized = quantized + F.embedding(codes[:, level], codebooks[level])
        total = total + F.linear(quantized, output_proj[rvq])
    if out is None:
        return total
    out.copy_(total)
    return out


@triton.jit
def _rvq_decode_kernel(
    codes_ptr, codebooks_ptr, proj_ptr, out_ptr,
    DIM, CODE_DIM,
    stride_codes_b, stride_codes_q,
    stride_codebooks_q, stride_codebooks_n, stride_codebooks_c,
    stride_proj_r, stride_proj_d, stride_proj_c,
    stride_out_b, stride_out_d,
    NUM_LEVELS: tl.constexpr, N_SEMANTIC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_mask = dims < DIM
    offs_k = tl.arange(0, BLOCK_DC)
    k_mask = offs_k < CODE_DIM
    w_mask = dim_mask[:, None] & k_mask[None, :]
    w_offsets = dims[:, None] * stride_proj_d + offs_k[None, :] * stride_proj_c
    semantic_proj = tl.load(proj_ptr + w_offsets, mask=w_mask, other=0.0)
    acoustic_proj = tl.load(proj_ptr + stride_proj_r + w_offsets, mask=w_mask, other=0.0)
    # The projections (weights) load while the previous kernel may still run; the codes come after.
    await_previous_kernel(PDL)
    semantic = tl.zeros((BLOCK_DC,), dtype=tl.float32)
    acoustic = tl.zeros((BLOCK_DC,), dtype=tl.float32)
    # Unrolled: the NQ gathers are in flight together; each sum runs in level order from 0.
    for level in tl.static_range(NUM_LEVELS):
        index = tl.load(codes_ptr + row * stride_codes_b + level * stride_codes_q).to(tl.int64)
        codeword = tl.load(codebooks_ptr + level * stride_codebooks_q + index * stride_codebooks_n
                           + offs_k * stride_codebooks_c, mask=k_mask, other=0.0)
        if level < N_SEMANTIC:
            semantic += codeword
        else:
            acoustic += codeword
    total = _matvec(semantic_proj, semantic) + _matvec(acoustic_proj, acoustic)
    tl.store(out_ptr + row * stride_out_b + dims * stride_out_d, total, mask=dim_mask)


def rvq_decode(codes: torch.Tensor, codebooks: torch.Tensor, output_proj: torch.Tensor, n_semantic: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher. float32 codebooks and projections (any strides); see module doc."""
    batch, nq = codes.shape
    _, _, dc = codebooks.shape
    dim = output_proj.shape[1]
    if codebooks.shape[0] != nq or output_proj.shape != (2, dim, dc):
        raise ValueError(f"codes {list(codes.shape)}, codebooks {list(codebooks.shape)} and output_proj "
                         f"{list(output_proj.shape)} do not match [B, NQ], [NQ, N, DC], [2, D, DC]")
    if not 0 < n_semantic < nq:
        raise ValueError(f"need 0 < n_semantic < {nq}, got {n_semantic}")
    if out is None:
        out = torch.empty(batch, dim, device=codebooks.device, dtype=torch.float32)
    block_dc = next_pow2(dc, minimum=1)
    # At least one program per SM (the interpreter: as few as possible), each with its two projection
    # slices [BLOCK_D, DC] in registers: warps added (4 to 16) rather than spill.
    programs = parallel_sms(codebooks.device)
    block_d = min(64, next_pow2(dim, minimum=1), next_pow2(triton.cdiv(dim * batch, programs), minimum=4))
    num_warps = _warps_for(2 * block_d * block_dc)
    use_pdl = pdl(codebooks.device, "rvq_decode")
    _rvq_decode_kernel[(batch, triton.cdiv(dim, block_d))](
        codes, codebooks, output_proj, out,
        dim, dc,
        codes.stride(0), codes.stride(1),
        codebooks.stride(0), codebooks.stride(1), codebooks.stride(2),
        output_proj.stride(0), output_proj.stride(1), output_proj.stride(2),
        out.stride(0), out.stride(1),
        NUM_LEVELS=nq, N_SEMANTIC=n_semantic, BLOCK_D=block_d, BLOCK_DC=block_dc, PDL=use_pdl,
        num_warps=num_warps, launch_pdl=use_pdl,
    )
    return out
