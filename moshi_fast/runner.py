"""Streams a whole mono signal through a `FastMoshi` frame by frame, timing every step: the `demo` and
`run` commands, and the timestamped transcript of a run."""
from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import audio
from .config import PRESETS, MoshiConfig
from .engine import BACKENDS, FastMoshi
from .weights import find_moshi_checkpoint

DEFAULT_SECONDS = 4.0


@dataclass
class RunResult:
    """What one conversation produced, frame by frame (n frames of `frame_size` samples)."""

    pcm: np.ndarray
    """float32 [n * frame_size], Moshi's audio at `sample_rate` (the first frame is silence)."""
    text_tokens: np.ndarray
    """int64 [n], the text token of each frame (-1 on the first frame)."""
    pieces: list[str] | None
    """n text pieces ("" for padding and no token); None when the engine has no tokenizer."""
    frame_ms: np.ndarray
    """float64 [n], wall time of each `engine.step` call in milliseconds."""
    sample_rate: int
    frame_size: int

    def timing_summary(self) -> dict:
        """Step-time statistics in milliseconds and the real-time factor.

        The first frame is reported alone as `first_ms` and left out of p50/p90/p99/mean/max, since
        it pays one-off warm-up costs (allocator, kernel selection); with a single frame, that frame
        is used. `real_time_factor` is audio seconds / wall seconds over all frames, warm-up included;
        above 1 is faster than real time. `budget_ms` is the audio duration of one frame.
        """
        frame_count = len(self.frame_ms)
        if frame_count == 0:
            raise ValueError("no frames were run")
        steady = self.frame_ms[1:] if frame_count > 1 else self.frame_ms
        total_s = float(self.frame_ms.sum()) / 1000
        audio_s = frame_count * self.frame_size / self.sample_rate
        return {
            "frames": frame_count,
            "warmup_frames": frame_count - len(steady),
            "first_ms": float(self.frame_ms[0]),
            "p50_ms": float(np.percentile(steady, 50)),
            "p90_ms": float(np.percentile(steady, 90)),
            "p99_ms": float(np.percentile(steady, 99)),
            "mean_ms": float(steady.mean()),
            "max_ms": float(steady.max()),
            "budget_ms": 1000 * self.frame_size / self.sample_rate,
            "audio_s": audio_s,
            "total_s": total_s,
            "real_time_factor": audio_s / total_s if total_s > 0 else float("inf"),
        }


def format_timing(summary: dict) -> str:
    """A few human-readable lines from `RunResult.timing_summary()`."""
    if summary["warmup_frames"]:
        frames_line = (f"frames: {summary['frames']} (the first, {summary['first_ms']:.1f} ms, "
                       f"is warm-up and left out of the step times)")
    else:
        frames_line = f"frames: {summary['frames']}"
    return "\n".join([
        frames_line,
        f"step time: p50 {summary['p50_ms']:.1f} ms, p90 {summary['p90_ms']:.1f} ms, "
        f"p99 {summary['p99_ms']:.1f} ms, mean {summary['mean_ms']:.1f} ms, max {summary['max_ms']:.1f} ms "
        f"(real time allows {summary['budget_ms']:.0f} ms)",
        f"real-time factor: {summary['real_time_factor']:.2f}x "
        f"({summary['audio_s']:.2f} s of audio in {summary['total_s']:.2f} s)",
    ])


