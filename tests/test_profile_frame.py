"""bench/profile_frame.py's bookkeeping on synthetic kernel traces (its profiling itself needs a GPU): frames cut
from the trace, kernel names shortened, every kernel of a frame given its phase, spans, gaps and end steps."""
import pytest

from bench.profile_frame import _kernel_rows, _phases, _short_name, _split_frames

# One frame of a tiny LM (2 Helium layers, 2 codebooks) between a codec encode and decode, in launch order.
HELIUM = ["embed_sum"] + ["linear", "paged_attention", "linear", "linear", "linear"] * 2
DEPTH = ["linear"] + ["embed_sum", "linear", "linear", "sample_tokens"] * 2
FRAME = ["conv", "conv"] + HELIUM + ["linear", "sample_tokens"] + DEPTH + ["rvq_decode", "conv"]


def trace(frames: int, names=FRAME, gap: float = 1.0, span: float = 2.0):
    events, t = [], 0.0
    for _ in range(frames):
        for name in names:
            events.append((name, t, t + span))
            t += span + gap
    return events


def test_split_frames_cuts_equal_runs_of_the_same_kernels():
    runs = _split_frames(trace(3), 3)
    assert len(runs) == 3 and all([e[0] for e in run] == FRAME for run in runs)
    with pytest.raises(RuntimeError, match="equal frames"):
        _split_frames(trace(3)[:-1], 3)
    different = trace(1) + trace(1, names=list(reversed(FRAME)))
    with pytest.raises(RuntimeError, match="different kernel sequences"):
        _split_frames(different, 2)


def test_short_names():
    assert _short_name("void moshi_fast::sampling_detail::sample_tokens_kernel<float, 256, 8>("
                       "moshi_fast::SampleTokensArgs)") == "moshi_fast::sampling_detail::sample_tokens_kernel"
    assert _short_name("_paged_attention_kernel") == "_paged_attention_kernel"


def test_phases_follow_the_frame_order():
    expected = (["mimi encode + LM inputs"] * 2 + ["helium"] * len(HELIUM) + ["text head + sample"] * 2
                + ["depth transformer"] * len(DEPTH) + ["LM outputs + mimi decode"] * 2)
    assert _phases(FRAME) == expected
    assert _phases(["conv", "linear"]) == ["frame", "frame"]


def test_end_steps_sum_to_the_frame_span_when_kernels_overlap():
    """Kernels that start before their predecessor ends (programmatic dependent launch): no gap, spans longer than
    their own work, and end steps that sum to the first start to last end."""
    names = ["a", "b", "c"]
    frame = [("a", 0.0, 3.0), ("b", 1.0, 4.5), ("c", 2.0, 8.0)]
    runs = [frame, [(n, s + 10.0, e + 10.0) for n, s, e in frame]]
    rows = _kernel_rows(runs, names, ["frame"] * 3)
    assert [r["us"] for r in rows] == [3.0, 3.5, 6.0]
    assert [r["gap_before_us"] for r in rows] == [0.0, 0.0, 0.0]
    assert [r["end_step_us"] for r in rows] == [3.0, 1.5, 3.5]
    assert sum(r["end_step_us"] for r in rows) == frame[-1][2] - frame[0][1]
