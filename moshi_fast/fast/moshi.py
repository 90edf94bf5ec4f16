"""The whole Moshi frame on the fast path: Mimi encode -> LM step (delays, Helium, depth transformer,
sampling) -> Mimi decode, for every slot at once, as one CUDA graph.

    pcm [B, 1, 1920] f32 --encode--> user codes [B, 8] --LM step--> tokens [B, 1 + 8] (delayed output)
        --decode (slots with output)--> pcm [B, 1, 1920] f32, silence where a slot has no output yet

`FastFrameRunner` owns the streaming state of both models (a MimiCache and an LMCache) for `batch_size`
slots and the captured graph; an execution mask [B] says which slots step this frame (the others keep
their state). Nothing here allocates or syncs per frame outside the graph's own memory pool.
"""
from __future__ import annotations

import torch

from .. import ops
from ..cache import MimiCache
from ..graphs import CapturedStep
from ..reference.lm import SamplingParams
from .lm import FastLM, FastLMRunner
from .mimi import FastMimi


class FastFrameRunner:
    def __init__(self, mimi: FastMimi, lm: FastLM, batch_size: int, params: SamplingParams, device: torch.device,
                 eager: bool = False, kv_pages: int | None = None):
        mc = mimi.config
        self.mimi, self.lm = mimi, lm
        self.mimi_cache = MimiCache(mimi, batch_size, device)
        self.scratch = ops.rvq_encode_scratch(batch_size, mc.num_codebooks, mc.codebook_dim, device)
        # The LM half: its cache and bookkeeping, stepped inside this runner's graph (eager=True keeps the
        # LM runner from capturing a graph of its own).
        self.lm_runner = FastLMRunner(lm, batch_size, params, device, eager=True, kv_pages=kv_pages)
        pcm = torch.zeros(batch_size, 1, mc.frame_size, device=device)
        mask = torch.ones(batch_size, dtype=torch.bool, device=device)
        self._step = CapturedStep(self._frame, [pcm, mask], eager=eager)
        self.reset(mask)

    def _frame(self, pcm: torch.Tensor, exec_mask: torch.Tensor):
        lc = self.lm.config
        codes = self.mimi.encode_step(pcm, self.mimi_cache, exec_mask, self.scratch)
        out = self.lm_runner.generator.step(codes[:, :lc.dep_q], exec_mask)
        decoded = self.mimi.decode_step(out.tokens[:, 1:].clamp(min=0), self.mimi_cache, out.valid)
        pcm_out = torch.where(out.valid[:, None, None], decoded, torch.zeros_like(decoded))
        return pcm_out, out.tokens, out.valid

    def step(self, pcm: torch.Tensor, exec_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pcm [B, 1, frame_size] f32, exec_mask [B] bool -> (pcm out [B, 1, frame_size], tokens [B, 1 + dep_q]
        int64 (-1 where not produced), valid [B] bool); static tensors, overwritten by the next step."""
        return self._step(pcm, exec_mask)

    def reset(self, slots: torch.Tensor) -> None:
        """Restarts the selected slots (bool mask [B]) in the codec and the LM."""
        self.mimi_cache.reset(slots)
        self.lm_runner.reset(slots)
