"""The CUDA extension's fp32 GEMV for Mimi's transformer layers (csrc/skinny_gemv_f32_kernel.cuh): its reference
against skinny_linear's spec and its dispatch on any machine; on the GPU the kernel against float64 over odd and
Mimi's shapes, with the LayerNorm (with and without its bias), the GELU and residuals (separate and in place),
NaN-poisoned outputs, the split of K forced, argument checks, determinism, CUDA-graph capture, and ops.linear's
dispatch to it."""
import sys

import pytest
import torch

import moshi_fast
from moshi_fast import cuda_ext, moshiko, ops
from moshi_fast.kernels.skinny_linear import as_norm, skinny_linear_ref

from .helpers import gemv_layout_bad_calls, rel_err

_MIMI = moshiko().mimi
_D, _FF = _MIMI.dimension, _MIMI.dim_feedforward
MIMI_SHAPES = [(3 * _D, _D), (_D, _D), (_FF, _D), (_D, _FF)]
"""(N, K) of Mimi's transformer products: qkv, attention output, fc1, fc2."""
ODD_SHAPES = [(40, 36), (7, 516), (1, 4), (9, 2052), (200, 1028)]
"""(N, K): partial 8-row tiles (N % 8 != 0) and a partial last K step (K % 128 != 0); 2052 has 17 K steps, more
than a block's 16 warps."""
FUSIONS = ["layer", "layer-no-bias", "layer+gelu", "gelu"]


def _norm(k, device, bias=True):
    weight = 1 + 0.5 * torch.randn(k, device=device)
    return weight, (0.3 * torch.randn(k, device=device) if bias else None), 1e-5


def test_reference_is_skinny_linears_spec():
    """gemv_f32_ref's LayerNorm, GELU and residual are the ones skinny_linear computes for Mimi's layers."""
    x, weight, residual = torch.randn(3, 64), torch.randn(24, 64) / 8, torch.randn(3, 24)
    for norm, gelu in [(None, False), (_norm(64, "cpu"), False), (_norm(64, "cpu"), True), (None, True),
                       (_norm(64, "cpu", bias=False), True)]:
        got = cuda_ext.gemv_f32_ref(x, weight, residual, norm=norm, gelu=gelu)
        expected = skinny_linear_ref(x, weight, norm=norm, activation="gelu" if gelu else None, residual=residual)
        assert rel_err(got, expected) < 1e-6, (norm is not None, gelu)


def test_reference_updates_in_place():
    x, weight, hidden = torch.randn(3, 40), torch.randn(24, 40), torch.randn(3, 24)
    expected = hidden + x @ weight.T
    assert cuda_ext.gemv_f32_ref(x, weight, residual=hidden, out=hidden) is hidden
    assert rel_err(hidden, expected) < 1e-6


def test_raises_clearly_without_the_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "moshi_fast._C", None)
    monkeypatch.delattr(moshi_fast, "_C", raising=False)
    monkeypatch.setenv("MOSHI_FAST_NO_JIT", "1")
    monkeypatch.setattr(cuda_ext, "_extension", cuda_ext._UNTRIED)
    with pytest.raises(RuntimeError, match="CUDA extension is not available: .*MOSHI_FAST_NO_JIT"):
        cuda_ext.gemv_f32(torch.randn(2, 16), torch.randn(8, 16))


def test_dispatch_needs_the_switch_and_cuda_tensors(monkeypatch):
    """ops.linear's test for the fp32 GEMV: off by default; with the switch on, still never for CPU tensors."""
    x, weight, norm = torch.randn(2, _D), torch.randn(3 * _D, _D), as_norm(_norm(_D, "cpu"))
    assert not ops.CUDA_GEMV_F32
    monkeypatch.setattr(ops, "CUDA_GEMV_F32", True)
    monkeypatch.setattr(cuda_ext, "available", lambda: True)
    assert not ops._use_cuda_gemv_f32(x, weight, None, norm, None, None, None)


def test_fusion_names():
    layer, rms = as_norm(_norm(8, "cpu")), as_norm(("rms", torch.ones(8), 1e-5))
    assert [ops._gemv_f32_fusion(n, a) for n, a in [(None, None), (layer, None), (layer, "gelu"), (None, "gelu")]] == [
        "plain", "layer", "layer+gelu", "gelu"]
    assert ops._gemv_f32_fusion(rms, None) is None and ops._gemv_f32_fusion(None, "silu_gate") is None


@pytest.fixture(scope="module")
def extension():
    """The extension on the GPU machine, where its tests fail, rather than skip, when it cannot load."""
    assert cuda_ext.available(), cuda_ext.unavailable_reason()


