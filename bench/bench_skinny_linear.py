"""skinny_linear at Mimi's transformer shapes (fp32, M = 2 new steps x B slots) and at the language
model's decode linears (bf16, M = batch), beside the torch path: F.layer_norm or the reference RMSNorm,
cuBLAS F.linear (addmm with the residual as its beta term), F.gelu or the SiLU gating. The split cases
give the kernel a SplitWorkspace, so that its default tiles may split K.

BENCH_LM_CANDIDATES=1 also times every candidate tiling (skinny_linear_candidate_tiles) of the language
model's shapes, one case per candidate, its tiles in the case's extra_info, for a sweep of the plans."""
import os

import pytest
import torch
import torch.nn.functional as F

from moshi_fast.config import LMConfig
from moshi_fast.kernels._utils import SplitWorkspace
from moshi_fast.kernels.norm_rows import norm_rows
from moshi_fast.kernels.skinny_linear import (Norm, skinny_linear, skinny_linear_candidate_tiles,
                                              skinny_linear_tiles, skinny_linear_workspace_size)
from moshi_fast.reference.lm import RMSNorm

GPU = torch.cuda.is_available()
# K, N, LayerNorm, GELU, residual
MIMI = {
    "qkv+LN": (512, 1536, True, False, False),
    "out+res": (512, 512, False, False, True),
    "fc1+LN+gelu": (512, 2048, True, True, False),
    "fc2+res": (2048, 512, False, False, True),
}
_LM = LMConfig()
# K, N (the output width: the gate_up weight has 2N rows), RMSNorm, SiLU gate, residual
LM = {
    "lm 4096>12288": (_LM.dim, 3 * _LM.dim, False, False, False),
    "lm 11264>4096": (_LM.hidden, _LM.dim, False, False, False),
    "qkv+rms 4096>12288": (_LM.dim, 3 * _LM.dim, True, False, False),
    "out+res 4096>4096": (_LM.dim, _LM.dim, False, False, True),
    "gate_up+rms+silu 4096>2x11264": (_LM.dim, _LM.hidden, True, True, False),
    "down+res 11264>4096": (_LM.hidden, _LM.dim, False, False, True),
    "head+rms 4096>32000": (_LM.dim, _LM.text_card, True, False, False),
    "dep qkv+rms 1024>3072": (_LM.depformer_dim, 3 * _LM.depformer_dim, True, False, False),
    "dep out+res 1024>1024": (_LM.depformer_dim, _LM.depformer_dim, False, False, True),
    "dep gate_up+rms+silu 1024>2x2816": (_LM.depformer_dim, _LM.depformer_hidden, True, True, False),
    "dep down+res 2816>1024": (_LM.depformer_hidden, _LM.depformer_dim, False, False, True),
}
LM_ROWS = [1, 8, 64] if GPU else [2]
MAX_CANDIDATES = 10


def tiny(k: int, n: int) -> tuple[int, int]:
    return (k, n) if GPU else (min(k, 48), min(n, 40))


def run(measure, device, shape: str, rows: int, batch: int, k: int, n: int, dtype: torch.dtype, norm: bool,
        gelu: bool, residual: bool, split: bool, separate_norm: bool = False):
    """One of Mimi's linears; separate_norm: the LayerNorm by norm_rows first, then the product without a norm,
    both launches timed together."""
    x = torch.randn(rows, k, device=device).to(dtype)
    weight = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    norm_args = None
    if norm:
        norm_args = (1 + 0.1 * torch.randn(k, device=device), 0.1 * torch.randn(k, device=device), 1e-5)
    res = torch.randn(rows, n, device=device).to(dtype) if residual else None
    out = torch.empty(rows, n, device=device, dtype=dtype)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if GPU else 1
    tiles = skinny_linear_tiles(rows, n, k, dtype, sms=sms, split_k=split)
    workspace = SplitWorkspace(*skinny_linear_workspace_size(rows, n, tiles), device) if split else None

    normed = torch.empty(rows, k, device=device)

    def fast():
        if separate_norm:
            skinny_linear(norm_rows(x, norm_args, out=normed), weight, activation="gelu" if gelu else None,
                          residual=res, out=out, workspace=workspace)
        else:
            skinny_linear(x, weight, norm=norm_args, activation="gelu" if gelu else None, residual=res, out=out,
                          workspace=workspace)

    def torch_path():
        h = F.layer_norm(x, (k,), *norm_args) if norm else x
        if residual:
            return torch.addmm(res, h, weight.t())
        y = F.linear(h, weight)
        return F.gelu(y) if gelu else y

    moved = weight.nbytes + x.nbytes + out.nbytes + (res.nbytes if residual else 0)
    measure(fast, moved, torch_path, op="skinny_linear",
            shape=shape + (" split" if split else "") + (" separate norm" if separate_norm else ""),
            batch=batch, rows=rows, dtype=str(dtype).removeprefix("torch."), tiles=repr(tiles))


