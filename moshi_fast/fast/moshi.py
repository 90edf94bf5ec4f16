"""The whole Moshi frame on the fast path: Mimi encode -> LM step (delays, Helium, depth transformer,
sampling) -> Mimi decode, for a batch of slots at once, as one CUDA graph per batch bucket.

    pcm [b, 1, 1920] f32 --encode--> user codes [b, 8] --LM step--> tokens [b, 1 + 8] (delayed output)
        --decode (slots with output)--> pcm [b, 1, 1920] f32, silence where a slot has no output yet

`FastFrameRunner` owns the streaming state of both models (a MimiCache and an LMCache) for `batch_size`
slots and one captured step per bucket size b (graphs.batch_buckets): bucket b runs slots 0..b-1, on
views of the first b rows of every state tensor, so its replay reads and writes only those rows. An
execution mask [b] says which of them step this frame (the others keep their state). Nothing here
allocates or syncs per frame outside the graphs' shared memory pool.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .. import ops
from ..cache import LMCache, MimiCache
from ..graphs import CapturedStep, batch_buckets
from ..reference.lm import SamplingParams
from .lm import FastLM, FastStreamingLM
from .mimi import FastMimi


HOST_INPUTS_IN_GRAPH = True
"""FastMoshi's fast backend builds its runner with host_inputs (FastFrameRunner): the frame's graph copies the frames
and the execution mask from the engine's pinned host buffers itself, and a step issues one launch before the GPU
starts, not five. On an H100 (bench/results/2026-12-07_H100_44a2e76_frame_b1_b8_b32_variants.json) the host's part of
a B = 1 step before the GPU starts went from 0.118 to 0.073 ms; bench_frame.py --host-inputs-copied-first times the
previous path."""


class FrameOutput(NamedTuple):
    """One frame of a batch of b slots (static tensors of a captured step: copy what you keep)."""

    pcm: torch.Tensor
    """[b, 1, frame_size] float32: Moshi's audio, silence where a slot has no output yet."""
    tokens: torch.Tensor
    """[b, 1 + dep_q] int64: the delayed text token and audio codes decoded into pcm, -1 where none."""
    valid: torch.Tensor
    """[b] bool: the slot ran and produced output."""
    user_codes: torch.Tensor
    """[b, num_codebooks] int64: the Mimi codes of the user's audio this frame."""
    text_logits: torch.Tensor
    """[b, text_card]: the logits of this frame's text token."""
    audio_logits: torch.Tensor
    """[b, dep_q, card]: the logits of this frame's audio codes."""


class _BucketFrame:
    """The frame function of one bucket: the models on the first `size` slots' views of the state."""

    def __init__(self, mimi: FastMimi, lm: FastLM, mimi_cache: MimiCache, lm_cache: LMCache,
                 params: SamplingParams):
        mc = mimi.config
        self.mimi, self.mimi_cache = mimi, mimi_cache
        self.generator = FastStreamingLM(lm, lm_cache, params)
        self.dep_q = lm.config.dep_q
        self.scratch = ops.rvq_encode_scratch(mimi_cache.batch_size, mc.num_codebooks, mc.codebook_dim,
                                              mimi_cache.encoder_frame.device)

    def __call__(self, pcm: torch.Tensor, exec_mask: torch.Tensor, forced: torch.Tensor | None = None) -> FrameOutput:
        codes = self.mimi.encode_step(pcm, self.mimi_cache, exec_mask, self.scratch)
        out = self.generator.step(codes[:, :self.dep_q], exec_mask, forced)
        decoded = self.mimi.decode_step(out.tokens[:, 1:].clamp(min=0), self.mimi_cache, out.valid)
        pcm_out = torch.where(out.valid[:, None, None], decoded, 0.0)
        return FrameOutput(pcm_out, out.tokens, out.valid, codes, out.text_logits, out.audio_logits)


def _check_host_inputs(host_inputs, batch_size: int, frame_size: int, teacher_forcing: bool) -> None:
    if teacher_forcing:
        raise ValueError("host inputs carry frames and masks only: a teacher-forced runner takes step()'s arguments")
    frames, mask = host_inputs
    if frames.device.type != "cpu" or mask.device.type != "cpu":
        raise ValueError("host inputs must be host (CPU) tensors")
    if frames.shape != (batch_size, 1, frame_size) or frames.dtype != torch.float32 or not frames.is_contiguous():
        raise ValueError(f"host frames must be a contiguous float32 [{batch_size}, 1, {frame_size}] tensor, got "
                         f"{frames.dtype} {list(frames.shape)}")
    if mask.shape != (batch_size,) or mask.dtype != torch.bool or not mask.is_contiguous():
        raise ValueError(f"the host execution mask must be a contiguous bool [{batch_size}] tensor, got "
                         f"{mask.dtype} {list(mask.shape)}")


