"""The CUDA extension moshi_fast._C (csrc/): the package without it (any machine), and on the GPU its
weight-streaming GEMV against the reference: odd and model shapes, residuals (separate and in place), the fused
RMSNorm and SiLU gate, NaN-poisoned outputs, the split of K forced, argument checks, determinism, CUDA-graph
capture, and ops.linear's dispatch to it."""
import os
import subprocess
import sys

import pytest
import torch

import moshi_fast
from moshi_fast import cuda_ext, ops
from moshi_fast.config import LMConfig

from .helpers import rel_err

_LM = LMConfig()
ODD_SHAPES = [(40, 72), (8, 8), (17, 264), (1, 136), (200, 1032)]
"""(N, K): partial 16-row tiles (N % 16 != 0) and a partial last K step (K % 128 != 0)."""
MODEL_SHAPES = [(3 * _LM.dim, _LM.dim), (_LM.dim, _LM.dim), (2 * _LM.hidden, _LM.dim),
                (_LM.text_card, _LM.dim), (_LM.dim, _LM.hidden), (3 * _LM.depformer_dim, _LM.depformer_dim),
                (_LM.depformer_dim, _LM.depformer_dim), (2 * _LM.depformer_hidden, _LM.depformer_dim),
                (_LM.depformer_dim, _LM.depformer_hidden)]
"""(N, K) of the language model's decode linears: Helium's qkv, out, gate_up, text head, down; the depth
transformer's qkv, out, gate_up, down."""


def exact_of(x, weight, residual):
    """x @ weight.T + residual in float64, computed before the call (the residual may be out)."""
    exact = x.double() @ weight.double().T
    return exact if residual is None else exact + residual.double()


def assert_rounded_once(out, exact):
    """Within the 1e-2 bound of the bf16 kernel tests, and no further from the exact result than its own
    rounding to bf16 (a product rounded before the residual is added, or bf16 partial sums, would be)."""
    assert not out.isnan().any()
    assert rel_err(out, exact) < 1e-2
    assert rel_err(out, exact) <= 1.1 * rel_err(exact.bfloat16(), exact) + 1e-6


@pytest.fixture
def without_extension(monkeypatch):
    """cuda_ext as on a machine where moshi_fast._C is neither built nor buildable (even where it is)."""
    monkeypatch.setitem(sys.modules, "moshi_fast._C", None)
    monkeypatch.delattr(moshi_fast, "_C", raising=False)
    monkeypatch.setenv("MOSHI_FAST_NO_JIT", "1")
    monkeypatch.setattr(cuda_ext, "_extension", cuda_ext._UNTRIED)
    monkeypatch.setattr(cuda_ext, "_unavailable_reason", "")


def test_package_imports_without_the_extension():
    code = ("import sys; sys.modules['moshi_fast._C'] = None\n"
            "import moshi_fast, moshi_fast.ops as ops\n"
            "assert not ops.cuda_extension_available()\n")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MOSHI_FAST_NO_JIT": "1"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_load_returns_none_without_the_extension(without_extension):
    assert cuda_ext.load() is None
    assert not cuda_ext.available() and not ops.cuda_extension_available()
    assert "MOSHI_FAST_NO_JIT" in cuda_ext.unavailable_reason()


@pytest.fixture
def jit_build(without_extension, monkeypatch):
    """A CUDA machine with nvcc and ninja but no built extension, JIT allowed: the build's arguments are
    recorded into the returned dict, and the build returns its "module" entry or raises its "error" entry."""
    from torch.utils import cpp_extension

    monkeypatch.delenv("MOSHI_FAST_NO_JIT")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_ext.shutil, "which", lambda name: name)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    build = {}

    def fake_load(**kwargs):
        build["kwargs"] = kwargs
        if "error" in build:
            raise build["error"]
        return build["module"]

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    return build


