"""The CUDA extension's fp32 GEMV (csrc/skinny_gemv_f32_kernel.cuh) beside what the codec runs by default (norm_rows
for the LayerNorm, then the Triton skinny_linear with a SplitWorkspace) and torch (F.layer_norm, cuBLAS, F.gelu), at
Mimi's transformer products with 2, 8 and 16 rows (1, 4 and 8 conversations), fused as the codec calls them: qkv
after its LayerNorm, the attention output and fc2 with the residual, fc1 after its LayerNorm and with the GELU.

Each case times one provider and records its time, GB/s and % of the copy-bandwidth floor, with the torch time of
the same run (torch_us; torch_strict_fp32_us with TF32 off, as the codec's products are); the CUDA cases also record
the default path's time (default_us, speedup_vs_default). Bytes moved: weight + x + out (+ residual, + the norm's
weight and bias). Each call reads its own copy of the weight, in turn among enough copies to fill COLD_WEIGHT_BYTES,
so that no call finds its weight in L2, as in the frame, where the LM's weights stream through L2 between two runs
of the codec. On a machine without the extension every case skips."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from moshi_fast import cuda_ext, moshiko, ops
from moshi_fast.kernels._utils import SplitWorkspace, parallel_sms
from moshi_fast.kernels.skinny_linear import skinny_linear_tiles

from ._harness import graph_time

pytestmark = pytest.mark.skipif(not cuda_ext.available(),
                                reason=f"the CUDA extension is unavailable: {cuda_ext.unavailable_reason()}")

_MIMI = moshiko().mimi
_D, _FF = _MIMI.dimension, _MIMI.dim_feedforward
# K, N, LayerNorm first, GELU, residual: as FastMimi._transformer calls them.
SHAPES = {
    "qkv+ln 512>1536": (_D, 3 * _D, True, False, False),
    "out+res 512>512": (_D, _D, False, False, True),
    "fc1+ln+gelu 512>2048": (_D, _FF, True, True, False),
    "fc2+res 2048>512": (_FF, _D, False, False, True),
}
ROWS = [2, 8, 16]
COLD_WEIGHT_BYTES = 200 * 2 ** 20
"""The weight copies a case rotates through fill at least this (four times the L2 of an H100 or H200)."""
EPS = 1e-5


def _operands(device, shape: str, rows: int):
    k, n, layer_norm, gelu, residual = SHAPES[shape]
    x = torch.randn(rows, k, device=device)
    weight = torch.randn(n, k, device=device) / k ** 0.5
    weights = [weight] + [weight.clone() for _ in range(math.ceil(COLD_WEIGHT_BYTES / weight.nbytes) - 1)]
    norm = (1 + 0.2 * torch.randn(k, device=device), 0.1 * torch.randn(k, device=device), EPS) if layer_norm else None
    res = torch.randn(rows, n, device=device) if residual else None
    out = torch.empty(rows, n, device=device)
    moved = (weight.nbytes + x.nbytes + out.nbytes + (res.nbytes if residual else 0)
             + (2 * norm[0].nbytes if layer_norm else 0))
    return x, weights, res, out, moved, norm, gelu


def _in_turn(call, weights):
    """A call of call(weight) on the next of `weights` each time (each call captured in a graph keeps its own)."""
    turn = itertools.count()
    return lambda: call(weights[next(turn) % len(weights)])


def _default(x, weights, res, out, norm, gelu):
    """The codec's default: the LayerNorm in a norm_rows launch, then skinny_linear's default plan with a
    workspace (so that it may split K); and the plan's description."""
    (m, k), n = x.shape, out.shape[1]
    tiles = skinny_linear_tiles(m, n, k, weights[0].dtype, sms=parallel_sms(x.device), split_k=True)
    workspace = SplitWorkspace(*ops.linear_workspace_size(m, n, k, weights[0].dtype), x.device)
    activation = "gelu" if gelu else None
    return _in_turn(lambda weight: ops.linear(x, weight, norm=norm, activation=activation, residual=res, out=out,
                                              workspace=workspace), weights), repr(tiles)


def _torch(x, weights, res, norm, gelu):
    def call(weight):
        hidden = x if norm is None else F.layer_norm(x, (x.shape[1],), *norm)
        y = F.linear(hidden, weight)
        if gelu:
            y = F.gelu(y)
        return y if res is None else y + res
    return _in_turn(call, weights)


def _cuda(x, weights, res, out, norm, gelu):
    return _in_turn(lambda weight: cuda_ext.gemv_f32(x, weight, res, out, norm=norm, gelu=gelu), weights)


@pytest.mark.parametrize("provider", ["cuda", "default", "torch"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemv_f32(measure, device, shape, rows, provider, monkeypatch):
    # The default path as the codec runs it, whatever ops.CUDA_GEMV_F32 says.
    monkeypatch.setattr(ops, "CUDA_GEMV_F32", False)
    x, weights, res, out, moved, norm, gelu = _operands(device, shape, rows)
    default_fn, tiles = _default(x, weights, res, out, norm, gelu)
    torch_fn = _torch(x, weights, res, norm, gelu)
    config = {"op": f"gemv_f32 {provider}", "shape": shape, "batch": rows // 2, "rows": rows, "dtype": "float32"}
    if provider == "cuda":
        extra = measure(_cuda(x, weights, res, out, norm, gelu), moved, torch_fn, strict_fp32_torch=True, **config)
        default_seconds = graph_time(default_fn)
        measure.benchmark.extra_info.update(default_us=default_seconds * 1e6,
                                            speedup_vs_default=default_seconds * 1e6 / extra["us"])
    elif provider == "default":
        measure(default_fn, moved, torch_fn, strict_fp32_torch=True, tiles=tiles, **config)
    else:
        measure(torch_fn, moved, strict_fp32_torch=True, **config)
