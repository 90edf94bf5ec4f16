"""Attention of the depth transformer: the KV-cache write of one codebook step and the causal
attention over this frame's steps so far, in one launch.

Shapes:
    qkv      [B, 3 * H * D]   the step's projections, laid out (q | k | v), each (head, dim); any row
                              stride, unit last stride
    k_cache  [B, H, S, D]     contiguous, qkv's dtype (fp32 or bf16); S = the frame's codebook steps
    v_cache  [B, H, S, D]
    step                      Python int, 0 <= step < S
    out      [B, H * D]       qkv's dtype, any row stride, unit last stride

Semantics: k_cache[:, :, step] and v_cache[:, :, step] take the step's key and value (no RoPE: the
depth transformer has no positional embedding); then each head's query attends over cache positions
0..step, scale 1/sqrt(D), scores, softmax and weighted sum in fp32, the result rounded to out's dtype.
Positions past step are never read: they may hold anything, e.g. the previous frame's steps or NaN.

Design, for the depth transformer's regime (H = 16, D = 64, S = 8, bf16): a (slot, head) holds at
most S x D = 512 cached elements per tensor, far too few for tensor cores or for more than one warp.
One program per (slot, head), one warp: it requests q, k, v and the cache rows before step together
(one memory latency), stores the new key and value, puts them into its tiles in registers at row
`step` (the stored row is never read back, so no barrier orders the store before a load), and
computes the scores as a broadcast multiply and row sum, the output as a broadcast multiply and
column sum, in fp32. Graph-safe: `step` is fixed per call site (the depth transformer's k-th step
always passes k), so each captured launch keeps its own value; nothing is allocated but `out` when
it is None.

Floor: per (slot, head), q, k, v read, 2 x step cached rows read, the key and value rows and the
output written: (6 + 2 step) x D x itemsize bytes, at most 2.6 MB at B = 64 (under a microsecond of
H200 copy bandwidth). The launch and one memory latency are the floor at every B in use.
Tile choices unmeasured.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import await_previous_kernel, check_launch_devices, launch_dependents, next_pow2, pdl

DTYPES = (torch.float32, torch.bfloat16)
START_NEXT_EARLY = True
"""With programmatic dependent launch the kernel lets the next one (the attention output's product) start before
its own wait, not after it: at B = 1 the attention takes under 2 us, too short to hide the product's launch and
its first weight round trip, which then start only once the qkv product is done. Safe because the next kernel
reads only weights before its own wait, and this kernel completes only after its wait. Its one-warp programs (one
per slot and head) hold almost nothing while they wait. Same run on an H100 (bench/RESULTS.md, 2026-12-06 sixth
session): the B = 1 frame 7.68 ms with it, 7.80 ms without."""


def depth_attention_ref(qkv, k_cache, v_cache, step, out=None):
    """Torch reference, the spec: the cache write, then SDPA in fp32 over positions 0..step, cast back."""
    batch, heads, _, head_dim = k_cache.shape
    q, k, v = qkv.unflatten(1, (3, heads, head_dim)).unbind(1)
    k_cache[:, :, step] = k
    v_cache[:, :, step] = v
    attended = F.scaled_dot_product_attention(q[:, :, None].float(), k_cache[:, :, :step + 1].float(),
                                              v_cache[:, :, :step + 1].float())
    result = attended.reshape(batch, heads * head_dim).to(qkv.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


@triton.jit
def _depth_attention_kernel(
    qkv_ptr, k_cache_ptr, v_cache_ptr, out_ptr, step,
    stride_qkv_b, stride_out_b,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, STEPS: tl.constexpr, BLOCK_S: tl.constexpr,
    SCALE: tl.constexpr, PDL: tl.constexpr, START_NEXT_EARLY: tl.constexpr,
):
    if START_NEXT_EARLY:
        launch_dependents(PDL)
    await_previous_kernel(PDL, LAUNCH_DEPENDENTS=not START_NEXT_EARLY)
    pair = tl.program_id(0)
    slot = pair // HEADS
    head = pair % HEADS
    offs_d = tl.arange(0, HEAD_DIM)
    positions = tl.arange(0, BLOCK_S)
    qkv_row = qkv_ptr + slot.to(tl.int64) * stride_qkv_b + head * HEAD_DIM + offs_d
    query = tl.load(qkv_row).to(tl.float32) * SCALE
    key = tl.load(qkv_row + HEADS * HEAD_DIM)
    value = tl.load(qkv_row + 2 * HEADS * HEAD_DIM)
    cache_base = pair.to(tl.int64) * STEPS * HEAD_DIM
    cache_tile = cache_base + positions[:, None] * HEAD_DIM + offs_d[None, :]
    earlier = (positions < step)[:, None]
    keys = tl.load(k_cache_ptr + cache_tile, mask=earlier, other=0.0)
    values = tl.load(v_cache_ptr + cache_tile, mask=earlier, other=0.0)
    tl.store(k_cache_ptr + cache_base + step * HEAD_DIM + offs_d, key)
    tl.store(v_cache_ptr + cache_base + step * HEAD_DIM + offs_d, value)

    current = (positions == step)[:, None]
    keys = tl.where(current, key[None, :], keys).to(tl.float32)
    values = tl.where(current, value[None, :], values).to(tl.float32)
    # Rows past step were never loaded (zeros): their scores are masked, and the row at step is finite
    # for finite inputs, so the maximum is too.
    scores = tl.where(positions <= step, tl.sum(keys * query[None, :], axis=1), float("-inf"))
    weights = tl.exp(scores - tl.max(scores, axis=0))
    attended = tl.sum(weights[:, None] * values, axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + slot.to(tl.int64) * stride_out_b + head * HEAD_DIM + offs_d,
             attended.to(out_ptr.dtype.element_ty))


def depth_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher; see the module doc. Returns out ([B, H * D], qkv's dtype)."""
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [B, H, S, D], got {list(k_cache.shape)}")
    batch, heads, steps, head_dim = k_cache.shape
    if qkv.dtype not in DTYPES:
        raise TypeError(f"qkv must be float32 or bfloat16, got {qkv.dtype}")
    if k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype:
        raise TypeError(f"k_cache and v_cache must have qkv's dtype {qkv.dtype}, got {k_cache.dtype} and "
                        f"{v_cache.dtype}")
    if v_cache.shape != k_cache.shape or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError(f"k_cache and v_cache must be contiguous [B, H, S, D] of one shape, got "
                         f"{list(k_cache.shape)} and {list(v_cache.shape)}")
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    width = heads * head_dim
    if qkv.shape != (batch, 3 * width) or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [{batch}, {3 * width}] with unit stride in its last dim, got "
                         f"{list(qkv.shape)} strides {qkv.stride()}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < steps:
        raise ValueError(f"step must be a Python int in [0, {steps}), got {step!r}")
    if out is None:
        out = torch.empty(batch, width, device=qkv.device, dtype=qkv.dtype)
    if out.shape != (batch, width) or out.dtype != qkv.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{batch}, {width}] {qkv.dtype} with unit stride in its last dim, got "
                         f"{list(out.shape)} {out.dtype} strides {out.stride()}")
    operands = (qkv, k_cache, v_cache, out)
    check_launch_devices(*operands)
    if batch == 0:
        return out
    use_pdl = pdl(qkv.device, "depth_attention")
    _depth_attention_kernel[(batch * heads,)](
        qkv, k_cache, v_cache, out, step,
        qkv.stride(0), out.stride(0),
        HEADS=heads, HEAD_DIM=head_dim, STEPS=steps, BLOCK_S=next_pow2(steps, minimum=2),
        SCALE=head_dim ** -0.5, PDL=use_pdl, START_NEXT_EARLY=START_NEXT_EARLY, num_warps=1, launch_pdl=use_pdl,
    )
    return out
