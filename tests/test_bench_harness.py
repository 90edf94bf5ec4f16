"""bench/_harness's variant options (the benchmarks' same-run comparisons): which runs each flag adds, and that each
run happens under its setting (the timing itself needs a GPU); bench_frame's per-frame records."""
import argparse
import json
import time

import pytest
import torch

from bench._harness import add_variant_options, kept_runs, strict_fp32, variant_runs
from moshi_fast import ops
from moshi_fast.fast import lm as fast_lm
from moshi_fast.kernels import _utils, conv1d_stream, conv_transpose1d_stream, tuned


def _settings(name, kv_dtype):
    return {"name": name, "kv_dtype": kv_dtype, "cuda_sampling": ops._cuda_sampling, "pdl": _utils._pdl_allowed,
            "cuda_depth_step": ops._cuda_depth_step, "separate_norms": ops._separate_norms,
            "helium_cuda_gemv": (12288, 4096, "plain") in ops.CUDA_GEMV_SHAPES,
            "fma_convs": conv1d_stream.FMA_MAX_COLUMNS > 0 and conv_transpose1d_stream.FMA_MAX_COLUMNS > 0,
            "depth_gemv_many_rows": bool(ops.CUDA_GEMV_MANY_ROWS_SHAPES),
            "depth_gemv_fused_norms": (3072, 1024, "rms") in ops.CUDA_GEMV_MANY_ROWS_SHAPES,
            "overlap_text_sampling": fast_lm._overlap_text_sampling,
            "text_sampler_warp_kernel": ops.TEXT_SAMPLER_WARP_KERNEL, "sampler_vector_loads": ops.SAMPLER_VECTOR_LOADS}


def _runs(argv):
    parser = argparse.ArgumentParser()
    add_variant_options(parser, "the fast step")
    return variant_runs(parser.parse_args(argv), _settings)


def test_no_flag_adds_no_run():
    assert _runs([]) == []


def test_each_flag_runs_its_variant_under_its_setting():
    runs = dict(_runs(["--without-pdl", "--helium-cuda-gemv", "--triton-sampling", "--cuda-depth-step",
                       "--fused-norms", "--conv-tensor-cores", "--depth-triton-linears", "--depth-gemv-fused-norms",
                       "--serial-text-sampling", "--text-sampler-block-kernel", "--sampler-scalar-loads",
                       "--kv-cache", "fp8"]))
    assert list(runs) == ["fast_no_pdl", "fast_helium_cuda_gemv", "fast_triton_sampling", "fast_fused_norms",
                          "fast_conv_tensor_cores", "fast_depth_triton_linears", "fast_depth_gemv_fused_norms",
                          "fast_serial_text_sampling", "fast_text_sampler_block_kernel", "fast_sampler_scalar_loads",
                          "fast_kv_fp8", "fast_cuda_depth_step"]
    defaults = {"cuda_sampling": ops._cuda_sampling, "pdl": _utils._pdl_allowed,
                "cuda_depth_step": ops._cuda_depth_step, "separate_norms": ops._separate_norms,
                "helium_cuda_gemv": False, "fma_convs": True, "depth_gemv_many_rows": True,
                "depth_gemv_fused_norms": False, "overlap_text_sampling": True, "text_sampler_warp_kernel": True,
                "sampler_vector_loads": True}
    assert runs["fast_no_pdl"]() == {"name": "fast_no_pdl", "kv_dtype": None, **defaults, "pdl": False}
    assert runs["fast_helium_cuda_gemv"]() == {"name": "fast_helium_cuda_gemv", "kv_dtype": None, **defaults,
                                               "helium_cuda_gemv": True}
    assert runs["fast_triton_sampling"]() == {"name": "fast_triton_sampling", "kv_dtype": None, **defaults,
                                              "cuda_sampling": False}
    assert runs["fast_cuda_depth_step"]() == {"name": "fast_cuda_depth_step", "kv_dtype": None, **defaults,
                                              "cuda_depth_step": True}
    assert runs["fast_fused_norms"]() == {"name": "fast_fused_norms", "kv_dtype": None, **defaults,
                                          "separate_norms": False}
    assert runs["fast_conv_tensor_cores"]() == {"name": "fast_conv_tensor_cores", "kv_dtype": None, **defaults,
                                                "fma_convs": False}
    assert runs["fast_depth_triton_linears"]() == {"name": "fast_depth_triton_linears", "kv_dtype": None, **defaults,
                                                   "depth_gemv_many_rows": False}
    assert runs["fast_depth_gemv_fused_norms"]() == {"name": "fast_depth_gemv_fused_norms", "kv_dtype": None,
                                                     **defaults, "depth_gemv_fused_norms": True}
    assert runs["fast_serial_text_sampling"]() == {"name": "fast_serial_text_sampling", "kv_dtype": None,
                                                   **defaults, "overlap_text_sampling": False}
    assert runs["fast_text_sampler_block_kernel"]() == {"name": "fast_text_sampler_block_kernel", "kv_dtype": None,
                                                        **defaults, "text_sampler_warp_kernel": False}
    assert runs["fast_sampler_scalar_loads"]() == {"name": "fast_sampler_scalar_loads", "kv_dtype": None, **defaults,
                                                   "sampler_vector_loads": False}
    assert runs["fast_kv_fp8"]() == {"name": "fast_kv_fp8", "kv_dtype": torch.float8_e4m3fn, **defaults}
    assert {key: value for key, value in _settings(None, None).items() if key in defaults} == defaults


