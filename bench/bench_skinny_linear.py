"""skinny_linear at Mimi's transformer shapes (fp32, M = 2 new steps x B slots) and at two of the
language model's decode linears (bf16, M = batch), beside the torch path: F.layer_norm, cuBLAS
F.linear (addmm with the residual as its beta term), F.gelu. The split cases give the kernel a
SplitWorkspace, so that its default tiles may split K."""
import pytest
import torch
import torch.nn.functional as F

from moshi_fast.kernels._utils import SplitWorkspace
from moshi_fast.kernels.skinny_linear import skinny_linear, skinny_linear_tiles, skinny_linear_workspace_size

GPU = torch.cuda.is_available()
# K, N, LayerNorm, GELU, residual
MIMI = {
    "qkv+LN": (512, 1536, True, False, False),
    "out+res": (512, 512, False, False, True),
    "fc1+LN+gelu": (512, 2048, True, True, False),
    "fc2+res": (2048, 512, False, False, True),
}
LM = {"lm 4096>12288": (4096, 12288), "lm 11264>4096": (11264, 4096)}


def tiny(k: int, n: int) -> tuple[int, int]:
    return (k, n) if GPU else (min(k, 48), min(n, 40))


def run(measure, device, shape: str, rows: int, batch: int, k: int, n: int, dtype: torch.dtype, norm: bool,
        gelu: bool, residual: bool, split: bool):
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

    def fast():
        skinny_linear(x, weight, norm=norm_args, activation="gelu" if gelu else None, residual=res, out=out,
                      workspace=workspace)

    def torch_path():
        h = F.layer_norm(x, (k,), *norm_args) if norm else x
        if residual:
            return torch.addmm(res, h, weight.t())
        y = F.linear(h, weight)
        return F.gelu(y) if gelu else y

    moved = weight.nbytes + x.nbytes + out.nbytes + (res.nbytes if residual else 0)
    measure(fast, moved, torch_path, op="skinny_linear", shape=shape + (" split" if split else ""),
            batch=batch, rows=rows, dtype=str(dtype).removeprefix("torch."), tiles=repr(tiles))


@pytest.mark.parametrize("split", [False, True] if GPU else [False])
@pytest.mark.parametrize("rows", [2, 16, 128] if GPU else [3])
@pytest.mark.parametrize("name", list(MIMI))
def test_skinny_linear_mimi(measure, device, name, rows, split):
    k, n, norm, gelu, residual = MIMI[name]
    slots = max(1, rows // 2)
    run(measure, device, name, rows, slots, *tiny(k, n), torch.float32, norm, gelu, residual, split)


@pytest.mark.parametrize("rows", [1, 8, 64] if GPU else [2])
@pytest.mark.parametrize("name", list(LM))
def test_skinny_linear_lm(measure, device, name, rows):
    run(measure, device, name, rows, rows, *tiny(*LM[name]), torch.bfloat16, False, False, False, False)
