"""The headline: one 80 ms Moshi frame (Mimi encode -> LM step -> Mimi decode) for B conversations,
moshi_fast's engine vs Kyutai's (the `moshi` package, its own CUDA graphs), same random weights, same run.

    python bench/bench_frame.py --batches 1,8,32,64 --frames 60 --json frame.json --plot frame.png

Kyutai's side is its library loop: `MimiModel.encode`, `LMGen.step`, `MimiModel.decode` in streaming mode.
Ours is `FastMoshi(backend="fast").step(frames)`: pcm from the host in, pcm and tokens to the host out.
Kyutai's side copies pcm in and its output to the host as well. Weights: Kyutai's Mimi with random non-zero
codebooks (saved in its file format and read by our loader) and Kyutai's randomly initialised LM (our
loader's name map onto the same tensors), bf16 LM, fp32 codec, Kyutai's default sampling. Every slot
starts at frame `--context` (full context: the LM's 3000-token window full of random keys and values, valid
random tokens in the delay lines; our codec's rings full too), so the numbers are those of conversations
that old. Times are wall-clock per step call with the GPU synchronised, p50 and p99 over `--frames` frames
after warm-up, and each frame's time (frames_ms); for moshi_fast also, from a second pass over the same frames with
CUDA events around the runner's step (kept out of frames_ms: recording them costs the host), each frame's span of
its graph replay on the GPU's timeline (replay_ms), the host's time around it and that pass's wall times; memory is
each engine's peak allocation during its run (they run one after the other). By default the frames run back to
back; `--cadence-ms 80` starts them 80 ms apart, the thread asleep in between, as a real-time caller's do: the
host's part of each step then runs with cold caches, and is slower (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_lm_step import (KYUTAI_SAMPLING, _release, _set_fast_context, _set_kyutai_context,  # noqa: E402
                                 kyutai_lm, ours_from_kyutai)
from bench._harness import (GPU_FAULTS, VARIANTS, add_variant_options, device_info, kept_runs,  # noqa: E402
                            recorded_fault, timed_calls, variant_runs)
from moshi_fast import FastMoshi  # noqa: E402
from moshi_fast.config import MoshiConfig, moshiko  # noqa: E402
from moshi_fast.fast.mimi import FastMimi  # noqa: E402
from moshi_fast.weights import load_mimi  # noqa: E402
from tests.checkpoints import kyutai_mimi  # noqa: E402
from tests.helpers import speech_like  # noqa: E402

VARIANT_LABELS = [(variant.name, variant.what_it_times) for variant in VARIANTS] + [
    ("fast_compare_table", "with the --compare-table launch plans")]
"""(run name, how the summary names it) of the same-run variants (the KV-cache one is printed with its memory)."""
BUDGET_MS = 80.0
"""One frame of audio: an engine keeps up in real time while a frame takes less."""


def _stats(times: list[float]) -> dict:
    """p50, p99 and mean of per-frame wall times (seconds) in ms, and every frame's time in order (a slow p99 is then
    one frame or many, early or late)."""
    frames_ms = [1000 * t for t in times]
    ordered = sorted(frames_ms)
    return {"p50_ms": ordered[len(ordered) // 2], "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "mean_ms": sum(ordered) / len(ordered), "frames_ms": [round(t, 3) for t in frames_ms]}


def bench_kyutai(mimi, lm, config: MoshiConfig, batch: int, frames: list[torch.Tensor], warmup: int,
                 context: int, cadence_s: float = 0.0) -> dict:
    from moshi.models.lm import LMGen

    torch.cuda.reset_peak_memory_stats()
    lm_gen = LMGen(lm, **KYUTAI_SAMPLING)

    def step(pcm: torch.Tensor) -> None:
        codes = mimi.encode(pcm.cuda()[:, None])
        tokens = lm_gen.step(codes)
        if tokens is not None:
            mimi.decode(tokens[:, 1:]).cpu()
            tokens.cpu()

    with torch.no_grad(), mimi.streaming(batch), lm_gen.streaming(batch):
        _set_kyutai_context(lm_gen, context, config.lm)
        for pcm in frames[:warmup]:
            step(pcm)
        row = _stats(timed_calls(step, frames[warmup:], cadence_s=cadence_s))
    row["peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
    del lm_gen
    _release()
    return row


def gpu_timed(step: Callable, calls: list) -> Callable:
    """step, recording into `calls`, for each call, a pair of CUDA events around it and the host's clock when it
    was entered and when it returned: the events' interval is the call's span on the GPU's timeline (for the frame
    runner, the copies into the graph's inputs, or its own copies from the host, and the graph replay), which beside
    the wall time of `FastMoshi.step` tells a slow frame of the GPU from one of the host, and the clock how the
    host's time splits around it."""
    def timed(*args, **kwargs):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        entered = time.perf_counter()
        begin.record()
        result = step(*args, **kwargs)
        end.record()
        calls.append((begin, end, entered, time.perf_counter()))
        return result
    return timed