def operands(m, n, k, residual):
    """(x, weight, residual, out) on the GPU, out NaN-poisoned; residual None, "separate" or "out" (out itself,
    filled with values). Rows of x of very different sizes and offsets, so that a wrong row's statistics show."""
    x = torch.randn(m, k, device="cuda") * torch.logspace(-1, 1, m, device="cuda")[:, None]
    x = x + torch.linspace(-3, 3, m, device="cuda")[:, None]
    weight = torch.randn(n, k, device="cuda") / k ** 0.5
    out = torch.full((m, n), float("nan"), device="cuda")
    if residual == "out":
        out.copy_(torch.randn(m, n, device="cuda"))
        return x, weight, out, out
    return x, weight, (torch.randn(m, n, device="cuda") if residual == "separate" else None), out


def exact_of(x, weight, residual, norm=None, gelu=False):
    """The spec in float64, computed before the call (the residual may be out)."""
    hidden = x.double()
    if norm is not None:
        norm_weight, norm_bias, eps = norm
        hidden = torch.nn.functional.layer_norm(hidden, (x.shape[1],), norm_weight.double(),
                                                None if norm_bias is None else norm_bias.double(), eps)
    exact = hidden @ weight.double().T
    if gelu:
        exact = torch.nn.functional.gelu(exact)
    return exact if residual is None else exact + residual.double()


def assert_fp32_exact(out, exact):
    """Every element written, within fp32 accumulation error of the float64 spec."""
    assert not out.isnan().any()
    assert rel_err(out, exact) < 2e-6


def _shape_id(shape):
    return f"N{shape[0]}-K{shape[1]}"


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [None, "separate", "out"], ids=["plain", "residual", "residual-is-out"])
@pytest.mark.parametrize("n, k", ODD_SHAPES + MIMI_SHAPES, ids=[_shape_id(s) for s in ODD_SHAPES + MIMI_SHAPES])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16])
def test_gemv_f32_matches_reference(extension, m, n, k, residual):
    x, weight, res, out = operands(m, n, k, residual)
    exact = exact_of(x, weight, res)
    got = cuda_ext.gemv_f32(x, weight, res, out)
    assert got is out
    assert_fp32_exact(out, exact)


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("n, k", ODD_SHAPES + MIMI_SHAPES, ids=[_shape_id(s) for s in ODD_SHAPES + MIMI_SHAPES])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_fused_gemv_f32_matches_reference(extension, m, n, k, fusion):
    x, weight, res, out = operands(m, n, k, "separate" if m == 3 else None)
    norm = _norm(k, "cuda", bias=fusion != "layer-no-bias") if fusion.startswith("layer") else None
    gelu = fusion.endswith("gelu")
    exact = exact_of(x, weight, res, norm, gelu)
    assert cuda_ext.gemv_f32(x, weight, res, out, norm=norm, gelu=gelu) is out
    assert_fp32_exact(out, exact)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, warps", [(5, 1), (5, 3), (5, 16), (16, 5), (16, 8)])
def test_forced_warps_per_block(extension, rows, warps):
    """Any split of K's 17 steps among a block's warps, up to the most a block of that many rows takes (16, 8 past 8
    rows)."""
    x, weight, res, out = operands(rows, 200, 2052, "separate")
    norm = _norm(2052, "cuda")
    exact = exact_of(x, weight, res, norm, gelu=True)
    cuda_ext.gemv_f32(x, weight, res, out, warps_per_block=warps, norm=norm, gelu=True)
    assert_fp32_exact(out, exact)


def test_gemv_f32_max_warps_follows_the_rows():
    assert [cuda_ext.gemv_f32_max_warps(rows) for rows in (1, 8, 9, 16)] == [16, 16, 8, 8]


@pytest.mark.gpu
def test_allocates_out_and_is_deterministic(extension):
    x, weight, _, _ = operands(2, _D, _FF, None)
    first = cuda_ext.gemv_f32(x, weight)
    assert first.shape == (2, _D) and first.dtype == torch.float32
    assert torch.equal(first, cuda_ext.gemv_f32(x, weight))


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(extension):
    """An in-place hidden += fc2(gelu(fc1(LayerNorm(hidden)))) pair captured once, replayed twice after new inputs
    are written into the captured tensors: equal to two eager steps, and no memory allocated by the replays."""
    hidden = torch.randn(2, _D, device="cuda")
    fc1, fc2 = torch.randn(_FF, _D, device="cuda") / 32, torch.randn(_D, _FF, device="cuda") / 64
    activation = torch.empty(2, _FF, device="cuda")
    norm = _norm(_D, "cuda")

    def step(state):
        cuda_ext.gemv_f32(state, fc1, out=activation, norm=norm, gelu=True)
        cuda_ext.gemv_f32(activation, fc2, state, state)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(hidden.clone())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(hidden)

    start = torch.randn_like(hidden)
    expected = start.clone()
    for _ in range(2):
        step(expected)
    hidden.copy_(start)
    allocated = torch.cuda.memory_allocated()
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated
    assert torch.equal(hidden, expected)


