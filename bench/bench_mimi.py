"""Mimi encode and decode per 80 ms frame: moshi_fast's fast codec vs Kyutai's MimiModel in streaming
mode (its own CUDA graphs), same random weights, same run.

    python bench/bench_mimi.py --batches 1,8,32,64 --frames 40 --json results.json

Kyutai's model is built by its own code (`moshi.models.loaders.get_mimi`), given random non-zero
codebooks, saved in its file format, and loaded into ours by our loader: both run the same weights.
Each figure is the median wall time of one user-visible call (input copy, the codec's work, output
ready), with the GPU synchronised after every call, over `--frames` frames after warm-up; beside it (`*_gpu_ms`)
the median span between CUDA events around each call, the GPU's part without the host's noise.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import (device_info, plan_table, timed_calls, with_conv_tensor_cores,  # noqa: E402
                            with_fused_norms, with_plans, without_pdl)
from moshi_fast import MimiCodec  # noqa: E402
from tests.checkpoints import kyutai_mimi  # noqa: E402
from tests.helpers import speech_like  # noqa: E402


VARIANT_LABELS = {"fast_no_pdl": "without programmatic dependent launch",
                  "fast_fused_norms": "every LayerNorm fused into its linear",
                  "fast_conv_tensor_cores": "few-column convs on the tensor cores",
                  "fast_compare_table": "the --compare-table launch plans"}
"""How the summary names the variants bench_batch times (the rows' key prefixes)."""


def _median_ms(times: list[float]) -> float:
    return 1000 * sorted(times)[len(times) // 2]


def _time_codec(encode, decode, chunks, warmup: int) -> tuple[dict, list]:
    """Median encode and decode ms per frame after `warmup` frames, wall time and GPU span ({"encode_ms",
    "decode_ms", "encode_gpu_ms", "decode_gpu_ms"}), and every frame's codes."""
    codes = [encode(c) for c in chunks[:warmup]]
    encode_spans, decode_spans = [], []
    encode_times = timed_calls(lambda c: codes.append(encode(c)), chunks[warmup:], encode_spans)
    for t in range(warmup):
        decode(codes[t])
    decode_times = timed_calls(decode, codes[warmup:], decode_spans)
    medians = {"encode_ms": _median_ms(encode_times), "decode_ms": _median_ms(decode_times),
               "encode_gpu_ms": _median_ms(encode_spans), "decode_gpu_ms": _median_ms(decode_spans)}
    return medians, codes


def _record(row: dict, name: str, medians: dict) -> None:
    row.update({f"{name}_{key}": value for key, value in medians.items()})


def bench_batch(kyutai, ours: MimiCodec, batch: int, frames: int, warmup: int = 4,
                compare_pdl: bool = False, compare_fused_norms: bool = False,
                compare_conv_tensor_cores: bool = False, compare_plans: dict | None = None) -> dict:
    """One batch's row: Kyutai's codec, ours, and the variants asked for, in that order on the same frames;
    compare_plans: also ours planned from this plan table (kernels/tuned_tiles.json's layout)."""
    pcm = speech_like(batch, frames + warmup).cuda()
    chunks = list(pcm.split(1920, dim=-1))
    row = {"batch": batch, "frames": frames}
    with torch.no_grad(), kyutai.streaming(batch):
        medians, codes = _time_codec(kyutai.encode, kyutai.decode, chunks, warmup)
    _record(row, "kyutai", medians)
    stream = ours.stream(batch)
    medians, our_codes = _time_codec(stream.encode, stream.decode, chunks, warmup)
    _record(row, "fast", medians)
    row["agreement"] = float((torch.cat(our_codes, -1) == torch.cat(codes, -1)).float().mean())
    # Each variant's graphs are captured under its setting (the previous defaults), timed in the same run.
    variants = [("fast_no_pdl", without_pdl, compare_pdl), ("fast_fused_norms", with_fused_norms, compare_fused_norms),
                ("fast_conv_tensor_cores", with_conv_tensor_cores, compare_conv_tensor_cores)]
    if compare_plans is not None:
        variants.append(("fast_compare_table", functools.partial(with_plans, compare_plans), True))
    for name, variant, wanted in variants:
        if wanted:
            stream = variant(ours.stream, batch)
            _record(row, name, _time_codec(stream.encode, stream.decode, chunks, warmup)[0])
    row["speedup"] = ((row["kyutai_encode_ms"] + row["kyutai_decode_ms"])
                      / (row["fast_encode_ms"] + row["fast_decode_ms"]))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--without-pdl", action="store_true",
                        help="also time the fast codec with programmatic dependent launch off, same run")
    parser.add_argument("--fused-norms", action="store_true",
                        help="also time the fast codec with every LayerNorm fused into its linear, same run")
    parser.add_argument("--conv-tensor-cores", action="store_true",
                        help="also time the fast codec with its few-column convs on the tensor-core tiles, same run")
    parser.add_argument("--compare-table", type=plan_table, metavar="PATH",
                        help="also time the fast codec with the launch plans of this tuned-tiles JSON instead of "
                             "kernels/tuned_tiles.json's, e.g. the table before a sweep, same run")
    args = parser.parse_args(argv)
    info = device_info()
    print(f"# {info}")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        kyutai, path = kyutai_mimi(Path(tmp) / "mimi.safetensors")
        kyutai = kyutai.cuda()
        ours = MimiCodec.from_pretrained(path, device="cuda", backend="fast")
    rows = []
    print(f"{'B':>3} {'Kyutai enc':>11} {'dec':>7} {'fast enc':>9} {'dec':>7} {'enc+dec x':>10} {'codes eq':>9}")
    for batch in (int(b) for b in args.batches.split(",")):
        row = bench_batch(kyutai, ours, batch, args.frames, compare_pdl=args.without_pdl,
                          compare_fused_norms=args.fused_norms, compare_conv_tensor_cores=args.conv_tensor_cores,
                          compare_plans=args.compare_table.plans if args.compare_table else None)
        rows.append(row)
        print(f"{batch:>3} {row['kyutai_encode_ms']:>9.3f}ms {row['kyutai_decode_ms']:>5.3f}ms "
              f"{row['fast_encode_ms']:>7.3f}ms {row['fast_decode_ms']:>5.3f}ms {row['speedup']:>9.1f}x "
              f"{row['agreement']:>9.2%}")
        print(f"    GPU spans: Kyutai enc {row['kyutai_encode_gpu_ms']:.3f}ms dec {row['kyutai_decode_gpu_ms']:.3f}ms, "
              f"fast enc {row['fast_encode_gpu_ms']:.3f}ms dec {row['fast_decode_gpu_ms']:.3f}ms")
        for name, label in VARIANT_LABELS.items():
            if f"{name}_encode_ms" in row:
                print(f"    {label}: enc {row[name + '_encode_ms']:.3f}ms dec {row[name + '_decode_ms']:.3f}ms (GPU "
                      f"{row[name + '_encode_gpu_ms']:.3f} / {row[name + '_decode_gpu_ms']:.3f}ms)")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "mimi_frame", **info,
                                         "config": "Mimi real config, random weights, fp32, TF32 convs as default",
                                         "compare_table": args.compare_table.path if args.compare_table else None,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
