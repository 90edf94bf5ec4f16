"""Timing and reporting shared by the benchmarks: per-call GPU time, achieved GB/s, % of the floor."""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from moshi_fast import ops
from moshi_fast.engine import KV_CACHE_DTYPES
from moshi_fast.fast import moshi as fast_moshi
from moshi_fast.fast.lm import overlap_text_sampling
from moshi_fast.kernels import conv1d_stream, conv_transpose1d_stream, depth_attention, tuned

CALLS_PER_ROUND = 50
"""pytest-benchmark's own statistics are per round of this many back-to-back calls."""


@functools.cache
def device_info() -> dict:
    """Device name, versions, git SHA (GIT_SHA when the tree has no .git), and measured copy bandwidth."""
    import triton

    sha = os.environ.get("GIT_SHA") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "git_sha": sha}
    if torch.cuda.is_available():
        info["copy_GBps"] = round(copy_bandwidth() / 1e9, 1)
    return info


def copy_bandwidth(size_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written, of a copy run by
    the SMs (an elementwise kernel). A plain `dst.copy_(src)` becomes a DMA memcpy on the copy engines,
    which is markedly slower on Hopper (measured 2.76 TB/s on an H200) and no bound for our kernels."""
    src = torch.randn(size_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    seconds = graph_time(lambda: torch.mul(src, 1.0, out=dst), iters=5)
    return 2 * size_bytes / seconds


def _graph(fn: Callable[[], object], iters: int) -> torch.cuda.CUDAGraph:
    """`iters` calls of fn captured in one CUDA graph, after a warm-up on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def capture(fn: Callable[[], object], iters: int = 50) -> Callable[[], None]:
    """A callable that runs `iters` calls of fn and waits for them (one graph replay on the GPU)."""
    if not torch.cuda.is_available():
        return lambda: [fn() for _ in range(iters)] and None
    graph = _graph(fn, iters)

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    return replay


def graph_time(fn: Callable[[], object], iters: int = 50, reps: int = 15) -> float:
    """Median seconds per call of fn: on the GPU, `iters` calls in one CUDA graph, replayed `reps`
    times between CUDA events; on the CPU, one timed call."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    graph = _graph(fn, iters)
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1000 / iters)
    return sorted(times)[len(times) // 2]


def time_plans(name: str, batch: int, plans: list, run_once, run_timed, out: torch.Tensor, reference: torch.Tensor,
               deadline: float) -> list[dict]:
    """Rows for `plans` (the first is the default): run_once(plan, out) from fresh state for the output's relative
    difference from `reference`, then run_timed(plan) in a CUDA graph, until `deadline` (time.time())."""
    rows = []
    for plan in plans:
        if time.time() > deadline:
            break
        row = {"shape": name, "batch": batch, "tiles": plan._asdict(), "default": plan is plans[0]}
        try:
            run_once(plan, out)
            row["rel_diff"] = ((out - reference).abs().max() / reference.abs().max()).item()
            row["us"] = graph_time(lambda: run_timed(plan), iters=20, reps=7) * 1e6
        except Exception as error:  # noqa: BLE001 - a plan that cannot compile or run is recorded, not fatal
            row["error"] = repr(error)[:200]
        rows.append(row)
    return rows


def sweep_main(argv, description: str, shapes: dict, default_shapes: str, sweep) -> int:
    """The command line of a wide plan sweep (bench/sweep_wide_*.py): `sweep(name, batch, deadline, device)` for each
    shape, the best plan of each printed, every row in --json."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shapes", default=default_shapes, help=f"of {', '.join(shapes)}")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="stop starting plans after this long, shared out evenly over the shapes left")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    end = time.time() + args.budget_s
    rows = []
    names = args.shapes.split(",")
    for index, name in enumerate(names):
        deadline = time.time() + (end - time.time()) / (len(names) - index)
        shape_rows = sweep(name, args.batch, deadline, device)
        rows += shape_rows
        timed = [row for row in shape_rows if "us" in row]
        if timed:
            best = min(timed, key=lambda row: row["us"])
            default = next((row["us"] for row in timed if row["default"]), float("nan"))
            print(f"{name:14s} B={args.batch}: default {default:8.1f} us, best {best['us']:8.1f} us {best['tiles']}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({**device_info(), "rows": rows}, indent=1) + "\n")
    return 0


def without_pdl(fn: Callable[..., object], *args, **kwargs):
    """fn(*args, **kwargs) with every launch (and graph capture) inside it made without programmatic
    dependent launch: the baseline that shows what PDL gains, timed in the same run."""
    with ops.programmatic_launch(False):
        return fn(*args, **kwargs)


def with_triton_sampling(fn: Callable[..., object], *args, **kwargs):
    """fn(*args, **kwargs) with `ops.sample_tokens` on the Triton kernel (graphs captured inside it keep it): the
    previous sampler beside the default CUDA one, timed in the same run."""
    with ops.cuda_sampling(False):
        return fn(*args, **kwargs)


def with_cuda_depth_step(fn: Callable[..., object], *args, **kwargs):
    """fn(*args, **kwargs) with the fast LM's depth-transformer steps on the CUDA extension's persistent kernel
    where it applies (`ops.cuda_depth_step`, B <= 8; graphs captured inside it keep it), timed beside the default
    in the same run."""
    with ops.cuda_depth_step():
        return fn(*args, **kwargs)


def with_fused_norms(fn: Callable[..., object], *args, **kwargs):
    """fn(*args, **kwargs) with every norm of `ops.linear` fused into its product (`ops.separate_norms(False)`, the
    previous default; graphs captured inside it keep it), timed beside the default in the same run."""
    with ops.separate_norms(False):
        return fn(*args, **kwargs)


@contextlib.contextmanager
def _attribute(owner, name: str, value):
    """owner.name set to value within the block, restored after it (a module-level setting a variant changes)."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def with_setting(owner, name: str, value) -> Callable[..., object]:
    """A variant's wrapper: fn(*args, **kwargs) with owner.name set to value (graphs captured inside keep it), timed
    beside the default in the same run."""
    def wrapper(fn: Callable[..., object], *args, **kwargs):
        with _attribute(owner, name, value):
            return fn(*args, **kwargs)
    return wrapper


def with_helium_cuda_gemv(fn: Callable[..., object], *args, **kwargs):
    """fn(*args, **kwargs) with Helium's products on the CUDA GEMV at every batch, after their RMSNorm in a launch of
    its own (ops.CUDA_GEMV_ONE_ROW_SHAPES, which the default gives it at one row only, added to ops.CUDA_GEMV_SHAPES;
    graphs captured inside keep it), timed beside the default in the same run."""
    with _attribute(ops, "CUDA_GEMV_SHAPES", ops.CUDA_GEMV_SHAPES | ops.CUDA_GEMV_ONE_ROW_SHAPES):
        return fn(*args, **kwargs)


def with_conv_tensor_cores(fn: Callable[..., object], *args, **kwargs):
    """fn(*args, **kwargs) with every conv of the codec on the tensor-core tiles, the few-column ones too
    (FMA_MAX_COLUMNS 0 in kernels.conv1d_stream and kernels.conv_transpose1d_stream, the previous default; graphs
    captured inside keep it), timed beside the default in the same run."""
    with _attribute(conv1d_stream, "FMA_MAX_COLUMNS", 0), _attribute(conv_transpose1d_stream, "FMA_MAX_COLUMNS", 0):
        return fn(*args, **kwargs)


# The depth transformer's products past 8 rows on skinny_linear, their RMSNorm in a launch of its own (the previous
# default).
with_depth_triton_linears = with_setting(ops, "CUDA_GEMV_MANY_ROWS_SHAPES", frozenset())


def with_depth_gemv_fused_norms(fn: Callable[..., object], *args, **kwargs):
    """fn(*args, **kwargs) with the depth transformer's RMSNorms past 8 rows fused into the CUDA GEMV's qkv and
    gate_up products instead of a launch of their own (ops.CUDA_GEMV_MANY_ROWS_SHAPES with the "rms" fusions; graphs
    captured inside keep it), timed beside the default in the same run."""
    fused = {(3072, 1024, "plain"): (3072, 1024, "rms"), (5632, 1024, "silu_gate"): (5632, 1024, "rms+silu_gate")}
    with _attribute(ops, "CUDA_GEMV_MANY_ROWS_SHAPES",
                    frozenset(fused.get(shape, shape) for shape in ops.CUDA_GEMV_MANY_ROWS_SHAPES)):
        return fn(*args, **kwargs)


# The depth attention letting the next kernel start only after its wait (the previous default).
with_late_depth_attention_trigger = with_setting(depth_attention, "START_NEXT_EARLY", False)


# The CUDA sampler as it was before its GPU run of 2026-12-07 (bench/RESULTS.md): the text token on the block-wide
# kernel, and every row's keys loaded two or four bytes at a time.
with_text_sampler_block_kernel = with_setting(ops, "TEXT_SAMPLER_WARP_KERNEL", False)
with_sampler_scalar_loads = with_setting(ops, "SAMPLER_VECTOR_LOADS", False)
# The CUDA block-wide sampler as it was before the radix select (2026-12-07, nineteenth session).
with_sampler_bisection = with_setting(ops, "SAMPLER_RADIX_SELECT", False)


# Helium's attention on the Triton kernel instead of the CUDA extension's (the previous default).
with_triton_paged_attention = with_setting(ops, "CUDA_PAGED_ATTENTION", False)

# Helium's CUDA attention reading nothing before it waits for the qkv product (the previous default).
with_attention_reads_after_wait = with_setting(ops, "PAGED_ATTENTION_READS_BEFORE_WAIT", False)

# The depth transformer's RMSNorm'd products on the CUDA GEMV with the norm applied to x before the product, not
# its row scale after it (the previous default).
with_gemv_norm_before = with_setting(ops, "CUDA_GEMV_NORM_AFTER", False)


# The CUDA GEMV's residual requested after the block's reduction, not before its products (the previous default).
with_gemv_late_residual = with_setting(ops, "GEMV_EARLY_RESIDUAL", False)


# FastMoshi's frames and execution mask copied to the device before the frame graph's replay, and from there into
# the graph's inputs, not by the graph itself from the host buffers (the previous default).
with_host_inputs_copied_first = with_setting(fast_moshi, "HOST_INPUTS_IN_GRAPH", False)


def with_serial_text_sampling(fn: Callable[..., object], *args, **kwargs):
    """fn(*args, **kwargs) with the text token drawn before the depth transformer's input projection, on the step's
    own stream (moshi_fast.fast.lm.overlap_text_sampling(False), the previous default; steps and graphs built inside
    keep it), timed beside the default in the same run."""
    with overlap_text_sampling(False):
        return fn(*args, **kwargs)


class Variant(NamedTuple):
    """A same-run variant of the fast engine: its command-line flag, its run's name and the wrapper that runs a
    timing call under its setting; what_it_times completes "also time <subject> ..." in the flag's help."""
    flag: str
    name: str
    wrapper: Callable[..., object]
    what_it_times: str


VARIANTS = (
    Variant("--without-pdl", "fast_no_pdl", without_pdl, "with programmatic dependent launch off"),
    Variant("--helium-cuda-gemv", "fast_helium_cuda_gemv", with_helium_cuda_gemv,
            "with Helium's products on the CUDA GEMV after their RMSNorm at every batch, not only at one row"),
    Variant("--triton-sampling", "fast_triton_sampling", with_triton_sampling,
            "sampling with the Triton kernel instead of the CUDA extension's"),
    Variant("--fused-norms", "fast_fused_norms", with_fused_norms,
            "with every RMSNorm fused into its linear, at every batch"),
    Variant("--conv-tensor-cores", "fast_conv_tensor_cores", with_conv_tensor_cores,
            "with the codec's few-column convs on the tensor-core tiles"),
    Variant("--depth-triton-linears", "fast_depth_triton_linears", with_depth_triton_linears,
            "with the depth transformer's products past 8 rows on skinny_linear instead of the CUDA GEMV's column "
            "groups"),
    Variant("--depth-gemv-fused-norms", "fast_depth_gemv_fused_norms", with_depth_gemv_fused_norms,
            "with the depth transformer's RMSNorms past 8 rows fused into the CUDA GEMV"),
    Variant("--late-depth-attention-trigger", "fast_late_depth_attention_trigger", with_late_depth_attention_trigger,
            "with the depth attention starting the next kernel after its wait"),
    Variant("--serial-text-sampling", "fast_serial_text_sampling", with_serial_text_sampling,
            "with the text token drawn before the depth transformer's input projection, not beside it"),
    Variant("--text-sampler-block-kernel", "fast_text_sampler_block_kernel", with_text_sampler_block_kernel,
            "with the text token drawn by the CUDA sampler's block-wide kernel, not its warp-reduction kernel"),
    Variant("--sampler-scalar-loads", "fast_sampler_scalar_loads", with_sampler_scalar_loads,
            "with the CUDA sampler reading logit rows one key at a time, not in 16-byte pieces"),
    Variant("--sampler-bisection", "fast_sampler_bisection", with_sampler_bisection,
            "with the CUDA block-wide sampler (the audio rows) finding the k-th logit by bisection, not radix select"),
    Variant("--triton-paged-attention", "fast_triton_paged_attention", with_triton_paged_attention,
            "with Helium's attention on the Triton kernel instead of the CUDA extension's"),
    Variant("--attention-reads-after-wait", "fast_attention_reads_after_wait", with_attention_reads_after_wait,
            "with Helium's CUDA attention reading its window only after it waits for the qkv product"),
    Variant("--gemv-norm-before", "fast_gemv_norm_before", with_gemv_norm_before,
            "with the depth transformer's RMSNorm'd products normalising x before the CUDA GEMV's product, not "
            "scaling its sums after it"),
    Variant("--host-inputs-copied-first", "fast_host_inputs_copied_first", with_host_inputs_copied_first,
            "with the frames and execution mask copied to the device before the frame graph's replay, not by the "
            "graph itself from the host buffers"),
    Variant("--gemv-late-residual", "fast_gemv_late_residual", with_gemv_late_residual,
            "with the CUDA GEMV's products requesting their residual after the block's reduction, not before the "
            "products"),
    # Last (variant_runs times it after the KV-cache run).
    Variant("--cuda-depth-step", "fast_cuda_depth_step", with_cuda_depth_step,
            "with each depth-transformer step as the CUDA extension's persistent kernel, B <= 8"),
)
"""The flag variants, in the order variant_runs times them."""


def _dest(variant: Variant) -> str:
    return variant.flag.removeprefix("--").replace("-", "_")


def add_variant_options(parser, subject: str) -> None:
    """The benchmarks' options that also time variants of the fast engine in the same run (see variant_runs);
    subject names what is timed in their help ("the fast step", "moshi_fast")."""
    for variant in VARIANTS:
        parser.add_argument(variant.flag, action="store_true",
                            help=f"also time {subject} {variant.what_it_times} ({variant.name}), same run")
    parser.add_argument("--kv-cache", choices=sorted(KV_CACHE_DTYPES),
                        help=f"also time {subject} with Helium's KV cache in this dtype (fast_kv_<name>), same run")
    parser.add_argument("--compare-table", type=plan_table, metavar="PATH",
                        help=f"also time {subject} with the launch plans of this tuned-tiles JSON instead of "
                             f"kernels/tuned_tiles.json's, e.g. the table before a sweep (fast_compare_table; with "
                             f"--kv-cache's dtype when one is given), same run")
    parser.add_argument("--skip", default="", type=_skipped_runs,
                        help="comma-separated runs not to time: kyutai (Kyutai's engine, whose model is then freed "
                             "once ours is built from it), fast (the fast engine's default run); e.g. --skip "
                             "kyutai,fast --kv-cache fp8 at a batch whose bf16 cache does not fit the GPU")


class PlanTable(NamedTuple):
    """A tuned-tiles JSON read for --compare-table: where it came from (recorded with the results) and its plans."""
    path: str
    plans: dict


def plan_table(path: str) -> PlanTable:
    """The plan table at `path` (kernels/tuned_tiles.json's layout: op -> shape -> batch -> plan)."""
    try:
        plans = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"cannot read a plan table from {path}: {error}") from None
    if not isinstance(plans, dict) or not all(isinstance(shapes, dict) for shapes in plans.values()):
        raise argparse.ArgumentTypeError(f"{path} is not a plan table (op -> shape -> batch -> plan)")
    return PlanTable(path, plans)


