"""skinny_linear kernel vs its torch reference: every fused option (LayerNorm, RMSNorm, GELU, SiLU gate,
residual), odd shapes, both product paths, split-K, strided rows, in-place residual updates, bf16,
determinism, the default tiles at the model shapes, and argument checks."""
import math

import pytest
import torch
import torch.nn.functional as F
import triton

from moshi_fast.config import LMConfig
from moshi_fast.kernels import tuned
from moshi_fast.kernels._utils import SplitWorkspace
from moshi_fast.kernels.skinny_linear import (DOT_MIN_ROWS, DOT_SHARED_MEMORY, WEIGHT_BYTES_IN_FLIGHT_PER_SM,
                                              WIDE_TILE_MIN_ROWS, Norm, SkinnyTiles, skinny_linear,
                                              skinny_linear_candidate_tiles, skinny_linear_ref, skinny_linear_tiles,
                                              skinny_linear_workspace_size)
from moshi_fast.reference.lm import RMSNorm, gated_ffn

from .helpers import rel_err

N, K = 37, 45
FEATURES = {  # bias, norm ("bias" / "no-bias" / None), gelu, residual (None / "separate" / "out")
    "plain": (False, None, False, None),
    "bias": (True, None, False, None),
    "norm-bias-gelu": (True, "bias", True, None),
    "norm-without-bias": (False, "no-bias", False, None),
    "residual": (False, None, False, "separate"),
    "residual-is-out": (True, None, False, "out"),
    "everything": (True, "bias", True, "out"),
}
FMA_TILES = SkinnyTiles(block_m=2, block_n=8, block_k=16, dot=False)
DOT_TILES = SkinnyTiles(block_m=16, block_n=16, block_k=16, dot=True)


def operands(m, features, dtype=torch.float32, n=N, k=K, x_offset=0.0):
    """(x, weight, kwargs for skinny_linear, out) with NaN-poisoned out; x rows and out rows strided."""
    bias, norm, gelu, residual = features
    x = (torch.randn(m, k + 11)[:, 3:3 + k] + x_offset).to(dtype)
    weight = (torch.randn(n, k) / k ** 0.5).to(dtype)
    out = torch.full((m, n + 5), float("nan"), dtype=dtype)[:, 2:2 + n]
    kwargs = {}
    if bias:
        kwargs["bias"] = torch.randn(n).to(dtype)
    if norm is not None:
        norm_bias = torch.randn(k).to(dtype) if norm == "bias" else None
        kwargs["norm"] = (1 + 0.2 * torch.randn(k).to(dtype), norm_bias, 1e-5)
    if gelu:
        kwargs["activation"] = "gelu"
    _add_residual(kwargs, residual, out, dtype)
    return x, weight, kwargs, out


def _add_residual(kwargs, residual, out, dtype):
    """residual: None, "separate" (a strided tensor of its own) or "out" (out itself, filled first)."""
    m, n = out.shape
    if residual == "separate":
        kwargs["residual"] = torch.randn(m, n + 3)[:, :n].to(dtype)
    elif residual == "out":
        out.copy_(torch.randn(m, n))
        kwargs["residual"] = out


def expected_of(x, weight, kwargs):
    """The reference, computed before the call (the residual may be out, which the call overwrites)."""
    return skinny_linear_ref(x, weight, **{**kwargs, "residual": None if "residual" not in kwargs
                                           else kwargs["residual"].clone()})


