"""Split RVQ encode and decode at Mimi's quantizer shapes (one latent / code vector per slot and frame)
beside the torch path: F.linear projections, per level cdist + argmin + gather + subtract (encode);
embedding gathers + F.linear (decode)."""
import pytest
import torch

from moshi_fast.kernels.rvq_decode import rvq_decode, rvq_decode_ref
from moshi_fast.kernels.rvq_encode import rvq_encode, rvq_encode_ref, rvq_encode_scratch

GPU = torch.cuda.is_available()
# dimension, codebook dim, codebook size, codebooks, semantic codebooks
SHAPE = (512, 256, 2048, 8, 1) if GPU else (24, 20, 37, 4, 1)


def operands(device):
    dim, code_dim, num_codes, nq, _ = SHAPE
    codebooks = torch.randn(nq, num_codes, code_dim, device=device)
    return {
        "input_proj": torch.randn(2, code_dim, dim, device=device) / dim ** 0.5,
        "output_proj": torch.randn(2, dim, code_dim, device=device) / code_dim ** 0.5,
        "codebooks": codebooks,
        "norms": codebooks.square().sum(-1),
    }


@pytest.mark.parametrize("batch", [1, 8, 64] if GPU else [3])
def test_rvq_encode(measure, device, batch):
    dim, code_dim, _, nq, n_semantic = SHAPE
    ops = operands(device)
    latent = torch.randn(batch, dim, device=device)
    scratch = rvq_encode_scratch(batch, nq, code_dim, device)
    codes = torch.empty(batch, nq, dtype=torch.int64, device=device)
    args = (latent, ops["input_proj"], ops["codebooks"], ops["norms"], n_semantic)

    def fast():
        rvq_encode(*args, scratch, out=codes)

    read = ops["codebooks"].numel() + ops["norms"].numel() + ops["input_proj"].numel() + latent.numel()
    moved = 4 * read + 8 * codes.numel()
    measure(fast, moved, lambda: rvq_encode_ref(*args), op="rvq_encode", shape="mimi" if GPU else "tiny",
            batch=batch)


@pytest.mark.parametrize("batch", [1, 8, 64] if GPU else [3])
def test_rvq_decode(measure, device, batch):
    dim, code_dim, num_codes, nq, n_semantic = SHAPE
    ops = operands(device)
    codes = torch.randint(0, num_codes, (batch, nq), device=device)
    out = torch.empty(batch, dim, device=device)
    args = (codes, ops["codebooks"], ops["output_proj"], n_semantic)

    def fast():
        rvq_decode(*args, out=out)

    # The gathered codewords (at most B per codebook), both projections, codes and out.
    moved = 4 * (batch * nq * code_dim + ops["output_proj"].numel() + out.numel()) + 8 * codes.numel()
    measure(fast, moved, lambda: rvq_decode_ref(*args), op="rvq_decode", shape="mimi" if GPU else "tiny",
            batch=batch)
