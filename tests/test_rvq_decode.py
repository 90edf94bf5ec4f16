"""rvq_decode kernel vs its torch reference and the reference model's SplitRVQ.decode: odd shapes,
both depth orders of the two RVQs, int32 and strided codes, NaN-poisoned outputs."""
import pytest
import torch

from moshi_fast.config import MimiConfig
from moshi_fast.kernels.rvq_decode import rvq_decode, rvq_decode_ref

from .helpers import rel_err
from .test_rvq_encode import random_quantizer, stacked, tiny_config


@pytest.mark.parametrize("batch, nq, n_semantic, dtype, strided", [
    pytest.param(1, 4, 1, torch.int64, False, id="b1"),
    pytest.param(3, 4, 1, torch.int32, True, id="b3-int32-strided"),
    pytest.param(17, 4, 1, torch.int64, False, id="b17-two-row-tiles"),
    pytest.param(5, 5, 3, torch.int64, True, id="semantic-deeper"),
])
def test_rvq_decode_matches_reference(batch, nq, n_semantic, dtype, strided):
    ops = stacked(random_quantizer(tiny_config(nq, n_semantic)))
    codes = torch.randint(0, 37, (nq, batch), dtype=dtype).T if strided else torch.randint(0, 37, (batch, nq),
                                                                                            dtype=dtype)
    out = torch.full((batch, 24), float("nan"))
    rvq_decode(codes, ops["codebooks"], ops["output_proj"], n_semantic, out=out)
    assert not out.isnan().any()
    assert rel_err(out, rvq_decode_ref(codes.long(), ops["codebooks"], ops["output_proj"], n_semantic)) < 1e-5


def test_rvq_decode_matches_the_model_quantizer():
    quantizer = random_quantizer(tiny_config())
    ops = stacked(quantizer)
    codes = torch.randint(0, 37, (17, 4))
    got = rvq_decode(codes, ops["codebooks"], ops["output_proj"], 1)
    assert rel_err(got, quantizer.decode(codes[..., None])[..., 0]) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_rvq_decode_real_shapes_on_gpu(batch):
    config = MimiConfig()
    quantizer = random_quantizer(config, "cuda")
    ops = stacked(quantizer)
    codes = torch.randint(0, config.codebook_size, (batch, config.num_codebooks), device="cuda")
    out = torch.full((batch, config.dimension), float("nan"), device="cuda")
    rvq_decode(codes, ops["codebooks"], ops["output_proj"], config.n_q_semantic, out=out)
    expected = quantizer.cpu().decode(codes.cpu()[..., None])[..., 0]
    assert rel_err(out.cpu(), expected) < 1e-5