@pytest.mark.gpu
def test_linear_dispatches_mimis_products_when_switched_on(extension, monkeypatch):
    """With ops.CUDA_GEMV_F32 on, ops.linear gives the fp32 GEMV Mimi's four products at 2 and 16 rows, with the
    LayerNorm fused (no norm_rows launch), the results of skinny_linear's spec; at 32 rows, at another shape, or with
    the switch off it keeps norm_rows and skinny_linear."""
    calls, norm_launches = [], []
    real_gemv, real_norm_rows = cuda_ext.gemv_f32, ops._norm_rows_kernel
    monkeypatch.setattr(cuda_ext, "gemv_f32", lambda *a, **kw: calls.append(kw) or real_gemv(*a, **kw))
    monkeypatch.setattr(ops, "_norm_rows_kernel", lambda *a, **kw: norm_launches.append(1) or real_norm_rows(*a, **kw))
    monkeypatch.setattr(ops, "CUDA_GEMV_F32", True)
    norm = _norm(_D, "cuda")
    products = [(3 * _D, _D, norm, None, False), (_D, _D, None, None, True), (_FF, _D, norm, "gelu", False),
                (_D, _FF, None, None, True)]
    for rows in (2, 16):
        for n, k, layer_norm, activation, with_residual in products:
            x = torch.randn(rows, k, device="cuda")
            weight = torch.randn(n, k, device="cuda") / k ** 0.5
            residual = torch.randn(rows, n, device="cuda") if with_residual else None
            got = ops.linear(x, weight, norm=layer_norm, activation=activation, residual=residual)
            expected = skinny_linear_ref(x, weight, norm=layer_norm, activation=activation, residual=residual)
            assert rel_err(got, expected) < 1e-5
    assert [(c["norm"] is not None, c["gelu"]) for c in calls] == [(True, False), (False, False), (True, True),
                                                                   (False, False)] * 2
    assert not norm_launches
    ops.linear(torch.randn(32, _D, device="cuda"), torch.randn(3 * _D, _D, device="cuda"), norm=norm)
    ops.linear(torch.randn(2, _D, device="cuda"), torch.randn(3 * _D + 8, _D, device="cuda"), norm=norm)
    monkeypatch.setattr(ops, "CUDA_GEMV_F32", False)
    ops.linear(torch.randn(2, _D, device="cuda"), torch.randn(3 * _D, _D, device="cuda"), norm=norm)
    assert len(calls) == 8 and len(norm_launches) == 3


def _bad_calls():
    """(changes to the good arguments, error, message); good: x [3, 64], weight [40, 64], out [3, 40]."""
    return [
        pytest.param(lambda ok: dict(ok, x=ok["x"].bfloat16()), TypeError, "x must be float32", id="x-bf16"),
        pytest.param(lambda ok: dict(ok, weight=ok["weight"].double()), TypeError, "weight must be float32",
                     id="weight-fp64"),
        pytest.param(lambda ok: dict(ok, x=ok["x"].new_zeros(17, 64), out=ok["out"].new_zeros(17, 40)),
                     ValueError, "1 to 16 rows", id="17-rows"),
        pytest.param(lambda ok: dict(ok, x=ok["x"].new_zeros(9, 64), out=ok["out"].new_zeros(9, 40),
                                     warps_per_block=16),
                     ValueError, "1 to 8 at 9 rows", id="16-warps-at-9-rows"),
        pytest.param(lambda ok: dict(ok, x=ok["x"].new_zeros(3, 62), weight=ok["weight"].new_zeros(40, 62)),
                     ValueError, "multiple of 4", id="k-not-multiple-of-4"),
    ] + gemv_layout_bad_calls() + [
        pytest.param(lambda ok: dict(ok, norm=(ok["x"].new_ones(72), None, 1e-5)), ValueError,
                     r"norm_weight must have shape \[64\]", id="norm-weight-length"),
        pytest.param(lambda ok: dict(ok, norm=(ok["x"].new_ones(64), ok["x"].new_ones(64).bfloat16(), 1e-5)),
                     TypeError, "norm_bias must be float32", id="norm-bias-bf16"),
        pytest.param(lambda ok: dict(ok, norm=(ok["x"].new_ones(2, 64), None, 1e-5)), ValueError,
                     "norm_weight must be 1-D", id="norm-weight-2d"),
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("change, error, message", _bad_calls())
def test_bad_arguments_raise(extension, change, error, message):
    ok = {"x": torch.randn(3, 64, device="cuda"), "weight": torch.randn(40, 64, device="cuda"),
          "out": torch.empty(3, 40, device="cuda")}
    call = change(ok)
    with pytest.raises(error, match=message):
        cuda_ext.gemv_f32(call.pop("x"), call.pop("weight"), call.pop("residual", None), **call)
