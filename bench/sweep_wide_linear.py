"""A wide grid of tensor-core launch plans for the Mimi transformer's linears (skinny_linear, fp32) at one batch.

    python bench/sweep_wide_linear.py --batch 64 --json sweep.json [--budget-s 200]

sweep_tiles.py tries the neighbours of the current plan, one knob at a time; at 64 conversations (M = 128 rows) the
codec's linears took 11-19 µs each on an H100 for 67-270 MFLOP, where a plain tf32x3 GEMM of their size would take
a few. This tries every plan of a fixed grid: row x column tiles from 16 x 32 to 128 x 64, 64- and 128-wide K
chunks, K split 1, 2 or 4 ways, 4 warps (8 for the largest tiles), 3 stages, each product as the codec runs it
(sweep_tiles._linear_cases). Each plan is timed in a CUDA graph of back-to-back calls (median of the replays), and
its output compared with the current plan's.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sweep_tiles import WORKSPACE_FLOATS, linear_products  # noqa: E402
from bench.sweep_wide_convtr import sweep_main, time_plans  # noqa: E402
from moshi_fast import MimiCodec, moshiko  # noqa: E402
from moshi_fast.kernels._utils import SplitWorkspace  # noqa: E402
from moshi_fast.kernels.skinny_linear import SkinnyTiles, skinny_linear, skinny_linear_tiles  # noqa: E402

TILES = [(16, 32), (32, 32), (64, 32), (32, 64), (64, 64), (128, 32), (128, 64)]
"""(block_m, block_n) of the plans tried."""
NAMES = ["qkv+LN", "out+residual", "fc1+LN+gelu", "fc2+residual"]


def grid() -> list[SkinnyTiles]:
    """The plans tried, each tile with K chunks of 64 and 128 and K split 1, 2 and 4 ways."""
    return [SkinnyTiles(bm, bn, bk, True, split, 8 if bm * bn >= 128 * 32 else 4, 3)
            for bm, bn in TILES for bk in (64, 128) for split in (1, 2, 4)]


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
