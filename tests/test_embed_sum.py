"""embed_sum kernel vs its torch reference (sequential adds in out's dtype)."""
import pytest
import torch

from moshi_fast import ops
from moshi_fast.kernels.embed_sum import embed_sum, embed_sum_ref

HELIUM_STREAMS = [2049] * 16 + [32001]
"""Helium's input streams: 16 audio tables, then the text table."""


def concatenated_tables(sizes, dim, dtype=torch.float32, device="cpu"):
    """(table, row_offset): the streams' random tables concatenated along rows, each followed by a row
    of NaN that no token selects, so that a gather from the wrong row shows."""
    blocks, offsets, start = [], [], 0
    for size in sizes:
        # Rows of very different magnitudes, so that every add rounds.
        scale = 2.0 ** torch.randint(-6, 7, (size, 1))
        blocks += [torch.randn(size, dim) * scale, torch.full((1, dim), float("nan"))]
        offsets.append(start)
        start += size + 1
    table = torch.cat(blocks).to(device=device, dtype=dtype)
    return table, torch.tensor(offsets, dtype=torch.int64, device=device)


def random_tokens(batch, sizes, layout="contiguous", dtype=torch.int64, device="cpu"):
    """[B, S] tokens, each below its stream's table size, stored contiguous, transposed ([S, B] memory)
    or in every other column of a wider tensor."""
    tokens = torch.stack([torch.randint(0, size, (batch,)) for size in sizes], dim=1).to(dtype)
    if layout == "transposed":
        tokens = tokens.t().contiguous().t()
    elif layout == "every-other-column":
        wide = torch.randint(0, 10, (batch, 2 * len(sizes)), dtype=dtype)
        wide[:, ::2] = tokens
        tokens = wide[:, ::2]
    return tokens.to(device)


def poisoned_out(batch, dim, dtype=torch.float32, device="cpu"):
    """[B, D] NaN view with a row stride wider than D."""
    return torch.full((batch, dim + 3), float("nan"), dtype=dtype, device=device)[:, :dim]