def run_stream(engine, pcm: np.ndarray, progress: Callable[[int, int], None] | None = None) -> RunResult:
    """Feeds pcm [T] (float, at engine.sample_rate) to slot 0 of a max_batch=1 `FastMoshi`, one frame
    per `engine.step`, zero-padding the tail to a whole frame. Calls progress(frames_done, frames_total)
    after every step. The engine's streaming state carries on from wherever it was."""
    if engine.max_batch != 1:
        raise ValueError(f"run_stream drives a single conversation; the engine has "
                         f"max_batch={engine.max_batch}")
    chunks = audio.frames(np.asarray(pcm, dtype=np.float32), engine.frame_size)
    if len(chunks) == 0:
        raise ValueError("the input signal is empty")
    on_cuda = engine.device.type == "cuda"
    out_pcm, text_tokens, pieces, frame_ms = [], [], [], []
    for index, chunk in enumerate(chunks):
        if on_cuda:
            torch.cuda.synchronize(engine.device)
        start = time.perf_counter()
        out = engine.step(chunk[None])
        if on_cuda:
            torch.cuda.synchronize(engine.device)
        frame_ms.append(1000 * (time.perf_counter() - start))
        out_pcm.append(out.pcm[0].numpy())
        text_tokens.append(int(out.text_tokens[0]))
        if out.text is not None:
            pieces.append(out.text[0])
        if progress is not None:
            progress(index + 1, len(chunks))
    return RunResult(
        pcm=np.concatenate(out_pcm).astype(np.float32, copy=False),
        text_tokens=np.asarray(text_tokens, dtype=np.int64),
        pieces=pieces or None,
        frame_ms=np.asarray(frame_ms, dtype=np.float64),
        sample_rate=engine.sample_rate,
        frame_size=engine.frame_size,
    )


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress_bar(done: int, total: int, width: int = 30) -> None:
    """A `progress(done, total)` callback: a frame progress bar on stderr, redrawn in place on a
    terminal; in a log, one line per tenth of the run."""
    filled = width * done // total
    line = f"streaming [{'#' * filled}{'.' * (width - filled)}] {done}/{total} frames"
    if sys.stderr.isatty():
        print(f"\r{line}", end="\n" if done == total else "", file=sys.stderr, flush=True)
    elif done == total or done * 10 // total != (done - 1) * 10 // total:
        print(line, file=sys.stderr, flush=True)


def default_backend(device: torch.device) -> str:
    """The backend to use on `device`: on CUDA the first non-reference backend this build has, else the
    reference backend."""
    if device.type == "cuda":
        return next((backend for backend in BACKENDS if backend != "reference"), "reference")
    return "reference"


@dataclass(frozen=True)
class EngineSpec:
    """How to build a `FastMoshi`: a checkpoint directory, or random weights at a preset."""

    weights: Path | None
    device: torch.device
    preset: str | None = None
    backend: str = "reference"
    seed: int = 0
    greedy: bool = False
    kv_cache: str | None = None
    """None: Helium's KV cache in the LM's dtype; a name of engine.KV_CACHE_DTYPES ("fp8")."""

    def __post_init__(self):
        if (self.weights is None) == (self.preset is None):
            raise ValueError("give either a checkpoint directory or a preset for random weights")

    @property
    def config(self) -> MoshiConfig:
        if self.weights is not None:
            return find_moshi_checkpoint(self.weights).config
        return PRESETS[self.preset]()

    def describe(self) -> str:
        model = str(self.weights) if self.weights is not None else f"random weights, {self.preset} preset"
        decoding = "greedy" if self.greedy else f"sampling, seed {self.seed}"
        cache = f", {self.kv_cache} KV cache" if self.kv_cache else ""
        return f"{model} on {self.device}, {self.backend} backend ({decoding}{cache})"

    def build(self, max_batch: int = 1, quiet: bool = False, batch_buckets: list[int] | None = None) -> FastMoshi:
        """The engine, serving `max_batch` conversations (batch_buckets: see FastMoshi); reports loading on
        stderr unless quiet."""
        sampling = {"seed": self.seed, "batch_buckets": batch_buckets, "kv_dtype": self.kv_cache}
        if self.greedy:
            sampling["use_sampling"] = False
        start = time.perf_counter()
        if self.weights is not None:
            if not quiet:
                _status(f"loading {self.weights} on {self.device} (a 7B model takes a while) ...")
            engine = FastMoshi.from_pretrained(self.weights, device=self.device, backend=self.backend,
                                               max_batch=max_batch, progress=not quiet, **sampling)
        else:
            if not quiet:
                _status(f"building the {self.preset} model with random weights on {self.device} ...")
            engine = FastMoshi.random(PRESETS[self.preset](), device=self.device, backend=self.backend,
                                      max_batch=max_batch, weights_seed=self.seed, **sampling)
        if not quiet:
            _status(f"model ready in {time.perf_counter() - start:.1f} s")
        return engine


