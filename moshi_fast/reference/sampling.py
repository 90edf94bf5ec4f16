"""Token sampling: Kyutai's temperature + top-k exponential race, driven by a counter-based RNG.

Kyutai (moshi/utils/sampling.py) samples `argmax(p_i / E_i)` over the top-k probabilities p of
softmax(logits / temperature), with E_i ~ Exp(1) i.i.d.; this picks i with probability p_i / sum(p),
without a host sync. Greedy is `argmax(logits)`.

Here E_i is a pure function of (seed, counter, draw, rank i): a 32-bit integer hash made into a
uniform u in (0, 1), E = -log(u). Per slot, `seed` is fixed and `counter` is the slot's frame index,
so a conversation's random stream depends on nothing but its own seed and position: the same seed
repeats, a reset slot replays, and a kernel can compute the very same numbers on the GPU. `draw`
separates the text token (0) from the audio codebooks (1 + k) of one frame.
The hash is Wellons' "lowbias32", evaluated in int64 without overflow.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for x in [0, 2^32), with every intermediate below 2^49."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _combine(h: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    return _mix32(((h ^ value) + _GOLDEN) & _MASK32)


def exponential_noise(seed: torch.Tensor, counter: torch.Tensor, draw: int, n: int) -> torch.Tensor:
    """Exp(1) variates [B, n] float32 for seeds [B], counters [B] (int64) and one draw index."""
    h = _combine(seed & _MASK32, (seed >> 32) & _MASK32)
    h = _combine(h, counter & _MASK32)
    h = _combine(h, draw)
    ranks = torch.arange(n, device=seed.device, dtype=torch.int64)
    bits = _combine(h[:, None], ranks[None, :])
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(uniform)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, max_top_k: int,
           seed: torch.Tensor, counter: torch.Tensor, draw: int) -> torch.Tensor:
    """One token per slot from logits [B, V].

    temperature [B] float32 (<= 0 means greedy for that slot), top_k [B] int64 in [1, max_top_k],
    max_top_k a Python int <= V fixed for the model's lifetime (shapes stay static).
    Returns [B] int64.
    """
    logits = logits.float()
    greedy = temperature <= 0
    safe_temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(logits / safe_temperature[:, None], dim=-1)
    k = min(max_top_k, logits.shape[-1])
    top_probs, top_index = torch.topk(probs, k, dim=-1)
    ranks = torch.arange(k, device=logits.device)
    # Ranks past the slot's top_k never win, even where their noise is -0.0 (u rounds to 1.0, once in
    # 2**24), which would make 0 / -0.0 a NaN that argmax picks.
    race = torch.where(ranks[None, :] < top_k[:, None], top_probs / exponential_noise(seed, counter, draw, k),
                       torch.full_like(top_probs, float("-inf")))
    sampled = top_index.gather(-1, race.argmax(-1, keepdim=True))[:, 0]
    return torch.where(greedy, logits.argmax(-1), sampled)