@pytest.mark.parametrize("features", list(FEATURES.values()), ids=list(FEATURES))
@pytest.mark.parametrize("m", [1, 2, 3, 17, 33])
def test_default_tiles_match_reference(m, features):
    x, weight, kwargs, out = operands(m, features)
    expected = expected_of(x, weight, kwargs)
    got = skinny_linear(x, weight, out=out, **kwargs)
    assert got is out
    assert not out.isnan().any()
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("m, tiles", [
    pytest.param(3, FMA_TILES, id="fma-two-row-tiles"),
    pytest.param(1, SkinnyTiles(block_m=1, block_n=1, block_k=64, dot=False), id="fma-one-column"),
    pytest.param(33, DOT_TILES, id="dot-three-row-tiles"),
    pytest.param(2, DOT_TILES, id="dot-padded-rows"),
    pytest.param(3, FMA_TILES._replace(split_k=3), id="fma-split3"),
    pytest.param(17, DOT_TILES._replace(split_k=2), id="dot-split2"),
    pytest.param(2, SkinnyTiles(block_m=2, block_n=16, block_k=16, dot=False, split_k=4),
                 id="split-with-empty-ranges"),
])
@pytest.mark.parametrize("features", ["everything", "norm-without-bias", "residual"])
def test_forced_tiles_match_reference(m, tiles, features):
    x, weight, kwargs, out = operands(m, FEATURES[features])
    expected = expected_of(x, weight, kwargs)
    workspace = SplitWorkspace(*skinny_linear_workspace_size(m, N, tiles), device="cpu")
    skinny_linear(x, weight, out=out, tiles=tiles, workspace=workspace, **kwargs)
    assert rel_err(out, expected) < 1e-5
    assert not workspace.counters.any(), "the last program of each tile resets its counter"


def test_out_padding_untouched():
    x, weight, kwargs, out = operands(3, FEATURES["everything"])
    skinny_linear(x, weight, out=out, tiles=FMA_TILES, **kwargs)
    storage = out.as_strided((3, N + 5), (N + 5, 1), out.storage_offset() - 2)
    assert storage[:, :2].isnan().all() and storage[:, 2 + N:].isnan().all()


def test_layer_norm_of_rows_with_a_large_mean():
    """Chunked statistics (three K chunks) must not cancel. Rows of mean 1000 and unit spread: fp32
    itself limits any LayerNorm to ~2e-5 here (x - mean is rounded at 1000's ulp), while a sum of
    squares minus the squared sum would be off by ~10% of the variance."""
    x, weight, kwargs, out = operands(3, FEATURES["norm-bias-gelu"], x_offset=1000.0)
    skinny_linear(x, weight, out=out, tiles=FMA_TILES, **kwargs)
    norm_weight, norm_bias, eps = kwargs["norm"]
    normalized = F.layer_norm(x.double(), (K,), norm_weight.double(), norm_bias.double(), eps)
    exact = F.gelu(F.linear(normalized, weight.double(), kwargs["bias"].double()))
    assert rel_err(out, exact) < 1e-4


@pytest.mark.parametrize("m, tiles", [
    pytest.param(3, None, id="few-rows-default"),
    pytest.param(17, None, id="dot-default"),
    pytest.param(17, FMA_TILES, id="fma-forced"),
    pytest.param(9, DOT_TILES._replace(split_k=2), id="dot-split"),
])
def test_bf16(m, tiles):
    x, weight, kwargs, out = operands(m, FEATURES["everything"], dtype=torch.bfloat16)
    as_float = {**kwargs, "norm": (kwargs["norm"][0].float(), kwargs["norm"][1].float(), kwargs["norm"][2]),
                "bias": kwargs["bias"].float(), "residual": kwargs["residual"].float()}
    expected = skinny_linear_ref(x.float(), weight.float(), **as_float)
    workspace = SplitWorkspace(1 << 12, 16, "cpu")
    skinny_linear(x, weight, out=out, tiles=tiles, workspace=workspace, **kwargs)
    assert out.dtype == torch.bfloat16
    # bf16 output rounding (2^-9 relative), and in the dot path the bf16 rounding of the normalised rows.
    assert rel_err(out, expected) < 1e-2


