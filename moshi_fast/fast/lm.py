"""The fast Moshi LM step: the reference LM's parameters (same names, same loader), run with ops only.

One frame for B slots (`FastStreamingLM.step`), the launches in order, at Moshi's real config:

    delay_line_in                           LMGen's bookkeeping: the user's codes enter their delayed
                                            positions, this frame's 17 input tokens are read in
                                            Helium's embedding order
    embed_sum                               16 audio + 1 text embeddings summed, the reference's order
    32 x Helium layer                       linear qkv (RMSNorm fused) -> paged_attention (RoPE, KV
                                            write, window) -> linear out (+ residual, in place) ->
                                            linear gate_up (RMSNorm, SiLU gate) -> linear down (+ residual)
    norm_rows out_norm                      once for both heads below (where the RMSNorm runs apart)
    linear text head                        text logits [B, 32000]
    linear depth in_proj, all 8 codebooks   h = out_norm(x) projected once for every codebook step;
                                            sample_tokens draws the text token on a second stream meanwhile
                                            (a parallel branch of the graph; before the projection, on the
                                            step's stream, inside overlap_text_sampling(False))
    8 x depth step k                        embed_sum adds the previous token's embedding; 6 layers of
                                            linear qkv (RMSNorm) -> depth_attention over steps 0..k ->
                                            linear out (+res) -> linear gate_up (RMSNorm, SiLU) ->
                                            linear down (+res); linear head[k] -> sample_tokens.
                                            Inside ops.cuda_depth_step() (bf16, B <= 8), or with
                                            prepare(fused_depth=True), the step before the sampling is one
                                            persistent ops.depth_step launch instead (the Triton one
                                            measured slower: bench/RESULTS.md)
    delay_line_out                          the generated tokens enter the line, the delayed output
                                            is read, the frame counter advances

Everything lives in device tensors of an `LMCache`, so the whole step is one CUDA graph
(`FastLMRunner`). Slots outside the execution mask keep their state: the paged cache writes nothing
for them, and the delay line and frame counter are committed through the mask.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .. import ops
from ..cache import LMCache
from ..graphs import CapturedStep, SideStream
from ..reference.lm import LM, SamplingParams

_overlap_text_sampling = True


@contextlib.contextmanager
def overlap_text_sampling(enabled: bool = True):
    """Inside the block (and in the steps and graphs built inside it), FastStreamingLM draws the text token on a
    second stream while the depth transformer's input projection runs if enabled, before it on the step's own stream
    if not: the two do not depend on each other, and at one conversation each is a few tens of microseconds of the
    frame's chain (the sampler on one SM, the projection streaming 67 MB). The same tokens either way. Enabled
    outside any block: 0.02 ms less a frame at 1 and 8 conversations on an H100 (bench/RESULTS.md)."""
    global _overlap_text_sampling
    saved, _overlap_text_sampling = _overlap_text_sampling, enabled
    try:
        yield
    finally:
        _overlap_text_sampling = saved


class FastLM(LM):
    """Call `prepare()` once after the weights are loaded: the embedding tables become views of one
    concatenated table per transformer, and each depth-transformer projection's (and RMSNorm's) layers
    views of one stacked tensor (no second copy), read by one launch (embed_sum, depth_step)."""

    fused_depth = False

    @torch.no_grad()
    def prepare(self, fused_depth: bool = False) -> "FastLM":
        """fused_depth: run each depth-transformer step as one persistent kernel (ops.depth_step) rather
        than 32 launches; off by default, because on an H200 it measured slower (bench/RESULTS.md)."""
        c = self.config
        self.fused_depth = fused_depth
        # Helium sums audio streams 0..n_q-1 then the text stream (LM.embed's order, which fixes the
        # bf16 rounding of every partial sum).
        self._concatenate_tables("embed", [*self.audio_emb, self.text_emb])
        # The depth transformer's step k embeds the text token (k = 0) or audio code k - 1.
        self._concatenate_tables("depth_embed", [self.depformer.text_emb, *self.depformer.audio_emb])
        self.register_buffer("depth_in_proj", self.depformer.in_proj.view(c.dep_q * c.depformer_dim, c.dim),
                             persistent=False)
        layers = self.depformer.layers
        for name in ("qkv", "out", "gate_up", "down"):
            self._stack_layers(f"depth_{name}", [getattr(layer, name) for layer in layers])
        for name in ("norm1", "norm2"):
            self._stack_layers(f"depth_{name}", [getattr(layer, name).weight for layer in layers])
        ops.settle_weights(self)
        return self

    def _stack_layers(self, name: str, parameters: list[torch.nn.Parameter]) -> None:
        """[layers, ...] stacked, each parameter re-pointed to its slice: the depth step takes a
        projection's weights of every layer as one tensor with a layer stride."""
        stacked = torch.stack([p.data for p in parameters])
        for i, p in enumerate(parameters):
            p.data = stacked[i]
        self.register_buffer(name, stacked, persistent=False)

    def _concatenate_tables(self, name: str, embeddings: list[torch.nn.Embedding]) -> None:
        table = torch.cat([e.weight for e in embeddings])
        starts, start = [], 0
        for e in embeddings:
            rows = e.weight.shape[0]
            e.weight.data = table[start:start + rows]
            starts.append(start)
            start += rows
        self.register_buffer(f"{name}_table", table, persistent=False)
        self.register_buffer(f"{name}_offsets", torch.tensor(starts, dtype=torch.long, device=table.device),
                             persistent=False)

    def helium(self, tokens: torch.Tensor, cache: LMCache) -> torch.Tensor:
        """tokens [B, n_q + 1] (audio streams, then text) -> the residual stream after the last layer
        [B, dim]; writes each running slot's keys and values at its position (not advanced here)."""
        c, kv, workspace = self.config, cache.kv, cache.workspace
        x = ops.embed_sum(tokens, self.embed_table, self.embed_offsets)
        for i, layer in enumerate(self.layers):
            qkv = ops.linear(x, layer.qkv, norm=("rms", layer.norm1.weight, c.norm_eps), workspace=workspace)
            k_pool, v_pool = kv.layer(i)
            attended = ops.paged_attention(qkv, k_pool, v_pool, kv.page_table, kv.positions, kv.exec_mask,
                                           c.context, c.max_period, workspace=workspace, after_qkv_product=True)
            ops.linear(attended, layer.out, residual=x, out=x, workspace=workspace)
            hidden = ops.linear(x, layer.gate_up, norm=("rms", layer.norm2.weight, c.norm_eps),
                                activation="silu_gate", workspace=workspace)
            ops.linear(hidden, layer.down, residual=x, out=x, workspace=workspace)
        return x

    def head_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """The residual stream [B, dim] -> (rows, norm) for text_logits and depth_inputs, which both take
        out_norm(x): where `ops.linear` would run that RMSNorm in a launch of its own, it runs here once for both
        (rows = out_norm(x), norm None; the same rows each product would get); otherwise (rows = x, the norm) for
        each product to fuse."""
        norm = ("rms", self.out_norm.weight, self.config.norm_eps)
        if ops.norm_runs_apart(ops.as_norm(norm)):
            return ops.norm_rows(x, norm), None
        return x, norm

    def text_logits(self, rows: torch.Tensor, norm: tuple | None, cache: LMCache) -> torch.Tensor:
        """head_inputs' (rows, norm) -> text logits [B, text_card]."""
        return ops.linear(rows, self.text_head, norm=norm, workspace=cache.workspace)

    def depth_inputs(self, rows: torch.Tensor, norm: tuple | None, cache: LMCache) -> torch.Tensor:
        """head_inputs' (rows, norm) -> in_proj[k](out_norm(x)) for every codebook k, [dep_q, B, depformer_dim]:
        codebook-major, so that each step's rows are contiguous, as the CUDA GEMV reads them (one small copy
        for B > 1; none at B = 1)."""
        c = self.config
        projected = ops.linear(rows, self.depth_in_proj, norm=norm, workspace=cache.workspace)
        return projected.view(-1, c.dep_q, c.depformer_dim).transpose(0, 1).contiguous()

    def depth_step(self, step: int, x: torch.Tensor, previous: torch.Tensor, cache: LMCache,
                   logits_out: torch.Tensor) -> torch.Tensor:
        """Codebook `step` of the depth transformer. x [B, depformer_dim] holds in_proj[step](h) and is
        updated in place into the step's residual stream; previous [B] is the token step - 1 produced
        (the text token at step 0). Writes the step's logits into logits_out [B, card]."""
        c, d, workspace = self.config, self.depformer, cache.workspace
        operands = (x, previous, self.depth_embed_table, self.depth_embed_offsets[step:step + 1], self.depth_norm1,
                    self.depth_qkv[:, step], self.depth_out[:, step], self.depth_norm2, self.depth_gate_up[:, step],
                    self.depth_down[:, step], d.heads[step], cache.depth_k, cache.depth_v, step)
        cuda = ops.uses_cuda_depth_step(*operands, logits_out, cache.depth_scratch)
        if self.fused_depth or cuda:
            return ops.depth_step(*operands, c.norm_eps, logits_out, cache.depth_scratch, cuda=cuda)
        ops.embed_sum(previous[:, None], self.depth_embed_table, self.depth_embed_offsets[step:step + 1], out=x,
                      accumulate=True)
        for i, layer in enumerate(d.layers):
            qkv = ops.linear(x, layer.qkv[step], norm=("rms", layer.norm1.weight, c.norm_eps), workspace=workspace)
            attended = ops.depth_attention(qkv, cache.depth_k[i], cache.depth_v[i], step)
            ops.linear(attended, layer.out[step], residual=x, out=x, workspace=workspace)
            hidden = ops.linear(x, layer.gate_up[step], norm=("rms", layer.norm2.weight, c.norm_eps),
                                activation="silu_gate", workspace=workspace)
            ops.linear(hidden, layer.down[step], residual=x, out=x, workspace=workspace)
        return ops.linear(x, d.heads[step], out=logits_out, workspace=workspace)


