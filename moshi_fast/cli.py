"""The `moshi-fast` command line (also `python -m moshi_fast`).

    moshi-fast demo                                  # random tiny (CPU) or moshiko-sized (CUDA) model
    moshi-fast demo --weights DIR --input in.wav     # a real checkpoint on your own audio

The demo streams a signal through Moshi frame by frame, writes Moshi's audio to a WAV file, and prints
the text tokens and step timings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import runner
from .config import PRESETS


def _device(value: str) -> torch.device:
    try:
        device = torch.device(value)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"invalid device {value!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r} requested but CUDA is not available")
    return device


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moshi-fast", description="Fast inference for Kyutai's Moshi.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="stream audio through Moshi and write its reply to a WAV file",
        description="Streams a signal through Moshi in 80 ms frames, writes Moshi's audio, and prints "
                    "its text tokens and step timings. Without --weights the model has random weights.")
    demo.add_argument("--weights", metavar="DIR", type=Path,
                      help="Kyutai or transformers Moshi checkpoint directory (default: random weights)")
    demo.add_argument("--input", metavar="WAV", type=Path,
                      help="audio file to stream as the user's voice (default: a generated test signal)")
    demo.add_argument("--output", metavar="WAV", type=Path, default=Path("moshi_demo_out.wav"),
                      help="where to write Moshi's audio (default: %(default)s)")
    demo.add_argument("--seconds", metavar="S", type=_positive_seconds,
                      help=f"length of the generated test signal (default: {runner.DEFAULT_SECONDS})")
    demo.add_argument("--device", type=_device, default=None,
                      help="torch device (default: cuda if available, else cpu)")
    demo.add_argument("--preset", choices=sorted(PRESETS),
                      help="model size for random weights (default: tiny on the CPU, moshiko on CUDA)")
    demo.add_argument("--seed", type=int, default=0, help="seed for sampling and random weights (default: 0)")
    demo.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    demo.set_defaults(handler=lambda args: runner.run_demo(
        weights=args.weights, input_path=args.input, output=args.output, seconds=args.seconds, device=args.device,
        preset=args.preset, seed=args.seed, greedy=args.greedy, progress=runner.show_progress))
    return parser


def _validate_demo_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.weights is not None and args.preset is not None:
        parser.error("--preset applies to random weights only; a checkpoint brings its own configuration")
    if args.input is not None and args.seconds is not None:
        parser.error("--seconds sets the length of the generated signal; it cannot be used with --input")
    if not args.output.parent.is_dir():
        parser.error(f"output directory does not exist: {args.output.parent}")
    args.device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.weights is None and args.preset is None:
        args.preset = "tiny" if args.device.type == "cpu" else "moshiko"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate_demo_args(parser, args)
    try:
        return args.handler(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"moshi-fast: error: {e}", file=sys.stderr)
        return 2
