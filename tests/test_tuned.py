"""The measured launch plans (kernels/tuned_tiles.json): valid for their kernels, found by the
kernels' default planning, and chosen by nearest batch."""
import json

import pytest
import torch

from moshi_fast.kernels import conv1d_stream as conv1d
from moshi_fast.kernels import conv_transpose1d_stream as convtr
from moshi_fast.kernels import paged_attention as paged
from moshi_fast.kernels import ring_attention as ring
from moshi_fast.kernels import skinny_linear as linear
from moshi_fast.kernels import tuned

TABLE = json.loads(tuned.TABLE_PATH.read_text())


def _cases(op):
    return [(shape, int(batch), plan) for shape, plans in TABLE.get(op, {}).items() for batch, plan in plans.items()]


def test_table_covers_every_op():
    assert set(TABLE) == {"conv1d", "convtr", "linear", "paged_attention", "ring"}


@pytest.mark.parametrize("shape, batch, plan", _cases("conv1d"))
def test_conv1d_plans_are_valid_and_used(shape, batch, plan):
    """The table's tensor-core plans are the convs' plans, except where few output columns take the FMA plan."""
    c_in, c_out, kernel, stride, t_in = map(int, shape.split(","))
    grid = conv1d._grid(conv1d.ConvTiles(**plan), batch, c_in, c_out, kernel, stride, t_in)
    assert conv1d._dot_plan(batch, c_in, c_out, kernel, stride, t_in) == grid.tiles
    if batch * (t_in // stride) > conv1d.FMA_MAX_COLUMNS:
        assert conv1d._plan(batch, c_in, c_out, kernel, stride, t_in) == grid.tiles
        assert conv1d.conv1d_stream_workspace_size(batch, c_in, c_out, kernel, stride, t_in) == grid.workspace_size()
    else:
        assert not conv1d._plan(batch, c_in, c_out, kernel, stride, t_in).dot


@pytest.mark.parametrize("shape, batch, plan", _cases("convtr"))
def test_conv_transpose_plans_are_valid_and_used(shape, batch, plan):
    c_in, c_out, kernel, stride, t_in, groups = map(int, shape.split(","))
    tiles = convtr.ConvTransposeTiles(**plan)
    geometry = convtr._geometry(batch, c_in, c_out, kernel, stride, t_in, groups)
    assert convtr._tiles_error(geometry, tiles) is None
    assert convtr._dot_default_plan(batch, c_in, c_out, kernel, stride, t_in, groups) == tiles
    if groups > 1 or geometry.cols > convtr.FMA_MAX_COLUMNS:
        assert convtr._default_plan(batch, c_in, c_out, kernel, stride, t_in, groups) == tiles
    else:
        assert not convtr._default_plan(batch, c_in, c_out, kernel, stride, t_in, groups).dot


@pytest.mark.parametrize("shape, rows, plan", _cases("linear"))
def test_linear_plans_are_valid_and_used(shape, rows, plan):
    n, k, dtype, *gate = shape.split(",")
    gated = gate == ["silu_gate"]
    assert gate in ([], ["silu_gate"])
    tiles = linear.SkinnyTiles(**plan)
    linear._check_tiles(tiles)
    assert linear.skinny_linear_tiles(rows, int(n), int(k), getattr(torch, dtype), split_k=True, gated=gated) == tiles
    without_workspace = linear.skinny_linear_tiles(rows, int(n), int(k), getattr(torch, dtype), split_k=False,
                                                   gated=gated)
    assert without_workspace.split_k == 1


@pytest.mark.parametrize("shape, batch, plan", _cases("ring"))
def test_ring_plans_are_valid_and_used(shape, batch, plan):
    heads, head_dim, capacity = map(int, shape.split(","))
    assert ring._resolve_tiles(batch, heads, head_dim, capacity, None, 1) == (plan["block_r"], plan["num_warps"])


@pytest.mark.parametrize("shape, batch, plan", _cases("paged_attention"))
def test_paged_attention_plans_are_valid_and_used(shape, batch, plan):
    """A plan keyed by the shape alone serves 16-bit pools (and 8-bit ones without their own); one keyed by the
    shape and an 8-bit dtype serves that dtype."""
    heads, head_dim, context, *kv_dtype = shape.split(",")
    kv_dtype = getattr(torch, kv_dtype[0]) if kv_dtype else torch.bfloat16
    expected = (plan["block_n"], plan["splits"], plan["num_warps"], plan["num_stages"])
    assert paged._resolve_tiles(batch, int(heads), int(head_dim), int(context), None, 1, kv_dtype) == expected


def test_nearest_batch_on_a_log_scale_and_heuristics_only():
    shape, plans = next(iter(TABLE["conv1d"].items()))
    swept = sorted(int(b) for b in plans)
    assert tuned.tuned_tiles("conv1d", shape, swept[0]) == plans[str(swept[0])]
    assert tuned.tuned_tiles("conv1d", shape, 10 * swept[-1]) == plans[str(swept[-1])]
    assert tuned.tuned_tiles("conv1d", "1,2,3", 1) is None
    with tuned.heuristics_only():
        assert tuned.tuned_tiles("conv1d", shape, swept[0]) is None
    assert tuned.shape_key(512, 3, torch.float32) == "512,3,float32"


def test_gated_products_have_plans_of_their_own(monkeypatch):
    """A plan under the gated key serves the SiLU-gated product only; the plain product of the same shape keeps its
    own plan (here, the heuristics')."""
    n, k, rows = 2816, 1024, 64
    plan = {"block_m": 64, "block_n": 32, "block_k": 64, "dot": True, "split_k": 2, "num_warps": 8, "num_stages": 2}
    key = linear.linear_plan_key(n, k, torch.bfloat16, gated=True)
    assert key == "2816,1024,bfloat16,silu_gate"
    with tuned.heuristics_only():
        plain = linear.skinny_linear_tiles(rows, n, k, torch.bfloat16, sms=132, split_k=True)
    monkeypatch.setattr(tuned, "_table", lambda: {"linear": {key: {str(rows): plan}}})
    assert linear.skinny_linear_tiles(rows, n, k, torch.bfloat16, sms=132, split_k=True, gated=True) == \
        linear.SkinnyTiles(**plan)
    assert linear.skinny_linear_tiles(rows, n, k, torch.bfloat16, sms=132, split_k=True) == plain


def test_plans_from_substitutes_another_table_inside_the_block_only():
    """A benchmark times a previous table's plans beside the current ones: inside the block the convs plan (and
    size their split workspace) from the given table, and the file's plans come back after it, even on an error."""
    batch, c_in, c_out, kernel, stride, t_in = 64, 256, 512, 12, 6, 96
    key = tuned.shape_key(c_in, c_out, kernel, stride, t_in)
    file_plan = conv1d._plan(batch, c_in, c_out, kernel, stride, t_in)
    other = conv1d.ConvTiles(block_co=32, block_n=16, block_r=16, split=4, num_warps=2, num_stages=2)
    assert other != file_plan
    with pytest.raises(RuntimeError), tuned.plans_from({"conv1d": {key: {str(batch): other._asdict()}}}):
        assert conv1d._plan(batch, c_in, c_out, kernel, stride, t_in) == other
        grid = conv1d._grid(other, batch, c_in, c_out, kernel, stride, t_in)
        assert conv1d.conv1d_stream_workspace_size(batch, c_in, c_out, kernel, stride, t_in) == grid.workspace_size()
        # A shape the substitute table lacks takes the heuristics' plan, not the file's.
        with tuned.heuristics_only():
            heuristic = conv1d._plan(batch, 512, 256, 3, 1, 16)
        assert conv1d._plan(batch, 512, 256, 3, 1, 16) == heuristic
        raise RuntimeError("the block fails")
    assert conv1d._plan(batch, c_in, c_out, kernel, stride, t_in) == file_plan
