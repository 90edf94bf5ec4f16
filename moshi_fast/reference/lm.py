"""The Moshi LM in eager PyTorch: the executable spec of the fast LM step.

Per frame and slot the LM reads 1 + n_q tokens (text, Moshi's dep_q codebooks, the user's dep_q
codebooks; each stream delayed by `delays`), and produces one text token and dep_q audio codes:

    x = sum_k audio_emb[k](tok[1 + k]) + text_emb(tok[0])                      [B, 1, dim]
    32 x (x += attn(RMSNorm(x)) over the ring KV window;  x += FFN(RMSNorm(x)))   Helium
    h = out_norm(x);  text = sample(text_head(h))                               [B, text_card]
    for k in 0..dep_q-1 (depth transformer, weights of step k, causal over this frame's steps):
        y = in_proj[k](h) + (text_emb(text) if k == 0 else audio_emb[k-1](a[k-1]))
        6 x (attn, FFN) with step-k weights;  a[k] = sample(head[k](y))           [B, card]

`StreamingLM` wraps this in Kyutai's `LMGen` token bookkeeping (delay lines, initial tokens, the
first frame that returns nothing). Parameters are bf16 on GPU with RMSNorm and RoPE in fp32, or
float32 for exact comparisons; the depth transformer's per-step weights are stacked on dim 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LMConfig
from . import sampling
from .attention import add_ring, attend, merge_heads, ring_write, rope_interleaved, split_heads
from .state import SlotState, swap_rows

UNGENERATED = -2
"""Token-cache filler for entries not produced yet (Kyutai's ungenerated_token_id)."""


class RMSNorm(nn.Module):
    """y = x * weight / sqrt(eps + mean(x^2)), computed in fp32 and cast back (Kyutai's rms_norm_f32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        var = self.eps + torch.mean(x32 ** 2, dim=-1, keepdim=True)
        return (x32 * (self.weight.float() * torch.rsqrt(var))).to(x.dtype)


def gated_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down @ (silu(gate) * up) with [gate | up] = gate_up @ x; gate_up [2h, dim], down [dim, h]."""
    h = F.linear(x, gate_up)
    gate, up = h.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


class HeliumLayer(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        dim = config.dim
        self.norm1 = RMSNorm(dim, config.norm_eps)
        self.qkv = nn.Parameter(torch.empty(3 * dim, dim))
        self.out = nn.Parameter(torch.empty(dim, dim))
        self.norm2 = RMSNorm(dim, config.norm_eps)
        self.gate_up = nn.Parameter(torch.empty(2 * config.hidden, dim))
        self.down = nn.Parameter(torch.empty(dim, config.hidden))


class DepformerLayer(nn.Module):
    """One depth-transformer layer; every projection has one weight per codebook step (dim 0)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        dim, steps = config.depformer_dim, config.dep_q
        self.norm1 = RMSNorm(dim, config.norm_eps)
        self.qkv = nn.Parameter(torch.empty(steps, 3 * dim, dim))
        self.out = nn.Parameter(torch.empty(steps, dim, dim))
        self.norm2 = RMSNorm(dim, config.norm_eps)
        self.gate_up = nn.Parameter(torch.empty(steps, 2 * config.depformer_hidden, dim))
        self.down = nn.Parameter(torch.empty(steps, dim, config.depformer_hidden))


class Depformer(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        dim = config.depformer_dim
        self.in_proj = nn.Parameter(torch.empty(config.dep_q, dim, config.dim))
        self.text_emb = nn.Embedding(config.text_card + 1, dim)
        self.audio_emb = nn.ModuleList(nn.Embedding(config.card + 1, dim) for _ in range(config.dep_q - 1))
        self.layers = nn.ModuleList(DepformerLayer(config) for _ in range(config.depformer_num_layers))
        self.heads = nn.Parameter(torch.empty(config.dep_q, config.card, dim))


class LM(nn.Module):
    """Helium + depth transformer. Stateless teacher-forced forwards and one-frame streaming steps."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.text_emb = nn.Embedding(config.text_card + 1, config.dim)
        self.audio_emb = nn.ModuleList(nn.Embedding(config.card + 1, config.dim) for _ in range(config.n_q))
        self.layers = nn.ModuleList(HeliumLayer(config) for _ in range(config.num_layers))
        self.out_norm = RMSNorm(config.dim, config.norm_eps)
        self.text_head = nn.Parameter(torch.empty(config.text_card, config.dim))
        self.depformer = Depformer(config)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1 + n_q, T] -> [B, T, dim], audio streams summed in order, then text."""
        x = self.audio_emb[0](tokens[:, 1])
        for k in range(1, self.config.n_q):
            x = x + self.audio_emb[k](tokens[:, 1 + k])
        return x + self.text_emb(tokens[:, 0])

    def init_state(self, batch_size: int, state: SlotState | None = None,
                   kv_dtype: torch.dtype | None = None) -> SlotState:
        """Helium's streaming state: per layer a ring KV of `context` steps, and the position. kv_dtype: the
        ring's dtype (default the weights'; or an 8-bit float, see attention.to_cache_dtype)."""
        c = self.config
        state = state or SlotState(batch_size)
        device, dtype = self.text_head.device, self.text_head.dtype
        state.add("helium.offset", torch.empty(batch_size, dtype=torch.long, device=device))
        for i in range(c.num_layers):
            add_ring(state, f"helium.layers.{i}", c.num_heads, c.context, c.head_dim, kv_dtype or dtype, device)
        return state

    def forward_text(self, tokens: torch.Tensor, state: SlotState | None = None,
                     exec_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, 1 + n_q, T] (already delayed) -> (h [B, T, dim] after out_norm, text logits [B, T, text_card]).

        Without state: the whole sequence from position 0 (teacher forcing). With state: T steps
        appended to each executing slot's stream.
        """
        c = self.config
        x = self.embed(tokens)
        steps = x.shape[1]
        if state is None:
            positions = torch.arange(steps, device=x.device).expand(x.shape[0], -1)
        else:
            offset = state["helium.offset"]
            positions = offset[:, None] + torch.arange(steps, device=x.device)
        for i, layer in enumerate(self.layers):
            q, k, v = split_heads(F.linear(layer.norm1(x), layer.qkv), c.num_heads)
            q = rope_interleaved(q, positions, c.max_period)
            k = rope_interleaved(k, positions, c.max_period)
            if state is None:
                attended = attend(q, k, v, positions, positions, c.context)
            else:
                ring_k, ring_v, ring_pos = ring_write(state, f"helium.layers.{i}", k, v, positions, exec_mask)
                attended = attend(q, ring_k, ring_v, positions, ring_pos, c.context)
            x = x + F.linear(merge_heads(attended), layer.out)
            x = x + gated_ffn(layer.norm2(x), layer.gate_up, layer.down)
        if state is not None:
            state.commit("helium.offset", offset + steps, exec_mask)
        h = self.out_norm(x)
        return h, F.linear(h, self.text_head)

    def depformer_logits(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced depth transformer. h [B, T, dim]; tokens [B, T, dep_q] = the text token and
        audio codes 0..dep_q-2 fed at each step. Returns audio logits [B, T, dep_q, card]."""
        c, d = self.config, self.depformer
        batch, steps, _ = h.shape
        inputs = [d.text_emb(tokens[..., 0])] + [d.audio_emb[k - 1](tokens[..., k]) for k in range(1, c.dep_q)]
        x = torch.stack([F.linear(h, d.in_proj[k]) + inputs[k] for k in range(c.dep_q)], dim=2)
        x = x.view(batch * steps, c.dep_q, -1)
        pos = torch.arange(c.dep_q, device=h.device).expand(x.shape[0], -1)
        for layer in d.layers:
            projected = _per_step_linear(layer.norm1(x), layer.qkv)
            q, k, v = split_heads(projected, c.depformer_num_heads)
            x = x + _per_step_linear(merge_heads(attend(q, k, v, pos, pos, None)), layer.out)
            y = layer.norm2(x)
            hidden = _per_step_linear(y, layer.gate_up)
            gate, up = hidden.chunk(2, dim=-1)
            x = x + _per_step_linear(F.silu(gate) * up, layer.down)
        logits = _per_step_linear(x, d.heads)
        return logits.view(batch, steps, c.dep_q, -1)

    def depformer_step(self, h: torch.Tensor, text_token: torch.Tensor, sampler) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequential depth transformer for one frame: h [B, dim], text_token [B] -> (audio codes
        [B, dep_q], their logits [B, dep_q, card] float32). `sampler(logits [B, card], k)` picks
        codebook k's code, which the next step embeds."""
        c, d = self.config, self.depformer
        batch = h.shape[0]
        heads, head_dim = c.depformer_num_heads, c.depformer_head_dim
        keys = h.new_zeros(c.depformer_num_layers, batch, heads, c.dep_q, head_dim)
        values = torch.zeros_like(keys)
        key_pos = torch.full((batch, c.dep_q), -1, dtype=torch.long, device=h.device)
        previous = d.text_emb(text_token)
        codes, all_logits = [], []
        for step in range(c.dep_q):
            x = (F.linear(h, d.in_proj[step]) + previous)[:, None]
            key_pos[:, step] = step
            pos_q = torch.full((batch, 1), step, dtype=torch.long, device=h.device)
            for i, layer in enumerate(d.layers):
                q, k, v = split_heads(F.linear(layer.norm1(x), layer.qkv[step]), heads)
                keys[i, :, :, step] = k[:, :, 0]
                values[i, :, :, step] = v[:, :, 0]
                attended = attend(q, keys[i], values[i], pos_q, key_pos, None)
                x = x + F.linear(merge_heads(attended), layer.out[step])
                x = x + gated_ffn(layer.norm2(x), layer.gate_up[step], layer.down[step])
            logits = F.linear(x[:, 0], d.heads[step]).float()
            code = sampler(logits, step)
            codes.append(code)
            all_logits.append(logits)
            if step + 1 < c.dep_q:
                previous = d.audio_emb[step](code)
        return torch.stack(codes, dim=1), torch.stack(all_logits, dim=1)


def _per_step_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, S, in] with weight [S, out, in]: position s uses weight[s]."""
    return torch.einsum("nsi,soi->nso", x, weight)


@dataclass
class SamplingParams:
    """Per-slot sampling parameters as tensors [B] (temperature <= 0 means greedy)."""

    text_temperature: torch.Tensor
    text_top_k: torch.Tensor
    audio_temperature: torch.Tensor
    audio_top_k: torch.Tensor
    seed: torch.Tensor
    max_text_top_k: int
    max_audio_top_k: int

    def _per_slot(self) -> tuple[str, ...]:
        return ("text_temperature", "text_top_k", "audio_temperature", "audio_top_k", "seed")

    def narrow(self, batch_size: int) -> "SamplingParams":
        """The parameters of the first batch_size slots, as views (writes reach these parameters)."""
        return dataclasses.replace(self, **{name: getattr(self, name)[:batch_size] for name in self._per_slot()})

    def swap(self, a: int, b: int) -> None:
        """Exchanges the parameters of slots a and b."""
        for name in self._per_slot():
            swap_rows(getattr(self, name), a, b)


@dataclass
class LMStepOutput:
    tokens: torch.Tensor
    """[B, 1 + dep_q]: the text token and the dep_q audio codes of this frame, -1 where not produced yet."""
    valid: torch.Tensor
    """[B] bool: the slot produced output this frame (False on a conversation's first frame)."""
    text_logits: torch.Tensor
    """[B, text_card] float32 logits of the text token sampled this frame."""
    audio_logits: torch.Tensor
    """[B, dep_q, card] float32 logits of this frame's audio codes."""


class StreamingLM:
    """Kyutai's `LMGen` per-frame semantics over explicit per-slot state.

    Each slot keeps a token delay line of 1 + max_delay + 1 frames. At step t (the slot's frame
    index): write the user's codes at t + delay; read the input at t, replacing stream k by its
    initial token while t <= delays[k]; run Helium; sample text; run the depth transformer; store the
    generated tokens at t + 1; output, if t >= max_delay, stream k read at t + 1 - max_delay + delays[k].
    """

    def __init__(self, lm: LM):
        self.lm = lm
        self.config = lm.config

    def init_state(self, batch_size: int, kv_dtype: torch.dtype | None = None) -> SlotState:
        """kv_dtype: Helium's KV cache dtype (LM.init_state)."""
        c = self.config
        state = SlotState(batch_size)
        device = self.lm.text_head.device
        state.add("gen.offset", torch.empty(batch_size, dtype=torch.long, device=device))
        state.add("gen.cache", torch.empty(batch_size, c.num_streams, c.max_delay + 2, dtype=torch.long,
                                           device=device), UNGENERATED)
        return self.lm.init_state(batch_size, state, kv_dtype)

    def step(self, user_codes: torch.Tensor, state: SlotState, exec_mask: torch.Tensor,
             params: SamplingParams, forced: torch.Tensor | None = None) -> LMStepOutput:
        """user_codes [B, dep_q] int64 (this frame's Mimi codes of the user) -> one frame of output.

        forced [B, 1 + dep_q] (teacher forcing): the text token and audio codes this frame generates,
        in place of the sampled ones (the logits are still those of the model fed these tokens)."""
        c = self.config
        device = user_codes.device
        offset, cache = state["gen.offset"], state["gen.cache"]
        span = cache.shape[-1]
        delays = torch.tensor(c.delays, device=device)
        initial = torch.tensor([c.text_initial_token] + [c.audio_initial_token] * c.n_q, device=device)
        user_streams = torch.arange(1 + c.dep_q, c.num_streams, device=device)

        new_cache = cache.clone()
        write_at = (offset[:, None] + delays[user_streams][None, :]) % span
        new_cache[:, user_streams] = new_cache[:, user_streams].scatter(-1, write_at[..., None],
                                                                        user_codes[..., None])
        read_at = (offset % span)[:, None, None].expand(-1, c.num_streams, 1)
        tokens = new_cache.gather(-1, read_at)[..., 0]
        tokens = torch.where(offset[:, None] <= delays[None, :], initial[None, :], tokens)

        h, text_logits = self.lm.forward_text(tokens[..., None], state, exec_mask)
        h, text_logits = h[:, 0], text_logits[:, 0].float()
        text = sampling.sample(text_logits, params.text_temperature, params.text_top_k, params.max_text_top_k,
                               params.seed, offset, draw=0)
        if forced is not None:
            text = forced[:, 0]

        def sample_audio(logits: torch.Tensor, step: int) -> torch.Tensor:
            if forced is not None:
                return forced[:, 1 + step]
            return sampling.sample(logits, params.audio_temperature, params.audio_top_k, params.max_audio_top_k,
                                   params.seed, offset, draw=1 + step)

        audio, audio_logits = self.lm.depformer_step(h, text, sample_audio)

        next_offset = offset + 1
        store_at = (next_offset % span)[:, None, None].expand(-1, 1 + c.dep_q, 1)
        generated = torch.cat([text[:, None], audio], dim=1)[..., None]
        new_cache[:, :1 + c.dep_q] = new_cache[:, :1 + c.dep_q].scatter(-1, store_at, generated)
        own_delays = delays[:1 + c.dep_q]
        out_at = (next_offset[:, None] - c.max_delay + own_delays[None, :]) % span
        out = new_cache[:, :1 + c.dep_q].gather(-1, out_at[..., None])[..., 0]
        valid = next_offset > c.max_delay
        out = torch.where(valid[:, None], out, torch.full_like(out, -1))

        state.commit("gen.cache", new_cache, exec_mask)
        state.commit("gen.offset", next_offset, exec_mask)
        return LMStepOutput(tokens=out, valid=valid & exec_mask, text_logits=text_logits,
                            audio_logits=audio_logits)