def test_jit_build_of_csrc(jit_build, capsys):
    jit_build["module"] = module = object()
    assert cuda_ext.load() is module and cuda_ext.available() and cuda_ext.unavailable_reason() == ""
    sources = {os.path.basename(path) for path in jit_build["kwargs"]["sources"]}
    assert {"skinny_gemv.cu", "bindings.cpp"} <= sources
    assert jit_build["kwargs"]["extra_cuda_cflags"] == cuda_ext.NVCC_FLAGS
    assert capsys.readouterr().err.count("\n") == 1, "one progress line"


def test_failed_jit_build_leaves_the_package_usable(jit_build):
    jit_build["error"] = RuntimeError("nvcc failed")
    assert cuda_ext.load() is None
    assert "nvcc failed" in cuda_ext.unavailable_reason()
    with pytest.raises(RuntimeError, match="JIT build .* failed"):
        ops.gemv_cuda(torch.randn(2, 16).bfloat16(), torch.randn(8, 16).bfloat16())


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the extension may be built")
def test_load_returns_none_on_a_cpu_machine():
    assert cuda_ext.load() is None
    assert cuda_ext.unavailable_reason()


def test_gemv_cuda_raises_clearly_without_the_extension(without_extension):
    x, weight = torch.randn(2, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    with pytest.raises(RuntimeError, match="CUDA extension is not available: .*MOSHI_FAST_NO_JIT"):
        ops.gemv_cuda(x, weight)


def test_gemv_serves_its_shapes_and_helium_at_one_row_only():
    """The dispatch table: the depth transformer's products at 1 to 32 rows (past 8 after their RMSNorm), Helium's
    FFN output at 1 to 8, Helium's others (after their RMSNorm) at one."""
    d, h = _LM.depformer_dim, _LM.depformer_hidden
    for rows in (1, 5, 8):
        assert ops.cuda_gemv_serves(3 * d, d, "rms", rows) and ops.cuda_gemv_serves(2 * h, d, "rms+silu_gate", rows)
    for rows in (9, 20, 32):
        assert ops.cuda_gemv_serves(3 * d, d, "plain", rows) and ops.cuda_gemv_serves(2 * h, d, "silu_gate", rows)
        assert not ops.cuda_gemv_serves(3 * d, d, "rms", rows)
    for rows in (1, 5, 8, 9, 20, 32):
        assert ops.cuda_gemv_serves(d, d, "plain", rows) and ops.cuda_gemv_serves(d, h, "plain", rows)
    for rows in (33, 64):
        assert not ops.cuda_gemv_serves(3 * d, d, "plain", rows) and not ops.cuda_gemv_serves(d, h, "plain", rows)
    for rows in (1, 5, 8):
        assert ops.cuda_gemv_serves(_LM.dim, _LM.hidden, "plain", rows)
    assert not ops.cuda_gemv_serves(_LM.dim, _LM.hidden, "plain", 9)
    assert not ops.cuda_gemv_serves(3 * d, d, "rms", 65) and not ops.cuda_gemv_serves(3 * d, d, None, 1)
    assert ops.cuda_gemv_serves(3 * _LM.dim, _LM.dim, "plain", 1) and ops.cuda_gemv_serves(
        2 * _LM.hidden, _LM.dim, "silu_gate", 1)
    assert not ops.cuda_gemv_serves(3 * _LM.dim, _LM.dim, "plain", 2)
    assert not ops.cuda_gemv_serves(3 * _LM.dim, _LM.dim, "rms", 1)


def test_reference_rounds_once_and_updates_in_place():
    x, weight = torch.randn(3, 40).bfloat16(), torch.randn(24, 40).bfloat16()
    hidden = torch.randn(3, 24).bfloat16()
    exact = exact_of(x, weight, hidden)
    got = cuda_ext.gemv_ref(x, weight, residual=hidden, out=hidden)
    assert got is hidden
    assert_rounded_once(hidden, exact)


def test_reference_norm_after_is_the_norm_rounded_elsewhere():
    """gemv_ref(norm_after=True): x * gamma rounded to bf16 is multiplied and the row scale applied to the fp32
    product, before the gate and the residual; the same function as the norm before the product, within bf16."""
    x, gamma = torch.randn(3, 64).bfloat16(), (1 + 0.3 * torch.randn(64)).bfloat16()
    x = x * torch.tensor([[0.1], [1.0], [30.0]]).bfloat16()
    weight = (torch.randn(2 * 24, 64) / 8).bfloat16()
    residual = torch.randn(3, 24).bfloat16()
    scale = torch.rsqrt(1e-8 + torch.mean(x.float() ** 2, dim=-1, keepdim=True))
    product = (x.float() * gamma.float()).bfloat16().float() @ weight.float().T * scale
    gate, up = product.chunk(2, dim=-1)
    for gated, expected in ((False, product), (True, torch.nn.functional.silu(gate) * up)):
        w = weight if gated else weight[:24]
        expected = expected if gated else expected[:, :24]
        got = cuda_ext.gemv_ref(x, w, residual, norm=(gamma, 1e-8), gated=gated, norm_after=True)
        assert torch.equal(got, (expected + residual.float()).bfloat16())
        before = cuda_ext.gemv_ref(x, w, residual, norm=(gamma, 1e-8), gated=gated)
        assert 0 < rel_err(got, before) < 1e-2


def test_reference_fusions_are_skinny_linears_spec():
    """gemv_ref's RMSNorm and SiLU gate are the ones skinny_linear computes (and the LM step calls either)."""
    from moshi_fast.kernels.skinny_linear import skinny_linear_ref

    x, gamma = torch.randn(3, 64).bfloat16(), (1 + 0.3 * torch.randn(64)).bfloat16()
    weight = (torch.randn(2 * 24, 64) / 8).bfloat16()
    for norm, gated in [(None, True), ((gamma, 1e-8), False), ((gamma, 1e-8), True)]:
        got = cuda_ext.gemv_ref(x, weight, norm=norm, gated=gated)
        expected = skinny_linear_ref(x, weight, norm=None if norm is None else ("rms", *norm),
                                     activation="silu_gate" if gated else None)
        assert torch.equal(got, expected), (norm is not None, gated)


@pytest.fixture(scope="module")
def extension():
    """The extension on the GPU machine, where its tests fail, rather than skip, when it cannot load."""
    assert cuda_ext.available(), cuda_ext.unavailable_reason()


def operands(m, n, k, residual):
    """(x, weight, residual, out) on the GPU, out NaN-poisoned; residual None, "separate" or "out" (out
    itself, filled with values)."""
    x = torch.randn(m, k, device="cuda").bfloat16()
    weight = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    if residual == "out":
        out.copy_(torch.randn(m, n, device="cuda"))
        return x, weight, out, out
    return x, weight, (torch.randn(m, n, device="cuda").bfloat16() if residual == "separate" else None), out


def _shape_id(shape):
    return f"N{shape[0]}-K{shape[1]}"


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [None, "separate", "out"], ids=["plain", "residual", "residual-is-out"])
@pytest.mark.parametrize("n, k", ODD_SHAPES + MODEL_SHAPES,
                         ids=[_shape_id(shape) for shape in ODD_SHAPES + MODEL_SHAPES])
