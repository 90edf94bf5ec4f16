"""Comparison helpers shared by the tests."""
from __future__ import annotations

import pytest
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


def _misaligned_copy_of(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of `tensor`'s shape and dtype starting one element past a fresh allocation: not 16-byte aligned."""
    return tensor.new_empty(tensor.numel() + 1)[1:].view(tensor.shape)


def _out_overlapping_x(operands: dict) -> dict:
    """GEMV operands (x, weight, out, ...) whose out starts 8 elements before x's end in one allocation."""
    x, out = operands["x"], operands["out"]
    storage = x.new_empty(x.numel() + out.numel())
    return dict(operands, x=storage[:x.numel()].view(x.shape),
                out=storage[x.numel() - 8:x.numel() - 8 + out.numel()].view(out.shape))


def _residual_shifted_from_out(operands: dict) -> dict:
    """GEMV operands whose residual overlaps out 8 elements further on, without being out."""
    out = operands["out"]
    storage = out.new_empty(out.numel() + 8)
    return dict(operands, out=storage[:out.numel()].view(out.shape), residual=storage[8:].view(out.shape))


def gemv_layout_bad_calls() -> list:
    """The bad calls every GEMV op of the CUDA extension rejects alike, as (changes to the good arguments, error,
    message) test parameters; good: x [3, 64], weight [40, 64], out [3, 40] on the GPU."""
    return [
        pytest.param(lambda ok: dict(ok, weight=ok["weight"].new_zeros(40, 72)), ValueError,
                     "do not match along K", id="k-mismatch"),
        pytest.param(lambda ok: dict(ok, weight=ok["weight"].new_zeros(64, 40).T), ValueError, "contiguous",
                     id="weight-transposed"),
        pytest.param(lambda ok: dict(ok, x=ok["x"].new_zeros(64)), ValueError, "x must be 2-D", id="x-1d"),
        pytest.param(lambda ok: dict(ok, out=ok["out"].new_zeros(3, 41)), ValueError, "out must have shape",
                     id="out-shape"),
        pytest.param(lambda ok: dict(ok, residual=ok["out"].new_zeros(2, 40)), ValueError,
                     "residual must have shape", id="residual-shape"),
        pytest.param(lambda ok: dict(ok, x=ok["x"].cpu()), ValueError, "runs on CUDA tensors", id="x-on-cpu"),
        pytest.param(lambda ok: dict(ok, weight=ok["weight"].cpu()), ValueError,
                     "weight must be on x's device", id="weight-on-cpu"),
        pytest.param(lambda ok: {name: t.cpu() for name, t in ok.items()}, NotImplementedError, "CPU",
                     id="all-on-cpu"),
        pytest.param(lambda ok: dict(ok, x=_misaligned_copy_of(ok["x"])), ValueError, "16-byte aligned",
                     id="x-misaligned"),
        pytest.param(_out_overlapping_x, ValueError, "out overlaps x", id="out-overlaps-x"),
        pytest.param(lambda ok: dict(ok, out=ok["weight"].view(-1)[:3 * 40].view(3, 40)), ValueError,
                     "out overlaps weight", id="out-in-weight"),
        pytest.param(_residual_shifted_from_out, ValueError, "residual overlaps out",
                     id="residual-shifted-from-out"),
        pytest.param(lambda ok: dict(ok, warps_per_block=17), ValueError, "warps_per_block", id="seventeen-warps"),
    ]