def _host_split(steps: list[tuple[float, float]], calls: list) -> dict:
    """Per frame, ms: the host's time in FastMoshi.step before the runner's step (frames checked and sent),
    launching the runner's step, and after it (waiting for the GPU, the outputs' copies); steps holds each
    FastMoshi.step's (start, end) clock, calls gpu_timed's records of the same frames."""
    split = {"before_runner_ms": [], "runner_launch_ms": [], "after_runner_ms": []}
    for (start, stop), (_, _, entered, left) in zip(steps, calls):
        split["before_runner_ms"].append(round(1000 * (entered - start), 3))
        split["runner_launch_ms"].append(round(1000 * (left - entered), 3))
        split["after_runner_ms"].append(round(1000 * (stop - left), 3))
    return split


def bench_fast(mimi: FastMimi, lm, config: MoshiConfig, batch: int, frames: list[torch.Tensor], warmup: int,
               context: int, kv_dtype: torch.dtype | None = None, cadence_s: float = 0.0) -> dict:
    torch.cuda.reset_peak_memory_stats()
    engine = FastMoshi(config, lm, mimi, None, torch.device("cuda"), max_batch=batch, batch_buckets=[batch],
                       kv_dtype=kv_dtype, **KYUTAI_SAMPLING)
    runner = engine._runner
    _set_fast_context(runner.lm_cache, context, config.lm)
    runner.mimi_cache.encoder_frame.fill_(context)
    runner.mimi_cache.decoder_frame.fill_(context)
    for ring_k, ring_v in runner.mimi_cache.rings.values():
        ring_k.normal_()
        ring_v.normal_()
    for pcm in frames[:warmup]:
        engine.step(pcm)
    row = _stats(timed_calls(engine.step, frames[warmup:], cadence_s=cadence_s))
    # The GPU spans and the host's split come from a second pass over the same frames with the runner's step
    # between CUDA events: recording those costs the host 10 to 150 us a frame (the most at a cadence, cold), which
    # the wall times above leave out.
    calls: list = []
    runner.step = gpu_timed(runner.step, calls)
    runner.step_from_host = gpu_timed(runner.step_from_host, calls)
    steps: list[tuple[float, float]] = []

    def step(pcm: torch.Tensor) -> None:
        start = time.perf_counter()
        engine.step(pcm)
        steps.append((start, time.perf_counter()))

    row["instrumented_frames_ms"] = [round(1000 * t, 3)
                                     for t in timed_calls(step, frames[warmup:], cadence_s=cadence_s)]
    row["replay_ms"] = [round(begin.elapsed_time(end), 3) for begin, end, _, _ in calls]
    row.update(_host_split(steps, calls))
    row["peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
    del engine, runner
    _release()
    return row


def plot(rows: list[dict], info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for engine, label in (("kyutai", "Kyutai moshi (PyTorch, CUDA graphs)"), ("fast", "moshi_fast"),
                          ("fast_kv_fp8", "moshi_fast, fp8 KV cache")):
        points = [(r["batch"], r[engine]["p50_ms"], r[engine]["p99_ms"]) for r in rows if "p50_ms" in r.get(engine, {})]
        if points:
            batches, p50, p99 = zip(*points)
            line = axis.plot(batches, p50, marker="o", label=f"{label}, p50")[0]
            axis.plot(batches, p99, marker="x", linestyle="--", color=line.get_color(), label=f"{label}, p99")
    axis.axhline(BUDGET_MS, color="red", linewidth=1, label="80 ms: real time")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("conversations per GPU (batch)")
    axis.set_ylabel("frame time (ms)")
    axis.set_title(f"One 80 ms Moshi frame, full context, {info['device']}")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--context", type=int, default=3000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--cadence-ms", type=float, default=0.0,
                        help="start each timed frame this long after the previous one started (80: a real-time "
                             "caller's cadence, the host idle between frames); default 0, back to back")
    add_variant_options(parser, "moshi_fast")
    args = parser.parse_args(argv)
    info = device_info()
    print(f"# {info}", flush=True)
    config = moshiko()
    with tempfile.TemporaryDirectory() as tmp:
        kyutai_codec, path = kyutai_mimi(Path(tmp) / "mimi.safetensors")
        kyutai_codec = kyutai_codec.cuda()
        ours_codec = load_mimi(path, FastMimi, torch.device("cuda"), num_codebooks=config.mimi.num_codebooks).prepare()
    kyutai_model = kyutai_lm(config.lm)
    ours_lm = ours_from_kyutai(kyutai_model, config.lm)
    if "kyutai" in args.skip:
        kyutai_model = kyutai_codec = None  # ours keeps the tensors it shares; the rest of Kyutai's models is freed
        _release()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        pcm = speech_like(batch, args.warmup + args.frames, seed=batch)
        frames = list(pcm[:, 0].split(config.mimi.frame_size, dim=-1))
        row = {"batch": batch, "frames": args.frames, "context": args.context}
        cadence = args.cadence_ms / 1000
        runs = [("kyutai", lambda: bench_kyutai(kyutai_codec, kyutai_model, config, batch, frames, args.warmup,
                                                args.context, cadence)),
                ("fast", lambda: bench_fast(ours_codec, ours_lm, config, batch, frames, args.warmup, args.context,
                                            cadence_s=cadence))]
        runs += variant_runs(args, lambda _, kv_dtype: bench_fast(ours_codec, ours_lm, config, batch, frames,
                                                                  args.warmup, args.context, kv_dtype=kv_dtype,
                                                                  cadence_s=cadence))
        runs = kept_runs(args, runs)
        for name, run in runs:
            try:
                row[name] = run()
            except GPU_FAULTS as error:
                row[name] = {"error": recorded_fault(error, _release)}
        if "p50_ms" in row.get("kyutai", {}) and "p50_ms" in row.get("fast", {}):
            row["speedup_p50"] = row["kyutai"]["p50_ms"] / row["fast"]["p50_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    real_time = {engine: max((r["batch"] for r in rows if r.get(engine, {}).get("p99_ms", 1e9) <= BUDGET_MS),
                             default=0)
                 for engine in ("kyutai", "fast")}
    print(f"\n{'B':>3} {'Kyutai p50':>11} {'p99':>8} {'GB':>6} {'fast p50':>9} {'p99':>8} {'GB':>6} {'speed-up':>9}")
    for row in rows:
        k, f = row.get("kyutai", {}), row.get("fast", {})
        cell = lambda r, key, width: f"{r[key]:>{width}.2f}" if key in r else f"{'-':>{width}}"  # noqa: E731
        ratio = f"{row['speedup_p50']:>8.2f}x" if "speedup_p50" in row else f"{'-':>9}"
        print(f"{row['batch']:>3} {cell(k, 'p50_ms', 9)}ms {cell(k, 'p99_ms', 6)}ms {cell(k, 'peak_GB', 6)} "
              f"{cell(f, 'p50_ms', 7)}ms {cell(f, 'p99_ms', 6)}ms {cell(f, 'peak_GB', 6)} {ratio}")
    for row in rows:
        for name, label in VARIANT_LABELS:
            if "p50_ms" in row.get(name, {}):
                print(f"B = {row['batch']}: moshi_fast {label} p50 {row[name]['p50_ms']:.2f} ms, "
                      f"p99 {row[name]['p99_ms']:.2f} ms")
        kv = row.get(f"fast_kv_{args.kv_cache}", {})
        if "p50_ms" in kv:
            print(f"B = {row['batch']}: moshi_fast with the {args.kv_cache} KV cache p50 {kv['p50_ms']:.2f} ms, "
                  f"p99 {kv['p99_ms']:.2f} ms, peak {kv['peak_GB']:.1f} GB")
    print(f"most conversations tested with p99 <= {BUDGET_MS:.0f} ms: Kyutai {real_time['kyutai']}, "
          f"moshi_fast {real_time['fast']} (of batches {args.batches})")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "moshi_frame", **info,
            "config": "moshiko real config, random weights (Kyutai's LM init, Mimi with random codebooks), "
                      f"bf16 LM, fp32 Mimi, Kyutai's default sampling, every slot at frame {args.context}",
            "compare_table": args.compare_table.path if args.compare_table else None,
            "cadence_ms": args.cadence_ms,
            "real_time_conversations": real_time, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, info, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
