"""The CUDA extension's weight-streaming GEMV (csrc/skinny_gemv_kernel.cuh) beside the Triton skinny_linear
(default tiles, with a SplitWorkspace, as bench_skinny_linear.py runs it) and cuBLAS (F.linear, or addmm with
the residual), at the language model's decode linears in bf16 with M = 1, 4 and 8 rows: the measurement that
decides which one ops.linear dispatches to.

Each case times one provider and records its time, GB/s and % of the copy-bandwidth floor, with the cuBLAS
time of the same run (torch_us); the CUDA cases also record the Triton time (triton_us, speedup_vs_triton).
Bytes moved: weight + x + out (+ residual). On a machine without the extension (any CPU machine) every case
skips. BENCH_CUDA_GEMV_WARPS=1 also times the CUDA op at every split of K among a block's warps, to re-plan
its default (csrc/skinny_gemv_kernel.cuh, skinny_gemv_default_warps)."""
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
# K, N, residual (the layers whose output adds to the hidden state)
SHAPES = {
    "qkv 4096>12288": (_LM.dim, 3 * _LM.dim, False),
    "out+res 4096>4096": (_LM.dim, _LM.dim, True),
    "gate_up 4096>22528": (_LM.dim, 2 * _LM.hidden, False),
    "head 4096>32000": (_LM.dim, _LM.text_card, False),
    "down+res 11264>4096": (_LM.hidden, _LM.dim, True),
    "dep qkv 1024>3072": (_LM.depformer_dim, 3 * _LM.depformer_dim, False),
    "dep out+res 1024>1024": (_LM.depformer_dim, _LM.depformer_dim, True),
    "dep gate_up 1024>5632": (_LM.depformer_dim, 2 * _LM.depformer_hidden, False),
    "dep down+res 2816>1024": (_LM.depformer_hidden, _LM.depformer_dim, True),
}
ROWS = [1, 4, 8]
WARPS_PER_BLOCK = [1, 2, 4, 8, 16]


def _operands(device, shape: str, rows: int):
    k, n, residual = SHAPES[shape]
    x = torch.randn(rows, k, device=device).bfloat16()
    weight = (torch.randn(n, k, device=device) / k ** 0.5).bfloat16()
    res = torch.randn(rows, n, device=device).bfloat16() if residual else None
    out = torch.empty(rows, n, device=device, dtype=torch.bfloat16)
    moved = weight.nbytes + x.nbytes + out.nbytes + (res.nbytes if residual else 0)
    return x, weight, res, out, moved


def _triton(x, weight, res, out):
    """skinny_linear's default plan with a workspace (so that it may split K), and the plan's description."""
    (m, k), n = x.shape, weight.shape[0]
    tiles = skinny_linear_tiles(m, n, k, weight.dtype, sms=parallel_sms(x.device), split_k=True)
    workspace = SplitWorkspace(*skinny_linear_workspace_size(m, n, tiles), x.device)
    return (lambda: skinny_linear(x, weight, residual=res, out=out, workspace=workspace)), repr(tiles)


def _cublas(x, weight, res):
    if res is None:
        return lambda: F.linear(x, weight)
    return lambda: torch.addmm(res, x, weight.t())


@pytest.mark.parametrize("provider", ["cuda", "triton", "cublas"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemv(measure, device, shape, rows, provider):
    x, weight, res, out, moved = _operands(device, shape, rows)
    triton_fn, tiles = _triton(x, weight, res, out)
    cublas_fn = _cublas(x, weight, res)
    config = {"op": f"gemv {provider}", "shape": shape, "batch": rows, "rows": rows, "dtype": "bfloat16"}
    if provider == "cuda":
        extra = measure(lambda: cuda_ext.gemv(x, weight, res, out), moved, cublas_fn, **config)
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
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemv_warps_per_block(measure, device, shape, rows, warps):
    x, weight, res, out, moved = _operands(device, shape, rows)
    measure(lambda: cuda_ext.gemv(x, weight, res, out, warps_per_block=warps), moved, _cublas(x, weight, res),
            op="gemv cuda", shape=f"{shape} warps {warps}", batch=rows, rows=rows, dtype="bfloat16",
            warps_per_block=warps)