def _parsed(argv):
    parser = argparse.ArgumentParser()
    add_variant_options(parser, "the fast step")
    return parser.parse_args(argv)


def test_compare_table_runs_the_engine_planned_from_that_table_with_the_kv_cache_asked_for(tmp_path):
    conv = tuned.shape_key(256, 512, 12, 6, 96)
    plans = {"conv1d": {conv: {"64": {"block_co": 32, "block_n": 16, "block_r": 16, "split": 4, "num_warps": 2,
                                      "num_stages": 2}}}}
    path = tmp_path / "before.json"
    path.write_text(json.dumps(plans))

    def run(name, kv_dtype):
        return name, kv_dtype, tuned.tuned_tiles("conv1d", conv, 64)

    runs = variant_runs(_parsed(["--kv-cache", "fp8", "--compare-table", str(path)]), run)
    assert [name for name, _ in runs] == ["fast_kv_fp8", "fast_compare_table"]
    file_plan = tuned.tuned_tiles("conv1d", conv, 64)
    assert file_plan != plans["conv1d"][conv]["64"]
    assert runs[0][1]() == ("fast_kv_fp8", torch.float8_e4m3fn, file_plan)
    assert runs[1][1]() == ("fast_compare_table", torch.float8_e4m3fn, plans["conv1d"][conv]["64"])
    assert tuned.tuned_tiles("conv1d", conv, 64) == file_plan
    assert _parsed(["--compare-table", str(path)]).compare_table.path == str(path)


@pytest.mark.parametrize("text, message", [("{", "cannot read a plan table"), ("[1, 2]", "is not a plan table"),
                                           ('{"conv1d": 3}', "is not a plan table")])
def test_compare_table_rejects_what_is_not_a_plan_table(tmp_path, capsys, text, message):
    path = tmp_path / "table.json"
    path.write_text(text)
    with pytest.raises(SystemExit):
        _parsed(["--compare-table", str(path)])
    assert message in capsys.readouterr().err


def test_skip_leaves_out_the_named_runs_and_keeps_the_variants():
    runs = [("kyutai", None), ("fast", None), ("fast_kv_fp8", None)]
    assert [name for name, _ in kept_runs(_parsed([]), runs)] == ["kyutai", "fast", "fast_kv_fp8"]
    assert [name for name, _ in kept_runs(_parsed(["--skip", "kyutai"]), runs)] == ["fast", "fast_kv_fp8"]
    assert [name for name, _ in kept_runs(_parsed(["--skip", "kyutai,fast"]), runs)] == ["fast_kv_fp8"]


