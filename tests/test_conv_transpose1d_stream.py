"""conv_transpose1d_stream kernel vs its torch reference and the model's streaming convtr."""
import pytest
import torch

from moshi_fast.kernels._utils import SplitWorkspace, split_tf32
from moshi_fast.kernels.conv_transpose1d_stream import (
    ConvTransposeTiles,
    _default_plan,
    _geometry,
    _plan,
    _tiles_error,
    conv_transpose1d_stream,
    conv_transpose1d_stream_candidate_tiles,
    conv_transpose1d_stream_ref,
    conv_transpose1d_stream_workspace_size,
    pack_conv_transpose_weight,
)

from .helpers import rel_err

CASES = [  # batch, c_in, c_out, kernel, stride, t_in, groups, elu, bias
    pytest.param(2, 6, 3, 16, 8, 2, 1, True, True, id="k16-s8"),
    pytest.param(3, 5, 7, 10, 5, 3, 1, True, True, id="k10-s5"),
    pytest.param(1, 33, 4, 8, 4, 5, 1, False, True, id="cin33"),
    pytest.param(2, 9, 9, 4, 2, 1, 9, False, False, id="depthwise-upsample"),
    pytest.param(2, 3, 2, 9, 3, 4, 1, True, False, id="three-taps"),
]

# Mimi's decoder, per frame: c_in, c_out, kernel, stride, t_in, groups.
MIMI_SHAPES = {
    "upsample": (512, 512, 4, 2, 1, 512),
    "dec.up0": (1024, 512, 16, 8, 2, 1),
    "dec.up1": (512, 256, 12, 6, 16, 1),
    "dec.up2": (256, 128, 10, 5, 96, 1),
    "dec.up3": (128, 64, 8, 4, 480, 1),
}


def _frame_inputs(batch, c_in, t_in, step):
    """Non-contiguous x, and frame counters that give the slots different parities."""
    x = torch.randn(batch, t_in, c_in).transpose(1, 2)
    frame = torch.tensor([step + i for i in range(batch)], dtype=torch.int32)
    return x, frame


def _assert_frame_matches(out, expected, partial_ker, partial_ref, frame, tolerance=1e-5):
    assert not out.isnan().any()
    assert rel_err(out, expected) < tolerance
    written = 1 - frame.long() % 2
    for slot in range(out.shape[0]):
        assert rel_err(partial_ker[written[slot], slot], partial_ref[written[slot], slot]) < tolerance


