"""Sum of one embedding row per stream, gathered from concatenated tables, in one launch: the LM's
input embedding (Helium: 16 audio streams then text; the depth transformer: one row added to a
projection).

Shapes:
    tokens      [B, S]   int64 or int32, any strides: stream s's token for each slot
    table       [R, D]   fp32 or bf16, contiguous: the S streams' tables concatenated along rows
    row_offset  [S]      int64 or int32, on the device: stream s's token t is table row row_offset[s] + t
    out         [B, D]   table's dtype, any row stride, unit stride along D

Semantics: out[b] = (((init + e_0) + e_1) + ... + e_{S-1}), e_s = table[row_offset[s] + tokens[b, s]],
every addition rounded to out's dtype, in stream order: exactly what `x = e_0; x = x + e_1; ...` gives
in torch in that dtype (bit-identical in bf16 too). init is nothing (the first term is e_0 itself)
unless `accumulate`, where it is out's current value. Rows are not bounds-checked (that would need a
host sync): a token outside its stream's table reads another stream's row, or out of memory.

Design: grid (B, D blocks); each program reads its slot's S token ids and offsets, gathers the S row
slices of BLOCK_D elements (an unrolled loop: no gather depends on the running sum, so the compiler can
issue them all before the first add) and adds them in stream order. Column blocks shrink, down to
MIN_BLOCK_D, while B alone leaves SMs idle. Each add is written as torch's bf16 add computes it (both
operands to fp32, add, round to nearest even); Triton compiles that to one native add.bf16 on sm_90,
the same bits: rounding twice (to fp32, then bf16) is innocuous for a sum when the wide format has at
least 2p + 2 bits (24 >= 2 x 8 + 2). Graph-safe: no host sync, nothing allocated but `out` when it is
None.

Floor: B x S x D x itemsize bytes gathered plus B x D x itemsize written (and read again when
accumulating): Helium's 17 bf16 rows of 4096 are 139 KB a slot, 8.9 MB at B = 64 (about 2 us of H200
copy bandwidth). At small B the launch and two dependent memory latencies (token ids, then rows) are
the floor instead. Tile heuristics unmeasured.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import await_previous_kernel, check_launch_devices, next_pow2, parallel_sms, pdl

DTYPES = (torch.float32, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)
MIN_BLOCK_D = 128
"""Narrowest column block the launcher picks by itself: 256 bytes of a bf16 row, one warp of 8-byte loads."""
MAX_BLOCK_D = 1024
"""Widest column block: a quarter of Helium's 4096-wide rows."""
BYTES_PER_WARP = 512
"""Row bytes a warp loads per stream: one 16-byte vector a thread."""


def embed_sum_ref(tokens, table, row_offset, out=None, accumulate=False):
    """Torch reference, the spec: F.embedding per stream, added one at a time in out's dtype."""
    if accumulate and out is None:
        raise ValueError("accumulate=True needs out")
    rows = tokens.long() + row_offset.long()
    total = out.clone() if accumulate else None
    for stream in range(rows.shape[1]):
        term = F.embedding(rows[:, stream], table)
        total = term if total is None else total + term
    if out is None:
        return total
    out.copy_(total)
    return out


@triton.jit
def _gather_row(tokens_row, row_offset_ptr, table_ptr, offs_d, in_dim, DIM, stream, stride_tokens_s,
                stride_row_offset):
    """Columns offs_d of the table row that `stream`'s token selects."""
    row = tl.load(row_offset_ptr + stream * stride_row_offset).to(tl.int64) + tl.load(
        tokens_row + stream * stride_tokens_s)
    return tl.load(table_ptr + row * DIM + offs_d, mask=in_dim)


@triton.jit
def _embed_sum_kernel(
    tokens_ptr, table_ptr, row_offset_ptr, out_ptr,
    DIM, stride_tokens_b, stride_tokens_s, stride_row_offset, stride_out_b,
    STREAMS: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    slot = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_dim = offs_d < DIM
    tokens_row = tokens_ptr + slot * stride_tokens_b
    out_row = out_ptr + slot * stride_out_b + offs_d
    if ACCUMULATE:
        total = tl.load(out_row, mask=in_dim)
    else:
        total = _gather_row(tokens_row, row_offset_ptr, table_ptr, offs_d, in_dim, DIM, 0, stride_tokens_s,
                            stride_row_offset)
    for stream in tl.static_range(0 if ACCUMULATE else 1, STREAMS):
        term = _gather_row(tokens_row, row_offset_ptr, table_ptr, offs_d, in_dim, DIM, stream,
                           stride_tokens_s, stride_row_offset)
        total = (total.to(tl.float32) + term.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_row, total, mask=in_dim)


def _block_d(batch: int, dim: int, programs_wanted: int) -> int:
    block_d = min(MAX_BLOCK_D, next_pow2(dim))
    while block_d > MIN_BLOCK_D and batch * triton.cdiv(dim, block_d) < programs_wanted:
        block_d //= 2
    return block_d


def embed_sum(tokens: torch.Tensor, table: torch.Tensor, row_offset: torch.Tensor,
              out: torch.Tensor | None = None, accumulate: bool = False,
              block_d: int | None = None) -> torch.Tensor:
    """Launcher; see the module doc. Returns out ([B, D], table's dtype). `block_d` (a power of two)
    overrides the column block the launcher picks."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, S], got {list(tokens.shape)}")
    batch, streams = tokens.shape
    if tokens.dtype not in INDEX_DTYPES or row_offset.dtype not in INDEX_DTYPES:
        raise TypeError(f"tokens and row_offset must be int64 or int32, got {tokens.dtype} and "
                        f"{row_offset.dtype}")
    if table.dtype not in DTYPES:
        raise TypeError(f"table must be float32 or bfloat16, got {table.dtype}")
    if table.dim() != 2 or not table.is_contiguous():
        raise ValueError(f"table must be a contiguous [R, D], got {list(table.shape)} "
                         f"strides {table.stride()}")
    dim = table.shape[1]
    if streams < 1:
        raise ValueError("tokens must hold at least one stream")
    if row_offset.shape != (streams,):
        raise ValueError(f"row_offset must be [{streams}] (one offset per stream), "
                         f"got {list(row_offset.shape)}")
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out")
        out = torch.empty(batch, dim, device=table.device, dtype=table.dtype)
    if out.shape != (batch, dim) or out.dtype != table.dtype or (dim > 1 and out.stride(1) != 1):
        raise ValueError(f"out must be [{batch}, {dim}] {table.dtype} with unit stride along D, "
                         f"got {list(out.shape)} {out.dtype} strides {out.stride()}")
    operands = (tokens, table, row_offset, out)
    check_launch_devices(*operands)
    if block_d is None:
        block_d = _block_d(batch, dim, parallel_sms(table.device))
    if block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a power of two, got {block_d}")
    if batch == 0 or dim == 0:
        return out
    num_warps = min(8, max(1, block_d * table.element_size() // BYTES_PER_WARP))
    use_pdl = pdl(out.device, "embed_sum")
    _embed_sum_kernel[(batch, triton.cdiv(dim, block_d))](
        tokens, table, row_offset, out,
        dim, tokens.stride(0), tokens.stride(1), row_offset.stride(0), out.stride(0),
        STREAMS=streams, ACCUMULATE=accumulate, BLOCK_D=block_d, PDL=use_pdl, num_warps=num_warps,
        launch_pdl=use_pdl,
    )
    return out
