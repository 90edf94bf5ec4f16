"""norm_rows kernel vs its torch reference, and ops.linear's separate-norm path vs the fused norm."""
import pytest
import torch

from moshi_fast import ops
from moshi_fast.config import LMConfig
from moshi_fast.kernels.norm_rows import MAX_K, norm_rows, norm_rows_ref
from moshi_fast.kernels.skinny_linear import Norm, skinny_linear

from .helpers import rel_err


def rms_norm(k: int, device="cpu") -> Norm:
    return Norm("rms", (1 + 0.1 * torch.randn(k)).to(device), None, 1e-5)


def layer_norm(k: int, bias: bool, device="cpu") -> Norm:
    return Norm("layer", (1 + 0.1 * torch.randn(k)).to(device), (0.1 * torch.randn(k)).to(device) if bias else None,
                1e-5)


def strided_rows(m: int, k: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """[M, K] rows of very different scales, as a view with a row stride wider than K."""
    wide = torch.randn(m, k + 7) * 2.0 ** torch.randint(-4, 5, (m, 1))
    return wide.to(device=device, dtype=dtype)[:, :k]


@pytest.mark.parametrize("m, k", [(1, 48), (3, 100), (8, 1000), (5, 4096)])
def test_rms_rows_match_reference_fp32(m, k):
    x = strided_rows(m, k)
    norm = rms_norm(k)
    out = torch.full((m, k + 3), float("nan"))[:, :k]
    assert norm_rows(x, norm, out=out) is out
    assert rel_err(out, norm_rows_ref(x, norm)) < 1e-6


def test_rms_rows_in_bf16_within_an_ulp_of_the_reference():
    """bf16 rows: fp32 math, one rounding to bf16. Triton's interpreter truncates where the GPU rounds to nearest
    (the GPU test below counts equal bits), so here each value is within one bf16 ulp of the reference's."""
    m, k = 6, 1000
    x = strided_rows(m, k, torch.bfloat16)
    norm = rms_norm(k)
    got, expected = norm_rows(x, norm), norm_rows_ref(x, norm)
    assert got.dtype == torch.bfloat16
    ulp = 2.0 ** (torch.frexp(expected.float()).exponent - 8).float()
    assert ((got.float() - expected.float()).abs() <= ulp).all()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("m, k", [(2, 512), (7, 37)])
def test_layer_rows_match_reference(m, k, bias):
    """LayerNorm, the rows kept in fp32 (Mimi's); rows with a mean well off 0, where a one-pass variance would
    lose digits."""
    x = strided_rows(m, k) + 3.0
    norm = layer_norm(k, bias)
    got = norm_rows(x, norm)
    assert got.dtype == torch.float32
    assert rel_err(got, norm_rows_ref(x, norm)) < 1e-5


def test_argument_checks():
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="needs a norm"):
        norm_rows(x, None)
    with pytest.raises(ValueError, match="unit stride"):
        norm_rows(torch.randn(32, 2).t(), rms_norm(32))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        norm_rows(x.half(), rms_norm(32))
    with pytest.raises(ValueError, match="contiguous \\[32\\]"):
        norm_rows(x, rms_norm(31))
    with pytest.raises(ValueError, match="out must be"):
        norm_rows(x, layer_norm(32, True), out=torch.empty(2, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="rows of up to"):
        norm_rows(torch.randn(1, MAX_K + 1), rms_norm(MAX_K + 1))


@pytest.mark.parametrize("rows", [1, 8, 17])
def test_linear_runs_norms_separately_unless_told_to_fuse(monkeypatch, rows):
    """ops.linear with an RMSNorm or a LayerNorm (Mimi's) runs norm_rows, then the product without a norm; inside
    ops.separate_norms(False) every norm is fused. Every way gives the fused kernel's result."""
    k, n = 40, 24
    x, weight = strided_rows(rows, k), torch.randn(n, k) / k ** 0.5
    calls = []
    real = ops._norm_rows_kernel
    monkeypatch.setattr(ops, "_norm_rows_kernel", lambda *a, **kw: calls.append(a[1].kind) or real(*a, **kw))
    for norm in (rms_norm(k), layer_norm(k, True)):
        fused = skinny_linear(x, weight, norm=norm)
        assert rel_err(ops.linear(x, weight, norm=norm), fused) < 1e-5
        with ops.separate_norms(False):
            assert rel_err(ops.linear(x, weight, norm=norm), fused) < 1e-5
    assert calls == ["rms", "layer"]


@pytest.mark.gpu
@pytest.mark.parametrize("k", [LMConfig().dim, LMConfig().depformer_dim])
@pytest.mark.parametrize("rows", [8, 64])
def test_linear_with_separate_rms_norm_at_lm_shapes(rows, k):
    """bf16 at the language model's dims: the separate path's product against the fused one's, and both against
    the reference, gated (SiLU) like the FFN input."""
    torch.manual_seed(rows)
    x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(2 * 3 * k, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
    norm = rms_norm(k, "cuda")
    fused = skinny_linear(x, weight, norm=norm, activation="silu_gate")
    separate = ops.linear(x, weight, norm=norm, activation="silu_gate")
    assert rel_err(separate, fused) < 1e-2
    assert rel_err(separate, ops.skinny_linear_ref(x, weight, norm=norm, activation="silu_gate")) < 1e-2
    assert (norm_rows(x, norm) == norm_rows_ref(x, norm)).float().mean() > 0.99
