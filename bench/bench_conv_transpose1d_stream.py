"""conv_transpose1d_stream at Mimi's decoder shapes beside cuDNN's transposed conv plus the overlap glue.

The kernel gets what the model gives it: the weight packed once and a split-K workspace allocated up
front at the size the default plan asks for."""
import pytest
import torch
import torch.nn.functional as F

from moshi_fast.kernels._utils import SplitWorkspace
from moshi_fast.kernels.conv_transpose1d_stream import (
    conv_transpose1d_stream,
    conv_transpose1d_stream_workspace_size,
    pack_conv_transpose_weight,
)

GPU = torch.cuda.is_available()
# c_in, c_out, kernel, stride, t_in (steps of one frame at that layer), groups
SHAPES = {
    "dec.up0": (1024, 512, 16, 8, 2, 1),
    "dec.up1": (512, 256, 12, 6, 16, 1),
    "dec.up2": (256, 128, 10, 5, 96, 1),
    "dec.up3": (128, 64, 8, 4, 480, 1),
    "upsample": (512, 512, 4, 2, 1, 512),
}
TINY = {name: (min(ci, 4) if g == 1 else 4, min(co, 4) if g == 1 else 4, k, s, min(t, 3), 1 if g == 1 else 4)
        for name, (ci, co, k, s, t, g) in SHAPES.items()}


def random_operands(batch: int, shape: tuple, device) -> tuple:
    """conv_transpose1d_stream's operands at `shape` (a SHAPES value) for `batch` slots, random and at frame 0: x,
    weight, bias (None for a grouped shape), partial (the carried overlap), frame and out."""
    c_in, c_out, kernel, stride, t_in, groups = shape
    x = torch.randn(batch, c_in, t_in, device=device)
    weight = torch.randn(c_in, c_out // groups, kernel, device=device)
    bias = torch.randn(c_out, device=device) if groups == 1 else None
    partial = torch.randn(2, batch, c_out, kernel - stride, device=device)
    frame = torch.zeros(batch, dtype=torch.int32, device=device)
    out = torch.empty(batch, c_out, t_in * stride, device=device)
    return x, weight, bias, partial, frame, out


@pytest.mark.parametrize("batch", [1, 8, 64] if GPU else [2])
@pytest.mark.parametrize("name", list(SHAPES))
def test_conv_transpose1d_stream(measure, device, name, batch):
    shape = (SHAPES if GPU else TINY)[name]
    c_in, c_out, kernel, stride, t_in, groups = shape
    x, weight, bias, partial, frame, out = random_operands(batch, shape, device)
    elu = groups == 1
    packed = pack_conv_transpose_weight(weight, stride) if groups == 1 else None
    workspace = SplitWorkspace(*conv_transpose1d_stream_workspace_size(batch, c_in, c_out, kernel, stride, t_in, groups),
                               device=device)

    def fast():
        conv_transpose1d_stream(x, partial, frame, weight, bias, stride, groups, elu, out=out, packed_weight=packed,
                                workspace=workspace)

    def torch_path():
        full = F.conv_transpose1d(F.elu(x) if elu else x, weight, bias, stride=stride, groups=groups)
        overlap = kernel - stride
        full[..., :overlap] += partial[0]
        partial[1].copy_(full[..., full.shape[-1] - overlap:])
        return full[..., :full.shape[-1] - overlap]

    moved = 4 * (weight.numel() + x.numel() + out.numel() + 2 * partial[0].numel() + (c_out if bias is not None else 0))
    measure(fast, moved, torch_path, strict_fp32_torch=True, op="conv_transpose1d_stream", shape=name, batch=batch)