def test_skip_rejects_a_run_it_does_not_know(capsys):
    with pytest.raises(SystemExit):
        _parsed(["--skip", "kyutai,fast_kv_fp8"])
    assert "--skip takes kyutai, fast; got fast_kv_fp8" in capsys.readouterr().err


def test_frame_stats_keep_every_frame_in_order():
    from bench.bench_frame import _stats

    stats = _stats([0.003, 0.001, 0.0025, 0.010])
    assert stats["frames_ms"] == [3.0, 1.0, 2.5, 10.0]
    assert stats["p50_ms"] == 3.0 and stats["p99_ms"] == 10.0 and stats["mean_ms"] == pytest.approx(4.125)


@pytest.mark.gpu
def test_gpu_timed_records_each_calls_span_and_returns_its_result():
    from bench.bench_frame import gpu_timed

    calls = []
    x = torch.ones(1 << 20, device="cuda")
    step = gpu_timed(lambda y, scale: y * scale, calls)
    results = [step(x, scale=float(i)) for i in range(3)]
    torch.cuda.synchronize()
    assert [float(r[0]) for r in results] == [0.0, 1.0, 2.0] and len(calls) == 3
    assert all(begin.elapsed_time(end) > 0 and left >= entered for begin, end, entered, left in calls)


def test_host_split_divides_each_frame_around_the_runners_step():
    from bench.bench_frame import _host_split

    split = _host_split([(1.0, 1.010), (2.0, 2.020)], [(None, None, 1.001, 1.003), (None, None, 2.002, 2.005)])
    assert split == {"before_runner_ms": [1.0, 2.0], "runner_launch_ms": [2.0, 3.0], "after_runner_ms": [7.0, 15.0]}


@pytest.mark.gpu
def test_timed_calls_record_each_calls_gpu_span_within_its_wall_time():
    from bench._harness import timed_calls

    x = torch.ones(1 << 22, device="cuda")
    spans = []
    times = timed_calls(lambda scale: x.mul_(scale), [1.0, 2.0, 0.5], spans)
    assert len(spans) == len(times) == 3
    assert all(0 < span <= wall for span, wall in zip(spans, times))


def test_timed_calls_at_a_cadence_start_each_call_on_its_tick(monkeypatch):
    """With cadence_s, call i starts at tick i (cadence_s apart) or, after a call that overran, at once; the
    schedule then goes on from its own ticks."""
    from bench._harness import timed_calls

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    starts = []

    def call(duration):
        starts.append(time.perf_counter())
        time.sleep(duration)

    times = timed_calls(call, [0.0, 0.03, 0.0, 0.0], cadence_s=0.02)
    offsets = [start - starts[0] for start in starts]
    # Ticks 0, 0.02, then 0.04 passed during the second call (it ends at 0.05), then 0.06.
    for offset, expected in zip(offsets, [0.0, 0.02, 0.05, 0.06]):
        assert expected - 1e-3 <= offset <= expected + 0.015
    assert len(times) == 4 and times[1] >= 0.03


def test_strict_fp32_turns_tf32_off_inside_and_restores_the_settings():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        with pytest.raises(RuntimeError), strict_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("the block fails")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_host_step_bench_times_the_engine_without_its_frame(tmp_path, monkeypatch):
    """bench_host_step.py on the CPU (every op's torch reference): one real step per bucket, then the runner hands
    back its outputs without running the frame; each batch gets a whole-batch and a dict-of-slots figure, written
    to the JSON."""
    from bench import bench_host_step

    launched = []
    real = bench_host_step._CachedRunner.step_from_host

    def counting(self, bucket):
        launched.append(bucket not in self._outputs)
        return real(self, bucket)

    monkeypatch.setattr(bench_host_step._CachedRunner, "step_from_host", counting)
    with ops.reference_ops():
        assert bench_host_step.main(["--batches", "1,2", "--steps", "3", "--json", str(tmp_path / "host.json")]) == 0
    rows = json.loads((tmp_path / "host.json").read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 2]
    assert all(row["whole_batch_us"] > 0 and row["dict_of_slots_us"] > 0 for row in rows)
    assert launched.count(True) == 2 and len(launched) > 2
