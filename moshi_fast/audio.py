"""Audio file helpers for the demo and tests: read any libsndfile format as mono float32 at a target
rate, write 16-bit WAV, generate a deterministic speech-like test signal, and cut a signal into frames.

Signals are 1-D float32 numpy arrays [T] of samples in [-1, 1].
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile
import soxr


def read_audio(path: str | os.PathLike, sample_rate: int = 24000) -> np.ndarray:
    """Reads an audio file (any format libsndfile reads: WAV, FLAC, OGG, MP3, ...) as mono.

    Channels are averaged; the signal is resampled with soxr when the file's rate is not `sample_rate`.
    Returns float32 [T] at `sample_rate`, T = round(frames_in_file * sample_rate / file_rate).
    Raises FileNotFoundError for a missing file and ValueError for one libsndfile cannot decode.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not an audio file: {path}")
    try:
        data, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as e:
        raise ValueError(f"cannot read {path} as audio: {e}") from None
    mono = data.mean(axis=1, dtype=np.float32)
    if file_rate != sample_rate and mono.size:
        mono = soxr.resample(mono, file_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def write_wav(path: str | os.PathLike, pcm: np.ndarray, sample_rate: int = 24000) -> None:
    """Writes mono float samples pcm [T] as a 16-bit PCM WAV file, clipping them to [-1, 1]."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise ValueError(f"pcm must be a mono signal of shape [T], got shape {list(pcm.shape)}")
    if not np.issubdtype(pcm.dtype, np.floating):
        raise ValueError(f"pcm must be floating point, got dtype {pcm.dtype}")
    clipped = np.clip(pcm.astype(np.float32), -1.0, 1.0)
    soundfile.write(Path(path), clipped, sample_rate, subtype="PCM_16", format="WAV")


def test_signal(seconds: float, sample_rate: int = 24000, seed: int = 0) -> np.ndarray:
    """A deterministic, voice-like test signal: float32 [round(seconds * sample_rate)], peak 0.5.

    Four harmonics of a fundamental gliding from 120 to 220 Hz, under a syllable-rate (3 Hz)
    amplitude envelope that never reaches zero, plus a little white noise drawn from `seed`.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    num_samples = int(round(seconds * sample_rate))
    if num_samples == 0:
        raise ValueError(f"{seconds} s at {sample_rate} Hz is less than one sample")
    t = np.arange(num_samples) / sample_rate
    fundamental = 120.0 + 100.0 * t / seconds
    # The phase integrates the instantaneous frequency, so the glide has no discontinuities.
    phase = 2 * np.pi * np.cumsum(fundamental) / sample_rate
    tones = sum(np.sin(k * phase) / k for k in range(1, 5))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t)
    noise = np.random.default_rng(seed).standard_normal(num_samples)
    signal = tones * envelope + 0.02 * noise
    return (0.5 * signal / np.abs(signal).max()).astype(np.float32)


def frames(pcm: np.ndarray, frame_size: int) -> np.ndarray:
    """Cuts pcm [T] into [ceil(T / frame_size), frame_size], zero-padding the last frame."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise ValueError(f"pcm must be a mono signal of shape [T], got shape {list(pcm.shape)}")
    if frame_size <= 0:
        raise ValueError(f"frame_size must be positive, got {frame_size}")
    num_frames = -(-pcm.shape[0] // frame_size)
    padded = np.zeros(num_frames * frame_size, dtype=pcm.dtype)
    padded[:pcm.shape[0]] = pcm
    return padded.reshape(num_frames, frame_size)
