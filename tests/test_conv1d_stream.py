"""conv1d_stream kernel vs its torch reference, over frames (parity), odd shapes and layouts, forced
tilings (column tiles across slots, slots across tiles, split-K with a shared workspace), and the
default plan's workspace arithmetic at Mimi's shapes."""
import pytest
import torch
import triton

from moshi_fast.kernels._utils import SplitWorkspace, split_tf32
from moshi_fast.kernels import conv1d_stream as conv1d_module
from moshi_fast.kernels.conv1d_stream import (ConvTiles, _grid, _plan, conv1d_stream, conv1d_stream_candidate_tiles,
                                              conv1d_stream_ref, conv1d_stream_workspace_size)

from .helpers import rel_err

CASES = [  # batch, c_in, c_out, kernel, stride, t_in, elu, residual, replicate, bias
    pytest.param(2, 1, 5, 7, 1, 24, False, False, False, True, id="in1-k7"),
    pytest.param(3, 6, 3, 3, 1, 10, True, False, False, True, id="res-k3-elu"),
    pytest.param(2, 3, 6, 1, 1, 9, True, True, False, True, id="k1-elu-residual"),
    pytest.param(2, 5, 9, 8, 4, 12, True, False, False, True, id="down-k8-s4"),
    pytest.param(1, 7, 4, 4, 2, 2, False, False, True, False, id="downsample-replicate"),
    pytest.param(2, 4, 17, 7, 1, 2, False, False, False, True, id="history-longer-than-input"),
    pytest.param(3, 33, 5, 3, 1, 3, True, False, False, True, id="cin33"),
]

FORCED = [  # batch, c_in, c_out, kernel, stride, t_in, elu, residual, replicate, tiles
    # 7 slots x 3 steps = 21 columns: tiles of 16 hold several slots, and slot 5 straddles two tiles.
    pytest.param(7, 20, 24, 3, 1, 3, True, False, False, ConvTiles(16, 16, 16, 4), id="slots-across-tiles-split4"),
    pytest.param(6, 48, 17, 1, 1, 5, True, True, False, ConvTiles(16, 16, 16, 3), id="residual-split3"),
    pytest.param(9, 12, 9, 4, 2, 4, False, False, True, ConvTiles(16, 16, 16, 3), id="replicate-split3"),
    pytest.param(3, 10, 18, 8, 4, 8, True, False, False, ConvTiles(16, 16, 16, 5), id="down-k8-s4-split5"),
    pytest.param(3, 10, 7, 7, 1, 2, False, False, False, ConvTiles(16, 16, 16, 5), id="long-history-split5"),
    # One slot over several column tiles: 40 steps (tiles straddle slots) and 32 (tiles within a slot).
    pytest.param(2, 5, 6, 3, 1, 40, True, False, False, ConvTiles(16, 16, 16, 1), id="slot-across-tiles"),
    pytest.param(2, 6, 20, 5, 1, 32, True, True, False, ConvTiles(16, 16, 16, 2), id="tiles-within-slots-split2"),
    # Tiles within a slot after its first read no history (the loop without the history test), strided too.
    pytest.param(3, 5, 9, 8, 4, 128, True, False, True, ConvTiles(16, 16, 16, 1), id="strided-history-free-tiles"),
    pytest.param(2, 10, 5, 7, 1, 64, True, True, False, ConvTiles(16, 16, 16, 3), id="history-free-tiles-split3"),
    pytest.param(5, 40, 40, 3, 1, 6, True, True, False, ConvTiles(32, 32, 32, 2), id="wide-tiles-split2"),
    # The FMA loop (dot=False): narrow tiles, a reduction that is and is not a multiple of block_r, split, the
    # replicate padding at T_out = 1, tiles within a slot that read no history, a residual.
    pytest.param(1, 12, 10, 4, 1, 2, True, False, False, ConvTiles(4, 2, 16, 3, dot=False), id="fma-even-split3"),
    pytest.param(1, 7, 4, 4, 2, 2, False, False, True, ConvTiles(2, 2, 8, 2, dot=False), id="fma-replicate-split2"),
    pytest.param(2, 5, 9, 3, 1, 2, True, True, False, ConvTiles(8, 4, 4, 1, num_warps=2, dot=False),
                 id="fma-odd-reduction-residual"),
    pytest.param(2, 5, 6, 3, 1, 16, True, False, False, ConvTiles(4, 8, 8, 2, dot=False), id="fma-history-free-tiles"),
    # Columns first: the history and its replicate padding, slots across tiles, split-K, history-free tiles.
    pytest.param(7, 20, 24, 3, 1, 3, True, False, False, ConvTiles(16, 16, 16, 4, columns_first=True),
                 id="columns-first-slots-across-tiles-split4"),
    pytest.param(9, 12, 9, 4, 2, 4, False, False, True, ConvTiles(16, 16, 16, 3, columns_first=True),
                 id="columns-first-replicate-split3"),
    pytest.param(6, 48, 17, 1, 1, 5, True, True, False, ConvTiles(32, 16, 16, 1, columns_first=True),
                 id="columns-first-k1-residual"),
    pytest.param(3, 5, 9, 8, 4, 128, True, True, True, ConvTiles(16, 32, 16, 1, columns_first=True),
                 id="columns-first-strided-history-free-tiles"),
    # The weight as its two tf32 parts (split per call here): history and replicate padding, split-K, history-free
    # tiles.
    pytest.param(9, 12, 9, 4, 2, 4, True, True, True,
                 ConvTiles(16, 16, 16, 3, columns_first=True, split_weight=True), id="split-weight-replicate-split3"),
    pytest.param(3, 5, 9, 8, 4, 128, True, False, False,
                 ConvTiles(16, 32, 16, 1, columns_first=True, split_weight=True), id="split-weight-history-free-tiles"),
]


