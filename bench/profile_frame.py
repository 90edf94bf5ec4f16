"""Where one frame's GPU time goes: every kernel of `FastMoshi(backend="fast").step` at Moshi's real
shapes, timed by the CUDA profiler (CUPTI, through torch.profiler) over graph replays, grouped by phase.

    python bench/profile_frame.py --batch 1 --frames 20 --json profile.json

Random weights (`FastMoshi.random`), every slot at frame `--context` (the LM's window full of random keys
and values, the codec's rings full). The frame graph runs the same kernels in the same order every frame,
so the i-th kernel of each frame is one node: its duration is the median over the frames, and so is the
gap before it (the time the GPU ran nothing of this stream, from the previous kernel's end to its start).
By default programmatic dependent launch is off while profiling, so that a kernel's span is its own work
and not also the time it waited for its predecessor (`--pdl` keeps it on: spans then overlap). Either way each
kernel also gets its end step, the median time from the previous kernel's end to its own: with PDL, what it adds
to the chain once its launch, its weight requests and its wait overlap the kernels before it; the end steps of
a frame sum to its span.
Phases follow the frame's order: the codec's encode, then Helium up to its last paged-attention layer's
last linear, the text head and its sampling, the depth transformer, and the codec's decode; a kernel is
assigned by its position between the first and last kernels that only that phase launches.
`--table OLD.json` plans the frame from another tuned-tiles JSON: with a profile of the current table in the same
call, two tables compare kernel by kernel as the frame runs them (kernels alone are not kernels in the chain).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import sys
from pathlib import Path

import torch

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import device_info, plan_table, with_plans  # noqa: E402
from bench.bench_buckets import _fill_context  # noqa: E402
from bench.bench_lm_step import KYUTAI_SAMPLING  # noqa: E402
from moshi_fast import FastMoshi, ops  # noqa: E402
from moshi_fast.engine import KV_CACHE_DTYPES  # noqa: E402
from tests.helpers import speech_like  # noqa: E402


def _kernel_events(profiler) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every GPU kernel the profiler saw, in start order."""
    events = []
    for event in profiler.profiler.kineto_results.events():
        if event.device_type() == torch.autograd.DeviceType.CUDA and not event.name().startswith(("Memcpy", "Memset")):
            start = event.start_ns() / 1000
            events.append((event.name(), start, start + event.duration_ns() / 1000))
    return sorted(events, key=lambda e: e[1])


def _split_frames(events: list[tuple[str, float, float]], frames: int) -> list[list[tuple[str, float, float]]]:
    """The profiled window's kernels cut into `frames` equal runs (every frame launches the same graph)."""
    per_frame, extra = divmod(len(events), frames)
    if per_frame == 0 or extra:
        raise RuntimeError(f"{len(events)} kernels do not split into {frames} equal frames")
    runs = [events[i * per_frame:(i + 1) * per_frame] for i in range(frames)]
    names = [name for name, _, _ in runs[0]]
    if any([name for name, _, _ in run] != names for run in runs[1:]):
        raise RuntimeError("frames launched different kernel sequences")
    return runs


def _short_name(name: str) -> str:
    """Triton kernels' names without their specialisation suffixes; CUDA kernels' without template arguments."""
    return name.split("(")[0].split("<")[0].removeprefix("void ")


def _phases(names: list[str]) -> list[str]:
    """The phase of each kernel position in one frame (see the module doc)."""
    paged = [i for i, n in enumerate(names) if "paged_attention" in n]
    samples = [i for i, n in enumerate(names) if "sample_tokens" in n]
    if not paged or len(samples) < 2:
        return ["frame"] * len(names)
    helium_start = paged[0] - 2  # the embedding and the first qkv linear come before the first attention
    helium_end = paged[-1] + 3  # the last layer's out, gate_up and down linears
    text_end = samples[0]
    depth_end = samples[-1]
    phases = []
    for i in range(len(names)):
        if i < helium_start:
            phases.append("mimi encode + LM inputs")
        elif i <= helium_end:
            phases.append("helium")
        elif i <= text_end:
            phases.append("text head + sample")
        elif i <= depth_end:
            phases.append("depth transformer")
        else:
            phases.append("LM outputs + mimi decode")
    return phases


def _kernel_rows(runs: list[list[tuple[str, float, float]]], names: list[str], phases: list[str]) -> list[dict]:
    """Each kernel position of the frames: its median span, the median idle time before it, and its median end step
    (from the previous kernel's end to its own; the first kernel's is its span)."""
    kernels = []
    for i, name in enumerate(names):
        spans = [run[i][2] - run[i][1] for run in runs]
        gaps = [max(0.0, run[i][1] - run[i - 1][2]) if i else 0.0 for run in runs]
        end_steps = [run[i][2] - (run[i - 1][2] if i else run[i][1]) for run in runs]
        kernels.append({"index": i, "name": name, "phase": phases[i], "us": statistics.median(spans),
                        "gap_before_us": statistics.median(gaps), "end_step_us": statistics.median(end_steps)})
    return kernels