def _to_cuda(value):
    if isinstance(value, tuple):
        return tuple(_to_cuda(v) for v in value)
    return value.cuda() if isinstance(value, torch.Tensor) else value


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("rows", [2, 16, 128])
def test_mimi_layer_shapes_on_gpu(rows, split):
    """fp32 at Mimi's transformer shapes (FMA path at 2 rows, tf32x3 dot beyond), default tiles, with and
    without a workspace, against the reference on the CPU."""
    layers = [(512, 1536, (False, "bias", False, None)), (512, 512, (False, None, False, "out")),
              (512, 2048, (False, "bias", True, None)), (2048, 512, (False, None, False, "out"))]
    workspace = SplitWorkspace(1 << 20, 1 << 12, "cuda") if split else None
    for k, n, features in layers:
        x, weight, kwargs, _ = operands(rows, features, n=n, k=k)
        expected = expected_of(x, weight, kwargs)
        kwargs = {name: _to_cuda(value) for name, value in kwargs.items()}
        out = kwargs["residual"] if "residual" in kwargs else torch.empty(rows, n, device="cuda")
        skinny_linear(x.cuda(), weight.cuda(), out=out, workspace=workspace, **kwargs)
        assert rel_err(out.cpu(), expected) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", [(1, 12288, 4096), (8, 4096, 11264), (64, 12288, 4096)])
def test_bf16_language_model_shapes_on_gpu(m, n, k):
    """Native bf16 tl.dot (the interpreter runs that path on fp32 operands) at the decode linears' shapes."""
    x = torch.randn(m, k, device="cuda").bfloat16()
    weight = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
    residual = torch.randn(m, n, device="cuda").bfloat16()
    norm = (torch.ones(k, device="cuda"), None, 1e-5)
    out = skinny_linear(x, weight, norm=norm, residual=residual)
    expected = skinny_linear_ref(x.float(), weight.float(), norm=norm, residual=residual.float())
    assert rel_err(out, expected) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_language_model_layers_on_gpu(rows, split):
    """bf16 at the language model's decode shapes: a Helium layer with the text head, and one depth-
    transformer step (its weights sliced from the per-codebook stacks), default tiles with and without
    a workspace. Against the language model's reference (RMSNorm, then F.linear and the gating in bf16,
    which rounds more often than the kernel): <= 1e-2. Against skinny_linear_ref, fp32 math on the same
    bf16 values with the RMSNorm rows rounded alike: <= 2e-3 (output rounding flips only)."""
    c = LMConfig()
    workspace = SplitWorkspace(1 << 24, 1 << 14, "cuda") if split else None
    helium, depth = (c.dim, c.hidden, 1, c.text_card), (c.depformer_dim, c.depformer_hidden, c.dep_q, 0)
    for dim, hidden, steps, head in (helium, depth):
        def weight(n, k):
            return (torch.randn(steps, n, k, device="cuda") / k ** 0.5).bfloat16()[steps - 1]

        norm = RMSNorm(dim, c.norm_eps).cuda().bfloat16()
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(dim))
        rms = Norm("rms", norm.weight.detach(), None, c.norm_eps)
        x = (3 * torch.randn(rows, dim, device="cuda")).bfloat16()
        attended = torch.randn(rows, dim, device="cuda").bfloat16()
        qkv, out = weight(3 * dim, dim), weight(dim, dim)
        gate_up, down = weight(2 * hidden, dim), weight(dim, hidden)
        with torch.no_grad():
            normed = norm(x)
            gate, up = F.linear(normed, gate_up).chunk(2, dim=-1)
            hidden_ref = F.silu(gate) * up
            calls = [(attended, out, dict(residual=x), x + F.linear(attended, out)),
                     (x, qkv, dict(norm=rms), F.linear(normed, qkv)),
                     (x, gate_up, dict(norm=rms, activation="silu_gate"), hidden_ref),
                     (hidden_ref, down, dict(residual=x), x + gated_ffn(normed, gate_up, down))]
            if head:
                text_head = weight(head, dim)
                calls.append((x, text_head, dict(norm=rms), F.linear(normed, text_head)))
        for inputs, w, kwargs, lm_reference in calls:
            got = skinny_linear(inputs, w, workspace=workspace, **kwargs)
            assert rel_err(got, lm_reference) <= 1e-2, (dim, w.shape, kwargs.keys())
            assert rel_err(got, skinny_linear_ref(inputs, w, **kwargs)) <= 2e-3, (dim, w.shape, kwargs.keys())


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [None, SkinnyTiles(block_m=1, block_n=16, block_k=256, dot=False)],
                         ids=["dot", "fma"])
