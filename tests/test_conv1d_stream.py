"""conv1d_stream kernel vs its torch reference, over frames (parity), odd shapes and layouts."""
import pytest
import torch

from moshi_fast.kernels.conv1d_stream import conv1d_stream, conv1d_stream_ref

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


@pytest.mark.parametrize("batch, c_in, c_out, kernel, stride, t_in, elu, residual, replicate, bias", CASES)
def test_conv1d_stream_matches_reference_over_frames(batch, c_in, c_out, kernel, stride, t_in, elu, residual,
                                                     replicate, bias):
    weight = torch.randn(c_out, c_in, kernel) / (c_in * kernel) ** 0.5
    b = torch.randn(c_out) if bias else None
    history = kernel - stride
    state_ref = torch.randn(2, batch, c_in, history)
    state_ker = state_ref.clone()
    t_out = t_in // stride
    for step in range(3):
        x = torch.randn(batch, t_in, c_in).transpose(1, 2)  # strided: time is not the contiguous dim
        frame = torch.tensor([step + i for i in range(batch)], dtype=torch.int32)
        res = torch.randn(batch, c_out, t_out) if residual else None
        expected = conv1d_stream_ref(x, state_ref, frame, weight, b, stride, elu, res, replicate)
        out = torch.full((batch, c_out, t_out), float("nan"))
        conv1d_stream(x, state_ker, frame, weight, b, stride, elu, res, replicate, out=out)
        assert not out.isnan().any()
        assert rel_err(out, expected) < 1e-5
        written = (1 - frame.long() % 2)
        for slot in range(batch):
            assert torch.equal(state_ker[written[slot], slot], state_ref[written[slot], slot])


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