def _reading_host(frame: _BucketFrame, host_inputs: tuple[torch.Tensor, torch.Tensor],
                  inputs: list[torch.Tensor]):
    """frame on the device tensors `inputs` (frames [b, 1, frame_size], exec_mask [b]), each first copied from
    the first b rows of its host tensor. Captured, each copy is a node of the graph with the host rows' address
    fixed, which reads them at every replay (pinned: by the copy engine, asynchronously)."""
    sources = [host[:inputs[0].shape[0]] for host in host_inputs]

    def run() -> FrameOutput:
        for static, source in zip(inputs, sources):
            static.copy_(source, non_blocking=True)
        return frame(*inputs)
    return run


class FastFrameRunner:
    """params: per-slot sampling parameters [batch_size] (the runner steps and swaps their rows with the
    state). buckets: the batch sizes to capture (default graphs.batch_buckets(batch_size)). eager: run the
    frame functions without graphs, for debugging. teacher_forcing: every step takes the tokens Moshi
    generates (for validation against a recorded run). kv_dtype: Helium's KV cache dtype (LMCache).

    host_inputs: (frames [batch_size, 1, frame_size] f32, exec_mask [batch_size] bool), pinned host tensors that
    each bucket's frame function copies its inputs from (their first b rows) before it runs: captured in the graph,
    those copies read the host tensors at every replay, so a step is one launch from the host (`step_from_host`)
    instead of two copies to the device, two into the graph's inputs and the replay (`step`). The caller writes the
    next frame there once the previous step has finished."""

    def __init__(self, mimi: FastMimi, lm: FastLM, batch_size: int, params: SamplingParams, device: torch.device,
                 eager: bool = False, kv_pages: int | None = None, buckets: Sequence[int] | None = None,
                 teacher_forcing: bool = False, kv_dtype: torch.dtype | None = None,
                 host_inputs: tuple[torch.Tensor, torch.Tensor] | None = None):
        if host_inputs is not None:
            _check_host_inputs(host_inputs, batch_size, mimi.config.frame_size, teacher_forcing)
        self.host_inputs = host_inputs
        self.mimi, self.lm = mimi, lm
        self.batch_size = batch_size
        self.buckets = batch_buckets(batch_size, buckets)
        self.params = params
        self.teacher_forcing = teacher_forcing
        self.mimi_cache = MimiCache(mimi, batch_size, device, buckets=self.buckets)
        self.lm_cache = LMCache(lm.config, batch_size, device, lm.text_head.dtype, kv_pages=kv_pages,
                                buckets=self.buckets, kv_dtype=kv_dtype)
        pool = torch.cuda.graph_pool_handle() if device.type == "cuda" and not eager else None
        self._steps: dict[int, CapturedStep] = {}
        for size in reversed(self.buckets):
            frame = _BucketFrame(mimi, lm, self.mimi_cache.narrow(size), self.lm_cache.narrow(size),
                                 params.narrow(size))
            inputs = [torch.zeros(size, 1, mimi.config.frame_size, device=device),
                      torch.ones(size, dtype=torch.bool, device=device)]
            if teacher_forcing:
                inputs.append(torch.zeros(size, 1 + lm.config.dep_q, dtype=torch.long, device=device))
            if host_inputs is None:
                self._steps[size] = CapturedStep(frame, inputs, eager=eager, pool=pool)
            else:
                self._steps[size] = CapturedStep(_reading_host(frame, host_inputs, inputs), [], eager=eager,
                                                 pool=pool, device=device)
        # Warm-up and capture stepped the state: every slot starts over.
        self.reset(torch.ones(batch_size, dtype=torch.bool, device=device))

    def step(self, pcm: torch.Tensor, exec_mask: torch.Tensor, forced: torch.Tensor | None = None) -> FrameOutput:
        """Slots 0..b-1 for a bucket size b: pcm [b, 1, frame_size] f32, exec_mask [b] bool, and with
        teacher_forcing the tokens to generate, forced [b, 1 + dep_q] int64 -> the frame's outputs, static
        tensors overwritten by the next step of that bucket."""
        if self.host_inputs is not None:
            raise ValueError("this runner reads its inputs from its host tensors: call step_from_host")
        step = self._captured(pcm.shape[0])
        if (forced is not None) != self.teacher_forcing:
            raise ValueError("forced tokens are given exactly when the runner is built with teacher_forcing")
        return step(pcm, exec_mask) if forced is None else step(pcm, exec_mask, forced)

    def step_from_host(self, bucket: int) -> FrameOutput:
        """Slots 0..bucket-1, their frames and execution mask read from the first `bucket` rows of host_inputs
        (see the class) -> the frame's outputs, as `step`."""
        if self.host_inputs is None:
            raise ValueError("this runner was built without host inputs: call step")
        return self._captured(bucket)()

    def _captured(self, bucket: int) -> CapturedStep:
        step = self._steps.get(bucket)
        if step is None:
            raise ValueError(f"no captured step for a batch of {bucket}; buckets: {self.buckets}")
        return step

    def reset(self, slots: torch.Tensor) -> None:
        """Restarts the selected slots (bool mask [batch_size]) in the codec and the LM."""
        self.mimi_cache.reset(slots)
        self.lm_cache.reset(slots)

    def swap(self, a: int, b: int) -> None:
        """Exchanges slots a and b: their whole streaming state and sampling parameters."""
        self.mimi_cache.swap(a, b)
        self.lm_cache.swap(a, b)
        self.params.swap(a, b)