def test_rms_norm_rows_round_like_the_reference_on_gpu(tiles):
    """bf16 rows and weights into an fp32 out, so that the output is not rounded: the kernel tracks the
    reference, whose RMSNorm rows are rounded to bf16 before the product, to ~1e-5 (a rare row element
    rounding the other way), while unrounded rows would differ by ~1e-3."""
    rows, k, n = 8, 4096, 1024
    x = (3 * torch.randn(rows, k, device="cuda")).bfloat16()
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
    rms = Norm("rms", (1 + 0.1 * torch.randn(k, device="cuda")).bfloat16(), None, 1e-8)
    out = skinny_linear(x, w, norm=rms, out=torch.empty(rows, n, device="cuda"), tiles=tiles)
    expected = skinny_linear_ref(x, w, norm=rms, out=torch.empty(rows, n, device="cuda"))
    x32 = x.float()
    unrounded_rows = x32 * (rms.weight.float() * torch.rsqrt(rms.eps + x32.pow(2).mean(-1, keepdim=True)))
    unrounded = F.linear(unrounded_rows, w.float())
    assert rel_err(unrounded, expected) > 5e-4
    assert rel_err(out, expected) < 2e-4


@pytest.mark.parametrize("m, tiles", [pytest.param(3, FMA_TILES, id="fma"), pytest.param(17, None, id="dot")])
def test_bf16_weights_with_fp32_activations(m, tiles):
    """fp32 rows with bf16 weights: the products run in fp32 on the exact upcast weights."""
    x, _, kwargs, out = operands(m, FEATURES["everything"])
    weight = (torch.randn(N, K) / K ** 0.5).bfloat16()
    expected = expected_of(x, weight, kwargs)
    skinny_linear(x, weight, out=out, tiles=tiles, **kwargs)
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("m, tiles", [pytest.param(2, FMA_TILES._replace(split_k=3), id="fma-split"),
                                      pytest.param(17, DOT_TILES._replace(split_k=2), id="dot-split"),
                                      pytest.param(17, None, id="dot-default")])
def test_deterministic(m, tiles):
    x, weight, kwargs, _ = operands(m, FEATURES["norm-bias-gelu"])
    workspace = SplitWorkspace(1 << 12, 16, "cpu")
    first = skinny_linear(x, weight, tiles=tiles, workspace=workspace, **kwargs)
    second = skinny_linear(x, weight, tiles=tiles, workspace=workspace, **kwargs)
    assert torch.equal(first, second)


def test_candidate_tiles_run_and_match():
    m = 3
    x, weight, kwargs, out = operands(m, FEATURES["everything"])
    expected = expected_of(x, weight, kwargs)
    residual = kwargs.pop("residual").clone()
    candidates = skinny_linear_candidate_tiles(m, N, K, torch.float32, sms=2, split_k=True)
    assert candidates[0] == skinny_linear_tiles(m, N, K, torch.float32, sms=2, split_k=True)
    assert any(t.dot for t in candidates) and any(not t.dot for t in candidates)
    assert any(t.split_k > 1 for t in candidates)
    for tiles in candidates:
        workspace = SplitWorkspace(*skinny_linear_workspace_size(m, N, tiles), device="cpu")
        out.copy_(residual)
        skinny_linear(x, weight, out=out, residual=out, tiles=tiles, workspace=workspace, **kwargs)
        assert rel_err(out, expected) < 1e-5, tiles


