"""The single dispatch point of the fast models: every op they use, and where it runs.

Each op runs its Triton kernel when its tensors are on CUDA (or on the CPU under Triton's
interpreter), and otherwise its torch reference from the same kernel file, so that the fast models
also run, more slowly, on a plain CPU. Dense matrix products go to cuBLAS through torch, which is
what Triton would have to match at these shapes. Nothing else in moshi_fast.fast chooses a backend.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .kernels._utils import can_launch
from .kernels.conv1d_stream import conv1d_stream as _conv1d_stream_kernel
from .kernels.conv1d_stream import conv1d_stream_ref
from .kernels.conv_transpose1d_stream import conv_transpose1d_stream as _conv_transpose1d_stream_kernel
from .kernels.conv_transpose1d_stream import conv_transpose1d_stream_ref
from .kernels.ring_attention import ring_attention as _ring_attention_kernel
from .kernels.ring_attention import ring_attention_ref
from .kernels.rvq_decode import rvq_decode as _rvq_decode_kernel
from .kernels.rvq_decode import rvq_decode_ref
from .kernels.rvq_encode import rvq_encode as _rvq_encode_kernel
from .kernels.rvq_encode import rvq_encode_ref, rvq_encode_scratch

_kernels_enabled = True


@contextlib.contextmanager
def reference_ops():
    """Runs every op's torch reference inside the block, even where its kernel could launch (to test a
    fast model's wiring on the CPU without the slow interpreter, or to bisect a kernel on the GPU)."""
    global _kernels_enabled
    saved, _kernels_enabled = _kernels_enabled, False
    try:
        yield
    finally:
        _kernels_enabled = saved


def _use_kernel(*tensors) -> bool:
    return _kernels_enabled and can_launch(*tensors)


def conv1d_stream(x, state, frame, weight, bias, stride, elu_input=False, residual=None, replicate=False, out=None):
    """Streaming causal conv1d with carried history (kernels/conv1d_stream.py)."""
    fn = _conv1d_stream_kernel if _use_kernel(x, state, weight) else conv1d_stream_ref
    return fn(x, state, frame, weight, bias, stride, elu_input, residual, replicate, out=out)


def conv_transpose1d_stream(x, partial, frame, weight, bias, stride, groups=1, elu_input=False, out=None):
    """Streaming transposed conv1d with carried overlap (kernels/conv_transpose1d_stream.py)."""
    fn = _conv_transpose1d_stream_kernel if _use_kernel(x, partial, weight) else conv_transpose1d_stream_ref
    return fn(x, partial, frame, weight, bias, stride, groups, elu_input, out=out)


def ring_attention(qkv, ring_k, ring_v, frame, max_period, out=None):
    """RoPE + ring KV write + sliding-window attention of the new steps (kernels/ring_attention.py)."""
    fn = _ring_attention_kernel if _use_kernel(qkv, ring_k) else ring_attention_ref
    return fn(qkv, ring_k, ring_v, frame, max_period, out=out)


def rvq_encode(latent, input_proj, codebooks, norms, n_semantic, scratch, out=None):
    """Split residual VQ encode, all codebooks in one launch (kernels/rvq_encode.py)."""
    fn = _rvq_encode_kernel if _use_kernel(latent, codebooks) else rvq_encode_ref
    return fn(latent, input_proj, codebooks, norms, n_semantic, scratch, out=out)


def rvq_decode(codes, codebooks, output_proj, n_semantic, out=None):
    """Split residual VQ decode: gathers, sums and both output projections (kernels/rvq_decode.py)."""
    fn = _rvq_decode_kernel if _use_kernel(codebooks) else rvq_decode_ref
    return fn(codes, codebooks, output_proj, n_semantic, out=out)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ residual, fused into the GEMM as cuBLAS's beta term)."""
    if residual is None:
        return F.linear(x, weight)
    return torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t()).view(
        residual.shape)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, as Mimi's FFN."""
    return F.gelu(x)


__all__ = ["conv1d_stream", "conv_transpose1d_stream", "gelu", "layer_norm", "linear", "ring_attention",
           "rvq_decode", "rvq_encode", "rvq_encode_scratch"]
