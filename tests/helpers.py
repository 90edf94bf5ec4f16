"""Comparison helpers shared by the tests."""
from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


def speech_like(batch: int, frames: int, frame_size: int = 1920, seed: int = 0) -> torch.Tensor:
    """Non-trivial audio [batch, 1, frames * frame_size]: per-slot tones with a glide, envelope and noise."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(frames * frame_size, dtype=torch.float64) / 24000
    slots = []
    for b in range(batch):
        base = 110.0 * (1 + b) * (1 + 0.3 * torch.sin(2 * torch.pi * 0.7 * t))
        phase = 2 * torch.pi * torch.cumsum(base, 0) / 24000
        tone = torch.sin(phase) + 0.5 * torch.sin(2 * phase + 1.0) + 0.25 * torch.sin(3 * phase + 2.0)
        envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * 1.3 * t + b) ** 2
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64)
        slots.append(0.2 * tone * envelope + 0.03 * noise)
    return torch.stack(slots)[:, None].float()