@dataclass
class FastLMOutput:
    tokens: torch.Tensor
    """[B, 1 + dep_q] int64: the delayed text token and audio codes output this frame, -1 before the delay fills."""
    valid: torch.Tensor
    """[B] bool: the slot ran and produced output this frame."""
    text_logits: torch.Tensor
    """[B, text_card], the weights' dtype: the logits the text token was drawn from."""
    audio_logits: torch.Tensor
    """[B, dep_q, card], the weights' dtype: the logits of this frame's audio codes."""


class FastStreamingLM:
    """Kyutai's `LMGen` frame semantics (see reference.lm.StreamingLM, the spec) on a FastLM and an
    LMCache, graph-safe: no allocation outside the graph's pool, no host sync, no changing Python value."""

    def __init__(self, lm: FastLM, cache: LMCache, params: SamplingParams):
        c = lm.config
        device = cache.frame.device
        self.lm, self.cache, self.params, self.config = lm, cache, params, c
        self.delays = torch.tensor(c.delays, dtype=torch.long, device=device)
        self.initial = torch.tensor([c.text_initial_token] + [c.audio_initial_token] * c.n_q, dtype=torch.long,
                                    device=device)
        # Helium's embedding order: the audio streams, then text.
        self.embed_order = torch.tensor([*range(1, c.num_streams), 0], dtype=torch.long, device=device)
        self.side = SideStream(device) if _overlap_text_sampling else None

    def _sample_text(self, text_logits: torch.Tensor, out: torch.Tensor) -> None:
        params = self.params
        ops.sample_tokens(text_logits, params.text_temperature, params.text_top_k, params.max_text_top_k,
                          params.seed, self.cache.frame, 0, out=out)

    def step(self, user_codes: torch.Tensor, exec_mask: torch.Tensor,
             forced: torch.Tensor | None = None) -> FastLMOutput:
        """user_codes [B, dep_q] int64, exec_mask [B] bool -> one frame. forced [B, 1 + dep_q] (teacher
        forcing, as in the reference): generate these tokens instead of the sampled ones."""
        c, cache, params = self.config, self.cache, self.params
        lm = self.lm
        frame = cache.frame
        cache.kv.set_exec_mask(exec_mask)
        running = cache.kv.exec_mask

        tokens = ops.delay_line_in(cache.tokens, frame, running, user_codes, self.delays, self.initial,
                                   self.embed_order)
        x = lm.helium(tokens, cache)
        cache.kv.advance()
        rows, norm = lm.head_inputs(x)
        text_logits = lm.text_logits(rows, norm, cache)
        generated = torch.empty(1 + c.dep_q, x.shape[0], dtype=torch.long, device=x.device)
        # With a side stream the text token is drawn while the input projection runs; without, before it.
        with self.side.fork() if self.side is not None else contextlib.nullcontext():
            self._sample_text(text_logits, generated[0])
        depth = lm.depth_inputs(rows, norm, cache)
        if self.side is not None:
            self.side.join()
        if forced is not None:
            generated.copy_(forced.t())
        audio_logits = torch.empty(x.shape[0], c.dep_q, c.card, dtype=x.dtype, device=x.device)
        for step in range(c.dep_q):
            logits = lm.depth_step(step, depth[step], generated[step], cache, audio_logits[:, step])
            if forced is None:
                ops.sample_tokens(logits, params.audio_temperature, params.audio_top_k, params.max_audio_top_k,
                                  params.seed, frame, 1 + step, out=generated[1 + step])

        out, valid = ops.delay_line_out(cache.tokens, frame, running, generated.t(), self.delays)
        return FastLMOutput(tokens=out, valid=valid, text_logits=text_logits, audio_logits=audio_logits)


