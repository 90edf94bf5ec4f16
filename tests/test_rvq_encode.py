"""rvq_encode kernel vs its torch reference and the reference model's SplitRVQ.encode: odd shapes, both
depth orders of the two RVQs, repeated launches on one scratch (the grid barrier's bookkeeping).

Codes can differ from the reference only where two codewords are at the same distance up to fp32
rounding (the projections round differently); after such a tie the rest of that RVQ follows another
residual. So each test asserts >= 99% agreement, prints the differences, and checks that every code
of the kernel is a nearest codeword of the residual its own earlier codes leave (in float64).
"""
import pytest
import torch

from moshi_fast.config import MimiConfig
from moshi_fast.kernels.rvq_encode import _layout, rvq_encode, rvq_encode_ref, rvq_encode_scratch
from moshi_fast.reference.mimi import SplitRVQ


def random_quantizer(config: MimiConfig, device="cpu") -> SplitRVQ:
    """A SplitRVQ with random parameters: unit-variance projected latents, and codewords at the scale
    of the residual they quantize (it shrinks level by level), so that the codes vary."""
    quantizer = SplitRVQ(config).requires_grad_(False)
    for rvq in (quantizer.semantic, quantizer.acoustic):
        torch.nn.init.normal_(rvq.input_proj, std=config.dimension ** -0.5)
        torch.nn.init.normal_(rvq.output_proj, std=config.codebook_dim ** -0.5)
        scale = 0.8 ** torch.arange(rvq.codebooks.shape[0], dtype=torch.float32)
        rvq.codebooks.copy_(torch.randn_like(rvq.codebooks) * scale[:, None, None])
    return quantizer.to(device)


def tiny_config(nq: int = 4, n_semantic: int = 1) -> MimiConfig:
    return MimiConfig(dimension=24, codebook_dim=20, codebook_size=37, num_codebooks=nq,
                      n_q_semantic=n_semantic)


def stacked(quantizer: SplitRVQ) -> dict[str, torch.Tensor]:
    """The kernels' operands, prepared as the fast model does once."""
    rvqs = (quantizer.semantic, quantizer.acoustic)
    codebooks = torch.cat([rvq.codebooks for rvq in rvqs]).contiguous()
    return {
        "input_proj": torch.stack([rvq.input_proj[..., 0] for rvq in rvqs]).contiguous(),
        "output_proj": torch.stack([rvq.output_proj[..., 0] for rvq in rvqs]).contiguous(),
        "codebooks": codebooks,
        "norms": (codebooks.double() ** 2).sum(-1).float(),
    }


def assert_nearest(latent, input_proj, codebooks, n_semantic, codes, rtol=1e-5):
    """Each code is a nearest codeword of the residual left by the codes before it (float64), up to
    rtol of the squared norms involved (fp32 rounding), so ties may go either way."""
    latent, input_proj, codebooks = latent.double(), input_proj.double(), codebooks.double()
    codes = codes.long()
    nq = codebooks.shape[0]
    for rvq, levels in enumerate((range(n_semantic), range(n_semantic, nq))):
        residual = latent @ input_proj[rvq].T
        for level in levels:
            distance = torch.cdist(residual, codebooks[level]).square()
            slack = distance.gather(1, codes[:, level, None])[:, 0] - distance.min(1).values
            scale = residual.square().sum(-1) + codebooks[level].square().sum(-1).max()
            assert (slack <= rtol * scale).all(), f"level {level}: a code is not a nearest codeword"
            residual = residual - codebooks[level][codes[:, level]]


def agreement(codes, expected, label) -> float:
    differ = int((codes != expected).sum())
    print(f"\n{label}: {differ} of {codes.numel()} codes differ from the reference (near-ties)")
    return 1 - differ / codes.numel()


def launch_and_check(quantizer, batch, n_semantic, scratch, launches, max_programs=None):
    """`launches` launches on one scratch, each with a fresh latent; returns the programs per launch."""
    ops = stacked(quantizer)
    device = ops["codebooks"].device
    for _ in range(launches):
        latent = torch.randn(batch, quantizer.semantic.input_proj.shape[1], device=device)
        codes = torch.full((batch, ops["codebooks"].shape[0]), -1, dtype=torch.int64, device=device)
        rvq_encode(latent, ops["input_proj"], ops["codebooks"], ops["norms"], n_semantic, scratch, out=codes,
                   max_programs=max_programs)
        expected = rvq_encode_ref(latent, ops["input_proj"], ops["codebooks"], ops["norms"], n_semantic)
        assert agreement(codes, expected, f"B={batch}") >= 0.99
        assert_nearest(latent, ops["input_proj"], ops["codebooks"], n_semantic, codes)
    _, _, row_groups, num_slices, _ = _layout(batch, ops["codebooks"].shape[1], device, max_programs)
    return row_groups * num_slices


