"""The `moshi-fast bench` command: frame latency of `FastMoshi.step` at several batch sizes, as a table,
a JSON record (device, versions, git SHA, configuration, every frame time) and two PNG plots."""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from . import audio
from .runner import EngineSpec

JSON_NAME = "bench.json"
HISTOGRAM_NAME = "latency_histogram.png"
BATCH_PLOT_NAME = "frame_time_vs_batch.png"


def default_batch_sizes(device: torch.device) -> list[int]:
    return [1, 8, 32, 64] if device.type == "cuda" else [1, 2, 4, 8]


def time_frames(engine, frames: int, warmup: int, seed: int = 0) -> np.ndarray:
    """Steps every slot of `engine` warmup + frames times with a voice-like signal per slot; returns the
    wall time of each of the last `frames` steps in milliseconds, float64 [frames] (the GPU is
    synchronised around each step)."""
    batch, frame_size = engine.max_batch, engine.frame_size
    total = warmup + frames
    seconds = total * frame_size / engine.sample_rate
    signals = np.stack([audio.test_signal(seconds, engine.sample_rate, seed=seed + i) for i in range(batch)])
    on_cuda = engine.device.type == "cuda"
    times = []
    for index in range(total):
        chunk = signals[:, index * frame_size:(index + 1) * frame_size]
        if on_cuda:
            torch.cuda.synchronize(engine.device)
        start = time.perf_counter()
        engine.step(chunk)
        if on_cuda:
            torch.cuda.synchronize(engine.device)
        if index >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return np.asarray(times, dtype=np.float64)


def summarize(batch: int, frame_ms: np.ndarray, budget_ms: float) -> dict:
    """Percentiles of frame_ms [n] for one batch size, with the real-time margin of each conversation
    (budget / p99: above 1, every conversation keeps up with real time even at the 99th percentile)."""
    p50, p90, p99 = (float(np.percentile(frame_ms, q)) for q in (50, 90, 99))
    return {"batch": batch, "frames": int(frame_ms.size), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
            "mean_ms": float(frame_ms.mean()), "max_ms": float(frame_ms.max()), "margin_p99": budget_ms / p99,
            "frame_ms": [round(float(t), 4) for t in frame_ms]}


def format_table(results: list[dict], budget_ms: float) -> str:
    columns = ("p50 ms", "p90 ms", "p99 ms", "max ms")
    header = f"{'batch':>5}  " + "  ".join(f"{c:>8}" for c in columns) + f"  {'margin':>7}  real time"
    rows = [header, "-" * len(header)]
    for r in results:
        verdict = "yes" if r["p99_ms"] <= budget_ms else "no"
        rows.append(f"{r['batch']:>5}  {r['p50_ms']:>8.2f}  {r['p90_ms']:>8.2f}  {r['p99_ms']:>8.2f}  "
                    f"{r['max_ms']:>8.2f}  {r['margin_p99']:>6.2f}x  {verdict}")
    rows.append(f"margin = {budget_ms:.0f} ms frame budget / p99; real time: p99 within the budget")
    return "\n".join(rows)


def environment() -> dict:
    """Device name, versions and the git SHA (GIT_SHA in the environment, else `git rev-parse`)."""
    if torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {"device_name": device_name, "torch": torch.__version__, "python": platform.python_version(),
            "git_sha": os.environ.get("GIT_SHA") or _git_sha()}


def _git_sha() -> str | None:
    try:
        completed = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   check=False, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def plot(record: dict, output_dir: Path) -> list[Path]:
    """Writes the latency histogram and the frame time vs batch plot; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    budget = record["budget_ms"]
    results = record["results"]
    subtitle = f"{record['label']} on {record['environment']['device_name']}"

    figure, axes = pyplot.subplots(figsize=(8, 4.5))
    upper = max(max(r["frame_ms"]) for r in results)
    bins = np.linspace(0, max(upper, budget) * 1.05, 60)
    for r in results:
        axes.hist(r["frame_ms"], bins=bins, alpha=0.55, label=f"batch {r['batch']}")
    axes.axvline(budget, color="black", linestyle="--", label=f"{budget:.0f} ms budget")
    axes.set(xlabel="frame time (ms)", ylabel="frames")
    axes.set_title(f"Frame latency\n{subtitle}", fontsize=10)
    axes.legend()
    histogram = _save(figure, output_dir / HISTOGRAM_NAME)

    figure, axes = pyplot.subplots(figsize=(8, 4.5))
    batches = [r["batch"] for r in results]
    for key, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^:")):
        axes.plot(batches, [r[key] for r in results], style, label=key.replace("_ms", ""))
    axes.axhline(budget, color="black", linestyle="--", label=f"{budget:.0f} ms real-time line")
    axes.set_xscale("log", base=2)
    axes.set_xticks(batches, [str(b) for b in batches])
    axes.set_ylim(bottom=0)
    axes.set(xlabel="batch (concurrent conversations)", ylabel="frame time (ms)")
    axes.set_title(f"Frame time vs batch\n{subtitle}", fontsize=10)
    axes.legend()
    batch_plot = _save(figure, output_dir / BATCH_PLOT_NAME)
    return [histogram, batch_plot]


def _save(figure, path: Path) -> Path:
    from matplotlib import pyplot

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def run_bench(spec: EngineSpec, batch_sizes: list[int], frames: int, warmup: int, output_dir: Path) -> int:
    """Times `frames` steps (after `warmup`) of an engine built for each batch size, prints the table and
    writes bench.json and the two plots into output_dir."""
    output_dir.mkdir(parents=True, exist_ok=True)
    config = spec.config
    budget_ms = 1000 * config.mimi.frame_size / config.mimi.sample_rate
    results = []
    for batch in batch_sizes:
        engine = spec.build(max_batch=batch, quiet=True)
        frame_ms = time_frames(engine, frames, warmup, seed=spec.seed)
        results.append(summarize(batch, frame_ms, budget_ms))
        print(f"batch {batch}: p50 {results[-1]['p50_ms']:.2f} ms over {frames} frames", flush=True)
        # Free one engine before building the next: at full size each holds gigabytes.
        del engine
        gc.collect()
        if spec.device.type == "cuda":
            torch.cuda.empty_cache()
    model = spec.weights.name if spec.weights is not None else f"{spec.preset} preset, random weights"
    record = {
        "model": spec.describe(),
        "label": f"{model}, {spec.backend} backend",
        "backend": spec.backend,
        "config": dataclasses.asdict(config),
        "environment": environment(),
        "budget_ms": budget_ms,
        "warmup_frames": warmup,
        "results": results,
    }
    json_path = output_dir / JSON_NAME
    json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    plots = plot(record, output_dir)
    print(format_table(results, budget_ms))
    print(f"wrote {json_path}, {', '.join(str(p) for p in plots)}")
    return 0