def profile(batch: int, frames: int, warmup: int, context: int, pdl: bool, cuda_sampling: bool = True,
            kv_cache: str | None = None) -> dict:
    with ops.programmatic_launch(pdl), ops.cuda_sampling(cuda_sampling):
        return _profile(batch, frames, warmup, context, pdl, cuda_sampling, kv_cache)


def _profile(batch: int, frames: int, warmup: int, context: int, pdl: bool, cuda_sampling: bool,
             kv_cache: str | None) -> dict:
    engine = FastMoshi.random(device="cuda", backend="fast", max_batch=batch, batch_buckets=[batch],
                              kv_dtype=kv_cache, **KYUTAI_SAMPLING)
    _fill_context(engine, context)
    pcm = speech_like(batch, warmup + frames, seed=batch)
    chunks = list(pcm[:, 0].split(engine.frame_size, dim=-1))
    for chunk in chunks[:warmup]:
        engine.step(chunk)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for chunk in chunks[warmup:]:
            engine.step(chunk)
        torch.cuda.synchronize()
    runs = _split_frames(_kernel_events(profiler), frames)
    names = [_short_name(name) for name, _, _ in runs[0]]
    phases = _phases(names)
    kernels = _kernel_rows(runs, names, phases)
    frame_spans = [run[-1][2] - run[0][1] for run in runs]
    by_phase = collections.defaultdict(lambda: {"kernels": 0, "us": 0.0, "gaps_us": 0.0, "end_steps_us": 0.0})
    by_name = collections.defaultdict(lambda: {"kernels": 0, "us": 0.0, "end_steps_us": 0.0})
    for k in kernels:
        by_phase[k["phase"]]["kernels"] += 1
        by_phase[k["phase"]]["us"] += k["us"]
        by_phase[k["phase"]]["gaps_us"] += k["gap_before_us"]
        by_phase[k["phase"]]["end_steps_us"] += k["end_step_us"]
        by_name[(k["phase"], k["name"])]["kernels"] += 1
        by_name[(k["phase"], k["name"])]["us"] += k["us"]
        by_name[(k["phase"], k["name"])]["end_steps_us"] += k["end_step_us"]
    return {"batch": batch, "context": context, "frames": frames, "pdl": pdl, "cuda_sampling": cuda_sampling,
            "kv_cache": kv_cache or "the LM's dtype", "gpu_span_us": statistics.median(frame_spans),
            "kernels_per_frame": len(kernels),
            "by_phase": dict(by_phase),
            "by_kernel": [{"phase": p, "name": n, **v} for (p, n), v in by_name.items()], "kernels": kernels}


def report(result: dict) -> None:
    print(f"\nB = {result['batch']}, context {result['context']}, PDL {'on' if result['pdl'] else 'off'}, "
          f"{'CUDA' if result['cuda_sampling'] else 'Triton'} sampling: "
          f"{result['kernels_per_frame']} kernels, first start to last end {result['gpu_span_us']:.1f} µs")
    print(f"{'phase':<28}{'kernels':>8}{'kernel µs':>11}{'gaps µs':>9}{'end steps µs':>14}")
    for phase, v in result["by_phase"].items():
        print(f"{phase:<28}{v['kernels']:>8}{v['us']:>11.1f}{v['gaps_us']:>9.1f}{v['end_steps_us']:>14.1f}")
    print(f"\n{'phase':<28}{'kernel':<44}{'count':>6}{'µs':>9}{'µs each':>9}{'end step each':>15}")
    for row in sorted(result["by_kernel"], key=lambda r: -r["us"]):
        print(f"{row['phase']:<28}{row['name'][:43]:<44}{row['kernels']:>6}{row['us']:>9.1f}"
              f"{row['us'] / row['kernels']:>9.2f}{row['end_steps_us'] / row['kernels']:>15.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--context", type=int, default=3000)
    parser.add_argument("--pdl", action="store_true", help="keep programmatic dependent launch on (spans overlap)")
    parser.add_argument("--triton-sampling", action="store_true",
                        help="sample with the Triton kernel instead of the CUDA extension's (ops.cuda_sampling(False))")
    parser.add_argument("--kv-cache", choices=sorted(KV_CACHE_DTYPES),
                        help="Helium's KV cache in this dtype (e.g. fp8 where the bf16 cache does not fit the GPU)")
    parser.add_argument("--table", type=plan_table, metavar="PATH",
                        help="plan the frame from this tuned-tiles JSON instead of kernels/tuned_tiles.json (two "
                             "profiles, with and without it, compare two tables kernel by kernel in the frame)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    info = device_info()
    print(f"# {info}", flush=True)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        run = functools.partial(profile, batch, args.frames, args.warmup, args.context, args.pdl,
                                not args.triton_sampling, args.kv_cache)
        result = with_plans(args.table.plans, run) if args.table else run()
        result["table"] = args.table.path if args.table else "kernels/tuned_tiles.json"
        report(result)
        results.append(result)
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "frame_profile", **info,
                                         "config": "moshiko real config, random weights (FastMoshi.random), bf16 "
                                                   "LM, fp32 Mimi, Kyutai's default sampling",
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
