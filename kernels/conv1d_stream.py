"""Streaming causal Conv1d with carried input history, fused input ELU and residual add.

Shapes (one call = the new samples of every slot):
    x        [B, C_in, T]          new input samples (any strides)
    state    [2, B, C_in, H]       the last H = K - S input samples of each slot, double-buffered by parity
    frame    [B] int               frames this slot has processed; reads state[frame % 2], writes state[(frame + 1) % 2]
    weight   [C_out, C_in, K]      bias [C_out] (optional)
    residual [B, C_out, T / S]     optional, added to the output
    out      [B, C_out, T / S]

    out[b, o, t] = bias[o] + residual[b, o, t] + sum_{i, k} weight[o, i, k] * act(v[b, i, t * S + k])
    v = concat(history, x) along time; act = ELU (alpha 1) when elu_input, else identity.

The history holds raw input samples (ELU is applied on read, and ELU(0) = 0, so a zero history
is causal zero padding). With `replicate`, a slot's first frame (frame == 0) uses copies of its first
sample as history (Kyutai's downsample conv). The kernel writes the next history into the other
parity buffer, so reads and writes never touch the same memory: no concat, no copy, no race, and a
slot that does not execute (its frame counter not advanced) keeps its history. Graph-safe: every
per-slot value comes from device memory.

Floor: the bytes are weights + x + out + residual + 2 x history; these convs are small (at most
8 MB of weights per direction in Mimi), so at B = 1 they are latency-bound; at large B they are
implicit GEMMs of [C_out x C_in*K] by [C_in*K x T/S] (fp32 operands, tf32x3 dot: see
_utils.dot_precision).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import dot_precision, next_pow2


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
def _conv1d_stream_kernel(
    x_ptr, state_ptr, frame_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    C_IN, C_OUT, T_IN, T_OUT,
    stride_xb, stride_xc, stride_xt,
    stride_sp, stride_sb, stride_sc,
    stride_wo, stride_wi,
    stride_rb, stride_rc, stride_rt,
    stride_ob, stride_oc, stride_ot,
    STRIDE: tl.constexpr, KERNEL: tl.constexpr, HISTORY: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ELU_INPUT: tl.constexpr, REPLICATE: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_t = tl.program_id(2)
    frame = tl.load(frame_ptr + pid_b)
    parity = frame % 2
    first = frame == 0
    x_base = x_ptr + pid_b * stride_xb
    read_base = state_ptr + parity * stride_sp + pid_b * stride_sb

    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_co = offs_co < C_OUT
    mask_t = offs_t < T_OUT
    reduction = C_IN * KERNEL
    acc = tl.zeros((BLOCK_CO, BLOCK_T), dtype=tl.float32)
    for r0 in range(0, reduction, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < reduction
        ci = offs_r // KERNEL
        k = offs_r % KERNEL
        w = tl.load(w_ptr + offs_co[:, None] * stride_wo + ci[None, :] * stride_wi + k[None, :],
                    mask=mask_co[:, None] & mask_r[None, :], other=0.0)
        # Index into concat(history, x): j < 0 reads the history, j >= 0 the new samples.
        j = offs_t[None, :] * STRIDE + k[:, None] - HISTORY
        valid = mask_r[:, None] & mask_t[None, :]
        from_x = j >= 0
        v = tl.load(x_base + ci[:, None] * stride_xc + j * stride_xt, mask=valid & from_x, other=0.0)
        h = tl.load(read_base + ci[:, None] * stride_sc + (j + HISTORY), mask=valid & (j < 0), other=0.0)
        if REPLICATE:
            x0 = tl.load(x_base + ci[:, None] * stride_xc, mask=valid & (j < 0), other=0.0)
            h = tl.where(first, x0, h)
        v = tl.where(from_x, v, h)
        if ELU_INPUT:
            v = tl.where(v > 0, v, tl.exp(v) - 1.0)
        acc += tl.dot(w, v, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_co, mask=mask_co, other=0.0)[:, None]
    mask_out = mask_co[:, None] & mask_t[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + pid_b * stride_rb + offs_co[:, None] * stride_rc + offs_t[None, :] * stride_rt,
                       mask=mask_out, other=0.0)
    tl.store(out_ptr + pid_b * stride_ob + offs_co[:, None] * stride_oc + offs_t[None, :] * stride_ot, acc,
             mask=mask_out)

    if HISTORY > 0:
        # One program per slot writes the next history: the last HISTORY samples of concat(history, x).
        if (pid_co == 0) & (pid_t == 0):
            write_base = state_ptr + (1 - parity) * stride_sp + pid_b * stride_sb
            offs_h = tl.arange(0, BLOCK_H)
            mask_h = offs_h < HISTORY
            source = T_IN - HISTORY + offs_h
            for c0 in range(0, C_IN, BLOCK_R):
                offs_c = c0 + tl.arange(0, BLOCK_R)
                mask = (offs_c < C_IN)[:, None] & mask_h[None, :]
                # Fresh names: Triton loop-carried values must keep the shape they had before the loop.
                new_v = tl.load(x_base + offs_c[:, None] * stride_xc + source[None, :] * stride_xt,
                                mask=mask & (source >= 0)[None, :], other=0.0)
                old_h = tl.load(read_base + offs_c[:, None] * stride_sc + (source + HISTORY)[None, :],
                                mask=mask & (source < 0)[None, :], other=0.0)
                if REPLICATE:
                    first_x = tl.load(x_base + offs_c[:, None] * stride_xc, mask=mask & (source < 0)[None, :], other=0.0)
                    old_h = tl.where(first, first_x, old_h)
                tl.store(write_base + offs_c[:, None] * stride_sc + offs_h[None, :],
                         tl.where((source >= 0)[None, :], new_v, old_h), mask=mask)


def _tiles(batch: int, c_out: int, t_out: int, reduction: int, target_programs: int = 128) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_CO, BLOCK_R). At B = 1 most SEANet convs would fill a handful of SMs with wide
    tiles, each looping over the whole reduction: narrower channel tiles until about one program per
    SM (the weights are the bytes, and each program then streams a smaller slice of them)."""
    block_t = min(64, next_pow2(t_out))
    block_co = min(64, next_pow2(c_out))
    while block_co > 16 and batch * triton.cdiv(c_out, block_co) * triton.cdiv(t_out, block_t) < target_programs:
        block_co //= 2
    return block_t, block_co, 64 if reduction >= 1024 else 32


