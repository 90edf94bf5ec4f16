"""embed_sum at the language model's two shapes beside the torch path (embed_sum_ref: one F.embedding
per stream, added one at a time): Helium's input (16 audio streams of 2049 rows then the 32001-row text
stream, 4096 wide, bf16) and the depth transformer's (one 1024-wide row added to an existing
projection)."""
import pytest
import torch

from moshi_fast.kernels.embed_sum import embed_sum, embed_sum_ref

GPU = torch.cuda.is_available()
DTYPE = torch.bfloat16 if GPU else torch.float32
# name: stream table sizes, width, accumulate (on the CPU interpreter, small tables that only keep the
# suite alive)
SHAPES = ({"helium": ([2049] * 16 + [32001], 4096, False), "depformer": ([2049], 1024, True)} if GPU
          else {"helium": ([9] * 4 + [17], 40, False), "depformer": ([9], 24, True)})


@pytest.mark.parametrize("batch", [1, 8, 64] if GPU else [3])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_embed_sum(measure, device, shape, batch):
    sizes, dim, accumulate = SHAPES[shape]
    table = torch.randn(sum(sizes), dim, device=device).to(DTYPE)
    row_offset = torch.tensor([0] + sizes[:-1], device=device).cumsum(0)
    tokens = torch.stack([torch.randint(0, size, (batch,), device=device) for size in sizes], dim=1)
    out = torch.randn(batch, dim, device=device).to(DTYPE)

    def fast():
        embed_sum(tokens, table, row_offset, out=out, accumulate=accumulate)

    def torch_path():
        embed_sum_ref(tokens, table, row_offset, out=out, accumulate=accumulate)

    # The gathered rows, out written (and read when accumulating), the token ids and offsets.
    moved = (DTYPE.itemsize * (batch * len(sizes) * dim + (2 if accumulate else 1) * batch * dim)
             + 8 * (tokens.numel() + row_offset.numel()))
    measure(fast, moved, torch_path, op="embed_sum", shape=shape, batch=batch, streams=len(sizes), dim=dim)
