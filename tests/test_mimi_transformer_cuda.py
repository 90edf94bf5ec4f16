"""The CUDA extension's one-launch Mimi transformer (csrc/mimi_transformer_kernel.cuh, `cuda_ext.mimi_transformer`).

On the GPU: the reference's x and ring writes frame after frame at Mimi's shapes (the real 250-step ring from a fresh
slot whose never-written rows hold NaN, a short ring that wraps many times, positions far from zero), a CUDA graph's
replays, with and without programmatic dependent launch, the argument checks, and the fast codec with it against the
reference codec. On the CPU: the spec (`mimi_transformer_ref`) against the fast model's per-layer path, and that ops
never reaches the extension there."""
import pytest
import torch

from moshi_fast import MimiCodec, cuda_ext, moshiko, ops, tiny
from moshi_fast.cache import MimiCache
from moshi_fast.fast.mimi import FastMimi
from moshi_fast.kernels._utils import programmatic_launch

from .helpers import calibrate_codebooks, rel_err, speech_like

WIDTH, HEADS, HEAD_DIM, FFN = cuda_ext.MIMI_WIDTH, cuda_ext.MIMI_HEADS, cuda_ext.MIMI_HEAD_DIM, cuda_ext.MIMI_FFN
MAX_PERIOD, EPS = 10000.0, 1e-5


def random_layers(count: int, device, seed: int = 0) -> list[cuda_ext.MimiLayerParams]:
    """Weights at the scale of a trained layer's (unit-variance products, layer scales of 0.1 folded in)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=device, generator=generator) * scale

    return [cuda_ext.MimiLayerParams(1 + randn(WIDTH, scale=0.1), randn(WIDTH, scale=0.1),
                                     randn(3 * WIDTH, WIDTH, scale=WIDTH ** -0.5),
                                     randn(WIDTH, WIDTH, scale=0.1 * WIDTH ** -0.5),
                                     1 + randn(WIDTH, scale=0.1), randn(WIDTH, scale=0.1),
                                     randn(FFN, WIDTH, scale=WIDTH ** -0.5), randn(WIDTH, FFN, scale=0.1 * FFN ** -0.5))
            for _ in range(count)]


def rings(count: int, context: int, device, fill: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, HEADS, context, HEAD_DIM), fill, device=device),
             torch.full((1, HEADS, context, HEAD_DIM), fill, device=device)) for _ in range(count)]


def written_rows(ring: torch.Tensor, frame: int, context: int) -> torch.Tensor:
    """The ring's rows that hold a written position after frames 0..frame of a fresh slot (the others may hold
    anything)."""
    return ring[:, :, :min(2 * frame + 2, context)]


def test_spec_matches_the_fast_models_per_layer_path_on_cpu():
    """mimi_transformer_ref is FastMimi's transformer (LayerNorms, folded scales, ring attention, GELU) frame by
    frame, its rings too: tiny config, its ring of 250 steps wrapped three times."""
    config = tiny().mimi
    reference = MimiCodec.random(config, device="cpu", seed=3)
    model = FastMimi(config)
    model.load_state_dict(reference.model.state_dict())
    model.requires_grad_(False).prepare()
    cache = MimiCache(model, 1, torch.device("cpu"))
    layers = model.layer_params(model.encoder_transformer)
    spec_rings = [(torch.zeros_like(k), torch.zeros_like(v))
                  for k, v in (cache.rings[f"encoder_transformer.{i}"] for i in range(len(layers)))]
    steps = model.streaming_input_lengths()["downsample"]
    frames = config.context // steps * 3 + 1
    with ops.reference_ops():
        for frame in range(frames):
            x = torch.randn(1, steps, config.dimension)
            counter = torch.tensor([frame], dtype=torch.int32)
            expected = model._transformer(model.encoder_transformer, "encoder_transformer", x.clone(), cache, counter)
            actual = cuda_ext.mimi_transformer_ref(x.clone(), counter, layers, spec_rings, config.max_period,
                                                   config.norm_eps)
            assert rel_err(actual, expected) <= 1e-6
    for i, (k, v) in enumerate(spec_rings):
        cache_k, cache_v = cache.rings[f"encoder_transformer.{i}"]
        assert torch.allclose(k, cache_k, atol=1e-6) and torch.allclose(v, cache_v, atol=1e-6)


def test_ops_never_reaches_the_extension_on_cpu(monkeypatch):
    monkeypatch.setattr(ops, "MIMI_CLUSTER_TRANSFORMER", True)
    layers = random_layers(1, "cpu")
    frame = torch.zeros(1, dtype=torch.int32)
    x = torch.randn(1, 2, WIDTH)
    assert not ops.uses_mimi_cluster_transformer(x, frame, layers, rings(1, 16, "cpu"))
    assert not cuda_ext.mimi_transformer_supported(x, frame, layers, rings(1, 16, "cpu"))
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        cuda_ext.mimi_transformer(x, frame, layers, rings(1, 16, "cpu"), MAX_PERIOD, EPS)


@pytest.fixture(scope="module")
def extension():
    """The extension on the GPU machine, where its tests fail, rather than skip, when it cannot load."""
    assert cuda_ext.available(), cuda_ext.unavailable_reason()
    assert cuda_ext._mimi_transformer_clusters(torch.device("cuda")) >= 1


def _run_frames(layers, context, frames, first_frame=0, programmatic=True, seed=0):
    """Frames through the kernel and the spec side by side; returns the worst relative errors of x and the rings
    (their rows written so far). From frame 0 the kernel's never-written rows hold NaN, which must never enter a
    result; from a later frame every row counts as written and both start from the same random rings."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    if first_frame == 0:
        fast_rings, spec_rings = rings(len(layers), context, "cuda", float("nan")), rings(len(layers), context, "cuda")
    else:
        spec_rings = [(torch.randn(k.shape, device="cuda", generator=generator),
                       torch.randn(v.shape, device="cuda", generator=generator))
                      for k, v in rings(len(layers), context, "cuda")]
        fast_rings = [(k.clone(), v.clone()) for k, v in spec_rings]
    worst_x = worst_ring = 0.0
    with programmatic_launch(programmatic):
        for frame in range(first_frame, first_frame + frames):
            counter = torch.tensor([frame], dtype=torch.int32, device="cuda")
            x = torch.randn(1, 2, WIDTH, device="cuda", generator=generator)
            actual = cuda_ext.mimi_transformer(x.clone(), counter, layers, fast_rings, MAX_PERIOD, EPS)
            expected = cuda_ext.mimi_transformer_ref(x.clone(), counter, layers, spec_rings, MAX_PERIOD, EPS)
            worst_x = max(worst_x, rel_err(actual, expected))
            for (fast_k, fast_v), (spec_k, spec_v) in zip(fast_rings, spec_rings):
                for fast, spec in ((fast_k, spec_k), (fast_v, spec_v)):
                    worst_ring = max(worst_ring, rel_err(written_rows(fast, frame, context),
                                                         written_rows(spec, frame, context)))
    return worst_x, worst_ring


