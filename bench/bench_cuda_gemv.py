"""The CUDA extension's weight-streaming GEMV (csrc/skinny_gemv_kernel.cuh) beside the Triton skinny_linear
(default tiles, with a SplitWorkspace, as bench_skinny_linear.py runs it) and cuBLAS (F.linear, or addmm with
the residual), at the language model's decode linears in bf16 with M = 1, 4 and 8 rows (the depth transformer's also
at 16, 32 and 64), plain and with the RMSNorm and SiLU gate fused as the LM step calls them: the measurement that
decides which one ops.linear dispatches to.

Each case times one provider and records its time, GB/s and % of the copy-bandwidth floor, with the cuBLAS
time of the same run (torch_us); the CUDA cases also record the Triton time (triton_us, speedup_vs_triton).
Bytes moved: weight + x + out (+ residual, + norm weight). Each call reads its own copy of the weight, in turn among
enough copies to fill COLD_WEIGHT_BYTES, so that no call finds its weight in L2 (50 MB on an H100 or H200), as in the
LM step, where every product reads weights no kernel of the frame read before. On a machine without the extension
(any CPU machine) every case skips. BENCH_CUDA_GEMV_WARPS=1 also times the CUDA op at every split of K among a
block's warps, to re-plan its default (csrc/skinny_gemv_kernel.cuh, skinny_gemv_default_warps)."""
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from moshi_fast import cuda_ext
from moshi_fast.config import LMConfig
from moshi_fast.kernels._utils import SplitWorkspace, parallel_sms
from moshi_fast.kernels.skinny_linear import skinny_linear, skinny_linear_tiles, skinny_linear_workspace_size

from ._harness import graph_time

pytestmark = pytest.mark.skipif(not cuda_ext.available(),
                                reason=f"the CUDA extension is unavailable: {cuda_ext.unavailable_reason()}")

_LM = LMConfig()
# K, N (the weight's rows), residual (the layers whose output adds to the hidden state), fusion
SHAPES = {
    "qkv 4096>12288": (_LM.dim, 3 * _LM.dim, False, None),
    "out+res 4096>4096": (_LM.dim, _LM.dim, True, None),
    "gate_up 4096>22528": (_LM.dim, 2 * _LM.hidden, False, None),
    "head 4096>32000": (_LM.dim, _LM.text_card, False, None),
    "down+res 11264>4096": (_LM.hidden, _LM.dim, True, None),
    "dep qkv 1024>3072": (_LM.depformer_dim, 3 * _LM.depformer_dim, False, None),
    "dep out+res 1024>1024": (_LM.depformer_dim, _LM.depformer_dim, True, None),
    "dep gate_up 1024>5632": (_LM.depformer_dim, 2 * _LM.depformer_hidden, False, None),
    "dep down+res 2816>1024": (_LM.depformer_hidden, _LM.depformer_dim, True, None),
    "dep head 1024>2048": (_LM.depformer_dim, _LM.card, False, None),
    # As the LM step calls them: RMSNorm fused, and the SiLU gate (N = the weight's 2 x hidden rows).
    "qkv+rms 4096>12288": (_LM.dim, 3 * _LM.dim, False, "rms"),
    "gate_up+rms+silu 4096>2x11264": (_LM.dim, 2 * _LM.hidden, False, "rms+silu_gate"),
    "head+rms 4096>32000": (_LM.dim, _LM.text_card, False, "rms"),
    "dep qkv+rms 1024>3072": (_LM.depformer_dim, 3 * _LM.depformer_dim, False, "rms"),
    "dep gate_up+rms+silu 1024>2x2816": (_LM.depformer_dim, 2 * _LM.depformer_hidden, False, "rms+silu_gate"),
}
ROWS = [1, 4, 8]
MANY_ROWS = [16, 32, 64]
"""Rows at which the depth transformer's products (the "dep" shapes) are also timed: the CUDA GEMV's column groups
against skinny_linear, which ops.linear gave them before (ops.CUDA_GEMV_MANY_ROWS_SHAPES)."""
CASES = [(shape, rows) for shape in SHAPES for rows in ROWS] + [
    (shape, rows) for shape in SHAPES if shape.startswith("dep") for rows in MANY_ROWS]
COLD_WEIGHT_BYTES = 200 * 2 ** 20
"""The weight copies a case rotates through fill at least this (four times the L2 of an H100 or H200)."""
WARPS_PER_BLOCK = [1, 2, 4, 8, 16]
EPS = 1e-8


def _operands(device, shape: str, rows: int):
    k, n, residual, fusion = SHAPES[shape]
    gated = fusion == "rms+silu_gate"
    columns = n // 2 if gated else n
    x = torch.randn(rows, k, device=device).bfloat16()
    weight = (torch.randn(n, k, device=device) / k ** 0.5).bfloat16()
    weights = [weight] + [weight.clone() for _ in range(math.ceil(COLD_WEIGHT_BYTES / weight.nbytes) - 1)]
    norm = (1 + 0.2 * torch.randn(k, device=device)).bfloat16() if fusion else None
    res = torch.randn(rows, columns, device=device).bfloat16() if residual else None
    out = torch.empty(rows, columns, device=device, dtype=torch.bfloat16)
    moved = weight.nbytes + x.nbytes + out.nbytes + (res.nbytes if residual else 0) + (norm.nbytes if fusion else 0)
    return x, weights, res, out, moved, norm, gated


