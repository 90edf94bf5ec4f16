"""CUDA-graph capture and replay of a step function with static inputs and outputs.

A `CapturedStep` owns static input tensors; calling it copies the new inputs into them and replays
the graph, whose outputs are static tensors overwritten by the next replay (copy them out before the
next call). Everything per-frame that varies lives in device tensors written before the replay.
On the CPU, or with `eager=True` for debugging, the function simply runs.

Batch buckets: an engine serving up to N slots captures one step per bucket size (by default the powers
of two below N, and N) and runs each frame on the smallest bucket that holds its slots, so a few
conversations on a large engine pay for a few rows, not N. Graphs of different buckets may share one
memory pool (`pool`): they never run at the same time, and each step's outputs are consumed before the
next replay.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch


def batch_buckets(max_batch: int, requested: Sequence[int] | None = None) -> tuple[int, ...]:
    """The sorted bucket sizes for an engine of max_batch slots: `requested` (validated; max_batch is
    always added), or by default the powers of two below max_batch, and max_batch."""
    if requested is None:
        requested = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    requested = list(requested)
    for size in requested:
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= max_batch:
            raise ValueError(f"batch buckets must be integers in [1, {max_batch}], got {size!r}")
    return tuple(sorted({*requested, max_batch}))


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `rows` rows (buckets sorted, the last the largest)."""
    for size in buckets:
        if size >= rows:
            return size
    raise ValueError(f"{rows} rows do not fit the largest bucket ({buckets[-1]})")


class CapturedStep:
    def __init__(self, fn: Callable[..., torch.Tensor], example_inputs: Sequence[torch.Tensor], eager: bool = False,
                 warmup: int = 2, pool=None, device: torch.device | None = None):
        """pool: a `torch.cuda.graph_pool_handle()` shared with other steps that never run concurrently. With no
        example_inputs, fn takes no arguments (it reads buffers of its own, e.g. pinned host memory that the graph
        copies from at each replay) and `device` says where it runs."""
        self.fn = fn
        self.inputs = [x.clone() for x in example_inputs]
        if device is None:
            if not self.inputs:
                raise ValueError("a step without example inputs needs its device")
            device = self.inputs[0].device
        self.eager = eager or torch.device(device).type != "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        if self.eager:
            return
        self._warmup_and_capture(warmup, pool)

    def _warmup_and_capture(self, warmup: int, pool) -> None:
        # Warm-up on a side stream compiles the Triton kernels and sets up cuBLAS before capture;
        # it advances streaming state, so the caller resets the state after building the step.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = self.fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return self.fn(*inputs)
        for static, value in zip(self.inputs, inputs):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output


class SideStream:
    """A second CUDA stream for work that does not depend on what the current stream issues next, so that the two
    run at once: `fork()` starts a branch (the side stream first waits for everything issued so far), `join()` makes
    the current stream wait for the branch. Captured in a CUDA graph, the branch becomes a parallel branch of the
    graph, its memory from the graph's pool (the branch is joined before the capture ends). On the CPU both are
    no-ops: the work runs in order on the one stream."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def fork(self):
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