def run_language_model(measure, device, shape: str, rows: int, split: bool, candidate: int | None = None,
                       separate_norm: bool = False):
    """One of LM's linears in bf16, default tiles (or candidate number `candidate`), beside the language
    model's torch path. Skips a candidate number past the shape's list. separate_norm: the rows normalised by
    norm_rows first, then the product without a norm (ops.linear's path for an RMSNorm, SEPARATE_NORM_KINDS),
    both launches timed together."""
    k, n, rms, gated, residual = LM[shape]
    k, n = tiny(k, n)
    dtype = torch.bfloat16
    sms = torch.cuda.get_device_properties(device).multi_processor_count if GPU else 1
    if candidate is None:
        tiles = skinny_linear_tiles(rows, n, k, dtype, sms=sms, split_k=split, gated=gated)
    else:
        candidates = skinny_linear_candidate_tiles(rows, n, k, dtype, sms=sms, split_k=split, gated=gated)
        if candidate >= len(candidates):
            pytest.skip(f"{shape} at M = {rows} has {len(candidates)} candidates")
        tiles = candidates[candidate]
    x = torch.randn(rows, k, device=device).to(dtype)
    weight = (torch.randn(2 * n if gated else n, k, device=device) / k ** 0.5).to(dtype)
    reference_norm = RMSNorm(k, _LM.norm_eps).to(device, dtype)
    with torch.no_grad():
        reference_norm.weight.copy_(1 + 0.1 * torch.randn(k))
    norm = Norm("rms", reference_norm.weight.detach(), None, _LM.norm_eps) if rms else None
    res = torch.randn(rows, n, device=device).to(dtype) if residual else None
    out = torch.empty(rows, n, device=device, dtype=dtype)
    workspace = (SplitWorkspace(*skinny_linear_workspace_size(rows, n, tiles, gated=gated), device)
                 if tiles.split_k > 1 else None)

    normed = torch.empty_like(x)

    def fast():
        if separate_norm:
            skinny_linear(norm_rows(x, norm, out=normed), weight, activation="silu_gate" if gated else None,
                          residual=res, out=out, tiles=tiles, workspace=workspace)
        else:
            skinny_linear(x, weight, norm=norm, activation="silu_gate" if gated else None, residual=res, out=out,
                          tiles=tiles, workspace=workspace)

    @torch.no_grad()
    def torch_path():
        h = reference_norm(x) if rms else x
        if residual:
            return torch.addmm(res, h, weight.t())
        y = F.linear(h, weight)
        if gated:
            gate, up = y.chunk(2, dim=-1)
            return F.silu(gate) * up
        return y

    moved = weight.nbytes + x.nbytes + out.nbytes + (res.nbytes if residual else 0) + (k * 2 if rms else 0)
    label = (shape + (" split" if split else "") + (" separate norm" if separate_norm else "")
             + ("" if candidate is None else f" candidate {candidate}"))
    measure(fast, moved, torch_path, op="skinny_linear", shape=label, batch=rows, rows=rows, dtype="bfloat16",
            tiles=repr(tiles))


@pytest.mark.parametrize("split", [False, True] if GPU else [False])
@pytest.mark.parametrize("rows", [2, 16, 128] if GPU else [3])
@pytest.mark.parametrize("name", list(MIMI))
def test_skinny_linear_mimi(measure, device, name, rows, split):
    k, n, norm, gelu, residual = MIMI[name]
    slots = max(1, rows // 2)
    run(measure, device, name, rows, slots, *tiny(k, n), torch.float32, norm, gelu, residual, split)


@pytest.mark.parametrize("rows", [2, 16, 128] if GPU else [3])
@pytest.mark.parametrize("name", [name for name, (_, _, norm, _, _) in MIMI.items() if norm])
def test_skinny_linear_mimi_separate_norm(measure, device, name, rows):
    """Mimi's LayerNorm shapes with the norm in a launch of its own (split plans), beside the fused cases above:
    whether ops.SEPARATE_NORM_KINDS should take the LayerNorm too."""
    k, n, norm, gelu, residual = MIMI[name]
    run(measure, device, name, rows, max(1, rows // 2), *tiny(k, n), torch.float32, norm, gelu, residual, True,
        separate_norm=True)


@pytest.mark.parametrize("split", [False, True] if GPU else [True])
@pytest.mark.parametrize("rows", LM_ROWS)
@pytest.mark.parametrize("name", list(LM))
def test_skinny_linear_lm(measure, device, name, rows, split):
    run_language_model(measure, device, name, rows, split)


@pytest.mark.parametrize("rows", LM_ROWS)
@pytest.mark.parametrize("name", [name for name, (_, _, rms, _, _) in LM.items() if rms])
def test_skinny_linear_lm_separate_norm(measure, device, name, rows):
    """The RMSNorm shapes with the norm in a launch of its own, beside the fused cases above (split plans)."""
    run_language_model(measure, device, name, rows, split=True, separate_norm=True)


@pytest.mark.skipif(not os.environ.get("BENCH_LM_CANDIDATES"), reason="set BENCH_LM_CANDIDATES=1 to sweep")
@pytest.mark.parametrize("candidate", range(MAX_CANDIDATES))
@pytest.mark.parametrize("rows", LM_ROWS)
@pytest.mark.parametrize("name", [name for name in LM if not name.startswith("lm ")])
def test_skinny_linear_lm_candidates(measure, device, name, rows, candidate):
    run_language_model(measure, device, name, rows, split=True, candidate=candidate)
