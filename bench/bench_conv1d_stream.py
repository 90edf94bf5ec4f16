"""conv1d_stream at Mimi's SEANet shapes (one 80 ms frame per slot) beside cuDNN's conv on the concat."""
import pytest
import torch
import torch.nn.functional as F

from moshi_fast.kernels._utils import SplitWorkspace
from moshi_fast.kernels.conv1d_stream import (conv1d_stream, conv1d_stream_candidate_tiles,
                                              conv1d_stream_workspace_size)

GPU = torch.cuda.is_available()
# c_in, c_out, kernel, stride, t_in (samples of one frame at that layer), elu, residual
SHAPES = {
    "enc.conv_in": (1, 64, 7, 1, 1920, False, False),
    "enc.res0.conv1": (64, 32, 3, 1, 1920, True, False),
    "enc.down0": (64, 128, 8, 4, 1920, True, False),
    "enc.down1": (128, 256, 10, 5, 480, True, False),
    "enc.down2": (256, 512, 12, 6, 96, True, False),
    "enc.down3": (512, 1024, 16, 8, 16, True, False),
    "enc.conv_out": (1024, 512, 3, 1, 2, True, False),
    "dec.conv_in": (512, 1024, 7, 1, 2, False, False),
    "dec.res0.conv1": (512, 256, 3, 1, 16, True, False),
    "dec.res3.conv2": (32, 64, 1, 1, 1920, True, True),
    "dec.conv_out": (64, 1, 3, 1, 1920, True, False),
}
TINY = {name: (min(c_in, 4), min(c_out, 8), k, s, min(t, 4 * s), elu, res)
        for name, (c_in, c_out, k, s, t, elu, res) in SHAPES.items()}


def random_operands(batch: int, shape: tuple, device) -> tuple:
    """conv1d_stream's operands at `shape` (a SHAPES value) for `batch` slots, random and at frame 0: x, weight,
    bias, state, frame, residual (None where the shape has none) and out."""
    c_in, c_out, kernel, stride, t_in, _, residual = shape
    x = torch.randn(batch, c_in, t_in, device=device)
    weight = torch.randn(c_out, c_in, kernel, device=device) / (c_in * kernel) ** 0.5
    bias = torch.randn(c_out, device=device)
    state = torch.randn(2, batch, c_in, kernel - stride, device=device)
    frame = torch.zeros(batch, dtype=torch.int32, device=device)
    res = torch.randn(batch, c_out, t_in // stride, device=device) if residual else None
    out = torch.empty(batch, c_out, t_in // stride, device=device)
    return x, weight, bias, state, frame, res, out


@pytest.mark.parametrize("batch", [1, 8, 64] if GPU else [2])
@pytest.mark.parametrize("name", list(SHAPES))
def test_conv1d_stream(measure, device, name, batch):
    shape = (SHAPES if GPU else TINY)[name]
    c_in, c_out, kernel, stride, t_in, elu, _ = shape
    x, weight, bias, state, frame, res, out = random_operands(batch, shape, device)
    # Preallocated once, as the model's cache does (a split plan would otherwise allocate per call).
    workspace = SplitWorkspace(*conv1d_stream_workspace_size(batch, c_in, c_out, kernel, stride, t_in), device)
    plan = conv1d_stream_candidate_tiles(batch, c_in, c_out, kernel, stride, t_in)[0]

    def fast():
        conv1d_stream(x, state, frame, weight, bias, stride, elu, res, out=out, workspace=workspace)

    def torch_path():
        full = torch.cat([state[0], x], dim=-1)
        state[1].copy_(full[..., full.shape[-1] - state.shape[-1]:])
        y = F.conv1d(F.elu(full) if elu else full, weight, bias, stride=stride)
        return y + res if res is not None else y

    moved = 4 * (weight.numel() + bias.numel() + x.numel() + out.numel() + 2 * state[0].numel()
                 + (res.numel() if res is not None else 0))
    measure(fast, moved, torch_path, strict_fp32_torch=True, op="conv1d_stream", shape=name, batch=batch,
            tiles=plan._asdict())
