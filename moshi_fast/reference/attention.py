"""Attention pieces shared by Mimi's transformers and the Moshi LM: interleaved RoPE, the ring KV
cache with absolute positions, and the sliding-window causal mask.

Semantics (Kyutai's `RingKVCache` + `StreamingMultiheadAttention`): keys are stored after RoPE at
ring index `position % capacity`; a key is visible from a query iff it was written, and
0 <= pos_q - pos_k < context. A step of T tokens writes all T keys before attending, so with
capacity == context the first query of a step no longer sees the key its last token overwrote.

KV cache dtype: the cache may hold keys and values in a narrower dtype than the activations (an 8-bit
float, to halve the bytes a step reads and the memory a conversation holds; not in Kyutai's engine).
They are then stored as `to_cache_dtype` rounds them (from the activation dtype, saturated to the
format's finite range) and attended with in the activation dtype they convert back to exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .state import SlotState, as_bits


def rope_interleaved(x: torch.Tensor, positions: torch.Tensor, max_period: float) -> torch.Tensor:
    """Rotates pairs (x[2i], x[2i+1]) of x [B, H, T, D] by positions [B, T] * max_period^(-2i/D).

    The rotation runs in fp32 and is cast back to x's dtype (Kyutai's `apply_rope`, interleave=True).
    """
    head_dim = x.shape[-1]
    freqs = torch.exp(torch.arange(head_dim // 2, device=x.device, dtype=torch.float32)
                      * (-math.log(max_period) * 2 / head_dim))
    angles = freqs * positions.float()[:, None, :, None]
    cos, sin = torch.cos(angles), torch.sin(angles)
    pairs = x.view(*x.shape[:-1], head_dim // 2, 2)
    real, imag = pairs[..., 0].float(), pairs[..., 1].float()
    out_real = real * cos - imag * sin
    out_imag = real * sin + imag * cos
    return torch.stack([out_real.to(x.dtype), out_imag.to(x.dtype)], dim=-1).view(x.shape)


CACHE_DTYPES_8BIT = (torch.float8_e4m3fn,)
"""8-bit float KV cache dtypes: e4m3 (3 mantissa bits, finite range +-448, no infinities)."""


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (keys or values, the activation dtype) as a KV cache of `dtype` stores them: unchanged, or rounded to
    nearest after saturation to the 8-bit format's largest finite magnitude (explicit, so that every
    implementation agrees past it: e4m3 has no infinity to round to); NaN stays NaN."""
    if dtype == x.dtype:
        return x
    if dtype in CACHE_DTYPES_8BIT:
        limit = torch.finfo(dtype).max
        return x.clamp(-limit, limit).to(dtype)
    return x.to(dtype)


def window_mask(pos_q: torch.Tensor, pos_k: torch.Tensor, context: int | None) -> torch.Tensor:
    """Visibility [B, 1, Tq, Tk] from query positions [B, Tq] and key positions [B, Tk] (-1 = empty)."""
    delta = pos_q[:, :, None] - pos_k[:, None, :]
    visible = (pos_k[:, None, :] >= 0) & (delta >= 0)
    if context is not None:
        visible &= delta < context
    return visible[:, None]


def split_heads(projected: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T, 3*H*D] laid out (q | k | v), each (head, dim) -> three [B, H, T, D]."""
    batch, steps, width = projected.shape
    qkv = projected.view(batch, steps, 3, num_heads, width // (3 * num_heads))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D]."""
    batch, heads, steps, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, steps, heads * head_dim)


def add_ring(state: SlotState, prefix: str, num_heads: int, capacity: int, head_dim: int,
             dtype: torch.dtype, device: torch.device) -> None:
    """Registers a ring KV cache `prefix.{k,v,pos}` of `capacity` slots in state."""
    shape = (state.batch_size, num_heads, capacity, head_dim)
    state.add(f"{prefix}.k", torch.empty(shape, dtype=dtype, device=device))
    state.add(f"{prefix}.v", torch.empty(shape, dtype=dtype, device=device))
    state.add(f"{prefix}.pos", torch.empty(state.batch_size, capacity, dtype=torch.long, device=device), -1)


def ring_write(state: SlotState, prefix: str, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               exec_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Writes keys/values [B, H, T, D] at positions [B, T] into the ring of the executing slots and
    returns the whole ring (keys, values, key positions) for attention."""
    ring_k, ring_v, ring_pos = state[f"{prefix}.k"], state[f"{prefix}.v"], state[f"{prefix}.pos"]
    capacity = ring_pos.shape[1]
    index = positions % capacity
    keep = ~exec_mask.view(-1, 1)
    new_pos = torch.where(keep, ring_pos.gather(1, index), positions)
    ring_pos.scatter_(1, index, new_pos)
    kv_index = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    kv_keep = keep[:, :, None, None]
    k, v = to_cache_dtype(k, ring_k.dtype), to_cache_dtype(v, ring_v.dtype)
    for ring, new in ((as_bits(ring_k), as_bits(k)), (as_bits(ring_v), as_bits(v))):
        ring.scatter_(2, kv_index, torch.where(kv_keep, ring.gather(2, kv_index), new))
    return ring_k, ring_v, ring_pos


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor,
           context: int | None) -> torch.Tensor:
    """Scaled dot-product attention (scale 1/sqrt(D)) under the sliding-window causal mask; keys and values of a
    narrower cache dtype first convert (exactly) to q's."""
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), window_mask(pos_q, pos_k, context))