def barrier_arrivals(programs: int, nq: int, n_semantic: int) -> int:
    """Arrivals per launch: one per program after phase 0 and after each step."""
    return programs * (max(n_semantic, nq - n_semantic) + 1)


@pytest.mark.parametrize("batch, nq, n_semantic", [
    pytest.param(1, 4, 1, id="b1"),
    pytest.param(3, 4, 1, id="b3"),
    pytest.param(17, 4, 1, id="b17-two-row-tiles"),
    pytest.param(5, 5, 3, id="semantic-deeper"),
])
def test_rvq_encode_matches_reference_over_launches(batch, nq, n_semantic):
    quantizer = random_quantizer(tiny_config(nq, n_semantic))
    # A scratch with spare rows: batch sizes up to its capacity share it.
    scratch = rvq_encode_scratch(batch + 2, nq, quantizer.semantic.codebooks.shape[2], "cpu")
    programs = launch_and_check(quantizer, batch, n_semantic, scratch, launches=3)
    arrivals, next_base = scratch[0, :2].tolist()
    assert arrivals == next_base == 3 * barrier_arrivals(programs, nq, n_semantic)


def test_rvq_encode_matches_the_model_quantizer():
    quantizer = random_quantizer(tiny_config())
    ops = stacked(quantizer)
    latent = torch.randn(17, 24)
    codes = rvq_encode(latent, ops["input_proj"], ops["codebooks"], ops["norms"], 1,
                       rvq_encode_scratch(17, 4, 20, "cpu"))
    expected = quantizer.encode(latent[..., None])[..., 0]
    assert agreement(codes, expected, "SplitRVQ.encode") >= 0.99
    assert_nearest(latent, ops["input_proj"], ops["codebooks"], 1, codes)


@pytest.mark.gpu
@pytest.mark.parametrize("batches, max_programs", [
    pytest.param((1, 8, 64, 3), None, id="all-sms"),
    pytest.param((3, 1), 2, id="g2"),
])
def test_rvq_encode_real_shapes_on_gpu(no_tf32, batches, max_programs):
    """Mimi's shapes, G > 1 programs through the grid barrier, batch sizes sharing one scratch (so the
    grid changes between launches), 4 launches each."""
    config = MimiConfig()
    quantizer = random_quantizer(config, "cuda")
    scratch = rvq_encode_scratch(max(batches), config.num_codebooks, config.codebook_dim, "cuda")
    arrivals = 0
    for batch in batches:
        programs = launch_and_check(quantizer, batch, config.n_q_semantic, scratch, 4, max_programs)
        assert programs > 1
        arrivals += 4 * barrier_arrivals(programs, config.num_codebooks, config.n_q_semantic)
    assert scratch[0, :2].tolist() == [arrivals, arrivals]


@pytest.mark.gpu
def test_rvq_encode_replays_in_a_cuda_graph(no_tf32):
    config = MimiConfig()
    ops = stacked(random_quantizer(config, "cuda"))
    scratch = rvq_encode_scratch(8, config.num_codebooks, config.codebook_dim, "cuda")
    latent = torch.randn(8, config.dimension, device="cuda")
    codes = torch.empty(8, config.num_codebooks, dtype=torch.int64, device="cuda")
    args = (ops["input_proj"], ops["codebooks"], ops["norms"], config.n_q_semantic)
    rvq_encode(latent, *args, scratch, out=codes)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rvq_encode(latent, *args, scratch, out=codes)
    for _ in range(3):
        latent.copy_(torch.randn_like(latent))
        codes.fill_(-1)
        graph.replay()
        assert agreement(codes, rvq_encode_ref(latent, *args), "graph replay") >= 0.99
        assert_nearest(latent, ops["input_proj"], ops["codebooks"], config.n_q_semantic, codes)