def run_demo(spec: EngineSpec, input_path: Path | None, output: Path, seconds: float | None) -> int:
    """The `moshi-fast demo` command: streams a signal through Moshi, writes Moshi's audio to
    `output`, prints the text tokens and step timings."""
    # The input is read before the (possibly long) model load so that a bad file fails at once.
    sample_rate = spec.config.mimi.sample_rate
    if input_path is not None:
        pcm = audio.read_audio(input_path, sample_rate)
        source = str(input_path)
    else:
        seconds = seconds or DEFAULT_SECONDS
        pcm = audio.test_signal(seconds, sample_rate, seed=spec.seed)
        source = f"generated test signal ({seconds:g} s)"

    engine = spec.build()
    result = run_stream(engine, pcm, progress=progress_bar)
    audio.write_wav(output, result.pcm, result.sample_rate)

    print(f"model: {spec.describe()}")
    print(f"input: {source}")
    print(f"output: {output} ({len(result.pcm) / result.sample_rate:.2f} s at {result.sample_rate} Hz)")
    print(textwrap.fill(" ".join(str(token) for token in result.text_tokens), width=100,
                        initial_indent="text tokens: ", subsequent_indent="  "))
    if result.pieces is not None:
        text = "".join(result.pieces).strip()
        print(f"text: {text}" if text else "text: (none, only padding)")
    print(format_timing(result.timing_summary()))
    if spec.weights is None:
        print("note: the weights are random, so the output audio is noise and the text tokens are\n"
              "      meaningless; pass --weights DIR to run a real checkpoint.")
    return 0


def transcript_lines(text_tokens: np.ndarray, pieces: list[str] | None, frame_s: float,
                     padding_ids: tuple[int, ...], pause_s: float = 1.0,
                     max_chars: int = 80) -> list[tuple[float, str]]:
    """Groups the text of a run into timestamped lines: [(seconds, text)], the time being the start of
    the output frame that carried the line's first piece.

    text_tokens [n] and pieces (n strings, "" for padding; None without a tokenizer, when the token ids
    themselves are written, padding ids and -1 left out). A line ends at a sentence end (. ! ?), before
    a pause of at least `pause_s` without text, or at a word boundary once it reaches `max_chars`.
    """
    if pieces is None:
        skipped = set(padding_ids)
        pieces = [f" {token}" if token >= 0 and token not in skipped else ""
                  for token in map(int, text_tokens)]
    lines: list[tuple[float, str]] = []
    start, text, last_frame = 0.0, "", 0
    pause_frames = max(1, round(pause_s / frame_s))
    for frame, piece in enumerate(pieces):
        if not piece:
            continue
        starts_word = piece.startswith(" ")
        too_long = starts_word and len(text) + len(piece) > max_chars
        if text and (frame - last_frame >= pause_frames or too_long):
            lines.append((start, text.strip()))
            text = ""
        if not text:
            start = frame * frame_s
        text += piece
        last_frame = frame
        if text.rstrip().endswith((".", "!", "?")):
            lines.append((start, text.strip()))
            text = ""
    if text.strip():
        lines.append((start, text.strip()))
    return [(seconds, line) for seconds, line in lines if line]


def format_transcript(lines: list[tuple[float, str]]) -> str:
    """One `[12.40s] text` line per transcript line."""
    return "".join(f"[{seconds:.2f}s] {text}\n" for seconds, text in lines)


def run_file(spec: EngineSpec, input_path: Path, output: Path, transcript_path: Path | None = None) -> int:
    """The `moshi-fast run` command: streams an audio file (any rate and channel count, resampled to the
    model's rate, mixed to mono) through Moshi frame by frame, writes Moshi's audio to `output`, prints
    the timestamped transcript (also written to `transcript_path` if given) and the real-time factor."""
    config = spec.config
    pcm = audio.read_audio(input_path, config.mimi.sample_rate)
    if pcm.size == 0:
        raise ValueError(f"{input_path} holds no audio")
    engine = spec.build()
    result = run_stream(engine, pcm, progress=progress_bar)
    audio.write_wav(output, result.pcm, result.sample_rate)

    lines = transcript_lines(result.text_tokens, result.pieces, result.frame_size / result.sample_rate,
                             (config.lm.text_padding_id, config.lm.text_end_padding_id))
    transcript = format_transcript(lines)
    if transcript_path is not None:
        transcript_path.write_text(transcript, encoding="utf-8")
    print(f"model: {spec.describe()}")
    print(f"input: {input_path} ({len(pcm) / config.mimi.sample_rate:.2f} s)")
    print(f"output: {output}")
    if result.pieces is None:
        print("transcript (text token ids: this model has no tokenizer):")
    else:
        print("transcript:")
    print(transcript if transcript else "(no text)\n", end="")
    if transcript_path is not None:
        print(f"transcript written to {transcript_path}")
    print(format_timing(result.timing_summary()))
    return 0
