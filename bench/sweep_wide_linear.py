"""A wide grid of tensor-core launch plans for the Mimi transformer's linears (skinny_linear, fp32) at one batch.

    python bench/sweep_wide_linear.py --batch 64 --json sweep.json [--budget-s 200]

sweep_tiles.py tries the neighbours of the current plan, one knob at a time; at 64 conversations (M = 128 rows) the
codec's linears took 11-19 µs each on an H100 for 67-270 MFLOP, where a plain tf32x3 GEMM of their size would take
a few. This tries every plan of a fixed grid (PLANS: row x column tiles from 16 x 32 to 128 x 64, 32- and 64-wide K
chunks, K unsplit or split 4 ways, 3 stages), each product as the codec runs it (sweep_tiles.linear_products).
Each plan is timed in a CUDA graph of back-to-back calls (median of the replays), and its output compared with the
current plan's.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sweep_tiles import WORKSPACE_FLOATS, linear_products  # noqa: E402
from bench._harness import sweep_main, time_plans  # noqa: E402
from moshi_fast import MimiCodec, moshiko  # noqa: E402
from moshi_fast.kernels._utils import SplitWorkspace  # noqa: E402
from moshi_fast.kernels.skinny_linear import SkinnyTiles, skinny_linear, skinny_linear_tiles  # noqa: E402

PLANS = [(16, 32, 32, 4), (16, 32, 64, 4), (16, 64, 32, 4), (32, 32, 32, 4), (32, 64, 32, 4), (64, 32, 32, 4),
         (64, 32, 64, 8), (64, 64, 32, 4), (64, 64, 64, 8), (128, 32, 32, 8), (128, 32, 64, 8), (128, 64, 32, 8)]
"""(block_m, block_n, block_k, num_warps) of the plans tried: tiles that ptxas (sm_90a, Triton 3.9) compiles without
spilling. The registers grow with block_k (16 x 32 tiles with 4 warps: 96 at 32, 186 at 64, 255 and spilling
at 128), so K chunks are 32 or 64 wide."""
NAMES = ["qkv+LN", "out+residual", "fc1+LN+gelu", "fc2+residual"]


def grid() -> list[SkinnyTiles]:
    """The plans tried, each with K unsplit and split 4 ways."""
    return [SkinnyTiles(bm, bn, bk, True, split, warps, 3) for bm, bn, bk, warps in PLANS for split in (1, 4)]


_products: dict = {}


def sweep_shape(name: str, batch: int, deadline: float, device: str) -> list[dict]:
    """The current plan of the product `name`, then every grid plan until `deadline`, as rows."""
    if batch not in _products:
        model = MimiCodec.random(moshiko().mimi, device=device, backend="fast", eager=True).model
        _products[batch] = (linear_products(model, batch, device), SplitWorkspace(WORKSPACE_FLOATS, 1 << 16, device))
    products, workspace = _products[batch]
    inputs, weight, kwargs, out = products[name]

    def run(plan, into=out):
        skinny_linear(inputs, weight, out=into, tiles=plan, workspace=workspace, **kwargs)

    default = skinny_linear_tiles(inputs.shape[0], weight.shape[0], weight.shape[1], torch.float32, split_k=True)
    reference = torch.empty_like(out)
    run(default, reference)
    return time_plans(name, batch, [default, *grid()], run, run, out, reference, deadline)


def main(argv=None) -> int:
    return sweep_main(argv, __doc__.split("\n")[0], dict.fromkeys(NAMES), ",".join(NAMES), sweep_shape)


if __name__ == "__main__":
    sys.exit(main())
