"""Helpers shared by the Triton kernels."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_launch(*tensors: torch.Tensor) -> bool:
    """Kernels launch on CUDA tensors, or on CPU tensors under the interpreter."""
    return all(t.is_cuda for t in tensors) or (interpreting() and all(t.device.type == "cpu" for t in tensors))


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): block sizes for tl.arange and tl.dot (>= 16)."""
    return max(minimum, triton.next_power_of_2(n))


def dot_precision() -> str:
    """fp32 tl.dot precision. "tf32x3" splits each fp32 operand into two tf32 parts on the tensor
    cores: close to fp32 (the codec tracks its float32 reference to ~1e-6), far faster than "ieee",
    which runs the dot on the CUDA cores (measured ~100x slower for the conv tiles on an H200)."""
    return "tf32x3"


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