def test_wide_candidate_tiles_for_many_rows_run_and_match():
    """From WIDE_TILE_MIN_ROWS rows on the candidates include N tiles past 64 wide with K split (and without a
    workspace, the same tiles unsplit); each matches the reference, gated too."""
    m, n, k = WIDE_TILE_MIN_ROWS + 3, 150, 200
    x = torch.randn(m, k)
    for gated in (False, True):
        weight = torch.randn(2 * n if gated else n, k) / k ** 0.5
        activation = "silu_gate" if gated else None
        expected = skinny_linear_ref(x, weight, activation=activation)
        for split_k in (True, False):
            candidates = skinny_linear_candidate_tiles(m, n, k, torch.float32, sms=2, split_k=split_k, gated=gated)
            wide = [t for t in candidates if t.block_n > 64]
            assert wide and all(t.dot and (t.split_k > 1) == split_k for t in wide)
            for tiles in wide:
                workspace = SplitWorkspace(*skinny_linear_workspace_size(m, n, tiles, gated=gated), device="cpu")
                got = skinny_linear(x, weight, activation=activation, tiles=tiles, workspace=workspace)
                assert rel_err(got, expected) < 1e-5, tiles


@pytest.mark.parametrize("m, n, k, dtype", [
    (2, 1536, 512, torch.float32), (2, 512, 2048, torch.float32), (16, 512, 512, torch.float32),
    (128, 2048, 512, torch.float32), (1, 12288, 4096, torch.bfloat16), (8, 4096, 11264, torch.bfloat16),
    (64, 12288, 4096, torch.bfloat16),
])
def test_default_and_candidate_tiles_at_model_shapes(m, n, k, dtype):
    """On an H200 (132 SMs): about two programs per SM where N allows, FMAs only for few rows of fp32
    weights, and at most 10 distinct valid candidates for the sweep."""
    tiles = skinny_linear_tiles(m, n, k, dtype, sms=132)
    programs = triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n) * tiles.split_k
    assert tiles.dot == (m >= DOT_MIN_ROWS[dtype])
    if not tiles.dot:
        assert programs >= math.ceil(1.5 * 132)
        assert tiles.block_m * tiles.block_n * tiles.block_k <= 64 * 32 * tiles.num_warps
    for split_k in (False, True):
        candidates = skinny_linear_candidate_tiles(m, n, k, dtype, sms=132, split_k=split_k)
        assert 1 < len(candidates) <= 10 and len(set(candidates)) == len(candidates)
        fma = [t for t in candidates if not t.dot]
        assert all(t.block_m * t.block_n * t.block_k <= 64 * 32 * t.num_warps for t in fma)
        assert all(min(t.block_m, t.block_n, t.block_k) >= 16 for t in candidates if t.dot)
        assert split_k or all(t.split_k == 1 for t in candidates)


LM_FEATURES = {  # RMSNorm, SiLU gate, residual (None / "separate" / "out")
    "rms": (True, False, None),
    "rms-residual-is-out": (True, False, "out"),
    "gate": (False, True, None),
    "rms-gate": (True, True, None),
    "rms-gate-residual": (True, True, "separate"),
    "gate-residual-is-out": (False, True, "out"),
}
LM_CASES = [  # (M, tiles): default tiles, and both product paths with and without split-K
    pytest.param(1, None, id="1-default"),
    pytest.param(3, None, id="3-default"),
    pytest.param(17, None, id="17-default"),
    pytest.param(1, FMA_TILES, id="1-fma"),
    pytest.param(3, FMA_TILES, id="3-fma-two-row-tiles"),
    pytest.param(3, FMA_TILES._replace(split_k=3), id="3-fma-split3"),
    pytest.param(1, DOT_TILES, id="1-dot"),
    pytest.param(17, DOT_TILES, id="17-dot-two-row-tiles"),
    pytest.param(3, DOT_TILES._replace(split_k=2), id="3-dot-split2"),
    pytest.param(17, DOT_TILES._replace(split_k=2), id="17-dot-split2"),
]