def _in_turn(call, weights):
    """A call of call(weight) on the next of `weights` each time (each call captured in a graph keeps its own)."""
    turn = itertools.count()
    return lambda: call(weights[next(turn) % len(weights)])


def _triton(x, weights, res, out, norm, gated):
    """skinny_linear's default plan with a workspace (so that it may split K), and the plan's description."""
    (m, k), n = x.shape, out.shape[1]
    tiles = skinny_linear_tiles(m, n, k, weights[0].dtype, sms=parallel_sms(x.device), split_k=True, gated=gated)
    workspace = SplitWorkspace(*skinny_linear_workspace_size(m, n, tiles, gated=gated), x.device)
    norm_spec = None if norm is None else ("rms", norm, EPS)
    activation = "silu_gate" if gated else None
    return _in_turn(lambda weight: skinny_linear(x, weight, norm=norm_spec, activation=activation, residual=res,
                                                 out=out, workspace=workspace), weights), repr(tiles)


def _cublas(x, weights, res, norm, gated):
    """cuBLAS with the fusions in torch, as the reference LM computes them."""
    if norm is None and not gated:
        if res is None:
            return _in_turn(lambda weight: F.linear(x, weight), weights)
        return _in_turn(lambda weight: torch.addmm(res, x, weight.t()), weights)

    def fused(weight):
        hidden = x
        if norm is not None:
            x32 = x.float()
            hidden = (x32 * (norm.float() * torch.rsqrt(EPS + torch.mean(x32 ** 2, dim=-1, keepdim=True)))).bfloat16()
        y = F.linear(hidden, weight)
        if gated:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return y
    return _in_turn(fused, weights)


def _cuda(x, weights, res, out, norm, gated, warps=0, norm_after=False, early_residual=True):
    norm = None if norm is None else (norm, EPS)
    return _in_turn(lambda weight: cuda_ext.gemv(x, weight, res, out, warps, norm=norm, gated=gated,
                                                 norm_after=norm_after, early_residual=early_residual), weights)


@pytest.mark.parametrize("provider", ["cuda", "cuda_norm_after", "cuda_late_residual", "triton", "cublas"])
@pytest.mark.parametrize("shape, rows", CASES)
def test_gemv(measure, device, shape, rows, provider):
    """provider cuda_norm_after: the CUDA GEMV with the RMSNorm's row scale applied after the product (the shapes
    with a norm only); cuda_late_residual: with the residual requested after the block's reduction instead of before
    the products (ops.GEMV_EARLY_RESIDUAL's previous path; the shapes with a residual only)."""
    if provider == "cuda_norm_after" and SHAPES[shape][3] is None:
        pytest.skip("no norm to apply after the product")
    if provider == "cuda_late_residual" and not SHAPES[shape][2]:
        pytest.skip("no residual to request late")
    x, weights, res, out, moved, norm, gated = _operands(device, shape, rows)
    triton_fn, tiles = _triton(x, weights, res, out, norm, gated)
    cublas_fn = _cublas(x, weights, res, norm, gated)
    config = {"op": f"gemv {provider}", "shape": shape, "batch": rows, "rows": rows, "dtype": "bfloat16"}
    if provider.startswith("cuda"):
        extra = measure(_cuda(x, weights, res, out, norm, gated, norm_after=provider == "cuda_norm_after",
                              early_residual=provider != "cuda_late_residual"), moved, cublas_fn, **config)
        triton_seconds = graph_time(triton_fn)
        measure.benchmark.extra_info.update(triton_us=triton_seconds * 1e6,
                                            speedup_vs_triton=triton_seconds * 1e6 / extra["us"])
    elif provider == "triton":
        measure(triton_fn, moved, cublas_fn, tiles=tiles, **config)
    else:
        measure(cublas_fn, moved, **config)


@pytest.mark.skipif(not os.environ.get("BENCH_CUDA_GEMV_WARPS"),
                    reason="set BENCH_CUDA_GEMV_WARPS=1 to sweep")
@pytest.mark.parametrize("warps", WARPS_PER_BLOCK)
@pytest.mark.parametrize("shape, rows", CASES)
def test_gemv_warps_per_block(measure, device, shape, rows, warps):
    if warps > cuda_ext.gemv_max_warps(rows):
        pytest.skip(f"a block of {rows} rows' column groups takes at most {cuda_ext.gemv_max_warps(rows)} warps")
    x, weights, res, out, moved, norm, gated = _operands(device, shape, rows)
    measure(_cuda(x, weights, res, out, norm, gated, warps), moved, _cublas(x, weights, res, norm, gated),
            op="gemv cuda", shape=f"{shape} warps {warps}", batch=rows, rows=rows, dtype="bfloat16",
            warps_per_block=warps)
