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


def calibrate_codebooks(model, seed: int = 0) -> None:
    """Random codewords spread around the latent each RVQ level quantizes (for a reference or fast Mimi
    with random weights), so that the codes follow the audio instead of being constant."""
    generator = torch.Generator().manual_seed(seed)
    state = model.init_encoder_state(2)
    run = torch.ones(2, dtype=torch.bool, device=model.downsample.weight.device)
    pcm = speech_like(2, 8, seed=11).to(run.device)
    with torch.no_grad():
        latent = torch.cat([model.encode_latent_step(c, state, run) for c in pcm.split(1920, dim=-1)], dim=-1)
        for rvq in (model.quantizer.semantic, model.quantizer.acoustic):
            projected = torch.nn.functional.conv1d(latent, rvq.input_proj)
            mean, deviation = projected.mean(dim=(0, 2)), (projected - projected.mean(dim=(0, 2))[:, None]).std()
            noise = torch.randn(rvq.codebooks.shape, generator=generator).to(run.device) * deviation
            noise[0] += mean
            rvq.codebooks.copy_(noise)


def graph_after_warmup(step, *restored: torch.Tensor) -> torch.cuda.CUDAGraph:
    """A CUDA graph of step(): one eager warm-up call on a side stream (compilation), then the capture; the
    `restored` tensors are set back to their values from before the warm-up, which thereby changes nothing."""
    initial = [tensor.clone() for tensor in restored]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for tensor, value in zip(restored, initial):
        tensor.copy_(value)
    return graph


def run_eagerly_then_replayed(step, replays: int = 2) -> None:
    """step() once eagerly, then captured in a CUDA graph and replayed `replays` times, then the device
    synchronised: for steps that give the same result however often they run (they write what they read over
    with the same values)."""
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