def lm_operands(m, features, dtype=torch.float32, n=N, k=K):
    """(x, weight, kwargs for skinny_linear, out) for the language model's options: weight [2n, k] with
    the gate, out [m, n] NaN-poisoned, x and out rows strided. Row i of x is scaled by i + 1, so that a
    wrong or missing RMSNorm scale shows."""
    rms, gate, residual = features
    x = (torch.randn(m, k + 11)[:, 3:3 + k] * torch.arange(1, m + 1)[:, None]).to(dtype)
    weight = (torch.randn(2 * n if gate else n, k) / k ** 0.5).to(dtype)
    out = torch.full((m, n + 5), float("nan"), dtype=dtype)[:, 2:2 + n]
    kwargs = {}
    if rms:
        kwargs["norm"] = Norm("rms", (1 + 0.2 * torch.randn(k)).to(dtype), None, 1e-5)
    if gate:
        kwargs["activation"] = "silu_gate"
    _add_residual(kwargs, residual, out, dtype)
    return x, weight, kwargs, out


def lm_workspace(m, tiles, kwargs):
    """Exactly the workspace forced tiles need (two accumulators' partials with the gate), or a roomy one
    for the default tiles."""
    if tiles is None:
        return SplitWorkspace(1 << 14, 64, device="cpu")
    gated = kwargs.get("activation") == "silu_gate"
    return SplitWorkspace(*skinny_linear_workspace_size(m, N, tiles, gated=gated), device="cpu")


@pytest.mark.parametrize("features", list(LM_FEATURES.values()), ids=list(LM_FEATURES))
@pytest.mark.parametrize("m, tiles", LM_CASES)
def test_rms_norm_and_silu_gate_match_reference(m, tiles, features):
    x, weight, kwargs, out = lm_operands(m, features)
    expected = expected_of(x, weight, kwargs)
    workspace = lm_workspace(m, tiles, kwargs)
    got = skinny_linear(x, weight, out=out, tiles=tiles, workspace=workspace, **kwargs)
    assert got is out
    assert rel_err(out, expected) < 1e-5
    assert not workspace.counters.any(), "the last program of each tile resets its counter"


@pytest.mark.parametrize("features", ["rms-residual-is-out", "rms-gate-residual", "gate"])
@pytest.mark.parametrize("m, tiles", [LM_CASES[i] for i in (0, 2, 4, 5, 9)])
def test_rms_norm_and_silu_gate_bf16(m, tiles, features):
    """bf16 throughout against the reference on the same bf16 values. Triton's interpreter truncates
    fp32 -> bf16 casts where the GPU (and torch) round to nearest even: the output and the RMSNorm rows
    can each be one bf16 ulp (2^-8 .. 2^-7 relative) off, ~5e-3 in all; a missing norm scale, gate or
    residual would be off by O(1). The GPU tests check the rounding itself."""
    x, weight, kwargs, out = lm_operands(m, LM_FEATURES[features], dtype=torch.bfloat16)
    expected = expected_of(x, weight, kwargs)
    skinny_linear(x, weight, out=out, tiles=tiles, workspace=lm_workspace(m, tiles, kwargs), **kwargs)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, expected) < 1e-2


def test_norm_forms_agree():
    """Norm tuples and the short forms: (weight, bias, eps) is LayerNorm, ("rms", weight, eps) RMSNorm."""
    x, weight, _, _ = operands(3, FEATURES["plain"])
    norm_weight, norm_bias = 1 + 0.2 * torch.randn(K), torch.randn(K)
    layer = skinny_linear(x, weight, norm=(norm_weight, norm_bias, 1e-5), tiles=FMA_TILES)
    assert torch.equal(layer, skinny_linear(x, weight, norm=Norm("layer", norm_weight, norm_bias, 1e-5),
                                            tiles=FMA_TILES))
    rms = skinny_linear(x, weight, norm=("rms", norm_weight, 1e-5), tiles=FMA_TILES)
    assert torch.equal(rms, skinny_linear(x, weight, norm=Norm("rms", norm_weight, None, 1e-5),
                                          tiles=FMA_TILES))
    assert rel_err(rms, layer) > 0.1, "LayerNorm, with its bias, and RMSNorm differ"


