"""Which launches gain from programmatic dependent launch (PDL): the fast LM step and the fast Mimi codec,
each captured under several launch policies and timed in one run, at Moshi's real config with random weights.

    python bench/pdl_sweep.py --batches 1,8 --context 3000 --json pdl_sweep.json

A policy sets `kernels._utils.PDL_KERNELS` (which launchers use PDL), `PDL_MAX_STREAM_BYTES` (launches
streaming more weight bytes go without it) and `skinny_linear.LAUNCH_DEPENDENTS_AFTER_STREAM` (when a
linear lets the next kernel start). PDL lets a kernel's programs land on SMs while the previous kernel
still runs; a bandwidth-bound kernel whose programs land unevenly then streams from fewer SMs, so the
policy is measured, not assumed. Each figure is the median wall time of one graph replay (GPU
synchronised) over --frames frames, every LM slot at frame --context.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import device_info, timed_calls  # noqa: E402
from bench.bench_lm_step import _percentiles, _release, _sampling, _set_fast_context  # noqa: E402
from moshi_fast import MimiCodec  # noqa: E402
from moshi_fast.config import moshiko  # noqa: E402
from moshi_fast.engine import _prepared, _random_module  # noqa: E402
from moshi_fast.fast.lm import FastLM, FastLMRunner  # noqa: E402
from moshi_fast.kernels import _utils, skinny_linear  # noqa: E402
from tests.helpers import speech_like  # noqa: E402

ALL_KERNELS = frozenset(_utils.PDL_KERNELS)
POLICIES = {
    "off": {"enabled": False},
    "all": {},
    "all, late launch": {"late": True},
    "no paged_attention": {"exclude": {"paged_attention"}},
    "no paged_attention, late launch": {"exclude": {"paged_attention"}, "late": True},
    "no paged_attention, linears <= 16 MB": {"exclude": {"paged_attention"}, "max_bytes": 16_000_000},
    "no paged_attention, linears <= 16 MB, late": {"exclude": {"paged_attention"}, "max_bytes": 16_000_000,
                                                   "late": True},
    "no convs": {"exclude": {"conv1d_stream", "conv_transpose1d_stream"}},
}
LM_POLICIES = [name for name in POLICIES if name != "no convs"]
CODEC_POLICIES = ["off", "all", "all, late launch", "no convs"]


@contextlib.contextmanager
def policy(name: str):
    settings = POLICIES[name]
    saved = (set(_utils.PDL_KERNELS), _utils.PDL_MAX_STREAM_BYTES, skinny_linear.LAUNCH_DEPENDENTS_AFTER_STREAM)
    _utils.PDL_KERNELS.clear()
    _utils.PDL_KERNELS.update(ALL_KERNELS - settings.get("exclude", set()))
    _utils.PDL_MAX_STREAM_BYTES = settings.get("max_bytes")
    skinny_linear.LAUNCH_DEPENDENTS_AFTER_STREAM = settings.get("late", False)
    try:
        with _utils.programmatic_launch(settings.get("enabled", True)):
            yield
    finally:
        _utils.PDL_KERNELS.clear()
        _utils.PDL_KERNELS.update(saved[0])
        _utils.PDL_MAX_STREAM_BYTES, skinny_linear.LAUNCH_DEPENDENTS_AFTER_STREAM = saved[1:]


def time_lm(lm: FastLM, config, batch: int, context: int, frames: int, warmup: int = 4) -> dict:
    runner = FastLMRunner(lm, batch, _sampling(batch), torch.device("cuda"))
    mask = torch.ones(batch, dtype=torch.bool, device="cuda")
    codes = torch.randint(0, config.card, (warmup + frames, batch, config.dep_q), device="cuda")
    _set_fast_context(runner.cache, context, config)
    with torch.no_grad():
        for t in range(warmup):
            runner.step(codes[t], mask)
        p50, p90 = _percentiles(timed_calls(lambda c: runner.step(c, mask), codes[warmup:]))
    del runner
    _release()
    return {"lm_p50_ms": p50, "lm_p90_ms": p90}


def time_codec(codec: MimiCodec, batch: int, frames: int, warmup: int = 4) -> dict:
    stream = codec.stream(batch)
    chunks = list(speech_like(batch, frames + warmup, seed=batch).cuda().split(1920, dim=-1))
    codes = [stream.encode(c) for c in chunks[:warmup]]
    encode = _percentiles(timed_calls(lambda c: codes.append(stream.encode(c)), chunks[warmup:]))[0]
    decode = _percentiles(timed_calls(stream.decode, codes[warmup:]))[0]
    del stream
    _release()
    return {"encode_ms": encode, "decode_ms": decode}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--context", type=int, default=3000)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    info = device_info()
    print(f"# {info}", flush=True)
    config = moshiko()
    lm = _prepared(_random_module(lambda: FastLM(config.lm), torch.bfloat16, torch.device("cuda"), 1))
    codec = MimiCodec.random(config.mimi, device="cuda", backend="fast")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for name in LM_POLICIES:
            with policy(name):
                row = {"part": "lm_step", "policy": name, "batch": batch, "context": args.context,
                       **time_lm(lm, config.lm, batch, args.context, args.frames)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        for name in CODEC_POLICIES:
            with policy(name):
                row = {"part": "mimi", "policy": name, "batch": batch, **time_codec(codec, batch, args.frames)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'part':<8} {'B':>3} {'policy':<46} {'ms':>8}")
    for row in rows:
        ms = row["lm_p50_ms"] if row["part"] == "lm_step" else row["encode_ms"] + row["decode_ms"]
        print(f"{row['part']:<8} {row['batch']:>3} {row['policy']:<46} {ms:>8.3f}")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "pdl_sweep", **info,
                                         "config": "moshiko real config, random weights, bf16 LM, fp32 Mimi, "
                                                   "Kyutai's default sampling", "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
