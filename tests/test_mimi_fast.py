"""The fast Mimi (Triton kernels, CUDA graphs) against the reference Mimi."""
import pytest
import torch

from moshi_fast import FastMoshi, MimiCodec, moshiko, ops, tiny
from moshi_fast.fast.mimi import FastMimi
from moshi_fast.kernels.tuned import plans_from

from .helpers import calibrate_codebooks, rel_err, speech_like


def _pair(config, device, eager=False):
    """A reference codec and a fast codec with the same random weights and calibrated codebooks."""
    reference = MimiCodec.random(config, device=device, seed=5)
    calibrate_codebooks(reference.model)
    fast_model = FastMimi(config).to(device)
    fast_model.load_state_dict(reference.model.state_dict())
    fast = MimiCodec(fast_model.requires_grad_(False).prepare(), torch.device(device), "fast", eager=eager)
    return reference, fast


def _compare(reference, fast, batch, frames, seed=0):
    pcm = speech_like(batch, frames, seed=seed).to(reference.device)
    chunks = pcm.split(1920, dim=-1)
    ref_stream, fast_stream = reference.stream(batch), fast.stream(batch)
    ref_codes = torch.cat([ref_stream.encode(c) for c in chunks], dim=-1)
    fast_codes = torch.cat([fast_stream.encode(c) for c in chunks], dim=-1)
    ref_pcm = torch.cat([ref_stream.decode(ref_codes[..., t:t + 1]) for t in range(frames)], dim=-1)
    fast_pcm = torch.cat([fast_stream.decode(ref_codes[..., t:t + 1]) for t in range(frames)], dim=-1)
    distinct = min(len(torch.unique(ref_codes[:, level])) for level in range(ref_codes.shape[1]))
    return float((fast_codes == ref_codes).float().mean()), rel_err(fast_pcm, ref_pcm), distinct


def test_fast_mimi_wiring_matches_reference_on_cpu():
    """The fast model's state conventions and weight folding, with every op's torch reference (the
    kernels themselves are tested one by one in the interpreter; here they would take minutes)."""
    reference, fast = _pair(tiny().mimi, "cpu")
    with ops.reference_ops():
        agreement, error, distinct = _compare(reference, fast, batch=2, frames=4)
    assert distinct > 1
    assert agreement >= 0.99 and error <= 1e-5, (agreement, error)


def test_prepare_splits_the_weights_whose_tuned_plans_read_tf32_parts():
    """prepare() makes split_tf32 parts once for exactly the dense convs whose measured plans (any batch) take
    split_weight: here a table naming one transposed conv and one conv of the tiny config."""
    model = FastMimi(tiny().mimi)
    lengths = model.streaming_input_lengths()
    up, down = model.decoder.stages[0].up, model.encoder.stages[0].down
    up_key = ",".join(map(str, (*up.weight.shape, up.stride, lengths["decoder.stages.0.up"], 1)))
    c_out, c_in, kernel = down.weight.shape
    down_key = ",".join(map(str, (c_in, c_out, kernel, down.stride, lengths["encoder.stages.0.down"])))
    plan = {"split_weight": True, "columns_first": True}
    table = {"convtr": {up_key: {"64": {"block_m": 16, "block_n": 16, "block_ci": 16, **plan}}},
             "conv1d": {down_key: {"8": {"block_co": 16, "block_n": 16, "block_r": 16}, "64": {
                 "block_co": 16, "block_n": 16, "block_r": 16, **plan}}}}
    with plans_from(table):
        model.prepare()
    assert torch.equal(up.weight_parts, ops.split_tf32(up.packed_weight))
    assert torch.equal(down.weight_parts, ops.split_tf32(down.weight))
    split = [name for name, module in model.named_modules() if hasattr(module, "weight_parts")]
    assert sorted(split) == ["decoder.stages.0.up", "encoder.stages.0.down"]