@pytest.mark.parametrize("batch, c_in, c_out, kernel, stride, t_in, groups, elu, bias", CASES)
def test_conv_transpose1d_stream_matches_reference(batch, c_in, c_out, kernel, stride, t_in, groups, elu, bias):
    weight = torch.randn(c_in, c_out // groups, kernel)
    b = torch.randn(c_out) if bias else None
    partial_ref = torch.randn(2, batch, c_out, kernel - stride)
    partial_ker = partial_ref.clone()
    for step in range(3):
        x, frame = _frame_inputs(batch, c_in, t_in, step)
        expected = conv_transpose1d_stream_ref(x, partial_ref, frame, weight, b, stride, groups, elu)
        out = torch.full((batch, c_out, t_in * stride), float("nan"))
        conv_transpose1d_stream(x, partial_ker, frame, weight, b, stride, groups, elu, out=out)
        _assert_frame_matches(out, expected, partial_ker, partial_ref, frame)


def test_conv_transpose1d_stream_matches_the_model_convtr():
    from moshi_fast.reference.mimi import CausalConvTranspose1d
    from moshi_fast.reference.state import SlotState

    convtr = CausalConvTranspose1d(5, 3, 8, stride=4).requires_grad_(False)
    torch.nn.init.normal_(convtr.weight)
    torch.nn.init.normal_(convtr.bias)
    state = SlotState(2)
    convtr.init_state(state, "c")
    partial = torch.zeros(2, 2, 3, 4)
    run = torch.ones(2, dtype=torch.bool)
    for step in range(3):
        x = torch.randn(2, 5, 3)
        expected = convtr(x, state, "c", run)
        got = conv_transpose1d_stream(x, partial, torch.full((2,), step), convtr.weight, convtr.bias, 4)
        assert rel_err(got, expected) < 1e-6


def test_packed_weight_layout_and_results():
    batch, c_in, c_out, kernel, stride, t_in = 3, 7, 5, 12, 4, 2
    weight = torch.randn(c_in, c_out, kernel)
    packed = pack_conv_transpose_weight(weight, stride)
    assert packed.shape == (kernel // stride, c_out, stride, c_in) and packed.is_contiguous()
    assert packed[2, 4, 1, 6] == weight[6, 4, 2 * stride + 1]
    bias = torch.randn(c_out)
    partial = torch.randn(2, batch, c_out, kernel - stride)
    partial_packed = partial.clone()
    x, frame = _frame_inputs(batch, c_in, t_in, 1)
    on_the_fly = conv_transpose1d_stream(x, partial, frame, weight, bias, stride, elu_input=True)
    prepared = conv_transpose1d_stream(x, partial_packed, frame, weight, bias, stride, elu_input=True,
                                       packed_weight=packed)
    assert torch.equal(on_the_fly, prepared)
    assert torch.equal(partial, partial_packed)
    with pytest.raises(ValueError, match="packed_weight"):
        conv_transpose1d_stream(x, partial, frame, weight, bias, stride, packed_weight=weight)


FORCED = [  # (batch, c_in, c_out, kernel, stride, t_in), tiles
    # 25 rows: the row-tile boundary at 16 falls inside channel 3's phases; 12 columns = 4 slots in one tile.
    pytest.param((4, 40, 5, 10, 5, 2), ConvTransposeTiles(16, 16, 16), id="columns-span-slots"),
    pytest.param((4, 40, 5, 10, 5, 2), ConvTransposeTiles(16, 16, 16, split=3), id="columns-span-slots-split3"),
    # 21 steps per slot: every slot spans two or three 16-column tiles.
    pytest.param((2, 40, 3, 8, 4, 20), ConvTransposeTiles(16, 16, 16, split=2), id="slot-spans-tiles-split2"),
    pytest.param((2, 40, 3, 8, 4, 20), ConvTransposeTiles(16, 16, 32, split=4), id="one-chunk-per-split"),
    # 6 chunks over 4 programs: 2 + 2 + 2 + 0, the last program arrives with an empty sum.
    pytest.param((3, 40, 6, 6, 2, 3), ConvTransposeTiles(32, 16, 16, split=4), id="uneven-split"),
    # The FMA loop (dot=False): narrow tiles, channels that are and are not a multiple of block_ci, split.
    pytest.param((1, 40, 5, 10, 5, 2), ConvTransposeTiles(8, 4, 8, split=3, dot=False), id="fma-even-split3"),
    pytest.param((2, 40, 3, 8, 4, 2), ConvTransposeTiles(4, 8, 16, split=2, dot=False), id="fma-partial-chunks"),
    pytest.param((3, 12, 6, 6, 2, 3), ConvTransposeTiles(16, 2, 4, num_warps=2, dot=False),
                 id="fma-columns-span-slots"),
    # The columns as the dot's first operand: columns across slots, a split, rows past C_out * S.
    pytest.param((4, 40, 5, 10, 5, 2), ConvTransposeTiles(16, 16, 16, columns_first=True), id="columns-first"),
    pytest.param((2, 40, 3, 8, 4, 20), ConvTransposeTiles(32, 16, 16, split=2, columns_first=True),
                 id="columns-first-split2"),
    # The weight as its two tf32 parts (split here per call: no weight_parts given).
    pytest.param((4, 40, 5, 10, 5, 2), ConvTransposeTiles(16, 16, 16, columns_first=True, split_weight=True),
                 id="split-weight"),
    pytest.param((2, 40, 3, 8, 4, 20), ConvTransposeTiles(32, 16, 16, split=2, columns_first=True, split_weight=True),
                 id="split-weight-split2"),
]


def test_columns_first_needs_the_dense_tensor_core_product():
    g = _geometry(2, 40, 3, 8, 4, 3, 1)
    assert _tiles_error(g, ConvTransposeTiles(16, 16, 16, columns_first=True)) is None
    assert "columns_first" in _tiles_error(g, ConvTransposeTiles(16, 4, 16, dot=False, columns_first=True))
    assert _tiles_error(g, ConvTransposeTiles(16, 16, 16, columns_first=True, split_weight=True)) is None
    assert "split_weight" in _tiles_error(g, ConvTransposeTiles(16, 16, 16, split_weight=True))


def test_prepared_weight_parts_give_the_per_call_split_bitwise():
    """weight_parts made once (split_tf32 of the packed weight) give what the launcher's own split gives; parts of
    another shape are refused before any launch."""
    batch, c_in, c_out, kernel, stride, t_in = 3, 40, 5, 10, 5, 2
    weight, bias = torch.randn(c_in, c_out, kernel), torch.randn(c_out)
    packed = pack_conv_transpose_weight(weight, stride)
    parts = split_tf32(packed)
    tiles = ConvTransposeTiles(16, 16, 16, columns_first=True, split_weight=True)
    partial = torch.randn(2, batch, c_out, kernel - stride)
    x, frame = _frame_inputs(batch, c_in, t_in, 1)
    states = [partial.clone(), partial.clone()]
    outs = [conv_transpose1d_stream(x, state, frame, weight, bias, stride, elu_input=True, packed_weight=packed,
                                    tiles=tiles, weight_parts=given) for state, given in zip(states, (None, parts))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(states[0], states[1])
    expected_state = partial.clone()
    expected = conv_transpose1d_stream_ref(x, expected_state, frame, weight, bias, stride, elu_input=True)
    _assert_frame_matches(outs[1], expected, states[1], expected_state, frame)
    with pytest.raises(ValueError, match="weight_parts"):
        conv_transpose1d_stream(x, partial.clone(), frame, weight, bias, stride, packed_weight=packed, tiles=tiles,
                                weight_parts=parts[:, :1])


@pytest.mark.parametrize("shape, tiles", FORCED)
def test_forced_tiles(shape, tiles):
    batch, c_in, c_out, kernel, stride, t_in = shape
    weight = torch.randn(c_in, c_out, kernel)
    packed = pack_conv_transpose_weight(weight, stride)
    bias = torch.randn(c_out)
    partial_ref = torch.randn(2, batch, c_out, kernel - stride)
    partial_ker = partial_ref.clone()
    workspace = SplitWorkspace(1 << 14, 64, "cpu")
    unsplit = tiles._replace(split=1)
    for step in range(3):
        x, frame = _frame_inputs(batch, c_in, t_in, step)
        expected = conv_transpose1d_stream_ref(x, partial_ref, frame, weight, bias, stride, elu_input=True)
        before = partial_ker.clone()

        def call(plan, state):
            out = torch.full((batch, c_out, t_in * stride), float("nan"))
            conv_transpose1d_stream(x, state, frame, weight, bias, stride, 1, True, out=out, packed_weight=packed,
                                    workspace=workspace, tiles=plan)
            assert not workspace.counters.any()
            return out

        again_state, unsplit_state = before.clone(), before.clone()
        out = call(tiles, partial_ker)
        _assert_frame_matches(out, expected, partial_ker, partial_ref, frame)
        assert torch.equal(call(tiles, again_state), out) and torch.equal(again_state, partial_ker)
        assert rel_err(call(unsplit, unsplit_state), out) < 1e-5
        assert rel_err(unsplit_state, partial_ker) < 1e-5


def test_layers_share_one_workspace():
    """Two split layers interleaved over frames on one workspace sized for the larger, as MimiCache does."""
    layers = []
    for c_in, c_out, kernel, stride, t_in, tiles in [(40, 5, 10, 5, 2, ConvTransposeTiles(16, 16, 16, split=3)),
                                                     (24, 3, 8, 4, 6, ConvTransposeTiles(16, 16, 16, split=2))]:
        weight = torch.randn(c_in, c_out, kernel)
        partial = torch.randn(2, 2, c_out, kernel - stride)
        layers.append((c_in, t_in, stride, weight, torch.randn(c_out), partial, partial.clone(), tiles))
    # The first layer's 25 x 4 output is 2 tiles of 16 x 16 split 3 ways; the second's 12 x 14 is 1 tile.
    workspace = SplitWorkspace(2 * 3 * 16 * 16, 2, "cpu")
    for step in range(3):
        for c_in, t_in, stride, weight, bias, partial_ref, partial_ker, tiles in layers:
            x, frame = _frame_inputs(2, c_in, t_in, step)
            expected = conv_transpose1d_stream_ref(x, partial_ref, frame, weight, bias, stride, elu_input=True)
            out = conv_transpose1d_stream(x, partial_ker, frame, weight, bias, stride, elu_input=True,
                                          workspace=workspace, tiles=tiles)
            _assert_frame_matches(out, expected, partial_ker, partial_ref, frame)
            assert not workspace.counters.any()


def test_split_without_a_workspace_allocates_one_and_a_small_one_is_refused():
    batch, c_in, c_out, kernel, stride, t_in = 2, 40, 3, 8, 4, 3
    weight, bias = torch.randn(c_in, c_out, kernel), torch.randn(c_out)
    partial_ref = torch.randn(2, batch, c_out, kernel - stride)
    partial_ker = partial_ref.clone()
    x, frame = _frame_inputs(batch, c_in, t_in, 0)
    tiles = ConvTransposeTiles(16, 16, 16, split=2)
    expected = conv_transpose1d_stream_ref(x, partial_ref, frame, weight, bias, stride)
    out = conv_transpose1d_stream(x, partial_ker, frame, weight, bias, stride, tiles=tiles)
    _assert_frame_matches(out, expected, partial_ker, partial_ref, frame)
    with pytest.raises(ValueError, match="workspace too small"):
        conv_transpose1d_stream(x, partial_ker, frame, weight, bias, stride, tiles=tiles,
                                workspace=SplitWorkspace(16 * 16, 1, "cpu"))


@pytest.mark.parametrize("tiles", [ConvTransposeTiles(16, 16, 16), ConvTransposeTiles(32, 16, 16, num_warps=2)],
                         ids=["rows-16", "rows-32"])
def test_depthwise_forced_tiles(tiles):
    batch, channels, kernel, stride, t_in = 3, 9, 4, 2, 2
    weight = torch.randn(channels, 1, kernel)
    partial_ref = torch.randn(2, batch, channels, kernel - stride)
    partial_ker = partial_ref.clone()
    for step in range(2):
        x, frame = _frame_inputs(batch, channels, t_in, step)
        expected = conv_transpose1d_stream_ref(x, partial_ref, frame, weight, None, stride, channels)
        out = conv_transpose1d_stream(x, partial_ker, frame, weight, None, stride, channels, tiles=tiles)
        _assert_frame_matches(out, expected, partial_ker, partial_ref, frame)
    with pytest.raises(ValueError, match="split"):
        conv_transpose1d_stream(x, partial_ker, frame, weight, None, stride, channels, tiles=tiles._replace(split=2))
    with pytest.raises(ValueError, match="columns_first"):
        conv_transpose1d_stream(x, partial_ker, frame, weight, None, stride, channels,
                                tiles=tiles._replace(columns_first=True))
    with pytest.raises(ValueError, match="packed_weight"):
        conv_transpose1d_stream(x, partial_ker, frame, weight, None, stride, channels, packed_weight=weight)


def test_candidate_tiles_run_and_match():
    batch, c_in, c_out, kernel, stride, t_in = 2, 40, 3, 8, 4, 3
    weight, bias = torch.randn(c_in, c_out, kernel), torch.randn(c_out)
    partial = torch.randn(2, batch, c_out, kernel - stride)
    x, frame = _frame_inputs(batch, c_in, t_in, 1)
    expected_state = partial.clone()
    expected = conv_transpose1d_stream_ref(x, expected_state, frame, weight, bias, stride, elu_input=True)
    candidates = conv_transpose1d_stream_candidate_tiles(batch, c_in, c_out, kernel, stride, t_in)
    assert candidates
    for tiles in candidates:
        state = partial.clone()
        out = conv_transpose1d_stream(x, state, frame, weight, bias, stride, elu_input=True, tiles=tiles)
        _assert_frame_matches(out, expected, state, expected_state, frame)


def test_light_candidates_join_from_many_columns_and_match(monkeypatch):
    """From LIGHT_TILE_COLUMNS columns on the sweep also tries three lighter plans (one pipeline stage less with 8
    warps, a halved row tile or reduction step); here the threshold is lowered to this shape's 6 columns, and each
    new candidate runs and matches the reference."""
    from moshi_fast.kernels import conv_transpose1d_stream as module

    batch, c_in, c_out, kernel, stride, t_in = 2, 40, 6, 8, 4, 2
    before = conv_transpose1d_stream_candidate_tiles(batch, c_in, c_out, kernel, stride, t_in)
    monkeypatch.setattr(module, "LIGHT_TILE_COLUMNS", 6)
    candidates = conv_transpose1d_stream_candidate_tiles(batch, c_in, c_out, kernel, stride, t_in)
    light = [tiles for tiles in candidates if tiles not in before]
    assert light and len(set(candidates)) == len(candidates) <= 16
    weight, bias = torch.randn(c_in, c_out, kernel), torch.randn(c_out)
    partial = torch.randn(2, batch, c_out, kernel - stride)
    x, frame = _frame_inputs(batch, c_in, t_in, 1)
    expected_state = partial.clone()
    expected = conv_transpose1d_stream_ref(x, expected_state, frame, weight, bias, stride, elu_input=True)
    for tiles in light:
        state = partial.clone()
        out = conv_transpose1d_stream(x, state, frame, weight, bias, stride, elu_input=True, tiles=tiles)
        _assert_frame_matches(out, expected, state, expected_state, frame)


@pytest.mark.parametrize("name", list(MIMI_SHAPES))
def test_plans_at_mimi_shapes(name):
    """Plan arithmetic only: the workspace size covers the default plan (measured or heuristic) at every
    batch, tiles are valid for tl.dot, and the candidates are a handful of valid alternatives."""
    c_in, c_out, kernel, stride, t_in, groups = MIMI_SHAPES[name]
    taps = kernel // stride
    for batch in range(1, 65):
        g = _geometry(batch, c_in, c_out, kernel, stride, t_in, groups)
        plan = _default_plan(batch, c_in, c_out, kernel, stride, t_in, groups)
        assert _tiles_error(g, plan) is None
        tiles = -(-c_out * stride // plan.block_m) * -(-batch * (t_in + taps - 1) // plan.block_n)
        floats, counters = conv_transpose1d_stream_workspace_size(batch, c_in, c_out, kernel, stride, t_in, groups)
        if plan.split > 1:
            assert floats >= tiles * plan.split * plan.block_m * plan.block_n and counters >= tiles
        if groups > 1:
            assert plan.split == 1
        candidates = conv_transpose1d_stream_candidate_tiles(batch, c_in, c_out, kernel, stride, t_in, groups)
        assert 0 < len(candidates) <= 16 and plan not in candidates and len(set(candidates)) == len(candidates)
        assert all(_tiles_error(g, tiles) is None for tiles in candidates)
    if groups == 1:
        assert _plan(_geometry(1, c_in, c_out, kernel, stride, t_in, groups)).split > 1


def test_few_columns_take_the_fma_plan_and_its_candidates_include_the_tensor_core_plan():
    """A dense transposed conv with at most FMA_MAX_COLUMNS columns (the decoder's first upsampling at one
    conversation) takes the FMA loop by default; the sweep's candidates are its neighbours and the tensor-core plan,
    and each runs and matches the reference."""
    batch, c_in, c_out, kernel, stride, t_in = 1, 64, 6, 8, 4, 2
    base = _default_plan(batch, c_in, c_out, kernel, stride, t_in, 1)
    assert not base.dot and base.block_n == 4 and c_in % base.block_ci == 0
    assert _default_plan(2, c_in, c_out, kernel, stride, t_in, 1).dot, "6 columns take the tensor-core plan"
    assert _default_plan(1, 6, 6, 4, 2, 1, 6).dot, "depthwise convs keep their loop"
    candidates = conv_transpose1d_stream_candidate_tiles(batch, c_in, c_out, kernel, stride, t_in)
    assert candidates[-1].dot and base not in candidates and len(set(candidates)) == len(candidates)
    weight, bias = torch.randn(c_in, c_out, kernel), torch.randn(c_out)
    partial = torch.randn(2, batch, c_out, kernel - stride)
    x, frame = _frame_inputs(batch, c_in, t_in, 1)
    expected_state = partial.clone()
    expected = conv_transpose1d_stream_ref(x, expected_state, frame, weight, bias, stride, elu_input=True)
    for tiles in [base, *candidates]:
        state = partial.clone()
        out = conv_transpose1d_stream(x, state, frame, weight, bias, stride, elu_input=True, tiles=tiles)
        _assert_frame_matches(out, expected, state, expected_state, frame)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(512, 256, 12, 6, 16), (256, 128, 10, 5, 96)], ids=["dec.up1", "dec.up2"])
def test_split_weight_is_as_close_to_float64_as_tf32x3(shape):
    """At 64 conversations, the columns-first plan with the weight's tf32 parts against the same plan in tl.dot's
    tf32x3, each against the float64 product: the parts may not cost accuracy (the first GPU sweep found the two
    0.8e-6 to 3e-6 apart, without saying which is the nearer)."""
    c_in, c_out, kernel, stride, t_in = shape
    batch = 64
    x = torch.randn(batch, c_in, t_in, device="cuda")
    weight = torch.randn(c_in, c_out, kernel, device="cuda") / (c_in * kernel / stride) ** 0.5
    bias = torch.randn(c_out, device="cuda")
    partial = torch.randn(2, batch, c_out, kernel - stride, device="cuda")
    frame = torch.ones(batch, dtype=torch.int32, device="cuda")
    packed = pack_conv_transpose_weight(weight, stride)
    expected = conv_transpose1d_stream_ref(x.double(), partial.double(), frame, weight.double(), bias.double(),
                                           stride, elu_input=True)
    tiles = ConvTransposeTiles(64, 64, 32, columns_first=True)
    errors = {}
    for name, plan in (("tf32x3", tiles), ("parts", tiles._replace(split_weight=True))):
        out = conv_transpose1d_stream(x, partial.clone(), frame, weight, bias, stride, elu_input=True,
                                      packed_weight=packed, tiles=plan, weight_parts=split_tf32(packed))
        errors[name] = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    print(f"convtr {shape}: relative error to float64 {errors}")
    assert errors["tf32x3"] < 1e-5
    assert errors["parts"] <= 1.5 * errors["tf32x3"] + 1e-7, errors
