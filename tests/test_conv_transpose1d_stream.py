"""conv_transpose1d_stream kernel vs its torch reference and the model's streaming convtr."""
import pytest
import torch

from moshi_fast.kernels.conv_transpose1d_stream import conv_transpose1d_stream, conv_transpose1d_stream_ref

from .helpers import rel_err

CASES = [  # batch, c_in, c_out, kernel, stride, t_in, groups, elu, bias
    pytest.param(2, 6, 3, 16, 8, 2, 1, True, True, id="k16-s8"),
    pytest.param(3, 5, 7, 10, 5, 3, 1, True, True, id="k10-s5"),
    pytest.param(1, 33, 4, 8, 4, 5, 1, False, True, id="cin33"),
    pytest.param(2, 9, 9, 4, 2, 1, 9, False, False, id="depthwise-upsample"),
    pytest.param(2, 3, 2, 9, 3, 4, 1, True, False, id="three-taps"),
]


@pytest.mark.parametrize("batch, c_in, c_out, kernel, stride, t_in, groups, elu, bias", CASES)
def test_conv_transpose1d_stream_matches_reference(batch, c_in, c_out, kernel, stride, t_in, groups, elu, bias):
    weight = torch.randn(c_in, c_out // groups, kernel)
    b = torch.randn(c_out) if bias else None
    partial_ref = torch.randn(2, batch, c_out, kernel - stride)
    partial_ker = partial_ref.clone()
    for step in range(3):
        x = torch.randn(batch, t_in, c_in).transpose(1, 2)
        frame = torch.tensor([step + i for i in range(batch)], dtype=torch.int32)
        expected = conv_transpose1d_stream_ref(x, partial_ref, frame, weight, b, stride, groups, elu)
        out = torch.full((batch, c_out, t_in * stride), float("nan"))
        conv_transpose1d_stream(x, partial_ker, frame, weight, b, stride, groups, elu, out=out)
        assert not out.isnan().any()
        assert rel_err(out, expected) < 1e-5
        written = 1 - frame.long() % 2
        for slot in range(batch):
            assert rel_err(partial_ker[written[slot], slot], partial_ref[written[slot], slot]) < 1e-5


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
