"""Streaming ConvTranspose1d with the overlapping tail carried to the next call, fused input ELU.

Shapes (kernel K a multiple of the stride S, as in Mimi where K = 2S):
    x        [B, C_in, T]              new input steps (any strides)
    partial  [2, B, C_out, K - S]      the carried tail, double-buffered by parity (bias not included)
    frame    [B] int                   reads partial[frame % 2], writes partial[(frame + 1) % 2]
    weight   [C_in, C_out / groups, K] groups = 1 (dense) or C_in = C_out (depthwise)
    bias     [C_out] (optional)
    out      [B, C_out, T * S]

    full[b, o, t*S + k] += sum_i weight[i, o, k] * act(x[b, i, t])         (length (T - 1) S + K)
    out[j] = full[j] + bias + partial[j] (j < K - S);   next partial[p] = full[T S + p]

act = ELU (alpha 1) when elu_input. Output position j = t S + phase receives x[t - r] through tap
phase + r S for r < K / S, so each (phase, r) pair is a plain GEMM over input channels; programs own
(channel tile, step tile, phase), and step tiles past T produce the next tail. The tail is written
to the other parity buffer, so no program reads what another writes. Graph-safe.

Floor: weights + x + out + 2 x tail bytes; latency-bound at B = 1 (Mimi's largest, 1024 -> 512 with
K = 16, is 33.5 MB of fp32 weights read once per call).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import dot_precision, next_pow2


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


@triton.jit
def _conv_transpose1d_stream_kernel(
    x_ptr, partial_ptr, frame_ptr, w_ptr, bias_ptr, out_ptr,
    C_IN, C_OUT, T_IN,
    stride_xb, stride_xc, stride_xt,
    stride_pp, stride_pb, stride_pc,
    stride_wi, stride_wo,
    stride_ob, stride_oc, stride_ot,
    STRIDE: tl.constexpr, TAPS: tl.constexpr, DEPTHWISE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ELU_INPUT: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_CI: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_t = tl.program_id(2) // STRIDE
    phase = tl.program_id(2) % STRIDE
    frame = tl.load(frame_ptr + pid_b)
    parity = frame % 2
    overlap = (TAPS - 1) * STRIDE
    x_base = x_ptr + pid_b * stride_xb

    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_co = offs_co < C_OUT
    steps = T_IN + TAPS - 1
    mask_t = offs_t < steps
    acc = tl.zeros((BLOCK_CO, BLOCK_T), dtype=tl.float32)
    for r in tl.static_range(TAPS):
        source = offs_t - r
        mask_source = mask_t & (source >= 0) & (source < T_IN)
        tap = phase + r * STRIDE
        if DEPTHWISE:
            w = tl.load(w_ptr + offs_co * stride_wi + tap, mask=mask_co, other=0.0)
            v = tl.load(x_base + offs_co[:, None] * stride_xc + source[None, :] * stride_xt,
                        mask=mask_co[:, None] & mask_source[None, :], other=0.0)
            if ELU_INPUT:
                v = tl.where(v > 0, v, tl.exp(v) - 1.0)
            acc += w[:, None] * v
        else:
            for c0 in range(0, C_IN, BLOCK_CI):
                offs_ci = c0 + tl.arange(0, BLOCK_CI)
                mask_ci = offs_ci < C_IN
                w = tl.load(w_ptr + offs_ci[None, :] * stride_wi + offs_co[:, None] * stride_wo + tap,
                            mask=mask_co[:, None] & mask_ci[None, :], other=0.0)
                v = tl.load(x_base + offs_ci[:, None] * stride_xc + source[None, :] * stride_xt,
                            mask=mask_ci[:, None] & mask_source[None, :], other=0.0)
                if ELU_INPUT:
                    v = tl.where(v > 0, v, tl.exp(v) - 1.0)
                acc += tl.dot(w, v, input_precision=INPUT_PRECISION)

    position = offs_t * STRIDE + phase
    in_output = mask_t & (offs_t < T_IN)
    in_tail = mask_t & (offs_t >= T_IN)
    read_base = partial_ptr + parity * stride_pp + pid_b * stride_pb
    carried = tl.load(read_base + offs_co[:, None] * stride_pc + position[None, :],
                      mask=mask_co[:, None] & (in_output & (position < overlap))[None, :], other=0.0)
    result = acc + carried
    if HAS_BIAS:
        result += tl.load(bias_ptr + offs_co, mask=mask_co, other=0.0)[:, None]
    tl.store(out_ptr + pid_b * stride_ob + offs_co[:, None] * stride_oc + position[None, :] * stride_ot, result,
             mask=mask_co[:, None] & in_output[None, :])
    write_base = partial_ptr + (1 - parity) * stride_pp + pid_b * stride_pb
    tl.store(write_base + offs_co[:, None] * stride_pc + (position - T_IN * STRIDE)[None, :], acc,
             mask=mask_co[:, None] & in_tail[None, :])


def conv_transpose1d_stream(x: torch.Tensor, partial: torch.Tensor, frame: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None, stride: int, groups: int = 1, elu_input: bool = False,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher. float32; partial [2, B, C_out, K - S] with unit stride in time; see module doc."""
    batch, c_in, t_in = x.shape
    kernel = weight.shape[-1]
    c_out = weight.shape[1] * groups
    if kernel % stride or kernel == stride:
        raise ValueError(f"kernel {kernel} must be a multiple (> 1) of the stride {stride}")
    if groups not in (1, c_in) or (groups == c_in and c_out != c_in):
        raise ValueError("only dense (groups=1) and depthwise (groups=C_in=C_out) transposed convs are supported")
    if partial.shape != (2, batch, c_out, kernel - stride) or partial.stride(-1) != 1:
        raise ValueError(f"partial must be [2, {batch}, {c_out}, {kernel - stride}] with unit stride in time")
    if weight.stride(-1) != 1:
        raise ValueError("weight must be contiguous in its kernel dimension")
    if out is None:
        out = torch.empty(batch, c_out, t_in * stride, device=x.device, dtype=torch.float32)
    taps = kernel // stride
    block_t = min(64, next_pow2(t_in + taps - 1))
    block_co = min(64, next_pow2(c_out))
    # Narrower channel tiles until about one program per SM (see conv1d_stream._tiles).
    while block_co > 16 and batch * triton.cdiv(c_out, block_co) * triton.cdiv(t_in + taps - 1, block_t) * stride < 128:
        block_co //= 2
    grid = (batch, triton.cdiv(c_out, block_co), triton.cdiv(t_in + taps - 1, block_t) * stride)
    _conv_transpose1d_stream_kernel[grid](
        x, partial, frame, weight, bias if bias is not None else weight, out,
        c_in, c_out, t_in,
        x.stride(0), x.stride(1), x.stride(2),
        partial.stride(0), partial.stride(1), partial.stride(2),
        weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        STRIDE=stride, TAPS=taps, DEPTHWISE=groups > 1, HAS_BIAS=bias is not None, ELU_INPUT=elu_input,
        BLOCK_CO=block_co, BLOCK_T=block_t, BLOCK_CI=32, INPUT_PRECISION=dot_precision(),
    )
    return out