@pytest.mark.parametrize("batch, sizes, dim, block_d", [
    pytest.param(3, [7, 5, 9, 4, 6], 37, None, id="odd"),
    pytest.param(3, [7, 5, 9, 4, 6], 37, 16, id="odd-3-column-blocks"),
    pytest.param(1, [11], 64, None, id="one-stream"),
    pytest.param(2, [5] * 16 + [13], 40, 8, id="helium-streams"),
    pytest.param(2, [3, 8], 1100, None, id="wider-than-a-block"),
])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "every-other-column"])
@pytest.mark.parametrize("token_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_embed_sum_matches_reference(batch, sizes, dim, block_d, layout, token_dtype):
    table, row_offset = concatenated_tables(sizes, dim)
    tokens = random_tokens(batch, sizes, layout, token_dtype)
    out = poisoned_out(batch, dim)
    got = embed_sum(tokens, table, row_offset, out=out, block_d=block_d)
    assert got is out
    assert not out.isnan().any()
    assert torch.equal(out, embed_sum_ref(tokens, table, row_offset))


@pytest.mark.parametrize("sizes, dim", [([7, 5, 9], 37), ([30], 24)], ids=["three-streams", "one-stream"])
def test_embed_sum_accumulates_into_out(sizes, dim):
    batch = 3
    table, row_offset = concatenated_tables(sizes, dim)
    tokens = random_tokens(batch, sizes, "transposed")
    start = torch.randn(batch, dim + 5)[:, :dim]
    out = start.clone()
    embed_sum(tokens, table, row_offset, out=out, accumulate=True)
    expected = embed_sum_ref(tokens, table, row_offset, out=start.clone(), accumulate=True)
    assert torch.equal(out, expected)
    assert not torch.equal(out, embed_sum_ref(tokens, table, row_offset))


def test_embed_sum_adds_in_stream_order_rounding_each_add():
    """((1 + 1e8) - 1e8) is 0 in fp32 (1e8 + 1 rounds to 1e8); any other order, or a wider running sum,
    gives 1."""
    table = torch.tensor([[1.0, 1e8], [1e8, -1e8], [-1e8, 1.0]])
    tokens = torch.tensor([[0, 1, 2]])
    expected = torch.tensor([[0.0, 1.0]])
    assert torch.equal(embed_sum_ref(tokens, table, torch.zeros(3, dtype=torch.int64)), expected)
    assert torch.equal(embed_sum(tokens, table, torch.zeros(3, dtype=torch.int64)), expected)


def test_embed_sum_of_no_slots_returns_out():
    table, row_offset = concatenated_tables([4, 6], 8)
    out = embed_sum(torch.zeros(0, 2, dtype=torch.int64), table, row_offset)
    assert out.shape == (0, 8)


def test_ops_embed_sum_runs_the_kernel_or_the_reference():
    sizes, dim = [7, 5, 9], 21
    table, row_offset = concatenated_tables(sizes, dim)
    tokens = random_tokens(2, sizes)
    expected = embed_sum_ref(tokens, table, row_offset)
    assert torch.equal(ops.embed_sum(tokens, table, row_offset), expected)
    with ops.reference_ops():
        assert torch.equal(ops.embed_sum(tokens, table, row_offset), expected)


def test_embed_sum_argument_checks():
    sizes, dim = [7, 5], 16
    table, row_offset = concatenated_tables(sizes, dim)
    tokens = random_tokens(2, sizes)
    with pytest.raises(TypeError, match="table must be float32 or bfloat16"):
        embed_sum(tokens, table.half(), row_offset)
    with pytest.raises(TypeError, match="must be int64 or int32"):
        embed_sum(tokens.float(), table, row_offset)
    with pytest.raises(TypeError, match="must be int64 or int32"):
        embed_sum(tokens, table, row_offset.float())
    with pytest.raises(ValueError, match=r"tokens must be \[B, S\]"):
        embed_sum(tokens[0], table, row_offset)
    with pytest.raises(ValueError, match="one offset per stream"):
        embed_sum(tokens, table, row_offset[:1])
    with pytest.raises(ValueError, match="at least one stream"):
        embed_sum(tokens[:, :0], table, row_offset[:0])
    with pytest.raises(ValueError, match="table must be a contiguous"):
        embed_sum(tokens, table.t().contiguous().t(), row_offset)
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        embed_sum(tokens, table, row_offset, accumulate=True)
    with pytest.raises(ValueError, match=r"out must be \[2, 16\] torch.float32"):
        embed_sum(tokens, table, row_offset, out=torch.empty(2, dim, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unit stride along D"):
        embed_sum(tokens, table, row_offset, out=torch.empty(dim, 2).t())
    with pytest.raises(ValueError, match="power of two"):
        embed_sum(tokens, table, row_offset, block_d=24)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_helium_input_embedding_is_bit_identical_on_gpu(batch):
    table, row_offset = concatenated_tables(HELIUM_STREAMS, 4096, torch.bfloat16, "cuda")
    tokens = random_tokens(batch, HELIUM_STREAMS, device="cuda")
    out = poisoned_out(batch, 4096, torch.bfloat16, "cuda")
    embed_sum(tokens, table, row_offset, out=out)
    assert torch.equal(out, embed_sum_ref(tokens, table, row_offset))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_depth_embedding_accumulates_bit_identically_on_gpu(batch):
    """The depth transformer's input at codebook steps 0 (text) and 5 (audio): one 1024-wide row
    added to an existing projection."""
    sizes = [32001] + [2049] * 7
    table, offsets = concatenated_tables(sizes, 1024, torch.bfloat16, "cuda")
    for step in (0, 5):
        tokens = torch.randint(0, sizes[step], (batch, 1), device="cuda")
        start = torch.randn(batch, 1024, device="cuda").to(torch.bfloat16)
        out = start.clone()
        embed_sum(tokens, table, offsets[step:step + 1], out=out, accumulate=True)
        expected = embed_sum_ref(tokens, table, offsets[step:step + 1], out=start, accumulate=True)
        assert torch.equal(out, expected), step


@pytest.mark.gpu
def test_embed_sum_replays_in_a_cuda_graph_with_new_tokens():
    batch, dim = 8, 4096
    table, row_offset = concatenated_tables(HELIUM_STREAMS, dim, torch.bfloat16, "cuda")
    tokens = random_tokens(batch, HELIUM_STREAMS, device="cuda")
    out = torch.empty(batch, dim, device="cuda", dtype=torch.bfloat16)
    embed_sum(tokens, table, row_offset, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        embed_sum(tokens, table, row_offset, out=out)
    for _ in range(2):
        tokens.copy_(random_tokens(batch, HELIUM_STREAMS, device="cuda"))
        graph.replay()
        assert torch.equal(out, embed_sum_ref(tokens, table, row_offset))