class FastLMRunner:
    """The fast LM step of `batch_size` slots as one captured CUDA graph (on CUDA, unless eager), with
    static inputs (user codes, execution mask, and with teacher_forcing the forced tokens)."""

    def __init__(self, lm: FastLM, batch_size: int, params: SamplingParams, device: torch.device,
                 eager: bool = False, teacher_forcing: bool = False, kv_pages: int | None = None,
                 kv_dtype: torch.dtype | None = None):
        """kv_dtype: Helium's KV cache dtype (LMCache)."""
        c = lm.config
        self.cache = LMCache(c, batch_size, device, lm.text_head.dtype, kv_pages=kv_pages, kv_dtype=kv_dtype)
        self.generator = FastStreamingLM(lm, self.cache, params)
        codes = torch.zeros(batch_size, c.dep_q, dtype=torch.long, device=device)
        mask = torch.ones(batch_size, dtype=torch.bool, device=device)
        inputs = [codes, mask]
        if teacher_forcing:
            inputs.append(torch.zeros(batch_size, 1 + c.dep_q, dtype=torch.long, device=device))
        self._step = CapturedStep(self.generator.step, inputs, eager=eager)
        self.reset(mask)

    def step(self, user_codes: torch.Tensor, exec_mask: torch.Tensor,
             forced: torch.Tensor | None = None) -> FastLMOutput:
        """One frame; the output's tensors are overwritten by the next step (copy what you keep)."""
        inputs = (user_codes, exec_mask) if forced is None else (user_codes, exec_mask, forced)
        return self._step(*inputs)

    def reset(self, slots: torch.Tensor) -> None:
        self.cache.reset(slots)
