"""The host's own work in `FastMoshi.step`: checking the frames and writing them into the pinned buffers, the
execution mask, then reading the outputs back in slot order, with the frame's GPU work taken out.

    python bench/bench_host_step.py --batches 1,8,64 --steps 3000 --json host_step.json

The engine (tiny preset: the host buffers have Moshi's frame size at any preset) runs one real step; then its
runner's step returns that step's outputs without launching anything, so what is timed is the engine's Python,
numpy and torch calls around the frame (on a GPU with their CUDA calls: the output copies and the stream
synchronisation), not the graph's launch or the GPU. Reports the best of five runs' mean microseconds per
step, for whole-batch steps (float32 numpy frames [B, 1920]) and for steps of a dict of every open slot; with
`--cadence-ms 80`, the median of steps started 80 ms apart, as a real-time caller's are (the host's caches cold).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import device_info  # noqa: E402
from moshi_fast import FastMoshi, tiny  # noqa: E402


class _CachedRunner:
    """The engine's runner with its step replaced by the outputs of one real step (see the module doc)."""

    def __init__(self, runner):
        self._runner, self._outputs = runner, {}

    def __getattr__(self, name: str):
        return getattr(self._runner, name)

    def _cached(self, bucket: int, run):
        if bucket not in self._outputs:
            self._outputs[bucket] = run()
        return self._outputs[bucket]

    def step_from_host(self, bucket: int):
        return self._cached(bucket, lambda: self._runner.step_from_host(bucket))

    def step(self, pcm, exec_mask):
        return self._cached(pcm.shape[0], lambda: self._runner.step(pcm, exec_mask))


def time_steps(engine: FastMoshi, frames, steps: int, repeats: int = 5) -> float:
    """Best of `repeats` runs' mean microseconds per engine.step(frames), after a few warm-up steps."""
    for _ in range(5):
        engine.step(frames)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            engine.step(frames)
        best = min(best, (time.perf_counter() - start) / steps * 1e6)
    return best


def time_paced_steps(engine: FastMoshi, frames, steps: int, cadence_s: float) -> float:
    """Median microseconds of engine.step(frames) over `steps` steps started cadence_s apart, the thread asleep
    in between (a real-time caller's steps: the host's caches cold), after a few warm-up steps."""
    for _ in range(5):
        engine.step(frames)
    times = []
    for _ in range(steps):
        time.sleep(cadence_s)
        start = time.perf_counter()
        engine.step(frames)
        times.append((time.perf_counter() - start) * 1e6)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--cadence-ms", type=float, default=0.0,
                        help="time each step alone, this long after the previous one (80: a real-time caller's "
                             "cadence, cold caches), the median of --steps steps; default 0: back to back, best of 5 "
                             "runs' mean")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    info = device_info()
    print(f"# {info}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    print(f"{'B':>3} {'whole batch us':>15} {'dict of slots us':>17}")
    for batch in (int(b) for b in args.batches.split(",")):
        engine = FastMoshi.random(tiny(), device=device, backend="fast", max_batch=batch, batch_buckets=[batch],
                                  seed=0)
        engine._runner = _CachedRunner(engine._runner)
        frames = (0.1 * np.random.default_rng(batch).standard_normal((batch, engine.frame_size))).astype(np.float32)
        timed = (functools.partial(time_paced_steps, cadence_s=args.cadence_ms / 1000) if args.cadence_ms
                 else time_steps)
        whole = timed(engine, frames if batch > 1 else frames[0], args.steps)
        slots = [engine.open() for _ in range(batch)]
        by_slot = timed(engine, {slot: frames[i] for i, slot in enumerate(slots)}, args.steps)
        rows.append({"batch": batch, "whole_batch_us": round(whole, 2), "dict_of_slots_us": round(by_slot, 2)})
        print(f"{batch:>3} {whole:>15.1f} {by_slot:>17.1f}")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "host_step", **info, "steps": args.steps,
                                         "cadence_ms": args.cadence_ms, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
