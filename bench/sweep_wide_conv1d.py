"""A wide grid of launch plans for the codec's dense convs (conv1d_stream) at one batch, columns first.

    python bench/sweep_wide_conv1d.py --batch 64 --json sweep.json [--shapes enc.down1,enc.down0] [--budget-s 300]

As sweep_wide_convtr.py for the transposed convs: the default plan, the default in the other operand order
(columns_first) and columns first with the weight read as its two tf32 parts (split_weight, the parts made once as a
prepared model makes them), then every tile of the same grid with the columns as the dot's first operand, with and
without the weight's parts, each split until the grid has about 256 programs. (The grid with the rows first lost to
the table's B = 64 plans on an H100:
bench/results/2026-12-07_H100_c0b0025_sweep_conv1d_b64_columns_first.json.) Each plan is timed in a CUDA graph of
back-to-back calls (median of the replays) on random inputs at Mimi's shapes, and its output is compared with the
default plan's.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_conv1d_stream import SHAPES, random_operands  # noqa: E402
from bench._harness import sweep_main, time_plans  # noqa: E402
from bench.sweep_wide_convtr import GRID  # noqa: E402
from moshi_fast.kernels._utils import SplitWorkspace, split_tf32  # noqa: E402
from moshi_fast.kernels.conv1d_stream import ConvTiles, _grid, _plan, conv1d_stream  # noqa: E402

TARGET_PROGRAMS = 256


def _split_to_fill(tiles: ConvTiles, shape: tuple) -> ConvTiles:
    """tiles with the reduction split (at most 16 ways, at least 4 steps a split) until the grid has about
    TARGET_PROGRAMS programs, rounded as _grid rounds it."""
    grid = _grid(tiles, *shape)
    programs = grid.co_tiles * grid.n_tiles
    steps = triton.cdiv(shape[1] * shape[3], tiles.block_r)
    split = max(1, min(16, steps // 4, triton.cdiv(TARGET_PROGRAMS, programs)))
    return _grid(tiles._replace(split=split), *shape).tiles


def sweep_shape(name: str, batch: int, deadline: float, device: str) -> list[dict]:
    """The default plan, the default in the other order and with the weight's parts, then every GRID plan columns
    first, with and without the weight's parts, until `deadline`."""
    c_in, c_out, kernel, stride, t_in, elu, _ = SHAPES[name]
    shape = (batch, c_in, c_out, kernel, stride, t_in)
    x, weight, bias, state, frame, residual, out = random_operands(batch, SHAPES[name], device)
    workspace = SplitWorkspace(1 << 24, 1 << 14, device=device)
    parts = split_tf32(weight)

    def run(tiles, into=out, history=state):
        conv1d_stream(x, history, frame, weight, bias, stride, elu, residual, out=into, workspace=workspace,
                      tiles=tiles, weight_parts=parts)

    default = _plan(*shape)
    reference = torch.empty_like(out)
    run(default, reference, state.clone())
    plans = [default]
    if default.dot:
        plans += [default._replace(columns_first=not default.columns_first),
                  default._replace(columns_first=True, split_weight=True)]
    plans += [_split_to_fill(ConvTiles(bco, bn, br, 1, warps, stages, columns_first=True, split_weight=split), shape)
              for bco, bn, br, warps, stages in GRID for split in (True, False)]
    return time_plans(name, batch, plans, lambda plan, into: run(plan, into, state.clone()), lambda plan: run(plan),
                      out, reference, deadline)


def main(argv=None) -> int:
    return sweep_main(argv, __doc__.split("\n")[0], SHAPES,
                      "enc.down1,enc.down0,enc.down2,dec.conv_in,enc.res0.conv1,enc.down3", sweep_shape)


if __name__ == "__main__":
    sys.exit(main())
