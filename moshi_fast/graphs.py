"""CUDA-graph capture and replay of a step function with static inputs and outputs.

A `CapturedStep` owns static input tensors; calling it copies the new inputs into them and replays
the graph, whose outputs are static tensors overwritten by the next replay (copy them out before the
next call). Everything per-frame that varies lives in device tensors written before the replay.
On the CPU, or with `eager=True` for debugging, the function simply runs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class CapturedStep:
    def __init__(self, fn: Callable[..., torch.Tensor], example_inputs: Sequence[torch.Tensor], eager: bool = False,
                 warmup: int = 2):
        self.fn = fn
        self.inputs = [x.clone() for x in example_inputs]
        self.eager = eager or not self.inputs[0].is_cuda
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        if self.eager:
            return
        self._warmup_and_capture(warmup)

    def _warmup_and_capture(self, warmup: int) -> None:
        # Warm-up on a side stream compiles the Triton kernels and sets up cuBLAS before capture;
        # it advances streaming state, so the caller resets the state after building the step.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self.fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return self.fn(*inputs)
        for static, value in zip(self.inputs, inputs):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output
