"""On-GPU token sampling (temperature + top-k exponential race) at the language model's two shapes,
text (V = 32000, k = 25, bf16 logits) and audio (V = 2048, k = 250), beside the torch path
(`moshi_fast.reference.sampling.sample`: softmax, torch.topk, the hashed noise, the race): the Triton kernel
(op sample_tokens) and, where it is built, the CUDA extension's kernel: its plain form (op sample_tokens_cuda), with
16-byte loads (sample_tokens_cuda_vector_loads), with those and the radix select (sample_tokens_cuda_radix_select:
what ops uses for the audio row) and, for the text row, its warp-reduction kernel (sample_tokens_cuda_warp_kernel:
what ops uses there); and, on a GPU, the Triton kernel's launch options (warps, compaction chunk) around the
default."""
import pytest
import torch
import triton

from moshi_fast import cuda_ext
from moshi_fast.kernels.sample_tokens import SampleTiles, sample_tokens, sample_tokens_ref

GPU = torch.cuda.is_available()
# name: vocabulary, max_top_k, draw (on the CPU interpreter, small rows that only keep the suite alive)
SHAPES = ({"text": (32000, 25, 0), "audio": (2048, 250, 1)} if GPU
          else {"text": (300, 25, 0), "audio": (200, 50, 1)})
BATCHES = [1, 8, 64] if GPU else [2]


def operands(device, batch, vocab, dtype=torch.bfloat16):
    """Logits [B, V] and the slot vectors of sampled slots at Moshi's temperatures (0.7 text, 0.8 audio)."""
    return {
        "logits": (torch.randn(batch, vocab, device=device) * 3).to(dtype),
        "temperature": torch.full((batch,), 0.7 if vocab > 4096 else 0.8, device=device),
        "seed": torch.randint(0, 2 ** 62, (batch,), device=device),
        "counter": torch.randint(0, 2 ** 20, (batch,), device=device),
    }


def sampling_call(device, batch, shape, dtype=torch.bfloat16):
    """(args of sample_tokens, out, bytes moved: the logits, the slot vectors and out)."""
    vocab, max_top_k, draw = SHAPES[shape]
    ops = operands(device, batch, vocab, dtype)
    top_k = torch.full((batch,), max_top_k, device=device)
    args = (ops["logits"], ops["temperature"], top_k, max_top_k, ops["seed"], ops["counter"], draw)
    out = torch.empty(batch, dtype=torch.int64, device=device)
    moved = ops["logits"].numel() * ops["logits"].element_size() + batch * (4 + 8 + 8 + 8 + 8)
    return args, out, moved


KERNELS = {"sample_tokens": sample_tokens, "sample_tokens_cuda": cuda_ext.sample_tokens}
"""Op name in the results -> the kernel: Triton's, and the CUDA extension's."""


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op", list(KERNELS))
def test_sample_tokens(measure, device, op, shape, dtype, batch):
    if op == "sample_tokens_cuda" and not (GPU and cuda_ext.available()):
        pytest.skip("needs the CUDA extension on a GPU")
    args, out, moved = sampling_call(device, batch, shape, dtype)
    kernel = KERNELS[op]

    def fast():
        kernel(*args, out=out)

    measure(fast, moved, lambda: sample_tokens_ref(*args), op=op,
            shape=f"{shape}-{str(dtype).removeprefix('torch.')}", batch=batch)


CUDA_SWITCHES = {
    "sample_tokens_cuda_vector_loads": {"vector_loads": True},
    "sample_tokens_cuda_radix_select": {"vector_loads": True, "radix_select": True},
}
"""Op name in the results -> cuda_ext.sample_tokens's switches: the block-wide kernel reading the (aligned,
contiguous) rows in 16-byte pieces, beside its entry-by-entry loads (sample_tokens_cuda above; the same keys), and
with those finding the k-th key by radix select instead of bisection (the same tokens)."""


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op", list(CUDA_SWITCHES))
def test_sample_tokens_cuda_switches(measure, device, op, shape, batch):
    if not (GPU and cuda_ext.available()):
        pytest.skip("needs the CUDA extension on a GPU")
    args, out, moved = sampling_call(device, batch, shape)
    switches = CUDA_SWITCHES[op]

    def fast():
        cuda_ext.sample_tokens(*args, out=out, **switches)

    measure(fast, moved, op=op, shape=f"{shape}-bfloat16", batch=batch)


@pytest.mark.parametrize("batch", BATCHES)
def test_sample_tokens_cuda_warp_kernel(measure, device, batch):
    """The text row (bf16) on the CUDA extension's warp-reduction kernel (warp_kernel) with 16-byte loads, beside
    sample_tokens_cuda's block-wide kernel and sample_tokens_cuda_vector_loads: the same tokens."""
    if not (GPU and cuda_ext.available()):
        pytest.skip("needs the CUDA extension on a GPU")
    args, out, moved = sampling_call(device, batch, "text")

    def fast():
        cuda_ext.sample_tokens(*args, out=out, warp_kernel=True, vector_loads=True)

    measure(fast, moved, op="sample_tokens_cuda_warp_kernel", shape="text-bfloat16", batch=batch)


@pytest.mark.skipif(not GPU, reason="launch options only mean something on a GPU")
@pytest.mark.parametrize("chunk_per_thread", [8, 16, 32])
@pytest.mark.parametrize("num_warps", [4, 8, 16, 32])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sample_tokens_tiles(measure, device, shape, batch, num_warps, chunk_per_thread):
    """Every warp count with compaction chunks of 8, 16 or 32 entries a thread (the default: 16)."""
    args, out, moved = sampling_call(device, batch, shape)
    block_v = triton.next_power_of_2(SHAPES[shape][0])
    tiles = SampleTiles(num_warps, min(block_v, chunk_per_thread * 32 * num_warps))

    def fast():
        sample_tokens(*args, out=out, tiles=tiles)

    measure(fast, moved, op="sample_tokens_tiles", shape=f"{shape}-w{num_warps}-c{tiles.chunk}", batch=batch,
            num_warps=num_warps, chunk=tiles.chunk)
