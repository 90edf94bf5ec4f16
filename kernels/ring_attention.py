"""Streaming attention over a ring KV cache for Mimi's transformers: RoPE, the ring write and the
sliding-window causal attention of T new steps in one launch.

Shapes:
    qkv      [B, T, 3 * H * D]   projections of the T new steps, laid out (q | k | v), each (head, dim)
    ring_k   [B, H, R, D]        keys after RoPE, at slot position % R (R = the attention context)
    ring_v   [B, H, R, D]
    frame    [B] int             frames this slot has processed: the new steps sit at positions
                                 frame * T + t (absolute positions, as Kyutai's RoPE uses)
    out      [B, T, H * D]

Semantics (Kyutai's RingKVCache with capacity = context): the T new keys are written before
attending, so ring slot s holds the newest position p = s (mod R) with p < frame * T + T. A query
at position q sees keys p with p written and 0 <= q - p < R. RoPE rotates interleaved pairs
(x[2i], x[2i+1]) by position * max_period^(-2i/D), in fp32.

One program per (slot, head): it reads the valid old ring entries and the new keys from qkv (the
old entries that the new keys overwrite are masked), and writes the rotated new keys and values into
the ring at the end. A slot that does not execute (frame not advanced) rewrites the same ring slots
next time before they can be read, so no execution mask is needed. Graph-safe.

Floor: the whole ring is read at steady state: 2 * R * D * H * 4 bytes per slot (1 MB for Mimi:
R = 250, H = 8, D = 64), plus qkv and out.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import dot_precision, next_pow2


def ring_attention_ref(qkv, ring_k, ring_v, frame, max_period, out=None):
    """Torch reference (same ring convention): explicit positions, ring write, masked SDPA."""
    batch, steps, width = qkv.shape
    heads, capacity, head_dim = ring_k.shape[1:]
    q, k, v = qkv.view(batch, steps, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    positions = frame.long()[:, None] * steps + torch.arange(steps, device=qkv.device)
    q, k = _rope(q, positions, max_period), _rope(k, positions, max_period)
    newest = positions[:, -1:]
    slots = torch.arange(capacity, device=qkv.device)
    key_pos = newest - (newest - slots[None, :]) % capacity
    index = (positions % capacity)[:, None, :, None].expand(-1, heads, -1, head_dim)
    ring_k.scatter_(2, index, k)
    ring_v.scatter_(2, index, v.contiguous())
    delta = positions[:, :, None] - key_pos[:, None, :]
    visible = (key_pos[:, None, :] >= 0) & (delta >= 0) & (delta < capacity)
    y = torch.nn.functional.scaled_dot_product_attention(q, ring_k, ring_v, visible[:, None])
    y = y.transpose(1, 2).reshape(batch, steps, heads * head_dim)
    if out is None:
        return y
    out.copy_(y)
    return out


def _rope(x, positions, max_period):
    head_dim = x.shape[-1]
    freqs = torch.exp(torch.arange(head_dim // 2, device=x.device, dtype=torch.float32)
                      * (-math.log(max_period) * 2 / head_dim))
    angles = freqs * positions.float()[:, None, :, None]
    cos, sin = torch.cos(angles), torch.sin(angles)
    pairs = x.float().view(*x.shape[:-1], head_dim // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).view(x.shape).to(x.dtype)


@triton.jit
def _rotate(base_ptr, offs_t, mask_t, offs_half, stride_t, positions, LOG_PERIOD: tl.constexpr,
            HEAD_DIM: tl.constexpr):
    """Loads [T, D] interleaved pairs and returns the rotated (even, odd) halves, each [T, D/2]."""
    pointers = base_ptr + offs_t[:, None] * stride_t + 2 * offs_half[None, :]
    even = tl.load(pointers, mask=mask_t[:, None], other=0.0)
    odd = tl.load(pointers + 1, mask=mask_t[:, None], other=0.0)
    freqs = tl.exp(offs_half.to(tl.float32) * (-LOG_PERIOD * 2.0 / HEAD_DIM))
    angles = positions.to(tl.float32)[:, None] * freqs[None, :]
    cos, sin = tl.cos(angles), tl.sin(angles)
    return even * cos - odd * sin, even * sin + odd * cos


@triton.jit
def _ring_attention_kernel(
    qkv_ptr, ring_k_ptr, ring_v_ptr, frame_ptr, out_ptr,
    STEPS, CAPACITY,
    stride_qb, stride_qt,
    stride_rb, stride_rh, stride_rs,
    stride_ob, stride_ot,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, LOG_PERIOD: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    frame = tl.load(frame_ptr + pid_b).to(tl.int64)
    first_new = frame * STEPS
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < STEPS
    positions = first_new + offs_t
    offs_half = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    row = qkv_ptr + pid_b * stride_qb
    q_even, q_odd = _rotate(row + pid_h * HEAD_DIM, offs_t, mask_t, offs_half, stride_qt, positions,
                            LOG_PERIOD, HEAD_DIM)
    k_even, k_odd = _rotate(row + (HEADS + pid_h) * HEAD_DIM, offs_t, mask_t, offs_half, stride_qt, positions,
                            LOG_PERIOD, HEAD_DIM)
    v_new = tl.load(row + (2 * HEADS + pid_h) * HEAD_DIM + offs_t[:, None] * stride_qt + offs_d[None, :],
                    mask=mask_t[:, None], other=0.0)
    q_even *= SCALE
    q_odd *= SCALE

    # The new keys attend causally among themselves.
    scores = tl.dot(q_even, tl.trans(k_even), input_precision=INPUT_PRECISION)
    scores += tl.dot(q_odd, tl.trans(k_odd), input_precision=INPUT_PRECISION)
    causal = (offs_t[None, :] <= offs_t[:, None]) & mask_t[None, :]
    scores = tl.where(causal, scores, float("-inf"))
    running_max = tl.max(scores, axis=1)
    weights = tl.exp(scores - running_max[:, None])
    running_sum = tl.sum(weights, axis=1)
    acc = tl.dot(weights, v_new, input_precision=INPUT_PRECISION)

    # Old entries: slot s holds position newest_old - ((newest_old - s) mod R); those the new keys
    # overwrite (positions below first_new + STEPS - R) and those never written (< 0) are hidden.
    ring_k = ring_k_ptr + pid_b * stride_rb + pid_h * stride_rh
    ring_v = ring_v_ptr + pid_b * stride_rb + pid_h * stride_rh
    newest_old = first_new - 1
    oldest_visible = first_new + STEPS - CAPACITY
    for s0 in range(0, CAPACITY, BLOCK_R):
        slots = s0 + tl.arange(0, BLOCK_R)
        slot_pos = newest_old - ((newest_old - slots) % CAPACITY + CAPACITY) % CAPACITY
        valid = (slots < CAPACITY) & (slot_pos >= 0) & (slot_pos >= oldest_visible)
        pointers = ring_k + slots[:, None] * stride_rs + 2 * offs_half[None, :]
        old_even = tl.load(pointers, mask=valid[:, None], other=0.0)
        old_odd = tl.load(pointers + 1, mask=valid[:, None], other=0.0)
        block = tl.dot(q_even, tl.trans(old_even), input_precision=INPUT_PRECISION)
        block += tl.dot(q_odd, tl.trans(old_odd), input_precision=INPUT_PRECISION)
        block = tl.where(valid[None, :], block, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(block, axis=1))
        correction = tl.exp(running_max - new_max)
        # A fresh name: Triton's loop-carried values keep the shape they had before the loop.
        block_weights = tl.exp(block - new_max[:, None])
        old_v = tl.load(ring_v + slots[:, None] * stride_rs + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * correction[:, None] + tl.dot(block_weights, old_v, input_precision=INPUT_PRECISION)
        running_sum = running_sum * correction + tl.sum(block_weights, axis=1)
        running_max = new_max

    out = acc / running_sum[:, None]
    tl.store(out_ptr + pid_b * stride_ob + offs_t[:, None] * stride_ot + pid_h * HEAD_DIM + offs_d[None, :], out,
             mask=mask_t[:, None])
    write_slot = positions % CAPACITY
    pointers = ring_k + write_slot[:, None] * stride_rs + 2 * offs_half[None, :]
    tl.store(pointers, k_even, mask=mask_t[:, None])
    tl.store(pointers + 1, k_odd, mask=mask_t[:, None])
    tl.store(ring_v + write_slot[:, None] * stride_rs + offs_d[None, :], v_new, mask=mask_t[:, None])


def ring_attention(qkv: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, frame: torch.Tensor,
                   max_period: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher (float32). The context equals the ring capacity R = ring_k.shape[2]."""
    batch, steps, width = qkv.shape
    _, heads, capacity, head_dim = ring_k.shape
    if width != 3 * heads * head_dim or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [B, T, {3 * heads * head_dim}] with unit stride in its last dim")
    if steps > capacity:
        raise ValueError("more new steps than ring slots")
    if ring_k.stride(-1) != 1 or ring_v.stride() != ring_k.stride():
        raise ValueError("ring_k and ring_v must share a layout with unit stride in the head dim")
    if out is None:
        out = torch.empty(batch, steps, heads * head_dim, device=qkv.device, dtype=torch.float32)
    _ring_attention_kernel[(batch, heads)](
        qkv, ring_k, ring_v, frame, out,
        steps, capacity,
        qkv.stride(0), qkv.stride(1),
        ring_k.stride(0), ring_k.stride(1), ring_k.stride(2),
        out.stride(0), out.stride(1),
        HEADS=heads, HEAD_DIM=head_dim, LOG_PERIOD=math.log(max_period), SCALE=head_dim ** -0.5,
        BLOCK_T=next_pow2(steps), BLOCK_R=64, INPUT_PRECISION=dot_precision(),
    )
    return out
