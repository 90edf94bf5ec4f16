"""The `moshi-fast` command line (also `python -m moshi_fast`).

    moshi-fast demo                                  # random tiny (CPU) or moshiko-sized (CUDA) model
    moshi-fast run in.wav -o out.wav --weights DIR   # an audio file through Moshi, with a transcript
    moshi-fast bench                                 # frame latency vs batch: table, JSON, plots
    moshi-fast serve --max-conversations 8           # Kyutai's websocket protocol at /api/chat
    moshi-fast loadtest --clients 16                 # concurrent clients against a running server

Without --weights the model has random weights. This module only parses arguments; the work is in
runner, benchmark, server and loadtest.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from . import runner
from .config import PRESETS
from .engine import BACKENDS, KV_CACHE_DTYPES


def _device(value: str) -> torch.device:
    try:
        device = torch.device(value)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"invalid device {value!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r} requested but CUDA is not available")
    return device


def _number(kind: type, valid, requirement: str):
    """An argparse type: `kind(value)` that must satisfy `valid`, else a message with `requirement`."""
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {value!r}") from None
        if not valid(number):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return number
    return parse


_positive_seconds = _number(float, lambda x: x > 0, "positive")
_non_negative_seconds = _number(float, lambda x: x >= 0, "at least 0")
_positive_int = _number(int, lambda x: x >= 1, "at least 1")
_non_negative_int = _number(int, lambda x: x >= 0, "at least 0")
_port = _number(int, lambda x: 0 <= x <= 65535, "in [0, 65535] (0 picks a free port)")


def _batch_sizes(value: str) -> list[int]:
    try:
        sizes = [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {value}")
    return sizes


def _engine_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("model")
    group.add_argument("--weights", metavar="DIR", type=Path,
                       help="Kyutai or transformers Moshi checkpoint directory (default: random weights)")
    group.add_argument("--device", type=_device, default=None,
                       help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help="model size for random weights (default: tiny on the CPU, moshiko on CUDA)")
    group.add_argument("--backend", choices=BACKENDS,
                       help="engine backend (default: the fastest this build has for the device)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed for sampling and random weights (default: 0)")
    group.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    group.add_argument("--kv-cache", choices=sorted(KV_CACHE_DTYPES),
                       help="store the LM's keys and values in 8 bits: half the memory per conversation, "
                            "e4m3 rounding (default: the LM's dtype)")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moshi-fast", description="Fast inference for Kyutai's Moshi.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    engine = _engine_options()

    demo = commands.add_parser(
        "demo", parents=[engine], help="stream audio through Moshi and write its reply to a WAV file",
        description="Streams a signal through Moshi in 80 ms frames, writes Moshi's audio, and prints "
                    "its text tokens and step timings. Without --weights the model has random weights.")
    demo.add_argument("--input", metavar="WAV", type=Path,
                      help="audio file to stream as the user's voice (default: a generated test signal)")
    demo.add_argument("--output", metavar="WAV", type=Path, default=Path("moshi_demo_out.wav"),
                      help="where to write Moshi's audio (default: %(default)s)")
    demo.add_argument("--seconds", metavar="S", type=_positive_seconds,
                      help=f"length of the generated test signal (default: {runner.DEFAULT_SECONDS})")
    demo.set_defaults(handler=lambda args: runner.run_demo(args.spec, args.input, args.output, args.seconds))

    run = commands.add_parser(
        "run", parents=[engine], help="stream an audio file through Moshi: reply audio and transcript",
        description="Streams an audio file (any format libsndfile reads, any sample rate and channel "
                    "count: it is mixed to mono and resampled to 24 kHz) through Moshi frame by frame, "
                    "writes Moshi's audio, prints the timestamped transcript and the real-time factor.")
    run.add_argument("input", metavar="IN", type=Path, help="the user's audio")
    run.add_argument("-o", "--output", metavar="OUT.wav", type=Path, required=True,
                     help="where to write Moshi's audio (24 kHz, 16-bit WAV)")
    run.add_argument("--transcript", metavar="FILE", type=Path,
                     help="also write the transcript there, one '[12.40s] text' line per phrase")
    run.set_defaults(handler=lambda args: runner.run_file(args.spec, args.input, args.output,
                                                          args.transcript))

    bench = commands.add_parser(
        "bench", parents=[engine], help="frame latency vs batch size: table, JSON and PNG plots",
        description="Times FastMoshi.step for an engine built at each batch size, prints a table and "
                    "writes bench.json, latency_histogram.png and frame_time_vs_batch.png.")
    bench.add_argument("--batch-sizes", metavar="N,N,...", type=_batch_sizes,
                       help="batch sizes to time (default: 1,2,4,8 on the CPU, 1,8,32,64 on CUDA)")
    bench.add_argument("--frames", metavar="N", type=_positive_int, default=50,
                       help="timed frames per batch size (default: %(default)s)")
    bench.add_argument("--warmup", metavar="N", type=int, default=3,
                       help="untimed frames before them (default: %(default)s)")
    bench.add_argument("--output-dir", metavar="DIR", type=Path, default=Path("moshi_bench"),
                       help="where to write the JSON and the plots (default: %(default)s)")
    bench.set_defaults(handler=_bench)

    serve = commands.add_parser(
        "serve", parents=[engine], help="serve Kyutai's websocket protocol (its clients work unchanged)",
        description="Serves Moshi over Kyutai's websocket protocol at ws://HOST:PORT/api/chat, one engine "
                    "slot per connection, all conversations stepped together every 80 ms. Random weights "
                    "have no tokenizer, so they send audio but no text.")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    serve.add_argument("--port", type=_port, default=8998,
                       help="port (default: %(default)s; 0 picks a free one)")
    serve.add_argument("--max-conversations", metavar="N", type=_positive_int, default=8,
                       help="concurrent conversations; one more is refused (default: %(default)s)")
    serve.add_argument("--input-backlog", metavar="SECONDS", type=_positive_seconds, default=2.0,
                       help="decoded input audio kept per connection while the engine lags behind real time, "
                            "before the oldest is dropped (default: %(default)s)")
    serve.add_argument("--batch-buckets", metavar="N,N,...", type=_batch_sizes,
                       help="batch sizes a frame can run at, the smallest that holds the open conversations "
                            "(the fast engine captures a CUDA graph for each; default: the powers of two below "
                            "N, and N)")
    serve.add_argument("--opus-processes", metavar="N", type=_non_negative_int,
                       help="worker processes for the Opus coding (default: on a GPU one per 8 conversations, "
                            "leaving a core free; on the CPU 0, the server's own process)")
    serve.set_defaults(handler=_serve)

    load = commands.add_parser(
        "loadtest", help="concurrent real-time clients against a running server; server frame times as JSON",
        description="Starts N clients that each stream a test signal in real time over Kyutai's protocol, "
                    "then reports the frames they got back and the server's frame times (from /api/stats).")
    load.add_argument("--url", default="ws://127.0.0.1:8998/api/chat",
                      help="server URL (default: %(default)s)")
    load.add_argument("--clients", metavar="N", type=_positive_int, default=16,
                      help="concurrent clients (default: %(default)s)")
    load.add_argument("--seconds", metavar="S", type=_positive_seconds, default=10.0,
                      help="audio each client streams (default: %(default)s)")
    load.add_argument("--processes", metavar="N", type=_positive_int,
                      help="client worker processes (default: one per 16 clients, at most the CPU count)")
    load.add_argument("--drain", metavar="S", type=_non_negative_seconds, default=1.0,
                      help="how long each client waits after its last page for the rest of its audio "
                           "(default: %(default)s)")
    load.add_argument("--output", metavar="JSON", type=Path, help="where to write the full report")
    load.set_defaults(handler=_loadtest)
    return parser


# The server, load test and plots import aiohttp, sphn and matplotlib only when their command runs.
def _bench(args: argparse.Namespace) -> int:
    from . import benchmark

    batch_sizes = args.batch_sizes or benchmark.default_batch_sizes(args.spec.device)
    return benchmark.run_bench(args.spec, batch_sizes, args.frames, args.warmup, args.output_dir)


def _serve(args: argparse.Namespace) -> int:
    from . import server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = args.spec.build(max_batch=args.max_conversations, batch_buckets=args.batch_buckets)
    server.serve(engine, host=args.host, port=args.port, opus_processes=args.opus_processes,
                 input_backlog_s=args.input_backlog)
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    from . import loadtest

    processes = args.processes or max(1, min(os.cpu_count() or 1, -(-args.clients // 16)))
    return loadtest.run_load_test(args.url, args.clients, args.seconds, processes, args.output, args.drain)


def _resolve_engine_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks the model options and replaces them by one `runner.EngineSpec` in args.spec."""
    if args.weights is not None and args.preset is not None:
        parser.error("--preset applies to random weights only; a checkpoint brings its own configuration")
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset
    if args.weights is None and preset is None:
        preset = "tiny" if device.type == "cpu" else "moshiko"
    args.spec = runner.EngineSpec(weights=args.weights, device=device, preset=preset,
                                  backend=args.backend or runner.default_backend(device), seed=args.seed,
                                  greedy=args.greedy, kv_cache=args.kv_cache)


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command == "loadtest":
        return
    _resolve_engine_args(parser, args)
    if args.command == "demo":
        if args.input is not None and args.seconds is not None:
            parser.error("--seconds sets the length of the generated signal; it cannot be used with --input")
        if not args.output.parent.is_dir():
            parser.error(f"output directory does not exist: {args.output.parent}")
    elif args.command == "run":
        for path in (args.output, args.transcript):
            if path is not None and not path.parent.is_dir():
                parser.error(f"output directory does not exist: {path.parent}")
    elif args.command == "bench" and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    elif args.command == "serve" and args.batch_buckets and max(args.batch_buckets) > args.max_conversations:
        parser.error(f"--batch-buckets may not exceed --max-conversations ({args.max_conversations})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    try:
        return args.handler(args)
    except (OSError, ValueError) as e:
        print(f"moshi-fast: error: {e}", file=sys.stderr)
        return 2
