"""Mimi encode and decode per 80 ms frame: moshi_fast's fast codec vs Kyutai's MimiModel in streaming
mode (its own CUDA graphs), same random weights, same run.

    python bench/bench_mimi.py --batches 1,8,32,64 --frames 40 --json results.json

Kyutai's model is built by its own code (`moshi.models.loaders.get_mimi`), given random non-zero
codebooks, saved in its file format, and loaded into ours by our loader: both run the same weights.
Each figure is the median wall time of one user-visible call (input copy, the codec's work, output
ready), with the GPU synchronised after every call, over `--frames` frames after warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import (device_info, timed_calls, with_conv_tensor_cores, with_fused_norms,  # noqa: E402
                            without_pdl)
from moshi_fast import MimiCodec  # noqa: E402
from tests.checkpoints import kyutai_mimi  # noqa: E402
from tests.helpers import speech_like  # noqa: E402


def _median_ms(times: list[float]) -> float:
    return 1000 * sorted(times)[len(times) // 2]


def _time_codec(encode, decode, chunks, warmup: int) -> tuple[float, float, list]:
    """Median encode and decode ms per frame after `warmup` frames, and every frame's codes."""
    codes = [encode(c) for c in chunks[:warmup]]
    encode_times = timed_calls(lambda c: codes.append(encode(c)), chunks[warmup:])
    for t in range(warmup):
        decode(codes[t])
    decode_times = timed_calls(decode, codes[warmup:])
    return _median_ms(encode_times), _median_ms(decode_times), codes


def bench_batch(kyutai, ours: MimiCodec, batch: int, frames: int, warmup: int = 4,
                compare_pdl: bool = False, compare_fused_norms: bool = False,
                compare_conv_tensor_cores: bool = False) -> dict:
    pcm = speech_like(batch, frames + warmup).cuda()
    chunks = list(pcm.split(1920, dim=-1))
    row = {"batch": batch, "frames": frames}
    with torch.no_grad(), kyutai.streaming(batch):
        row["kyutai_encode_ms"], row["kyutai_decode_ms"], codes = _time_codec(kyutai.encode, kyutai.decode, chunks,
                                                                              warmup)
    stream = ours.stream(batch)
    row["fast_encode_ms"], row["fast_decode_ms"], our_codes = _time_codec(stream.encode, stream.decode, chunks,
                                                                          warmup)
    row["agreement"] = float((torch.cat(our_codes, -1) == torch.cat(codes, -1)).float().mean())
    if compare_pdl:
        # Captured without programmatic dependent launch: the same graphs' baseline, same run.
        stream = without_pdl(ours.stream, batch)
        row["fast_no_pdl_encode_ms"], row["fast_no_pdl_decode_ms"], _ = _time_codec(stream.encode, stream.decode,
                                                                                    chunks, warmup)
    if compare_fused_norms:
        # Captured with every LayerNorm fused into its product (the previous default), same run.
        stream = with_fused_norms(ours.stream, batch)
        row["fast_fused_norms_encode_ms"], row["fast_fused_norms_decode_ms"], _ = _time_codec(
            stream.encode, stream.decode, chunks, warmup)
    if compare_conv_tensor_cores:
        stream = with_conv_tensor_cores(ours.stream, batch)
        row["fast_conv_tensor_cores_encode_ms"], row["fast_conv_tensor_cores_decode_ms"], _ = _time_codec(
            stream.encode, stream.decode, chunks, warmup)
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
                          compare_fused_norms=args.fused_norms, compare_conv_tensor_cores=args.conv_tensor_cores)
        rows.append(row)
        print(f"{batch:>3} {row['kyutai_encode_ms']:>9.3f}ms {row['kyutai_decode_ms']:>5.3f}ms "
              f"{row['fast_encode_ms']:>7.3f}ms {row['fast_decode_ms']:>5.3f}ms {row['speedup']:>9.1f}x "
              f"{row['agreement']:>9.2%}")
        if args.without_pdl:
            print(f"    without programmatic dependent launch: enc {row['fast_no_pdl_encode_ms']:.3f}ms "
                  f"dec {row['fast_no_pdl_decode_ms']:.3f}ms")
        if args.fused_norms:
            print(f"    every LayerNorm fused into its linear: enc {row['fast_fused_norms_encode_ms']:.3f}ms "
                  f"dec {row['fast_fused_norms_decode_ms']:.3f}ms")
        if args.conv_tensor_cores:
            print(f"    few-column convs on the tensor cores: enc {row['fast_conv_tensor_cores_encode_ms']:.3f}ms "
                  f"dec {row['fast_conv_tensor_cores_decode_ms']:.3f}ms")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "mimi_frame", **info,
                                         "config": "Mimi real config, random weights, fp32, TF32 convs as default",
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