@pytest.mark.gpu
@pytest.mark.parametrize("context, frames, first_frame, tolerance",
                         [(250, 12, 0, 2e-5), (250, 6, 124, 2e-5), (20, 30, 0, 2e-5), (17, 9, 4000, 2e-4)])
def test_matches_the_spec_frame_after_frame(extension, no_tf32, context, frames, first_frame, tolerance):
    """Mimi's 8 layers at its ring of 250 from a fresh slot and across the wrap (frame 124 writes positions 248-249,
    125 wraps to slot 0), rings that wrap many times, an odd capacity, positions near 8000 (where RoPE's fp32 angles,
    position times frequency, turn a frequency one ulp apart from torch's exp into errors near 1e-4)."""
    layers = random_layers(8, "cuda")
    worst_x, worst_ring = _run_frames(layers, context, frames, first_frame)
    print(f"\nR={context}, frames {first_frame}..{first_frame + frames - 1}: x rel err {worst_x:.2e}, rings "
          f"{worst_ring:.2e}")
    assert worst_x <= tolerance and worst_ring <= tolerance


@pytest.mark.gpu
def test_without_programmatic_launch_and_with_fewer_layers(extension, no_tf32):
    worst_x, worst_ring = _run_frames(random_layers(3, "cuda", seed=1), 250, 4, programmatic=False, seed=1)
    assert worst_x <= 2e-5 and worst_ring <= 2e-5


