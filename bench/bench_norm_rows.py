"""norm_rows beside the torch path (norm_rows_ref: the reference RMSNorm's fp32 math, or F.layer_norm) at the
shapes ops.linear normalises separately: Helium's and the depth transformer's RMSNorm rows (bf16, M = batch) and
Mimi's transformer LayerNorm rows (fp32, M = 2 steps x batch)."""
import pytest
import torch

from moshi_fast.config import LMConfig, MimiConfig
from moshi_fast.kernels.norm_rows import norm_rows, norm_rows_ref
from moshi_fast.kernels.skinny_linear import Norm

GPU = torch.cuda.is_available()
_LM, _MIMI = LMConfig(), MimiConfig()
# name: K, kind, rows per slot, dtype (on the CPU interpreter, small rows that only keep the suite alive)
SHAPES = {"helium rms": (_LM.dim, "rms", 1, torch.bfloat16),
          "depth rms": (_LM.depformer_dim, "rms", 1, torch.bfloat16),
          "mimi layer": (_MIMI.dimension, "layer", 2, torch.float32)}


@pytest.mark.parametrize("batch", [8, 64] if GPU else [3])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_norm_rows(measure, device, shape, batch):
    k, kind, rows_per_slot, dtype = SHAPES[shape]
    k = k if GPU else 40
    dtype = dtype if GPU else torch.float32
    rows = rows_per_slot * batch
    x = torch.randn(rows, k, device=device).to(dtype)
    weight = 1 + 0.1 * torch.randn(k, device=device)
    norm = Norm(kind, weight, 0.1 * torch.randn(k, device=device) if kind == "layer" else None, 1e-5)
    out_dtype = dtype if kind == "rms" else torch.float32
    out = torch.empty(rows, k, device=device, dtype=out_dtype)

    def fast():
        norm_rows(x, norm, out=out)

    def torch_path():
        norm_rows_ref(x, norm, out=out)

    moved = x.nbytes + out.nbytes + weight.nbytes * (2 if kind == "layer" else 1)
    measure(fast, moved, torch_path, op="norm_rows", shape=shape, batch=batch, rows=rows, dim=k,
            dtype=str(dtype).removeprefix("torch."))