def conv1d_stream(x: torch.Tensor, state: torch.Tensor, frame: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, stride: int, elu_input: bool = False,
                  residual: torch.Tensor | None = None, replicate: bool = False,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher. float32 tensors; state [2, B, C_in, K - S] contiguous in its last dim; see module doc."""
    batch, c_in, t_in = x.shape
    c_out, _, kernel = weight.shape
    history = kernel - stride
    if t_in % stride:
        raise ValueError(f"input length {t_in} is not a multiple of the stride {stride}")
    if state.shape != (2, batch, c_in, history) or state.stride(-1) != 1:
        raise ValueError(f"state must be [2, {batch}, {c_in}, {history}] with unit stride in time")
    if weight.stride(-1) != 1:
        raise ValueError("weight must be contiguous in its kernel dimension")
    t_out = t_in // stride
    if out is None:
        out = torch.empty(batch, c_out, t_out, device=x.device, dtype=torch.float32)
    block_t, block_co, block_r = _tiles(batch, c_out, t_out, c_in * kernel)
    grid = (batch, triton.cdiv(c_out, block_co), triton.cdiv(t_out, block_t))
    res = residual if residual is not None else out
    # A k = 1 conv has an empty history; any valid pointer stands in for it (never dereferenced).
    state_arg = state if state.numel() else x
    _conv1d_stream_kernel[grid](
        x, state_arg, frame, weight, bias if bias is not None else weight, res, out,
        c_in, c_out, t_in, t_out,
        x.stride(0), x.stride(1), x.stride(2),
        state.stride(0), state.stride(1), state.stride(2),
        weight.stride(0), weight.stride(1),
        res.stride(0), res.stride(1), res.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        STRIDE=stride, KERNEL=kernel, HISTORY=history,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ELU_INPUT=elu_input, REPLICATE=replicate,
        BLOCK_CO=block_co, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_H=next_pow2(max(history, 1)),
        INPUT_PRECISION=dot_precision(),
    )
    return out