def with_plans(table: dict, fn: Callable[..., object], *args, **kwargs):
    """fn(*args, **kwargs) planned from `table` instead of kernels/tuned_tiles.json (graphs captured inside keep its
    plans), timed beside the current plans in the same run."""
    with tuned.plans_from(table):
        return fn(*args, **kwargs)


SKIPPABLE_RUNS = ("kyutai", "fast")


def _skipped_runs(text: str) -> frozenset[str]:
    names = frozenset(name for name in text.split(",") if name)
    unknown = names - set(SKIPPABLE_RUNS)
    if unknown:
        raise argparse.ArgumentTypeError(f"--skip takes {', '.join(SKIPPABLE_RUNS)}; got {', '.join(sorted(unknown))}")
    return names


def kept_runs(args, runs: list[tuple[str, Callable[[], dict]]]) -> list[tuple[str, Callable[[], dict]]]:
    """The (name, timing call) pairs whose name --skip does not list."""
    return [(name, run) for name, run in runs if name not in args.skip]


def selected_variants(args) -> list[Variant]:
    """The VARIANTS whose flags add_variant_options parsed into args, in VARIANTS' order."""
    return [variant for variant in VARIANTS if getattr(args, _dest(variant))]


def variant_runs(args, run: Callable[[str, object], dict]) -> list[tuple[str, Callable[[], dict]]]:
    """(name, timing call) of each variant asked for by add_variant_options' flags; run(name, kv_dtype) times
    the fast engine with that KV cache dtype (None: the LM's) under the variant's settings. The KV-cache run and the
    other plan table's come before the last of VARIANTS (the CUDA depth step)."""
    def timed(variant: Variant) -> tuple[str, Callable[[], dict]]:
        return variant.name, lambda: variant.wrapper(run, variant.name, None)

    *first, last = VARIANTS
    selected = selected_variants(args)
    runs = [timed(variant) for variant in selected if variant in first]
    kv_dtype = KV_CACHE_DTYPES[args.kv_cache] if args.kv_cache else None
    if args.kv_cache:
        name = f"fast_kv_{args.kv_cache}"
        runs.append((name, lambda: run(name, kv_dtype)))
    if args.compare_table is not None:
        runs.append(("fast_compare_table",
                     lambda: with_plans(args.compare_table.plans, run, "fast_compare_table", kv_dtype)))
    if last in selected:
        runs.append(timed(last))
    return runs


