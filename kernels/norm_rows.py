"""Normalisation of few rows over their last dim in a launch of its own: the language model's RMSNorm (or
Mimi's LayerNorm), ahead of a weight-streaming linear that then runs without a norm (ops.linear does so for both:
ops.SEPARATE_NORM_KINDS).

Shapes:
    x       [M, K]   fp32 or bf16, unit stride along K, any row stride
    norm    skinny_linear.Norm: ("rms", weight [K], eps) or ("layer", weight [K], bias [K] or None, eps)
    out     [M, K]   RMSNorm: x's dtype; LayerNorm: fp32. Unit stride along K, any row stride

Semantics: the rows skinny_linear's fused norm multiplies (spec: skinny_linear.normalize_rows_ref), so that
skinny_linear(norm_rows(x, norm), W) is skinny_linear(x, W, norm=norm) up to the order in which a row's
statistics are summed:
    rms     (x * (weight * rsqrt(eps + mean(x^2)))) in fp32, rounded to x's dtype (the reference LM's)
    layer   (x - mean) * rsqrt(biased variance + eps) * weight + bias in fp32 (F.layer_norm)

Why a launch of its own: with the norm fused, every program of the linear first computes the statistics of
all its BLOCK_M rows over the whole K, and only then streams its weights. At M = 64 and K = 4096 that is
512 KB of x read from L2 by each of the 384 programs of Helium's qkv, a serial pass before any weight
arrives: on an H200 the fused qkv + RMSNorm took 67.9 us at B = 64 against 28.8 us for the same product
without the norm (bench/RESULTS.md), and gate_up + RMSNorm + SiLU 120 us. Here each row's statistics are
computed once.

Design: grid (M,); a program holds its whole row in registers (BLOCK_K = K rounded up to a power of two, up
to MAX_K), sums in fp32 (LayerNorm: the mean, then the squared deviations from it), normalises and stores.
num_warps grows with K so that a thread holds at most 32 elements. Launched with programmatic dependent
launch where `pdl` allows it: it lets the linear after it start at once, so that the linear's weight
prefetches overlap this launch.

Floor: x read and out written, M x K x (itemsize + out itemsize), plus the weight (and bias) of K: 1 MB at
M = 64, K = 4096 in bf16 (~0.25 us of H200 bandwidth); in practice a launch and two dependent memory
latencies.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import await_previous_kernel, next_pow2, pdl
from .skinny_linear import Norm, as_norm, normalize_rows_ref

DTYPES = (torch.float32, torch.bfloat16)
MAX_K = 16384
"""Widest row a program holds in registers (32 fp32 values a thread at 16 warps)."""
ELEMENTS_PER_THREAD = 32


def norm_rows_ref(x: torch.Tensor, norm, out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference, the spec (skinny_linear.normalize_rows_ref)."""
    rows = normalize_rows_ref(x, as_norm(norm))
    if out is None:
        return rows
    out.copy_(rows)
    return out


@triton.jit
def _norm_rows_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, K, stride_xm, stride_om, eps,
                      RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    values = tl.load(x_ptr + row * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    gamma = tl.load(weight_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    if RMS:
        scale = tl.rsqrt(eps + tl.sum(values * values, axis=0) / K)
        # The reference's order of operations, x * (weight * scale), so that the rounding matches.
        normed = values * (gamma * scale)
    else:
        mean = tl.sum(values, axis=0) / K
        deviations = tl.where(mask_k, values - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(deviations * deviations, axis=0) / K + eps)
        normed = deviations * rstd * gamma
        if HAS_BIAS:
            normed += tl.load(bias_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_k, normed.to(out_ptr.dtype.element_ty), mask=mask_k)


def norm_rows(x: torch.Tensor, norm, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher; see the module doc. norm: a Norm or the tuples skinny_linear takes ((weight, bias, eps) for
    LayerNorm, ("rms", weight, eps)). Returns out ([M, K]: x's dtype for RMSNorm, fp32 for LayerNorm)."""
    norm: Norm = as_norm(norm)
    if norm is None:
        raise ValueError("norm_rows needs a norm")
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, K] with unit stride along K, got {list(x.shape)} strides {x.stride()}")
    rows, k = x.shape
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32 or bfloat16, got {x.dtype}")
    if k > MAX_K:
        raise ValueError(f"rows of up to {MAX_K} elements are served, got {k}")
    for name, tensor in (("weight", norm.weight), ("bias", norm.bias)):
        if tensor is not None and (tensor.shape != (k,) or tensor.stride(-1) != 1 or tensor.device != x.device):
            raise ValueError(f"the norm's {name} must be a contiguous [{k}] on {x.device}")
    out_dtype = x.dtype if norm.kind == "rms" else torch.float32
    if out is None:
        out = torch.empty(rows, k, device=x.device, dtype=out_dtype)
    if out.shape != x.shape or out.dtype != out_dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {out_dtype} [{rows}, {k}] with unit stride along K")
    if rows == 0:
        return out
    block_k = next_pow2(k, minimum=16)
    use_pdl = pdl(x.device, "norm_rows")
    _norm_rows_kernel[(rows,)](
        x, norm.weight, norm.bias if norm.bias is not None else norm.weight, out, k, x.stride(0), out.stride(0),
        float(norm.eps), RMS=norm.kind == "rms", HAS_BIAS=norm.bias is not None, BLOCK_K=block_k, PDL=use_pdl,
        launch_pdl=use_pdl, num_warps=min(16, max(1, block_k // (32 * ELEMENTS_PER_THREAD))),
    )
    return out