@pytest.mark.parametrize("m", [1, 3, 8, 13, 27, 64])
def test_gemv_matches_reference(extension, m, n, k, residual):
    x, weight, res, out = operands(m, n, k, residual)
    exact = exact_of(x, weight, res)
    got = ops.gemv_cuda(x, weight, res, out)
    assert got is out
    assert_rounded_once(out, exact)


@pytest.mark.gpu
@pytest.mark.parametrize("residual", ["separate", "out"], ids=["residual", "residual-is-out"])
@pytest.mark.parametrize("fusion", [None, "rms-after+gated"], ids=["plain", "rms-after+gated"])
@pytest.mark.parametrize("n, k", [(40, 72), (200, 1032)] + MODEL_SHAPES[4:],
                         ids=[_shape_id(shape) for shape in [(40, 72), (200, 1032)] + MODEL_SHAPES[4:]])
@pytest.mark.parametrize("m", [1, 3, 8, 13, 64])
def test_early_residual_gives_the_same_bits(extension, m, n, k, residual, fusion):
    """The residual requested before the products (early_residual) adds the same value to the same sums: the
    outputs equal the default's bit for bit, with the residual separate or out itself (read before it is written)."""
    gated = fusion is not None
    x, weight, _, _ = operands(m, 2 * n if gated else n, k, None)
    start = torch.randn(m, n, device="cuda").bfloat16()
    norm = ((1 + 0.5 * torch.randn(k, device="cuda")).bfloat16(), 1e-8) if gated else None
    results = []
    for early in (False, True):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        res = start.clone() if residual == "separate" else out.copy_(start)
        ops.gemv_cuda(x, weight, res, out, norm=norm, gated=gated, norm_after=gated, early_residual=early)
        results.append(out)
    assert not results[1].isnan().any()
    assert torch.equal(results[0], results[1])