GPU_FAULTS = (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError))
"""What a timed run may raise and the benchmark records in its row instead of stopping: out of memory, or a fault
of the device (which leaves the process's CUDA context unusable, so the runs after it record theirs too)."""


def recorded_fault(error: BaseException, release: Callable[[], None]) -> str:
    """The row's note for a run that raised one of GPU_FAULTS; after running out of memory, release() frees what
    the run left (after a device fault nothing on the device can run any more)."""
    if isinstance(error, torch.OutOfMemoryError):
        release()
        return "out of GPU memory"
    return f"{type(error).__name__}: {error}"[:300]


def timed_calls(call: Callable[[object], object], inputs, gpu_spans: list | None = None,
                cadence_s: float = 0.0) -> list[float]:
    """Wall seconds of call(x) for each x, the GPU synchronised before and after each call: the time a
    user waits for one synchronous step (launch overhead, host work and GPU work). gpu_spans, when given, also
    receives each call's seconds between CUDA events recorded around it on the current stream: the GPU's part,
    without the host's noise around it. cadence_s > 0: the calls start cadence_s apart (a call that overruns starts
    the next at once), the thread asleep in between, as a real-time caller's frames come (0.08 for Moshi's 80 ms
    frames); by default they run back to back, with the host's caches and clocks warm from the call before."""
    times = []
    next_start = time.perf_counter()
    for x in inputs:
        torch.cuda.synchronize()
        if cadence_s:
            idle = next_start - time.perf_counter()
            if idle > 0:
                time.sleep(idle)
            next_start = max(next_start + cadence_s, time.perf_counter())
        start = time.perf_counter()
        if gpu_spans is not None:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        call(x)
        if gpu_spans is not None:
            end.record()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if gpu_spans is not None:
            gpu_spans.append(begin.elapsed_time(end) / 1000)
    return times


