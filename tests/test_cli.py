"""The audio helpers, the streaming runner, and the `moshi-fast` commands (demo, run, bench, and the
options of serve and loadtest) on the tiny CPU model."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from moshi_fast import FastMoshi, audio, cli, runner, tiny

FRAME = 1920
RATE = 24000


def _tone(seconds: float, rate: int, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_read_audio_downmixes_and_resamples_48k_stereo(tmp_path):
    path = tmp_path / "stereo48k.wav"
    tone48 = _tone(1.0, 48000)
    soundfile.write(path, np.stack([tone48, 0.5 * tone48], axis=1), 48000, subtype="PCM_16")

    pcm = audio.read_audio(path, sample_rate=RATE)

    assert pcm.dtype == np.float32 and pcm.shape == (RATE,)
    expected = 0.75 * _tone(1.0, RATE)
    assert np.corrcoef(pcm, expected)[0, 1] > 0.99
    assert np.std(pcm) == pytest.approx(np.std(expected), rel=0.02)


def test_write_wav_round_trip_is_16_bit_and_clips(tmp_path):
    path = tmp_path / "mono.wav"
    pcm = np.array([0.0, 0.25, -0.5, 1.5, -2.0], dtype=np.float32)

    audio.write_wav(path, pcm, sample_rate=RATE)

    info = soundfile.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (RATE, 1, "PCM_16")
    np.testing.assert_allclose(audio.read_audio(path, RATE), [0.0, 0.25, -0.5, 1.0, -1.0], atol=1 / 32768)


def test_read_audio_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        audio.read_audio(tmp_path / "missing.wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"definitely not audio" * 10)
    with pytest.raises(ValueError, match="garbage.wav"):
        audio.read_audio(garbage)


def test_test_signal_is_deterministic_and_non_trivial():
    first = audio.test_signal(0.5, RATE, seed=3)

    assert first.dtype == np.float32 and first.shape == (12000,)
    np.testing.assert_array_equal(first, audio.test_signal(0.5, RATE, seed=3))
    assert not np.array_equal(first, audio.test_signal(0.5, RATE, seed=4))
    assert np.abs(first).max() == pytest.approx(0.5, abs=1e-6)
    assert np.std(first) > 0.1
    # The envelope never closes: every 10 ms window carries signal.
    assert np.abs(first[: 12000 // 240 * 240].reshape(-1, 240)).max(axis=1).min() > 0.05


def test_frames_zero_pads_the_tail():
    padded = audio.frames(np.arange(1, 6, dtype=np.float32), 2)
    np.testing.assert_array_equal(padded, [[1, 2], [3, 4], [5, 0]])
    assert audio.frames(np.ones(6, dtype=np.float32), 3).shape == (2, 3)
    assert audio.frames(np.ones(0, dtype=np.float32), 3).shape == (0, 3)


def test_timing_summary_leaves_out_the_first_frame():
    result = runner.RunResult(pcm=np.zeros(4 * FRAME, np.float32), text_tokens=np.full(4, -1), pieces=None,
                              frame_ms=np.array([100.0, 10.0, 20.0, 30.0]), sample_rate=RATE,
                              frame_size=FRAME)

    summary = result.timing_summary()

    assert summary["frames"] == 4 and summary["warmup_frames"] == 1
    assert summary["first_ms"] == 100.0
    assert (summary["p50_ms"], summary["mean_ms"], summary["max_ms"]) == (20.0, 20.0, 30.0)
    assert summary["budget_ms"] == pytest.approx(80.0)
    assert summary["real_time_factor"] == pytest.approx(0.32 / 0.16)
    text = runner.format_timing(summary)
    assert "p50 20.0 ms" in text and "2.00x" in text


def test_run_stream_is_reproducible_and_reports_progress():
    signal = audio.test_signal(0.4, RATE)
    calls = []

    def greedy_run(progress=None):
        engine = FastMoshi.random(tiny(), device="cpu", seed=0, use_sampling=False)
        return runner.run_stream(engine, signal, progress=progress)

    first = greedy_run(progress=lambda done, total: calls.append((done, total)))
    second = greedy_run()

    assert calls == [(i, 5) for i in range(1, 6)]
    assert first.pcm.shape == (5 * FRAME,) and first.frame_ms.shape == (5,)
    assert first.text_tokens[0] == -1 and (first.text_tokens[1:] >= 0).all()
    assert first.pieces is None
    np.testing.assert_array_equal(first.text_tokens, second.text_tokens)
    np.testing.assert_array_equal(first.pcm, second.pcm)
    assert (first.frame_ms > 0).all()


def _printed_tokens(stdout: str) -> list[int]:
    block = stdout.split("text tokens:", 1)[1].split("frames:", 1)[0]
    return [int(token) for token in block.split()]


def test_demo_runs_end_to_end_on_the_tiny_preset(tmp_path, capsys):
    output = tmp_path / "reply.wav"

    code = cli.main(["demo", "--seconds", "1", "--device", "cpu", "--preset", "tiny",
                     "--output", str(output)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    pcm, rate = soundfile.read(output, dtype="float32")
    frames = -(-RATE // FRAME)
    assert rate == RATE and pcm.shape == (frames * FRAME,)
    assert not pcm[:FRAME].any() and np.abs(pcm[FRAME:]).max() > 0.01
    tokens = _printed_tokens(captured.out)
    assert len(tokens) == frames and tokens[0] == -1
    assert "noise" in captured.out and "meaningless" in captured.out
    assert f"frames: {frames}" in captured.out and "real-time factor" in captured.out
    assert "random weights" in captured.err


def test_demo_streams_an_input_file_resampled_to_24k(tmp_path, capsys):
    source, output = tmp_path / "voice16k.wav", tmp_path / "reply.wav"
    audio.write_wav(source, audio.test_signal(0.5, 16000), sample_rate=16000)

    code = cli.main(["demo", "--input", str(source), "--output", str(output), "--device", "cpu", "--greedy"])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    frames = -(-12000 // FRAME)
    assert soundfile.info(output).frames == frames * FRAME
    assert len(_printed_tokens(captured.out)) == frames
    assert str(source) in captured.out and "greedy" in captured.out


def test_demo_with_the_fp8_kv_cache(tmp_path, capsys, monkeypatch):
    built = []
    original = runner.EngineSpec.build
    monkeypatch.setattr(runner.EngineSpec, "build", lambda self, *a, **k: built.append(original(self, *a, **k))
                        or built[-1])
    code = cli.main(["demo", "--seconds", "0.5", "--device", "cpu", "--kv-cache", "fp8",
                     "--output", str(tmp_path / "reply.wav")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "fp8 KV cache" in captured.out + captured.err
    assert built[0].kv_dtype == torch.float8_e4m3fn


def test_demo_missing_input_fails_with_the_file_name(tmp_path, capsys):
    missing, output = tmp_path / "nowhere.wav", tmp_path / "reply.wav"

    code = cli.main(["demo", "--input", str(missing), "--output", str(output), "--device", "cpu"])

    assert code != 0
    assert "nowhere.wav" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("arguments", [["--weights", ".", "--preset", "tiny"],
                                       ["--input", "x.wav", "--seconds", "1"],
                                       ["--seconds", "0"], ["--preset", "huge"]])
def test_demo_rejects_conflicting_or_invalid_options(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *arguments])
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    completed = subprocess.run([sys.executable, "-m", "moshi_fast", "demo", "--help"],
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert "--weights" in completed.stdout and "--greedy" in completed.stdout


TRANSCRIPT_LINE = re.compile(r"^\[\d+\.\d\ds\] \S.*$")


def test_run_streams_a_stereo_44k_file_and_reports_transcript_and_speed(tmp_path, capsys):
    source, output, transcript = tmp_path / "voice.wav", tmp_path / "reply.wav", tmp_path / "reply.txt"
    voice = audio.test_signal(1.5, 44100)
    soundfile.write(source, np.stack([voice, 0.5 * voice], axis=1), 44100, subtype="PCM_16")

    code = cli.main(["run", str(source), "-o", str(output), "--transcript", str(transcript),
                     "--device", "cpu", "--greedy"])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    frames = -(-round(1.5 * RATE) // FRAME)
    info = soundfile.info(output)
    assert (info.samplerate, info.channels, info.frames) == (RATE, 1, frames * FRAME)
    lines = transcript.read_text().splitlines()
    assert lines and all(TRANSCRIPT_LINE.match(line) for line in lines)
    assert lines[0].startswith("[0.08s] "), "the first frame carries no token"
    assert "\n".join(lines) in captured.out and "real-time factor" in captured.out
    assert "streaming" in captured.err and f"{frames}/{frames}" in captured.err


def test_run_with_a_checkpoint_transcribes_its_text_pieces(kyutai_moshi, tmp_path, capsys):
    _, checkpoint = kyutai_moshi
    source, transcript = tmp_path / "voice.wav", tmp_path / "reply.txt"
    audio.write_wav(source, audio.test_signal(1.0, RATE), RATE)

    code = cli.main(["run", str(source), "-o", str(tmp_path / "reply.wav"), "--weights", str(checkpoint),
                     "--device", "cpu", "--transcript", str(transcript)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = transcript.read_text().splitlines()
    assert lines and all(TRANSCRIPT_LINE.match(line) for line in lines)
    # The test tokenizer's pieces are pseudo-words: text, not token ids.
    assert re.search(r"[a-z]{2,}", lines[0]) and not re.search(r"\d{2,}", lines[0].split("] ", 1)[1])
    assert "real-time factor" in captured.out


def test_run_missing_input_fails_with_the_file_name(tmp_path, capsys):
    code = cli.main(["run", str(tmp_path / "nowhere.flac"), "-o", str(tmp_path / "out.wav"),
                     "--device", "cpu"])

    assert code == 2
    assert "nowhere.flac" in capsys.readouterr().err
    assert not (tmp_path / "out.wav").exists()


def test_transcript_lines_break_at_sentences_pauses_and_width():
    pieces = ["", " Hello", " there", ".", "", " How", "", "", "", "", "", "", "", "", "", "", "", " are",
              " you", "?"] + [" word"] * 20
    tokens = np.arange(len(pieces))

    lines = runner.transcript_lines(tokens, pieces, frame_s=0.08, padding_ids=(0, 3), pause_s=0.8,
                                    max_chars=30)

    assert lines[:3] == [(0.08, "Hello there."), (0.4, "How"), pytest.approx((1.36, "are you?"))]
    assert all(len(text) <= 30 for _, text in lines[3:])
    assert " ".join(text for _, text in lines[3:]) == " ".join(["word"] * 20)
    assert runner.format_transcript(lines[:1]) == "[0.08s] Hello there.\n"


def test_transcript_without_a_tokenizer_lists_token_ids_and_skips_padding():
    tokens = np.array([-1, 17, 3, 0, 42, 3, 3, 3, 3, 3, 99])

    lines = runner.transcript_lines(tokens, None, frame_s=0.08, padding_ids=(3, 0), pause_s=0.4)

    assert lines == [(0.08, "17 42"), pytest.approx((0.8, "99"))]


def test_bench_writes_the_table_json_and_plots(tmp_path, capsys):
    code = cli.main(["bench", "--device", "cpu", "--batch-sizes", "1,2", "--frames", "4", "--warmup", "1",
                     "--output-dir", str(tmp_path)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads((tmp_path / "bench.json").read_text())
    assert [r["batch"] for r in record["results"]] == [1, 2]
    assert all(len(r["frame_ms"]) == 4 and 0 < r["p50_ms"] <= r["p99_ms"] for r in record["results"])
    assert record["budget_ms"] == pytest.approx(80.0) and record["backend"] == "reference"
    assert {"device_name", "torch", "git_sha"} <= record["environment"].keys()
    assert record["config"]["lm"]["dim"] == tiny().lm.dim
    for name in ("latency_histogram.png", "frame_time_vs_batch.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p99 ms" in captured.out and "margin" in captured.out


def test_the_backend_defaults_to_a_fast_one_on_cuda_only(monkeypatch):
    monkeypatch.setattr(runner, "BACKENDS", ("reference", "fast"))
    assert runner.default_backend(torch.device("cuda")) == "fast"
    assert runner.default_backend(torch.device("cpu")) == "reference"
    monkeypatch.setattr(runner, "BACKENDS", ("reference",))
    assert runner.default_backend(torch.device("cuda")) == "reference"


@pytest.mark.parametrize("arguments", [["run", "in.wav"], ["run", "in.wav", "-o", "no/such/dir/out.wav"],
                                       ["bench", "--batch-sizes", "1,x"], ["bench", "--frames", "0"],
                                       ["serve", "--port", "70000"], ["serve", "--max-conversations", "0"],
                                       ["loadtest", "--clients", "0"], ["serve", "--batch-buckets", "0,2"], ["serve", "--opus-processes", "-1"],
                                       ["serve", "--input-backlog", "0"], ["loadtest", "--drain", "-1"],
                                       ["demo", "--kv-cache", "int4"],
                                       ["serve", "--preset", "tiny", "--device", "cpu", "--max-conversations", "2",
                                        "--batch-buckets", "3"],
                                       ["serve", "--weights", ".", "--preset", "tiny"]])
def test_commands_reject_invalid_options(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(arguments)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