def exact_fused(x, weight, norm, gated, residual, norm_after=False):
    """The fused spec in float64 after the one rounding it prescribes before the product (the RMSNorm's
    bf16 x, or with norm_after bf16 x * gamma and the row scale in float64 on the product), computed before the
    call (the residual may be out)."""
    hidden = x
    if norm is not None:
        gamma, eps = norm
        scale = torch.rsqrt(eps + torch.mean(x.float() ** 2, dim=-1, keepdim=True))
        if norm_after:
            hidden = (x.float() * gamma.float()).bfloat16()
        else:
            hidden = (x.float() * (gamma.float() * scale)).bfloat16()
    exact = hidden.double() @ weight.double().T
    if norm is not None and norm_after:
        exact = exact * torch.rsqrt(eps + torch.mean(x.double() ** 2, dim=-1, keepdim=True))
    if gated:
        gate, up = exact.chunk(2, dim=-1)
        exact = torch.nn.functional.silu(gate) * up
    return exact if residual is None else exact + residual.double()


FUSED_SHAPES = [(40, 72), (34, 264), (200, 1032), (3 * _LM.depformer_dim, _LM.depformer_dim),
                (2 * _LM.depformer_hidden, _LM.depformer_dim), (3 * _LM.dim, _LM.dim), (2 * _LM.hidden, _LM.dim),
                (_LM.text_card, _LM.dim)]
