"""Batch buckets: one fast engine sized for many conversations, serving fewer. The engine captures one CUDA
graph per bucket (by default the powers of two below --max-batch, and --max-batch) and runs each frame on the
smallest bucket that holds the open conversations, so n conversations should cost about what an engine
built for exactly n costs (bench_frame.py), not what --max-batch costs.

    python bench/bench_buckets.py --max-batch 64 --open 1,8,32,64 --frames 60 --json buckets.json

Reports the time to build the engine (weights aside: caches, warm-up and capture of every bucket), then for
each number of open conversations the frame time p50/p99 of `step({slot: frame})` and the bucket it ran,
with the GPU synchronised per call. Conversations are opened in order and the first ones closed between
rows, so the open ones sit in scattered slot ids (the engine moves their state into its first rows).
Weights: random at Moshi's real shapes (bf16 LM, fp32 codec), Kyutai's default sampling; every open
conversation starts at frame --context (a full 3000-token window of random keys and values).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import device_info, timed_calls  # noqa: E402
from bench.bench_lm_step import KYUTAI_SAMPLING, _set_fast_context  # noqa: E402
from moshi_fast import FastMoshi  # noqa: E402
from moshi_fast.config import moshiko  # noqa: E402
from tests.helpers import speech_like  # noqa: E402


def _percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(1000 * t for t in times)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _fill_context(engine: FastMoshi, context: int) -> None:
    """Every row at frame `context`: the LM's window and the codec's rings full of random values."""
    runner = engine._runner
    _set_fast_context(runner.lm_cache, context, engine.config.lm)
    runner.mimi_cache.encoder_frame.fill_(context)
    runner.mimi_cache.decoder_frame.fill_(context)
    for ring_k, ring_v in runner.mimi_cache.rings.values():
        ring_k.normal_()
        ring_v.normal_()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--open", default="1,8,32,64", help="numbers of open conversations to time")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--context", type=int, default=3000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    info = device_info()
    print(f"# {info}", flush=True)
    config = moshiko()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    engine = FastMoshi.random(config, device="cuda", backend="fast", max_batch=args.max_batch, **KYUTAI_SAMPLING)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    print(f"engine of {args.max_batch} slots, buckets {engine.buckets}: built in {build_s:.1f} s, "
          f"{torch.cuda.memory_allocated() / 1e9:.1f} GB allocated", flush=True)
    rows = []
    for count in (int(n) for n in args.open.split(",")):
        for slot in list(engine.open_slots):
            engine.close(slot)
        # Open twice as many as needed and close every other one: the open conversations hold scattered
        # slot ids, so the rows they run in come from the engine's moves.
        opened = [engine.open() for _ in range(min(2 * count, args.max_batch))]
        for slot in opened[:len(opened) - count]:
            engine.close(slot)
        slots = engine.open_slots
        _fill_context(engine, args.context)
        pcm = speech_like(count, args.warmup + args.frames, seed=count)[:, 0].cuda()
        frames = [{slot: chunk[i] for i, slot in enumerate(slots)} for chunk in pcm.split(config.mimi.frame_size, -1)]
        buckets = set()
        for frame in frames[:args.warmup]:
            buckets.add(engine.step(frame).bucket)
        p50, p99 = _percentiles(timed_calls(engine.step, frames[args.warmup:]))
        row = {"open": count, "bucket": sorted(buckets), "p50_ms": p50, "p99_ms": p99}
        rows.append(row)
        print(json.dumps(row), flush=True)
    peak = torch.cuda.max_memory_allocated() / 1e9
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "batch_buckets", **info, "max_batch": args.max_batch, "buckets": list(engine.buckets),
            "build_s": build_s, "peak_GB": peak, "frames": args.frames, "context": args.context,
            "config": "moshiko real config, random weights, bf16 LM, fp32 Mimi, Kyutai's default sampling",
            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