def _inputs(batch, c_in, c_out, kernel, stride, bias=True):
    weight = torch.randn(c_out, c_in, kernel) / (c_in * kernel) ** 0.5
    b = torch.randn(c_out) if bias else None
    state = torch.randn(2, batch, c_in, kernel - stride)
    return weight, b, state


def _frame_inputs(batch, c_in, c_out, stride, t_in, residual, step):
    x = torch.randn(batch, t_in, c_in).transpose(1, 2)  # strided: time is not the contiguous dim
    # Slots at different frames: both parities in one call, and first frames (replicate) beside later ones.
    frame = torch.tensor([step + i % 3 for i in range(batch)], dtype=torch.int32)
    res = torch.randn(batch, c_out, t_in // stride) if residual else None
    return x, frame, res


def _check_over_frames(batch, c_in, c_out, kernel, stride, t_in, elu, residual, replicate, bias=True, tiles=None,
                       workspace=None, frames=3):
    weight, b, state_ref = _inputs(batch, c_in, c_out, kernel, stride, bias)
    state_ker = state_ref.clone()
    for step in range(frames):
        x, frame, res = _frame_inputs(batch, c_in, c_out, stride, t_in, residual, step)
        expected = conv1d_stream_ref(x, state_ref, frame, weight, b, stride, elu, res, replicate)
        out = torch.full((batch, c_out, t_in // stride), float("nan"))
        conv1d_stream(x, state_ker, frame, weight, b, stride, elu, res, replicate, out=out, workspace=workspace,
                      tiles=tiles)
        assert not out.isnan().any()
        assert rel_err(out, expected) < 1e-5
        # The whole state: each slot's next history written, the one it read left as it was.
        assert torch.equal(state_ker, state_ref)
        if workspace is not None:
            assert not workspace.counters.any(), "every tile's last program resets its counter"


@pytest.mark.parametrize("batch, c_in, c_out, kernel, stride, t_in, elu, residual, replicate, bias", CASES)
def test_conv1d_stream_matches_reference_over_frames(batch, c_in, c_out, kernel, stride, t_in, elu, residual,
                                                     replicate, bias):
    _check_over_frames(batch, c_in, c_out, kernel, stride, t_in, elu, residual, replicate, bias)


@pytest.mark.parametrize("batch, c_in, c_out, kernel, stride, t_in, elu, residual, replicate, tiles", FORCED)
def test_conv1d_stream_forced_tiles_match_reference_over_frames(batch, c_in, c_out, kernel, stride, t_in, elu,
                                                                residual, replicate, tiles):
    assert _grid(tiles, batch, c_in, c_out, kernel, stride, t_in).tiles.split == tiles.split, "no split rounding"
    workspace = SplitWorkspace(*conv1d_stream_workspace_size(batch, c_in, c_out, kernel, stride, t_in, tiles), "cpu")
    _check_over_frames(batch, c_in, c_out, kernel, stride, t_in, elu, residual, replicate, tiles=tiles,
                       workspace=workspace)


@pytest.mark.parametrize("batch, c_in, c_out, kernel, stride, t_in, elu, residual, replicate, tiles",
                         [case for case in FORCED if case.values[-1].split > 1])
def test_conv1d_stream_split_is_deterministic_and_matches_no_split(batch, c_in, c_out, kernel, stride, t_in, elu,
                                                                   residual, replicate, tiles):
    weight, b, state = _inputs(batch, c_in, c_out, kernel, stride)
    x, frame, res = _frame_inputs(batch, c_in, c_out, stride, t_in, residual, step=1)
    workspace = SplitWorkspace(*conv1d_stream_workspace_size(batch, c_in, c_out, kernel, stride, t_in, tiles), "cpu")

    def run(plan):
        fresh_state = state.clone()
        out = conv1d_stream(x, fresh_state, frame, weight, b, stride, elu, res, replicate, workspace=workspace,
                            tiles=plan)
        return out, fresh_state

    split_out, split_state = run(tiles)
    again_out, again_state = run(tiles)
    whole_out, whole_state = run(tiles._replace(split=1))
    assert torch.equal(split_out, again_out) and torch.equal(split_state, again_state)
    assert rel_err(split_out, whole_out) < 1e-5
    assert torch.equal(split_state, whole_state)


def test_conv1d_stream_shared_workspace_across_convs_and_frames():
    """Two convs of different shapes and splits take turns on one workspace, frame after frame."""
    shapes = [(4, 20, 24, 3, 1, 3, True, ConvTiles(16, 16, 16, 4)),
              (3, 10, 18, 8, 4, 8, False, ConvTiles(16, 16, 16, 5))]
    sizes = [conv1d_stream_workspace_size(*shape, tiles=tiles) for *shape, _, tiles in shapes]
    workspace = SplitWorkspace(max(s[0] for s in sizes), max(s[1] for s in sizes), "cpu")
    convs = []
    for batch, c_in, c_out, kernel, stride, t_in, elu, tiles in shapes:
        weight, b, state = _inputs(batch, c_in, c_out, kernel, stride)
        convs.append((batch, c_in, c_out, stride, t_in, elu, tiles, weight, b, state, state.clone()))
    for step in range(3):
        for batch, c_in, c_out, stride, t_in, elu, tiles, weight, b, state_ref, state_ker in convs:
            x, frame, _ = _frame_inputs(batch, c_in, c_out, stride, t_in, False, step)
            expected = conv1d_stream_ref(x, state_ref, frame, weight, b, stride, elu)
            got = conv1d_stream(x, state_ker, frame, weight, b, stride, elu, workspace=workspace, tiles=tiles)
            assert rel_err(got, expected) < 1e-5
            assert torch.equal(state_ker, state_ref)
            assert not workspace.counters.any()


def test_conv1d_stream_default_split_allocates_its_workspace():
    """A default plan that splits (long reduction, one output tile) runs without a workspace given."""
    batch, c_in, c_out, kernel, stride, t_in = 1, 64, 16, 8, 4, 8
    assert _plan(batch, c_in, c_out, kernel, stride, t_in).split > 1
    _check_over_frames(batch, c_in, c_out, kernel, stride, t_in, True, False, False, frames=2)


def test_conv1d_stream_rejects_a_small_workspace():
    x, frame, _ = _frame_inputs(2, 20, 24, 1, 3, False, step=0)
    weight, b, state = _inputs(2, 20, 24, 3, 1)
    with pytest.raises(ValueError, match="workspace too small"):
        conv1d_stream(x, state, frame, weight, b, 1, workspace=SplitWorkspace(16, 1, "cpu"),
                      tiles=ConvTiles(16, 16, 16, 4))


def test_columns_first_needs_the_tensor_core_product():
    with pytest.raises(ValueError, match="columns_first"):
        _grid(ConvTiles(4, 2, 16, dot=False, columns_first=True), 1, 12, 10, 4, 1, 2)
    with pytest.raises(ValueError, match="split_weight"):
        _grid(ConvTiles(16, 16, 16, split_weight=True), 1, 12, 10, 4, 1, 2)
    shape = (3, 48, 20, 3, 1, 4)
    assert _plan(*shape)._replace(columns_first=not _plan(*shape).columns_first) in conv1d_stream_candidate_tiles(
        *shape)


def test_prepared_weight_parts_give_the_per_call_split_bitwise():
    """weight_parts made once (split_tf32 of the weight) give what the launcher's own split gives; parts of another
    shape are refused before any launch."""
    batch, c_in, c_out, kernel, stride, t_in = 3, 20, 24, 3, 1, 6
    weight, b, state = _inputs(batch, c_in, c_out, kernel, stride)
    x, frame, res = _frame_inputs(batch, c_in, c_out, stride, t_in, True, step=1)
    tiles = ConvTiles(16, 16, 16, 2, columns_first=True, split_weight=True)
    parts = split_tf32(weight)
    high, low = parts
    assert torch.equal(high + low, weight) and not (high.view(torch.int32) & 0x1FFF).any()
    states = [state.clone(), state.clone()]
    outs = [conv1d_stream(x, fresh, frame, weight, b, stride, True, res, tiles=tiles, weight_parts=given)
            for fresh, given in zip(states, (None, parts))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(states[0], states[1])
    expected_state = state.clone()
    expected = conv1d_stream_ref(x, expected_state, frame, weight, b, stride, True, res)
    assert rel_err(outs[1], expected) < 1e-5 and torch.equal(states[1], expected_state)
    with pytest.raises(ValueError, match="weight_parts"):
        conv1d_stream(x, state.clone(), frame, weight, b, stride, True, res, tiles=tiles, weight_parts=parts[:1])


def test_conv1d_stream_candidate_tiles_match_reference():
    shape = (3, 48, 20, 3, 1, 4)  # batch, c_in, c_out, kernel, stride, t_in
    candidates = conv1d_stream_candidate_tiles(*shape)
    assert candidates[0] == _plan(*shape) and 1 < len(candidates) <= 12 and len(set(candidates)) == len(candidates)
    assert any(tiles.split > 1 for tiles in candidates)
    for tiles in candidates:
        workspace = SplitWorkspace(*conv1d_stream_workspace_size(*shape, tiles=tiles), "cpu")
        _check_over_frames(*shape, True, True, False, tiles=tiles, workspace=workspace, frames=1)


def test_few_columns_take_the_fma_plan_and_its_candidates_include_the_tensor_core_plan():
    """At most FMA_MAX_COLUMNS output columns (one conversation's 25 Hz convs) the default plan is the FMA loop's;
    the sweep's candidates are its neighbours and the tensor-core plan, and each matches the reference."""
    shape = (1, 24, 20, 8, 4, 8)  # batch, c_in, c_out, kernel, stride, t_in: 2 output columns, R = 192
    base = _plan(*shape)
    assert not base.dot and base.block_n == 2 and (24 * 8) % base.block_r == 0
    candidates = conv1d_stream_candidate_tiles(*shape)
    assert candidates[0] == base and candidates[-1].dot and len(set(candidates)) == len(candidates)
    assert _plan(3, 24, 20, 8, 4, 8).dot, "6 columns take the tensor-core plan"
    for tiles in candidates:
        workspace = SplitWorkspace(*conv1d_stream_workspace_size(*shape, tiles=tiles), "cpu")
        _check_over_frames(*shape, True, False, False, tiles=tiles, workspace=workspace, frames=2)


def test_wide_column_tiles_join_the_candidates_of_many_columns(monkeypatch):
    """From WIDE_COLUMNS columns on the sweep also tries 128- and 256-wide column tiles with 8 warps (here lowered
    to this shape's 12 columns); each runs and matches the reference."""
    shape = (3, 8, 20, 3, 1, 4)
    assert all(tiles.block_n <= 16 for tiles in conv1d_stream_candidate_tiles(*shape))
    monkeypatch.setattr(conv1d_module, "WIDE_COLUMNS", 12)
    candidates = conv1d_stream_candidate_tiles(*shape)
    wide = [tiles for tiles in candidates if tiles.block_n >= 128]
    assert {tiles.block_n for tiles in wide} == {128, 256} and all(tiles.num_warps == 8 for tiles in wide)
    assert len(set(candidates)) == len(candidates) <= 16
    for tiles in wide:
        _check_over_frames(*shape, True, True, False, tiles=tiles, frames=1)


def test_light_tiles_join_the_candidates_of_many_columns(monkeypatch):
    """From LIGHT_TILE_COLUMNS columns on the sweep also tries plans with one pipeline stage less and 8 warps, or a
    halved channel tile or reduction step (here lowered to this shape's 12 columns); each runs and matches the
    reference."""
    shape = (3, 48, 40, 3, 1, 4)
    before = conv1d_stream_candidate_tiles(*shape)
    monkeypatch.setattr(conv1d_module, "LIGHT_TILE_COLUMNS", 12)
    candidates = conv1d_stream_candidate_tiles(*shape)
    light = [tiles for tiles in candidates if tiles not in before]
    base = candidates[0]
    assert light and all(tiles.num_stages == max(1, base.num_stages - 1) for tiles in light)
    assert len(set(candidates)) == len(candidates) <= 19
    for tiles in light:
        workspace = SplitWorkspace(*conv1d_stream_workspace_size(*shape, tiles=tiles), "cpu")
        _check_over_frames(*shape, True, True, False, tiles=tiles, workspace=workspace, frames=1)


def _mimi_shapes():
    """(c_in, c_out, kernel, stride, t_in) of Mimi's streaming convs, per frame."""
    shapes = [(1, 64, 7, 1, 1920)]
    for (c, t), ratio in zip([(64, 1920), (128, 480), (256, 96), (512, 16)], [4, 5, 6, 8]):
        shapes += [(c, c // 2, 3, 1, t), (c // 2, c, 1, 1, t), (c, 2 * c, 2 * ratio, ratio, t)]
    shapes += [(1024, 512, 3, 1, 2), (512, 512, 4, 2, 2), (512, 1024, 7, 1, 2)]
    for c, t in [(512, 16), (256, 96), (128, 480), (64, 1920)]:
        shapes += [(c, c // 2, 3, 1, t), (c // 2, c, 1, 1, t)]
    return shapes + [(64, 1, 3, 1, 1920)]


def test_conv1d_stream_workspace_size_covers_the_default_plan_at_mimi_shapes():
    """Plan arithmetic only: what each default plan needs (from its tiles), against what
    conv1d_stream_workspace_size reports and against one workspace shared by all convs (as a cache holds)."""
    sizes, needs = [], []
    for c_in, c_out, kernel, stride, t_in in _mimi_shapes():
        for batch in range(1, 65):
            tiles = _plan(batch, c_in, c_out, kernel, stride, t_in)
            few_columns = batch * (t_in // stride) <= conv1d_module.FMA_MAX_COLUMNS
            assert tiles.dot != few_columns and tiles.split >= 1
            assert min(tiles.block_co, tiles.block_n, tiles.block_r) >= (16 if tiles.dot else 2)
            # Mimi's few-column convs stream whole weight steps (16-byte loads).
            assert tiles.dot or (c_in * kernel) % tiles.block_r == 0
            steps = triton.cdiv(c_in * kernel, tiles.block_r)
            assert (tiles.split - 1) * triton.cdiv(steps, tiles.split) < steps, "no empty split"
            size = conv1d_stream_workspace_size(batch, c_in, c_out, kernel, stride, t_in)
            sizes.append(size)
            if tiles.split == 1:
                assert size == (0, 0)
                continue
            output_tiles = triton.cdiv(c_out, tiles.block_co) * triton.cdiv(batch * (t_in // stride), tiles.block_n)
            needs.append((output_tiles * tiles.split * tiles.block_co * tiles.block_n, output_tiles))
            assert size[0] >= needs[-1][0] and size[1] >= needs[-1][1]
    assert needs, "the 25 Hz convs split their reduction"
    shared = SplitWorkspace(max(s[0] for s in sizes), max(s[1] for s in sizes), "cpu")
    for need in needs:
        shared.check(*need)


def test_conv1d_stream_matches_the_model_conv():
    """The kernel's state convention reproduces the reference model's streaming conv."""
    from moshi_fast.reference.mimi import CausalConv1d
    from moshi_fast.reference.state import SlotState

    conv = CausalConv1d(3, 4, 4, stride=2, replicate=True).requires_grad_(False)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    state = SlotState(2)
    conv.init_state(state, "c")
    kernel_state = torch.zeros(2, 2, 3, 2)
    run = torch.ones(2, dtype=torch.bool)
    for step in range(3):
        x = torch.randn(2, 3, 6)
        expected = conv(x, state, "c", run)
        got = conv1d_stream(x, kernel_state, torch.full((2,), step, dtype=torch.int32), conv.weight,
                            conv.bias, 2, replicate=True)
        assert rel_err(got, expected) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 512, 12, 6, 96), (128, 256, 10, 5, 480)], ids=["enc.down2", "enc.down1"])
def test_split_weight_is_as_close_to_float64_as_tf32x3(shape):
    """At 64 conversations, a columns-first plan with the weight's tf32 parts against the same plan in tl.dot's
    tf32x3, each against the float64 conv: the parts may not cost accuracy."""
    c_in, c_out, kernel, stride, t_in = shape
    batch = 64
    x = torch.randn(batch, c_in, t_in, device="cuda")
    weight = torch.randn(c_out, c_in, kernel, device="cuda") / (c_in * kernel) ** 0.5
    bias = torch.randn(c_out, device="cuda")
    state = torch.randn(2, batch, c_in, kernel - stride, device="cuda")
    frame = torch.ones(batch, dtype=torch.int32, device="cuda")
    expected = conv1d_stream_ref(x.double(), state.double(), frame, weight.double(), bias.double(), stride, True)
    tiles = ConvTiles(64, 128, 16, 4, num_warps=8, columns_first=True)
    errors = {}
    for name, plan in (("tf32x3", tiles), ("parts", tiles._replace(split_weight=True))):
        out = conv1d_stream(x, state.clone(), frame, weight, bias, stride, True, tiles=plan,
                            weight_parts=split_tf32(weight))
        errors[name] = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    print(f"conv1d {shape}: relative error to float64 {errors}")
    assert errors["tf32x3"] < 1e-5
    assert errors["parts"] <= 1.5 * errors["tf32x3"] + 1e-7, errors
