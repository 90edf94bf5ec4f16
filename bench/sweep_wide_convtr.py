"""A wide grid of launch plans for the decoder's dense transposed convs at one batch, both operand orders.

    python bench/sweep_wide_convtr.py --batch 64 --json sweep.json [--shapes dec.up2,dec.up3] [--budget-s 300]

sweep_tiles.py tries one-knob neighbours of the current plan; this tries every tile of a fixed grid (row x column
tiles whose accumulator is at most 32 fp32 elements a thread, which ptxas for sm_90a fits in 255 registers without
spilling, with 8 warps and 16- or 32-channel steps, and two 4-warp plans), each with the rows and with the columns
as the dot's first operand (columns_first), and columns first also with the weight read as its two tf32 parts
(split_weight, the parts made once as a prepared model makes them). Each plan is timed as sweep_tiles.py times one
(a CUDA graph of back-to-back calls, median of the replays) on random inputs at Mimi's shapes, and its output is
compared with the default plan's. The JSON lists every plan's µs and relative difference, the default's marked;
plans that win go into kernels/tuned_tiles.json by hand, after the codec is timed with them (bench_mimi.py
--compare-table).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import sweep_main, time_plans  # noqa: E402
from bench.bench_conv_transpose1d_stream import SHAPES, random_operands  # noqa: E402
from moshi_fast.kernels._utils import SplitWorkspace, split_tf32  # noqa: E402
from moshi_fast.kernels.conv_transpose1d_stream import (ConvTransposeTiles, _default_plan,  # noqa: E402
                                                        conv_transpose1d_stream, pack_conv_transpose_weight)

GRID = [(bm, bn, bci, 8, 3) for bm, bn in ((32, 128), (64, 64), (64, 128), (128, 64)) for bci in (32, 16)]
GRID += [(32, 128, 32, 4, 3), (64, 64, 32, 4, 3)]
"""(block_m, block_n, block_ci, num_warps, num_stages) of the plans tried, each in both operand orders (and columns
first with the weight's tf32 parts)."""


def sweep_shape(name: str, batch: int, deadline: float, device: str) -> list[dict]:
    """The default plan, then every GRID plan in both orders until `deadline` (time.time()), as rows."""
    c_in, c_out, kernel, stride, t_in, groups = SHAPES[name]
    x, weight, bias, partial, frame, out = random_operands(batch, SHAPES[name], device)
    packed = pack_conv_transpose_weight(weight, stride)
    parts = split_tf32(packed)
    workspace = SplitWorkspace(1 << 24, 1 << 14, device=device)

    def run(tiles, into=out, state=partial):
        conv_transpose1d_stream(x, state, frame, weight, bias, stride, groups, True, out=into, packed_weight=packed,
                                workspace=workspace, tiles=tiles, weight_parts=parts)

    default = _default_plan(batch, c_in, c_out, kernel, stride, t_in, groups)
    reference = torch.empty_like(out)
    run(default, reference, partial.clone())
    plans = [default]
    if default.dot:
        plans.append(default._replace(columns_first=True, split_weight=True))
    plans += [ConvTransposeTiles(bm, bn, bci, 1, warps, stages, columns_first=order, split_weight=split)
              for bm, bn, bci, warps, stages in GRID for order, split in ((True, True), (True, False), (False, False))]
    return time_plans(name, batch, plans, lambda plan, into: run(plan, into, partial.clone()), lambda plan: run(plan),
                      out, reference, deadline)


def main(argv=None) -> int:
    return sweep_main(argv, __doc__.split("\n")[0], SHAPES, "dec.up2,dec.up3,dec.up1", sweep_shape)


if __name__ == "__main__":
    sys.exit(main())