@contextlib.contextmanager
def strict_fp32():
    """torch's fp32 convolutions and matrix products without TF32 inside the block (graphs captured there keep
    it). cuDNN's convolutions may run one TF32 pass by default, while the codec's kernels run three
    ("tf32x3", close to fp32): the strict timing is the torch path at our kernels' precision."""
    convs, products = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = convs, products


class Measure:
    """Times one op and its torch path in the same run and records both in the benchmark's extra_info."""

    def __init__(self, benchmark, info: dict):
        self.benchmark = benchmark
        self.info = info

    def __call__(self, fn: Callable[[], object], bytes_moved: int, torch_fn: Callable[[], object] | None = None,
                 strict_fp32_torch: bool = False, **config) -> dict:
        """strict_fp32_torch: also time torch_fn under strict_fp32 (torch_strict_fp32_us), for fp32 paths that
        torch's defaults may run in TF32."""
        seconds = graph_time(fn)
        calls = CALLS_PER_ROUND if torch.cuda.is_available() else 1
        self.benchmark.pedantic(capture(fn, calls), rounds=5 if torch.cuda.is_available() else 1)
        extra = {**self.info, **config, "calls_per_round": calls, "us": seconds * 1e6, "bytes": bytes_moved,
                 "GBps": bytes_moved / seconds / 1e9}
        if "copy_GBps" in self.info:
            floor = bytes_moved / (self.info["copy_GBps"] * 1e9)
            extra["floor_us"] = floor * 1e6
            extra["pct_of_floor"] = 100 * floor / seconds
        if torch_fn is not None:
            torch_seconds = graph_time(torch_fn)
            extra["torch_us"] = torch_seconds * 1e6
            extra["speedup_vs_torch"] = torch_seconds / seconds
            if strict_fp32_torch:
                with strict_fp32():
                    extra["torch_strict_fp32_us"] = graph_time(torch_fn) * 1e6
        self.benchmark.extra_info.update(extra)
        return extra