@pytest.mark.gpu
def test_graph_replays_equal_eager_launches(extension):
    layers = random_layers(8, "cuda", seed=2)
    eager_rings, graph_rings = rings(8, 250, "cuda"), rings(8, 250, "cuda")
    x_eager = torch.randn(1, 2, WIDTH, device="cuda")
    x_graph = x_eager.clone()
    frame_eager = torch.zeros(1, dtype=torch.int32, device="cuda")
    frame_graph = frame_eager.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            cuda_ext.mimi_transformer(x_graph, frame_graph, layers, graph_rings, MAX_PERIOD, EPS)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(5):
        cuda_ext.mimi_transformer(x_eager, frame_eager, layers, eager_rings, MAX_PERIOD, EPS)
        graph.replay()
        frame_eager += 1
        frame_graph += 1
    torch.cuda.synchronize()
    assert torch.equal(x_graph, x_eager)
    assert all(torch.equal(a, b) for ring_a, ring_b in zip(graph_rings, eager_rings) for a, b in zip(ring_a, ring_b))


@pytest.mark.gpu
def test_argument_checks(extension):
    layers = random_layers(2, "cuda")
    good_rings = rings(2, 250, "cuda")
    frame = torch.zeros(1, dtype=torch.int32, device="cuda")
    x = torch.randn(1, 2, WIDTH, device="cuda")
    assert cuda_ext.mimi_transformer_supported(x, frame, layers, good_rings)
    bad = {
        "two conversations": (torch.randn(2, 2, WIDTH, device="cuda"), frame, layers, good_rings),
        "fp16 x": (x.half(), frame, layers, good_rings),
        "int64 frame": (x, frame.long(), layers, good_rings),
        "one ring for two layers": (x, frame, layers, good_rings[:1]),
        "a ring too long": (x, frame, layers, rings(2, cuda_ext.MIMI_MAX_CONTEXT + 1, "cuda")),
        "a transposed weight": (x, frame, [layers[0]._replace(fc2=layers[0].fc1.T)] + layers[1:], good_rings),
        "a misaligned norm": (x, frame, [layers[0]._replace(norm1_bias=torch.randn(WIDTH + 1, device="cuda")[1:])]
                              + layers[1:], good_rings),
        "too many layers": (x, frame, layers * 9, good_rings * 9),
    }
    for name, arguments in bad.items():
        assert not cuda_ext.mimi_transformer_supported(*arguments), name
        with pytest.raises((ValueError, TypeError)):
            cuda_ext.mimi_transformer(*arguments, MAX_PERIOD, EPS)
    # The op's own checks (the Python ones bypassed) refuse what the kernel cannot take.
    with pytest.raises(ValueError):
        torch.ops.moshi_fast.mimi_transformer_f32(x[:, :1], frame, *map(list, zip(*layers)),
                                                  [r for r, _ in good_rings], [r for _, r in good_rings], EPS,
                                                  MAX_PERIOD)


@pytest.mark.gpu
def test_fast_codec_with_it_matches_the_reference(extension, no_tf32, monkeypatch):
    """The codec at one conversation with both transformers in the kernel: the reference codec's codes and audio,
    as the issue's parity test asks, and the kernel really ran (its dispatch says so)."""
    monkeypatch.setattr(ops, "MIMI_CLUSTER_TRANSFORMER", True)
    reference = MimiCodec.random(moshiko().mimi, device="cuda", seed=5)
    calibrate_codebooks(reference.model)
    model = FastMimi(moshiko().mimi).cuda()
    model.load_state_dict(reference.model.state_dict())
    fast = MimiCodec(model.requires_grad_(False).prepare(), torch.device("cuda"), "fast")
    cache = MimiCache(model, 1, torch.device("cuda"))
    x = torch.zeros(1, 2, WIDTH, device="cuda")
    assert ops.uses_mimi_cluster_transformer(x, cache.encoder_frame, model.layer_params(model.encoder_transformer),
                                             [cache.rings[f"encoder_transformer.{i}"] for i in range(8)])
    frames = 50
    chunks = speech_like(1, frames, seed=1).cuda().split(1920, dim=-1)
    ref_stream, fast_stream = reference.stream(1), fast.stream(1)
    ref_codes = torch.cat([ref_stream.encode(c) for c in chunks], dim=-1)
    fast_codes = torch.cat([fast_stream.encode(c) for c in chunks], dim=-1)
    ref_pcm = torch.cat([ref_stream.decode(ref_codes[..., t:t + 1]) for t in range(frames)], dim=-1)
    fast_pcm = torch.cat([fast_stream.decode(ref_codes[..., t:t + 1]) for t in range(frames)], dim=-1)
    agreement, error = float((fast_codes == ref_codes).float().mean()), rel_err(fast_pcm, ref_pcm)
    print(f"\nfast (cluster transformer) vs reference Mimi, B=1, {frames} frames: codes equal {agreement:.4%}, decode "
          f"rel err {error:.2e}")
    assert agreement >= 0.999 and error <= 1e-4