def test_silu_gate_split_is_deterministic():
    x, weight, kwargs, _ = lm_operands(17, LM_FEATURES["rms-gate"])
    tiles = DOT_TILES._replace(split_k=2)
    workspace = lm_workspace(17, tiles, kwargs)
    first = skinny_linear(x, weight, tiles=tiles, workspace=workspace, **kwargs)
    second = skinny_linear(x, weight, tiles=tiles, workspace=workspace, **kwargs)
    assert torch.equal(first, second)
    partials, _ = skinny_linear_workspace_size(17, N, tiles)
    assert skinny_linear_workspace_size(17, N, tiles, gated=True)[0] == 2 * partials


def _language_model_linears():
    """(name, n, k, gated) of the language model's decode linears: Helium's and the depth transformer's."""
    c = LMConfig()
    return [("qkv", 3 * c.dim, c.dim, False), ("out", c.dim, c.dim, False),
            ("gate_up", c.hidden, c.dim, True), ("down", c.dim, c.hidden, False),
            ("text_head", c.text_card, c.dim, False),
            ("dep_qkv", 3 * c.depformer_dim, c.depformer_dim, False),
            ("dep_out", c.depformer_dim, c.depformer_dim, False),
            ("dep_gate_up", c.depformer_hidden, c.depformer_dim, True),
            ("dep_down", c.depformer_dim, c.depformer_hidden, False)]


@pytest.mark.parametrize("split_k", [False, True])
@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("name, n, k, gated", _language_model_linears())
def test_language_model_tiles(name, n, k, gated, m, split_k):
    """The heuristics (the measured table aside, which tests/test_tuned.py covers), bf16 on an H200: the
    dot path; pipeline buffers within the budget; every split non-empty; at Helium's shapes (33-262 MB
    weights) at least 1.5 programs per SM with a workspace and enough weight bytes requested at once;
    and valid candidates."""
    with tuned.heuristics_only():
        _check_language_model_tiles(name, n, k, gated, m, split_k)


def _check_language_model_tiles(name, n, k, gated, m, split_k):
    parts = 2 if gated else 1
    tiles = skinny_linear_tiles(m, n, k, torch.bfloat16, sms=132, split_k=split_k, gated=gated)
    assert tiles.dot and (split_k or tiles.split_k == 1)
    assert tiles.num_stages * (tiles.block_m + parts * tiles.block_n) * tiles.block_k * 2 <= DOT_SHARED_MEMORY
    k_per_split = triton.cdiv(triton.cdiv(k, tiles.split_k), tiles.block_k) * tiles.block_k
    assert (tiles.split_k - 1) * k_per_split < k
    programs = triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n) * tiles.split_k
    if not name.startswith("dep"):
        assert programs >= 1.5 * 132 or not split_k
        chunk = parts * tiles.block_n * tiles.block_k * 2
        assert programs * (tiles.num_stages - 1) * chunk >= WEIGHT_BYTES_IN_FLIGHT_PER_SM * 132
    candidates = skinny_linear_candidate_tiles(m, n, k, torch.bfloat16, sms=132, split_k=split_k, gated=gated)
    assert candidates[0] == tiles and 1 < len(candidates) <= 10 and len(set(candidates)) == len(candidates)
    assert all(min(t.block_m, t.block_n, t.block_k) >= 16 for t in candidates if t.dot)
    fma = [t for t in candidates if not t.dot]
    assert all(parts * t.block_m * t.block_n * t.block_k <= 64 * 32 * t.num_warps for t in fma)
    assert m > 32 or any(not t.dot for t in candidates)
    assert split_k == any(t.split_k > 1 for t in candidates)