"""(weight rows, K): partial tiles (40, 34 and 200 rows; gated, 20, 17 and 100 outputs in tiles of 8) and partial
K steps, and the
LM's products that carry an RMSNorm (qkv, the text head) or an RMSNorm and the gate (gate_up)."""


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", ["rms", "gated", "rms+gated", "rms-after", "rms+gated-after"])
@pytest.mark.parametrize("n, k", FUSED_SHAPES, ids=[_shape_id(shape) for shape in FUSED_SHAPES])
@pytest.mark.parametrize("m", [1, 3, 8, 13, 64])
def test_fused_gemv_matches_reference(extension, m, n, k, fusion):
    """fusion: the RMSNorm ("rms"; "-after": its row scale applied after the product), the SiLU gate, or both."""
    x, weight, res, out = operands(m, n, k, "separate" if m == 3 else None)
    # Rows of very different sizes, so that a wrong row's scale shows.
    x = x * torch.logspace(-1, 1, m, device="cuda")[:, None].bfloat16()
    gated = "gated" in fusion
    norm = ((1 + 0.5 * torch.randn(k, device="cuda")).bfloat16(), 1e-8) if "rms" in fusion else None
    if gated:
        out = out[:, :n // 2].contiguous()
        res = None if res is None else res[:, :n // 2].contiguous()
    after = fusion.endswith("-after")
    exact = exact_fused(x, weight, norm, gated, res, norm_after=after)
    got = ops.gemv_cuda(x, weight, res, out, norm=norm, gated=gated, norm_after=after)
    assert got is out
    assert_rounded_once(out, exact)


@pytest.mark.gpu
def test_linear_dispatches_the_depth_transformers_fused_products(extension, monkeypatch):
    """With ops.CUDA_GEMV_NORM_AFTER off, ops.linear gives the CUDA GEMV the RMSNorm'd qkv and gated FFN input of the
    depth transformer, at 2 rows (the norm fused) and at 20 (column groups, after norm_rows), with the results of
    skinny_linear's spec, and keeps skinny_linear for a LayerNorm."""
    monkeypatch.setattr(ops, "CUDA_GEMV_NORM_AFTER", False)
    calls = []
    real_gemv = cuda_ext.gemv
    monkeypatch.setattr(cuda_ext, "gemv", lambda *a, **kw: calls.append(kw) or real_gemv(*a, **kw))
    d, h = _LM.depformer_dim, _LM.depformer_hidden
    gamma = (1 + 0.5 * torch.randn(d, device="cuda")).bfloat16()
    for batch in (2, 20):
        x = torch.randn(batch, d, device="cuda").bfloat16()
        for rows, activation in ((3 * d, None), (2 * h, "silu_gate")):
            weight = (torch.randn(rows, d, device="cuda") / d ** 0.5).bfloat16()
            got = ops.linear(x, weight, norm=("rms", gamma, 1e-8), activation=activation)
            expected = cuda_ext.gemv_ref(x, weight, norm=(gamma, 1e-8), gated=activation is not None)
            assert rel_err(got, expected) < 1e-2
    # Past 8 rows the RMSNorm runs apart (norm_rows), then the plain or gated product.
    assert [(c.get("norm") is not None, c["gated"]) for c in calls] == [(True, False), (True, True), (False, False),
                                                                          (False, True)]
    ops.linear(x, weight[:d], norm=(gamma, None, 1e-5))
    assert len(calls) == 4


@pytest.mark.gpu
def test_linear_takes_the_norm_after_the_product_at_the_depth_transformers_shapes(extension, monkeypatch):
    """With ops.CUDA_GEMV_NORM_AFTER on, the depth transformer's qkv and gate_up at 2 and 20 rows are one CUDA GEMV
    each with the norm after the product, with no norm_rows launch; Helium's qkv at one row keeps its norm_rows
    launch and the plain product, a LayerNorm'd product skinny_linear."""
    calls, norm_launches = [], []
    real_gemv, real_norm_rows = cuda_ext.gemv, ops._norm_rows_kernel
    monkeypatch.setattr(cuda_ext, "gemv", lambda *a, **kw: calls.append(kw) or real_gemv(*a, **kw))
    monkeypatch.setattr(ops, "_norm_rows_kernel", lambda *a, **kw: norm_launches.append(1) or real_norm_rows(*a, **kw))
    monkeypatch.setattr(ops, "CUDA_GEMV_NORM_AFTER", True)
    d, h = _LM.depformer_dim, _LM.depformer_hidden
    gamma = (1 + 0.5 * torch.randn(d, device="cuda")).bfloat16()
    for rows, n, activation in [(2, 3 * d, None), (2, 2 * h, "silu_gate"), (20, 3 * d, None), (20, 2 * h, "silu_gate")]:
        x = torch.randn(rows, d, device="cuda").bfloat16()
        weight = (torch.randn(n, d, device="cuda") / d ** 0.5).bfloat16()
        got = ops.linear(x, weight, norm=("rms", gamma, 1e-8), activation=activation)
        expected = cuda_ext.gemv_ref(x, weight, norm=(gamma, 1e-8), gated=activation is not None, norm_after=True)
        assert rel_err(got, expected) < 1e-2
    assert [(c.get("norm_after"), c["gated"]) for c in calls] == [(True, False), (True, True)] * 2
    assert not norm_launches
    x, gamma = torch.randn(1, _LM.dim, device="cuda").bfloat16(), torch.ones(_LM.dim, device="cuda").bfloat16()
    ops.linear(x, (torch.randn(3 * _LM.dim, _LM.dim, device="cuda") / 64).bfloat16(), norm=("rms", gamma, 1e-8))
    assert len(norm_launches) == 1 and len(calls) == 5 and not calls[-1].get("norm_after")
    ops.linear(x, x.new_ones(40, _LM.dim), norm=(gamma, None, 1e-5))
    assert len(calls) == 5 and len(norm_launches) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("early", [False, True])
def test_linear_passes_the_early_residual_switch(extension, monkeypatch, early):
    """ops.linear asks the CUDA GEMV for the residual before the products exactly when GEMV_EARLY_RESIDUAL is on."""
    calls = []
    real_gemv = cuda_ext.gemv
    monkeypatch.setattr(cuda_ext, "gemv", lambda *a, **kw: calls.append(kw) or real_gemv(*a, **kw))
    monkeypatch.setattr(ops, "GEMV_EARLY_RESIDUAL", early)
    d, h = _LM.depformer_dim, _LM.depformer_hidden
    hidden = torch.randn(1, d, device="cuda").bfloat16()
    ops.linear(torch.randn(1, h, device="cuda").bfloat16(), (torch.randn(d, h, device="cuda") / 64).bfloat16(),
               residual=hidden, out=hidden)
    assert [c["early_residual"] for c in calls] == [early]


@pytest.mark.gpu
def test_linear_dispatches_the_depth_heads_at_one_row(extension, monkeypatch):
    """ops.linear gives the CUDA GEMV a depth transformer head's product into a contiguous logits row (B = 1), and
    keeps skinny_linear where the rows of out are strided (B > 1 writes one step's column of the audio logits)."""
    calls = []
    real_gemv = cuda_ext.gemv
    monkeypatch.setattr(cuda_ext, "gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real_gemv(*a, **kw))
    d, card, steps = _LM.depformer_dim, _LM.card, _LM.dep_q
    head = (torch.randn(card, d, device="cuda") / d ** 0.5).bfloat16()
    for rows in (1, 3):
        x = torch.randn(rows, d, device="cuda").bfloat16()
        logits = torch.empty(rows, steps, card, device="cuda", dtype=torch.bfloat16)
        ops.linear(x, head, out=logits[:, 2])
        assert rel_err(logits[:, 2], cuda_ext.gemv_ref(x, head)) < 1e-2
    assert calls == [1]


@pytest.mark.gpu
def test_linear_gives_the_gemv_the_normed_rows_of_a_plain_shape(extension, monkeypatch):
    """Where a product's RMSNorm runs in a launch of its own and CUDA_GEMV_SHAPES holds the product without it,
    ops.linear runs norm_rows and then the CUDA GEMV without a norm (plain, or with the SiLU gate)."""
    calls = []
    real_gemv = cuda_ext.gemv
    monkeypatch.setattr(cuda_ext, "gemv", lambda *a, **kw: calls.append(kw) or real_gemv(*a, **kw))
    k, n = 256, 96
    monkeypatch.setattr(ops, "CUDA_GEMV_SHAPES", ops.CUDA_GEMV_SHAPES | {(n, k, "plain"), (2 * n, k, "silu_gate")})
    x = torch.randn(3, k, device="cuda").bfloat16()
    gamma = (1 + 0.5 * torch.randn(k, device="cuda")).bfloat16()
    for rows, activation in ((n, None), (2 * n, "silu_gate")):
        weight = (torch.randn(rows, k, device="cuda") / k ** 0.5).bfloat16()
        got = ops.linear(x, weight, norm=("rms", gamma, 1e-8), activation=activation)
        normed = ops.norm_rows(x, ("rms", gamma, 1e-8))
        assert torch.equal(got, cuda_ext.gemv(normed, weight, gated=activation is not None))
    assert [(c.get("norm"), c["gated"]) for c in calls] == [(None, False), (None, False), (None, True), (None, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("rows, warps", [(5, 1), (5, 3), (5, 8), (5, 16), (16, 16), (30, 8), (40, 3)])
def test_forced_warps_per_block(extension, rows, warps):
    """Any split of K among a block's warps, including more warps than the 9 K steps, up to the most a block of
    that many column groups takes (16, 8 past 16 rows)."""
    x, weight, res, out = operands(rows, 200, 1032, "separate")
    exact = exact_of(x, weight, res)
    cuda_ext.gemv(x, weight, res, out, warps_per_block=warps)
    assert_rounded_once(out, exact)


def test_gemv_max_warps_follows_the_column_groups():
    assert [cuda_ext.gemv_max_warps(rows) for rows in (1, 8, 9, 16, 17, 64)] == [16, 16, 16, 16, 8, 8]


@pytest.mark.gpu
def test_allocates_out_and_is_deterministic(extension):
    x, weight, _, _ = operands(8, 4096, 11264, None)
    first = ops.gemv_cuda(x, weight)
    assert first.shape == (8, 4096) and first.dtype == torch.bfloat16
    assert torch.equal(first, ops.gemv_cuda(x, weight))


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(extension):
    """An in-place hidden += x @ weight.T step (residual = out) captured once, replayed twice after new inputs
    are written into the captured tensors: equal to two eager steps, and no memory allocated by the replays."""
    x, weight, hidden, _ = operands(4, 1000, 1032, "out")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.gemv_cuda(x, weight, hidden, hidden)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.gemv_cuda(x, weight, hidden, hidden)

    new_x, start = torch.randn_like(x), torch.randn_like(hidden)
    expected = start.clone()
    for _ in range(2):
        ops.gemv_cuda(new_x, weight, expected, expected)
    x.copy_(new_x)
    hidden.copy_(start)
    allocated = torch.cuda.memory_allocated()
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated
    assert torch.equal(hidden, expected)


def _bad_calls():
    """(changes to the good arguments, error, message); good: x [3, 64], weight [40, 64], out [3, 40]."""
    def misaligned(ok):
        return ok["x"].new_empty(3 * 64 + 1)[1:].view(3, 64)

    def out_over_x(ok):
        storage = ok["x"].new_empty(3 * 64 + 3 * 40)
        x_end = 3 * 64
        return dict(ok, x=storage[:x_end].view(3, 64), out=storage[x_end - 8:x_end - 8 + 3 * 40].view(3, 40))

    def shifted_residual(ok):
        storage = ok["out"].new_empty(3 * 40 + 8)
        return dict(ok, out=storage[:3 * 40].view(3, 40), residual=storage[8:].view(3, 40))

    return [
        pytest.param(lambda ok: dict(ok, x=ok["x"].float()), TypeError, "x must be bfloat16", id="x-fp32"),
        pytest.param(lambda ok: dict(ok, weight=ok["weight"].half()), TypeError, "weight must be bfloat16",
                     id="weight-fp16"),
        pytest.param(lambda ok: dict(ok, x=ok["x"].new_zeros(65, 64), out=ok["out"].new_zeros(65, 40)),
                     ValueError, "1 to 64 rows", id="65-rows"),
        pytest.param(lambda ok: dict(ok, x=ok["x"].new_zeros(33, 64), out=ok["out"].new_zeros(33, 40),
                                     warps_per_block=16),
                     ValueError, "1 to 8 at 33 rows", id="16-warps-at-33-rows"),
        pytest.param(lambda ok: dict(ok, weight=ok["weight"].new_zeros(40, 72)), ValueError,
                     "do not match along K", id="k-mismatch"),
        pytest.param(lambda ok: dict(ok, x=ok["x"].new_zeros(3, 60), weight=ok["weight"].new_zeros(40, 60)),
                     ValueError, "multiple of 8", id="k-not-multiple-of-8"),
        pytest.param(lambda ok: dict(ok, weight=ok["weight"].new_zeros(64, 40).T), ValueError, "contiguous",
                     id="weight-transposed"),
        pytest.param(lambda ok: dict(ok, x=ok["x"].new_zeros(64)), ValueError, "x must be 2-D", id="x-1d"),
        pytest.param(lambda ok: dict(ok, out=ok["out"].new_zeros(3, 41)), ValueError, "out must have shape",
                     id="out-shape"),
        pytest.param(lambda ok: dict(ok, residual=ok["out"].new_zeros(2, 40)), ValueError,
                     "residual must have shape", id="residual-shape"),
        pytest.param(lambda ok: dict(ok, residual=ok["out"].float()), TypeError, "residual must be bfloat16",
                     id="residual-fp32"),
        pytest.param(lambda ok: dict(ok, x=ok["x"].cpu()), ValueError, "runs on CUDA tensors", id="x-on-cpu"),
        pytest.param(lambda ok: dict(ok, weight=ok["weight"].cpu()), ValueError,
                     "weight must be on x's device", id="weight-on-cpu"),
        pytest.param(lambda ok: {name: t.cpu() for name, t in ok.items()}, NotImplementedError, "CPU",
                     id="all-on-cpu"),
        pytest.param(lambda ok: dict(ok, x=misaligned(ok)), ValueError, "16-byte aligned", id="x-misaligned"),
        pytest.param(out_over_x, ValueError, "out overlaps x", id="out-overlaps-x"),
        pytest.param(lambda ok: dict(ok, out=ok["weight"].view(-1)[:3 * 40].view(3, 40)), ValueError,
                     "out overlaps weight", id="out-in-weight"),
        pytest.param(shifted_residual, ValueError, "residual overlaps out", id="residual-shifted-from-out"),
        pytest.param(lambda ok: dict(ok, warps_per_block=17), ValueError, "warps_per_block",
                     id="seventeen-warps"),
        pytest.param(lambda ok: dict(ok, norm=(ok["x"].new_ones(72), 1e-5)), ValueError,
                     r"norm_weight must have shape \[64\]", id="norm-weight-length"),
        pytest.param(lambda ok: dict(ok, norm=(ok["x"].new_ones(64).float(), 1e-5)), TypeError,
                     "norm_weight must be bfloat16", id="norm-weight-fp32"),
        pytest.param(lambda ok: dict(ok, norm=(ok["x"].new_ones(2, 64), 1e-5)), ValueError,
                     "norm_weight must be 1-D", id="norm-weight-2d"),
        pytest.param(lambda ok: dict(ok, weight=ok["weight"][:39].contiguous(), out=ok["out"][:, :19].contiguous(),
                                     gated=True), ValueError, "even number of rows", id="gated-odd-rows"),
        pytest.param(lambda ok: dict(ok, gated=True), ValueError, r"out must have shape \[3, 20\]",
                     id="gated-out-width"),
        pytest.param(lambda ok: dict(ok, norm_after=True), ValueError, "norm_after needs a norm",
                     id="norm-after-without-norm"),
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("change, error, message", _bad_calls())
def test_bad_arguments_raise(extension, change, error, message):
    ok = {"x": torch.randn(3, 64, device="cuda").bfloat16(),
          "weight": torch.randn(40, 64, device="cuda").bfloat16(),
          "out": torch.empty(3, 40, device="cuda", dtype=torch.bfloat16)}
    call = change(ok)
    with pytest.raises(error, match=message):
        cuda_ext.gemv(call.pop("x"), call.pop("weight"), call.pop("residual", None), **call)