@ops.reference_ops()
def test_fast_stream_reset_of_one_slot_leaves_the_others_alone():
    _, fast = _pair(tiny().mimi, "cpu")
    pcm = speech_like(3, 6, seed=2)
    chunks = pcm.split(1920, dim=-1)
    kept, reset, fresh = fast.stream(3), fast.stream(3), fast.stream(3)
    for chunk in chunks[:3]:
        kept.encode(chunk)
        reset.encode(chunk)
    reset.reset(1)
    for chunk in chunks[3:]:
        a, b, c = kept.encode(chunk), reset.encode(chunk), fresh.encode(chunk)
        assert torch.equal(a[[0, 2]], b[[0, 2]])
        assert torch.equal(b[1], c[1])


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])  # 64: the plans tuned for many conversations
def test_fast_mimi_matches_reference_on_gpu(batch):
    torch.backends.cudnn.allow_tf32 = False
    reference, fast = _pair(moshiko().mimi, "cuda")
    agreement, error, distinct = _compare(reference, fast, batch=batch, frames=50, seed=batch)
    print(f"\nfast vs reference Mimi on {torch.cuda.get_device_name()}, B={batch}, 50 frames: codes equal "
          f"{agreement:.4%} (min distinct codes per level {distinct}), decode rel err {error:.2e}")
    assert distinct > 1
    assert agreement >= 0.999 and error <= 1e-4


@pytest.mark.gpu
def test_fast_mimi_graph_equals_eager_and_reset_is_bitwise():
    _, graphed = _pair(moshiko().mimi, "cuda")
    eager = MimiCodec(graphed.model, graphed.device, "fast", eager=True)
    pcm = speech_like(4, 8, seed=3).cuda()
    chunks = pcm.split(1920, dim=-1)
    g, e, kept = graphed.stream(4), eager.stream(4), graphed.stream(4)
    for t, chunk in enumerate(chunks):
        if t == 4:
            g.reset(2)
            e.reset(2)
        codes_g, codes_e, codes_k = g.encode(chunk), e.encode(chunk), kept.encode(chunk)
        assert torch.equal(codes_g, codes_e)
        assert torch.equal(codes_g[[0, 1, 3]], codes_k[[0, 1, 3]])
        pcm_g, pcm_e, pcm_k = g.decode(codes_k), e.decode(codes_k), kept.decode(codes_k)
        assert torch.equal(pcm_g, pcm_e)
        assert torch.equal(pcm_g[[0, 1, 3]], pcm_k[[0, 1, 3]])


def _engines(device, config):
    reference = FastMoshi.random(config, device=device, max_batch=3, seed=9)
    fast_mimi = FastMimi(config.mimi).to(device)
    fast_mimi.load_state_dict(reference.mimi.state_dict())
    fast = FastMoshi(config, reference.lm, fast_mimi.requires_grad_(False).prepare(), None, torch.device(device),
                     max_batch=3, seed=9)
    return reference, fast


def _run_slots(engine, frames):
    """Slots 0 and 2 open; slot 2 skips frame 1; returns every step's tokens and pcm."""
    slots = [engine.open(), engine.open(), engine.open()]
    engine.close(slots[1])
    outputs = []
    for t, frame in enumerate(frames):
        step = {0: frame[0]} if t == 1 else {0: frame[0], 2: frame[2]}
        out = engine.step(step)
        outputs.append((out.slots, out.text_tokens, out.audio_codes, out.pcm))
    return outputs


@ops.reference_ops()
def test_engine_with_fast_codec_matches_reference_engine_on_cpu():
    reference, fast = _engines("cpu", tiny())
    frames = [f[:, 0] for f in speech_like(3, 5, seed=4).split(1920, dim=-1)]
    for ours, theirs in zip(_run_slots(fast, frames), _run_slots(reference, frames)):
        assert ours[0] == theirs[0]
        assert torch.equal(ours[1], theirs[1]) and torch.equal(ours[2], theirs[2])
        assert rel_err(ours[3], theirs[3]) < 1e-5 or ours[3].abs().max() == 0


@pytest.mark.gpu
def test_engine_with_fast_codec_matches_reference_engine_on_gpu():
    torch.backends.cudnn.allow_tf32 = False
    config = moshiko().replace(lm=tiny().lm)
    reference, fast = _engines("cuda", config)
    frames = [f[:, 0].cuda() for f in speech_like(3, 6, seed=4).split(1920, dim=-1)]
    for ours, theirs in zip(_run_slots(fast, frames), _run_slots(reference, frames)):
        assert ours[0] == theirs[0]
        assert (ours[1] == theirs[1]).float().mean() >= 0.99
        assert rel_err(ours[3], theirs[3]) < 1e-4 or ours[3].abs().max() == 0