def _bad_calls():
    x, weight = torch.randn(3, K), torch.randn(N, K)
    ok = {"x": x, "weight": weight}
    buffer = torch.randn(3, K + N)
    split = FMA_TILES._replace(split_k=2)
    return [
        pytest.param(dict(ok, weight=torch.randn(N, K + 1)), ValueError, "do not match", id="k-mismatch"),
        pytest.param(dict(ok, x=x.half()), TypeError, "float32 or bfloat16", id="fp16"),
        pytest.param(dict(ok, x=torch.randn(K, 3).T), ValueError, "unit stride", id="x-column-major"),
        pytest.param(dict(ok, weight=torch.randn(K, N).T), ValueError, "unit stride", id="weight-transposed"),
        pytest.param(dict(ok, weight=torch.randn(N, 2 * K)[:, ::2]), ValueError, "unit stride",
                     id="weight-strided"),
        pytest.param(dict(ok, weight=torch.randn(2 * N, K)[::2]), ValueError, "contiguous",
                     id="weight-row-gaps"),
        pytest.param(dict(ok, bias=torch.randn(N + 1)), ValueError, "bias must have shape", id="bias-shape"),
        pytest.param(dict(ok, norm=(torch.randn(K - 1), None, 1e-5)), ValueError, "norm weight",
                     id="norm-shape"),
        pytest.param(dict(ok, out=torch.empty(3, N, dtype=torch.float64)), TypeError, "out", id="out-dtype"),
        pytest.param(dict(ok, out=torch.empty(4, N)), ValueError, "out must have shape", id="out-shape"),
        pytest.param(dict(ok, activation="relu"), ValueError, "activation", id="activation"),
        pytest.param(dict(ok, x=buffer[:, :K], out=buffer[:, K - 3:K - 3 + N]), ValueError, "x overlaps out",
                     id="out-overlaps-x"),
        pytest.param(dict(ok, out=buffer[:, :N], residual=buffer[:, 1:1 + N]), ValueError,
                     "residual overlaps out", id="residual-shifted-from-out"),
        pytest.param(dict(ok, tiles=FMA_TILES._replace(split_k=2)), ValueError, "needs a SplitWorkspace",
                     id="split-without-workspace"),
        pytest.param(dict(ok, tiles=FMA_TILES._replace(split_k=2), workspace=SplitWorkspace(4, 1, "cpu")),
                     ValueError, "too small", id="workspace-too-small"),
        pytest.param(dict(ok, tiles=DOT_TILES._replace(block_m=8)), ValueError, ">= 16", id="dot-block-8"),
        pytest.param(dict(ok, tiles=FMA_TILES._replace(block_n=6)), ValueError, "powers of two",
                     id="not-pow2"),
        pytest.param(dict(ok, weight=torch.randn(2 * N, K), activation="silu_gate", bias=torch.randn(N)),
                     ValueError, "takes no bias", id="gate-with-bias"),
        pytest.param(dict(ok, activation="silu_gate"), ValueError, "even", id="gate-odd-rows"),
        pytest.param(dict(ok, weight=torch.randn(2 * N, K), activation="silu_gate",
                          out=torch.empty(3, 2 * N)),
                     ValueError, "out must have shape", id="gate-out-full-width"),
        pytest.param(dict(ok, weight=torch.randn(2 * N, K), activation="silu_gate", tiles=split,
                          workspace=SplitWorkspace(*skinny_linear_workspace_size(3, N, split), "cpu")),
                     ValueError, "too small", id="gate-workspace-for-one-accumulator"),
        pytest.param(dict(ok, norm=Norm("rms", torch.randn(K), torch.randn(K), 1e-5)), ValueError,
                     "RMSNorm takes no bias", id="rms-with-bias"),
        pytest.param(dict(ok, norm=("rms", torch.randn(K - 1), 1e-5)), ValueError, "norm weight",
                     id="rms-shape"),
        pytest.param(dict(ok, norm=Norm("batch", torch.randn(K), None, 1e-5)), ValueError, "norm kind",
                     id="norm-kind"),
        pytest.param(dict(ok, norm=(torch.randn(K), 1e-5)), ValueError, "norm must be", id="norm-two-tuple"),
    ]


@pytest.mark.parametrize("call, error, message", _bad_calls())
def test_bad_arguments_raise(call, error, message):
    call = dict(call)
    with pytest.raises(error, match=message):
        skinny_linear(call.pop("x"), call.pop("weight"), **call)
