"""Helpers shared by the Triton kernels."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_launch(*tensors: torch.Tensor) -> bool:
    """Kernels launch on CUDA tensors, or on CPU tensors under the interpreter."""
    return all(t.is_cuda for t in tensors) or (interpreting() and all(t.device.type == "cpu" for t in tensors))


def check_launch_devices(*tensors: torch.Tensor) -> None:
    """A launcher's device check: raises ValueError unless every operand is on one device a kernel launches on
    (can_launch)."""
    if not can_launch(*tensors) or len({t.device for t in tensors}) > 1:
        raise ValueError("all tensors must be on one CUDA device (or on the CPU under TRITON_INTERPRET=1)")


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


PDL_ENV = "MOSHI_FAST_PDL"
"""Environment variable: "0" launches every kernel without programmatic dependent launch (to bisect a
suspected race, or to time the difference); anything else, or unset, leaves it on where supported."""
_pdl_allowed = os.environ.get(PDL_ENV, "1") != "0"


@functools.cache
def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


PDL_KERNELS = {"linear", "norm_rows", "gemv", "paged_attention", "depth_attention", "depth_step", "embed_sum",
               "sample_tokens", "conv1d_stream", "conv_transpose1d_stream", "ring_attention", "rvq_encode",
               "rvq_decode", "delay_line"}
"""The kernels (by launcher) that launch with programmatic dependent launch where `pdl` allows it."""
PDL_MAX_STREAM_BYTES: int | None = None
"""Launches that stream more weight bytes than this launch without programmatic dependent launch (None:
no limit)."""


def pdl(device: torch.device, kernel: str | None = None, stream_bytes: int = 0) -> bool:
    """Whether a launch of `kernel` (a name in PDL_KERNELS; None: any) streaming `stream_bytes` of weights
    on `device` uses programmatic dependent launch (PDL, Hopper and later): such a launch may start its
    programs while the previous kernel on the stream is still running, so that its launch latency and
    its first weight requests hide behind that kernel's tail. Every kernel launched with it begins with
    `await_previous_kernel` (its PDL argument this same value), before which it reads only weights, which
    no kernel of a step writes. Off under the interpreter, off CUDA, on GPUs before compute capability
    9.0, with MOSHI_FAST_PDL=0, and inside `programmatic_launch(False)`."""
    if not _pdl_allowed or device.type != "cuda" or interpreting():
        return False
    if kernel is not None and kernel not in PDL_KERNELS:
        return False
    if PDL_MAX_STREAM_BYTES is not None and stream_bytes > PDL_MAX_STREAM_BYTES:
        return False
    return _compute_capability(device)[0] >= 9


@contextlib.contextmanager
def programmatic_launch(enabled: bool):
    """Within the block, launches use programmatic dependent launch where `pdl` allows it (enabled) or
    never (not enabled); CUDA graphs keep what their capture saw."""
    global _pdl_allowed
    saved, _pdl_allowed = _pdl_allowed, enabled
    try:
        yield
    finally:
        _pdl_allowed = saved


@triton.jit
def await_previous_kernel(PDL: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr = True):
    """With PDL (a launch with programmatic dependent launch): wait until the previous kernel on the
    stream has finished and its writes are visible, then (LAUNCH_DEPENDENTS) let the next kernel's
    programs start (they hold their own wait). Nothing before this call may read what an earlier kernel
    of the step writes, or write what one reads. Without PDL, nothing."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        if LAUNCH_DEPENDENTS:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    """With PDL: let the next kernel's programs start now (a kernel that waited with LAUNCH_DEPENDENTS
    False). Without PDL, nothing."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(pointers):
    """Ask L2 for the 128-byte lines holding `pointers` (any shape), without waiting: a hint that costs
    no registers, for weights a program will read right after `await_previous_kernel`. GPU only (PTX)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [pointers], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def elu(v):
    """ELU with alpha 1 (SEANet's activation), elementwise: v where v > 0, else exp(v) - 1."""
    return tl.where(v > 0, v, tl.exp(v) - 1.0)


def parallel_sms(device: torch.device | None = None) -> int:
    """SMs a launch on `device` (default: the current CUDA device, if any) runs programs on at once, for
    sizing grids: 1 under the interpreter, which runs programs one after another, and off CUDA."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return 1 if interpreting() or device.type != "cuda" else sm_count(device)


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): block sizes for tl.arange and tl.dot (>= 16)."""
    return max(minimum, triton.next_power_of_2(n))


def fma_reduction_step(extent: int) -> int:
    """Elements of a reduction an FMA-loop step takes: the widest of 128, 64, 32, 16 that divides `extent` (whole
    steps load unmasked, in 16-byte pieces), else a masked step of min(128, next power of two)."""
    for size in (128, 64, 32, 16):
        if extent % size == 0:
            return size
    return min(128, next_pow2(extent, minimum=2))


def dot_precision() -> str:
    """fp32 tl.dot precision. "tf32x3" splits each fp32 operand into two tf32 parts on the tensor
    cores: close to fp32 (the codec tracks its float32 reference to ~1e-6), far faster than "ieee",
    which runs the dot on the CUDA cores (measured ~100x slower for the conv tiles on an H200)."""
    return "tf32x3"


@triton.jit
def tf32_high(x):
    """fp32 x rounded to its nearest tf32 value (10 mantissa bits, ties away from zero, as cvt.rna.tf32.f32), on the
    bits so that the interpreter runs it too; x - tf32_high(x) is exact in fp32."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)


@triton.jit
def dot_split_weight(a, b_high, b_low, acc, acc_small):
    """(acc, acc_small) after adding a @ b in three tf32 products, b given as its parts (split_tf32): b_high @ a's
    high part into acc, the two cross products into acc_small. Only `a` is split here (in registers, where the
    first operand of a Hopper tensor-core product may live), so b's parts go to the tensor cores as they were
    staged, without the register round trip of tl.dot's own tf32x3 (which splits both operands and writes the
    second one's parts back to shared memory every step). The small products keep their own accumulator, summed
    into acc once after the loop: added to acc step by step they would be rounded at acc's magnitude. The
    fourth product (the low parts') is below fp32's rounding, as in tf32x3."""
    a_high = tf32_high(a)
    a_low = a - a_high
    acc_small = tl.dot(a_low, b_high, acc_small, input_precision="tf32")
    acc_small = tl.dot(a_high, b_low, acc_small, input_precision="tf32")
    return tl.dot(a_high, b_high, acc, input_precision="tf32"), acc_small


def split_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 t as [2, *t.shape] (contiguous): its nearest tf32 values (as tf32_high) and the rest, t - high, exact in
    fp32. A product that takes a weight this way (dot_split_weight) reads both parts instead of splitting the
    weight tile on every step. Made once, when the model is prepared."""
    if t.dtype != torch.float32:
        raise ValueError(f"split_tf32 takes float32, got {t.dtype}")
    t = t.detach().contiguous()
    high = ((t.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
    return torch.stack([high, t - high])


class SplitWorkspace:
    """Scratch for kernels that split a reduction across programs (split-K): fp32 partial results and
    one int32 arrival counter per output tile. Each tile's last-arriving program sums the partials in a
    fixed order (deterministic, unlike float atomics) and resets its counter to 0, so the counters are
    zero between calls and the workspace is graph-safe. Allocated once by the caller (e.g. MimiCache)
    with the sizes the kernels' `*_workspace_size` functions report; calls on one stream may share it."""

    def __init__(self, partial_floats: int, counters: int, device: torch.device | str):
        self.partials = torch.empty(max(partial_floats, 1), dtype=torch.float32, device=device)
        self.counters = torch.zeros(max(counters, 1), dtype=torch.int32, device=device)

    def check(self, partial_floats: int, counters: int) -> None:
        if partial_floats > self.partials.numel() or counters > self.counters.numel():
            raise ValueError(f"split workspace too small: needs {partial_floats} partial floats and {counters} "
                             f"counters, has {self.partials.numel()} and {self.counters.numel()}")


def split_buffers(workspace: SplitWorkspace | None, partial_floats: int, counters: int, splits: int,
                  out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials, arrival counters) for a launch split `splits` ways: the given workspace, checked (a fresh
    one where None); unsplit, the kernel never touches them and `out` stands in for both pointers."""
    if splits == 1:
        return out, out
    if workspace is None:
        workspace = SplitWorkspace(partial_floats, counters, out.device)
    workspace.check(partial_floats, counters)
    return workspace.partials, workspace.counters


def max_offset(t: torch.Tensor) -> int:
    """Element offset of a non-empty tensor's last element from its first."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def spans_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges that the two tensors' elements span intersect."""
    a_end = a.data_ptr() + (max_offset(a) + 1) * a.element_size()
    b_end = b.data_ptr() + (max_offset(b) + 1) * b.element_size()
    return a.data_ptr() < b_end and b.data_ptr() < a_end


@triton.jit
def combine_softmax_partials(stats_ptr, partials_ptr, partials, has_split, offs_d, HEAD_DIM: tl.constexpr,
                             EXP2: tl.constexpr):
    """Attention output [HEAD_DIM] from the partials of a split key range: for each partial id in
    `partials` (where has_split) its running max and weight sum at stats_ptr[2 id] and [2 id + 1] and its
    unnormalised weighted values at partials_ptr[id * HEAD_DIM:]; scores in log2 units when EXP2. The
    partials are summed in id order (deterministic) and read with .cg, from L2, never from a line this
    SM's L1 kept (other SMs wrote them). At least one partial must hold a key (a finite max)."""
    maxes = tl.load(stats_ptr + 2 * partials, mask=has_split, other=float("-inf"), cache_modifier=".cg")
    sums = tl.load(stats_ptr + 2 * partials + 1, mask=has_split, other=0.0, cache_modifier=".cg")
    weighted = tl.load(partials_ptr + partials[:, None] * HEAD_DIM + offs_d[None, :], mask=has_split[:, None],
                       other=0.0, cache_modifier=".cg")
    if EXP2:
        rescales = tl.exp2(maxes - tl.max(maxes, axis=0))
    else:
        rescales = tl.exp(maxes - tl.max(maxes, axis=0))
    return tl.sum(rescales[:, None] * weighted, axis=0) / tl.sum(rescales * sums, axis=0)
