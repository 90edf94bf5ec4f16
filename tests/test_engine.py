"""The public API on the reference backend: step semantics, per-slot reset, input validation."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moshi_fast import FastMoshi, MimiCodec, SlotsBusyError, TextTokenizer, tiny
from moshi_fast import engine as engine_module

from .helpers import speech_like

CONFIG = tiny()


def _engine(max_batch=2, seed=5, **kwargs):
    return FastMoshi.random(CONFIG, device="cpu", max_batch=max_batch, seed=seed, **kwargs)


def _frames(batch, count, seed=0):
    return [f[:, 0] for f in speech_like(batch, count, seed=seed).split(1920, dim=-1)]


def _state(engine):
    runner = engine._runner
    return {f"{part}.{name}": t.clone() for part, state in (("enc", runner.codec._encoder_state),
                                                             ("dec", runner.codec._decoder_state),
                                                             ("lm", runner.lm_state)) for name, t in state.items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_first_frame_is_silence_then_tokens():
    engine = _engine()
    first, second = (engine.step(f) for f in _frames(2, 2))
    assert torch.equal(first.pcm, torch.zeros(2, 1920))
    assert first.text_tokens.tolist() == [-1, -1] and torch.equal(first.audio_codes, torch.full((2, 8), -1))
    assert second.pcm.shape == (2, 1920) and second.pcm.dtype == torch.float32 and second.pcm.abs().max() > 0
    assert second.audio_codes.shape == (2, 8) and bool((second.audio_codes >= 0).all())
    assert second.text is None


@pytest.mark.parametrize("bad, message", [
    (torch.randn(2, 1919), "shape"),
    (torch.randn(3, 1920), "shape"),
    (torch.randn(2, 1, 1920), "shape"),
    (torch.randn(2, 1920).index_put_((torch.tensor([1]), torch.tensor([777])), torch.tensor(float("nan"))),
     "NaN or Inf"),
    (torch.full((2, 1920), float("inf")), "NaN or Inf"),
    (np.full((2, 1920), 1e300), "NaN or Inf"),
    (torch.randint(-100, 100, (2, 1920)), "floating point"),
    (np.zeros((2, 1920), dtype=np.int16), "floating point"),
    ([0.0] * 1920, "numpy array or a torch tensor"),
])
def test_bad_input_raises_and_changes_no_state(bad, message):
    engine, twin = _engine(), _engine()
    frames = _frames(2, 4)
    for frame in frames[:2]:
        engine.step(frame)
        twin.step(frame)
    before = _state(engine)
    with pytest.raises(ValueError, match=message):
        engine.step(bad)
    assert _same(before, _state(engine))
    for frame in frames[2:]:
        ours, theirs = engine.step(frame), twin.step(frame)
        assert torch.equal(ours.pcm, theirs.pcm) and torch.equal(ours.audio_codes, theirs.audio_codes)


def test_outputs_are_the_callers_and_inputs_of_any_float_type_agree():
    """A step's outputs stay as they were through later steps (the engine's buffers are reused) and are ordinary
    tensors (not inference tensors: usable with autograd); frames given as float64 numpy, as a float32 tensor view
    with strides or as a tensor that requires grad step the engine alike."""
    engine, twin = _engine(), _engine()
    frames = _frames(2, 4)
    outputs = [engine.step(frame.numpy().astype(np.float64)) for frame in frames]
    assert not any(torch.is_inference(t) for out in outputs for t in (out.pcm, out.text_tokens, out.audio_codes))
    kept = [(out.pcm.clone(), out.audio_codes.clone(), out.text_tokens.clone()) for out in outputs]
    for t, (frame, out, (pcm, codes, text)) in enumerate(zip(frames, outputs, kept)):
        assert torch.equal(out.pcm, pcm) and torch.equal(out.audio_codes, codes) and torch.equal(out.text_tokens, text)
        strided = torch.stack([frame, frame], dim=-1)[..., 0]
        theirs = twin.step(strided if t % 2 else frame.clone().requires_grad_())
        assert torch.equal(theirs.pcm, pcm) and torch.equal(theirs.audio_codes, codes)


def test_single_slot_accepts_1d_numpy_frames():
    engine = _engine(max_batch=1)
    frames = _frames(1, 3)
    outputs = [engine.step(frame[0].numpy().astype(np.float64)) for frame in frames]
    assert outputs[2].pcm.shape == (1, 1920)
    reference = _engine(max_batch=1)
    assert torch.equal(outputs[2].pcm, [reference.step(f) for f in frames][2].pcm)


def test_reset_one_slot_restarts_it_and_leaves_the_other_alone():
    engine, untouched, fresh = _engine(), _engine(), _engine()
    first, second = _frames(2, 8, seed=1), _frames(2, 4, seed=2)
    for frame in first[:4]:
        engine.step(frame)
        untouched.step(frame)
    engine.reset(1)
    for t in range(4):
        mixed = torch.stack([first[4 + t][0], second[t][1]])
        ours, alone, restarted = engine.step(mixed), untouched.step(first[4 + t]), fresh.step(second[t])
        assert torch.equal(ours.audio_codes[0], alone.audio_codes[0])
        assert torch.equal(ours.pcm[0], alone.pcm[0])
        assert torch.equal(ours.text_tokens[1], restarted.text_tokens[1])
        assert torch.equal(ours.audio_codes[1], restarted.audio_codes[1])
        torch.testing.assert_close(ours.pcm[1], restarted.pcm[1], rtol=1e-5, atol=1e-6)
    assert engine.step(first[0]).text_tokens[1] >= 0


def test_reset_all_equals_a_fresh_engine():
    engine, fresh = _engine(), _engine()
    frames = _frames(2, 3)
    for frame in frames:
        engine.step(frame)
    engine.reset()
    for frame in frames:
        ours, theirs = engine.step(frame), fresh.step(frame)
        assert torch.equal(ours.audio_codes, theirs.audio_codes) and torch.equal(ours.pcm, theirs.pcm)
    with pytest.raises(ValueError, match="slot"):
        engine.reset(2)
    with pytest.raises(ValueError, match="slot"):
        engine.reset(-1)


def test_seed_decides_the_sampled_stream():
    frames = _frames(2, 6)
    run = lambda engine: torch.stack([engine.step(f).audio_codes for f in frames])  # noqa: E731
    assert torch.equal(run(_engine(seed=3)), run(_engine(seed=3)))
    assert not torch.equal(run(_engine(seed=3)), run(_engine(seed=4)))
    greedy = run(_engine(seed=3, use_sampling=False))
    assert torch.equal(greedy, run(_engine(seed=4, use_sampling=False)))


def test_text_pieces_from_the_tokenizer(tokenizer_file):
    tokenizer = TextTokenizer(tokenizer_file)
    engine = _engine(tokenizer=tokenizer)
    outputs = [engine.step(f) for f in _frames(2, 5)]
    assert outputs[0].text == ["", ""]
    for out in outputs[1:]:
        assert out.text == [tokenizer.piece(int(t)) for t in out.text_tokens]
    assert tokenizer.piece(0) == tokenizer.piece(3) == ""
    word_start = next(i for i in range(4, tokenizer.vocab_size) if tokenizer._processor.IdToPiece(i).startswith("\u2581"))
    assert tokenizer.piece(word_start).startswith(" ")


def test_constructor_validation():
    with pytest.raises(ValueError, match="max_batch"):
        _engine(max_batch=0)
    with pytest.raises(ValueError, match="top_k"):
        _engine(top_k=5000)
    with pytest.raises(ValueError, match="backend"):
        FastMoshi.random(CONFIG, device="cpu", backend="turbo")


def test_fp8_kv_cache_option():
    """kv_dtype "fp8" (or the dtype): e4m3 rings in the reference backend, e4m3 pools in the fast one, half the
    bytes; the LM's own dtype means the default; anything else is refused. Both backends serve the same
    tokens with it, through a reset and a slot that sits a frame out."""
    from moshi_fast import ops

    with pytest.raises(ValueError, match="kv_dtype"):
        _engine(kv_dtype="int4")
    with pytest.raises(ValueError, match="kv_dtype"):
        _engine(kv_dtype=torch.float16)
    assert _engine(kv_dtype=torch.float32).kv_dtype == torch.float32
    fast, reference = (_engine(max_batch=2, seed=9, backend=b, kv_dtype="fp8") for b in ("fast", "reference"))
    assert fast.kv_dtype == reference.kv_dtype == torch.float8_e4m3fn
    assert reference._runner.lm_state["helium.layers.0.k"].dtype == torch.float8_e4m3fn
    pool = fast._runner.lm_cache.kv.k_pool
    assert pool.dtype == torch.float8_e4m3fn
    plain = _engine(max_batch=2, seed=9, backend="fast")._runner.lm_cache.kv.k_pool
    assert pool.nbytes * 4 == plain.nbytes  # fp32 here: a quarter; bf16 on a GPU: half
    slots = [engine.open() for engine in (fast, reference) for _ in range(2)]
    assert slots == [0, 1, 0, 1]
    for t, pcm in enumerate(_frames(2, 5, seed=2)):
        if t == 3:
            fast.reset(1)
            reference.reset(1)
        batch = {0: pcm[0]} if t == 2 else {0: pcm[0], 1: pcm[1]}
        with ops.reference_ops():
            ours = fast.step(batch)
        theirs = reference.step(batch)
        assert torch.equal(ours.text_tokens, theirs.text_tokens), t
        assert torch.equal(ours.audio_codes, theirs.audio_codes), t
    # Closing slot 0 moves slot 1's whole state (its 8-bit keys and values too) into row 0.
    for engine in (fast, reference):
        engine.close(0)
    for pcm in _frames(1, 3, seed=4):
        with ops.reference_ops():
            ours = fast.step({1: pcm[0]})
        theirs = reference.step({1: pcm[0]})
        assert ours.bucket == theirs.bucket == 1
        assert torch.equal(ours.text_tokens, theirs.text_tokens)
        assert torch.equal(ours.audio_codes, theirs.audio_codes)


def test_mimi_codec_validation_and_stream_reset():
    codec = MimiCodec.random(CONFIG.mimi, device="cpu")
    pcm = speech_like(2, 3)
    with pytest.raises(ValueError, match=r"\[B, 1, T\]"):
        codec.encode(pcm[:, 0])
    with pytest.raises(ValueError, match="floating point"):
        codec.encode(pcm.long())
    codes = codec.encode(pcm)
    with pytest.raises(ValueError, match=r"in \[0, 2048\)"):
        codec.decode(codes + 2048)
    with pytest.raises(ValueError, match="integer"):
        codec.decode(codes.float())
    stream = codec.stream(2)
    with pytest.raises(ValueError, match="frame must have shape"):
        stream.encode(pcm[..., :1000])
    first = torch.cat([stream.encode(c) for c in pcm.split(1920, dim=-1)], dim=-1)
    stream.reset(0)
    again = stream.encode(pcm[..., :1920])
    assert torch.equal(again[0], first[0, :, :1]) and not torch.equal(again[1], first[1, :, :1])


def test_slots_open_close_and_errors():
    engine = _engine(max_batch=2)
    assert engine.open() == 0 and engine.open() == 1 and engine.open_slots == [0, 1]
    with pytest.raises(SlotsBusyError, match="all 2 conversation slots are busy"):
        engine.open()
    engine.close(0)
    with pytest.raises(ValueError, match="not an open conversation"):
        engine.close(0)
    with pytest.raises(ValueError, match="not an open conversation"):
        engine.step({0: torch.randn(1920)})
    with pytest.raises(ValueError, match="not an open conversation"):
        engine.step({7: torch.randn(1920)})
    before = _state(engine)
    with pytest.raises(ValueError, match=r"slot 1 must have shape \[1920\]"):
        engine.step({1: torch.randn(1921)})
    with pytest.raises(ValueError, match="NaN or Inf"):
        engine.step({1: torch.full((1920,), float("nan"))})
    assert _same(before, _state(engine))
    with pytest.raises(ValueError, match="top_k"):
        engine.open(top_k=251)
    assert engine.open() == 0


def test_late_joiner_and_idle_slot_produce_what_they_produce_alone():
    shared, alone_a, alone_b = _engine(max_batch=3), _engine(max_batch=1), _engine(max_batch=1)
    a_frames, b_frames = [f[0] for f in _frames(1, 8, seed=4)], [f[0] for f in _frames(1, 4, seed=5)]
    slot_a, _ = shared.open(seed=100), alone_a.open(seed=100)
    outputs_a, outputs_b = [], []
    for t in range(4):
        outputs_a.append(shared.step({slot_a: a_frames[t]}))
    slot_b, _ = shared.open(seed=200, use_sampling=False), alone_b.open(seed=200, use_sampling=False)
    for t in range(4):
        frames = {slot_b: b_frames[t]} if t == 1 else {slot_a: a_frames[4 + t - (t > 1)], slot_b: b_frames[t]}
        out = shared.step(frames)
        assert out.slots == list(frames)
        outputs_b.append(out)
        if slot_a in frames:
            outputs_a.append(out)
    expected_a = [alone_a.step({0: f}) for f in a_frames[:7]]
    expected_b = [alone_b.step({0: f}) for f in b_frames]
    for ours, theirs in zip(outputs_a, expected_a):
        row = ours.slots.index(slot_a)
        assert torch.equal(ours.text_tokens[row], theirs.text_tokens[0])
        assert torch.equal(ours.audio_codes[row], theirs.audio_codes[0])
        torch.testing.assert_close(ours.pcm[row], theirs.pcm[0], rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(outputs_b, expected_b):
        row = ours.slots.index(slot_b)
        assert torch.equal(ours.audio_codes[row], theirs.audio_codes[0])
        torch.testing.assert_close(ours.pcm[row], theirs.pcm[0], rtol=1e-5, atol=1e-6)
    greedy = _engine(max_batch=1, use_sampling=False)
    assert torch.equal(torch.stack([greedy.step(f).audio_codes[0] for f in b_frames]),
                       torch.stack([o.audio_codes[o.slots.index(slot_b)] for o in outputs_b]))


def test_fast_backend_serves_what_the_reference_backend_serves():
    """backend="fast" (FastMimi + FastLM in one frame function, which a CUDA graph captures on a GPU) and
    the reference backend, same random weights and seeds, fp32: the same tokens and codes and the same
    audio, through slots that join late, sit out frames and restart. The fast models run every op's
    torch reference here (their Triton kernels are tested op by op, and the LM step in test_lm_fast)."""
    from moshi_fast import ops

    fast, reference = (_engine(max_batch=3, seed=9, backend=b) for b in ("fast", "reference"))
    assert (fast.backend, reference.backend) == ("fast", "reference")
    frames = _frames(3, 6, seed=3)
    plan = [{0: 0, 1: 1}, {0: 0, 2: 2}, {0: 0, 1: 1, 2: 2}, "reset 1", {1: 1, 2: 2}, {0: 0, 1: 1, 2: 2}, {0: 0}]
    slots = [engine.open() for engine in (fast, reference) for _ in range(3)]
    assert slots == [0, 1, 2, 0, 1, 2]
    frame = iter(frames)
    for step in plan:
        if step == "reset 1":
            fast.reset(1)
            reference.reset(1)
            continue
        pcm = next(frame)
        batch = {slot: pcm[row] for slot, row in step.items()}
        with ops.reference_ops():
            ours = fast.step(batch)
        theirs = reference.step(batch)
        assert ours.slots == theirs.slots
        assert torch.equal(ours.text_tokens, theirs.text_tokens)
        assert torch.equal(ours.audio_codes, theirs.audio_codes)
        torch.testing.assert_close(ours.pcm, theirs.pcm, rtol=1e-4, atol=1e-5)


def test_long_conversation_wraps_the_window_like_the_reference():
    """A context of 6 frames, 30 frames: the fast backend's paged window recycles its pages several
    times and serves what the reference backend's ring serves (same weights, sampling, seeds)."""
    import dataclasses

    from moshi_fast import ops

    config = dataclasses.replace(CONFIG, lm=dataclasses.replace(CONFIG.lm, context=6))
    fast, reference = (FastMoshi.random(config, device="cpu", max_batch=2, seed=4, backend=b)
                       for b in ("fast", "reference"))
    for pcm in _frames(2, 30, seed=8):
        with ops.reference_ops():
            ours = fast.step(pcm)
        theirs = reference.step(pcm)
        assert torch.equal(ours.text_tokens, theirs.text_tokens)
        assert torch.equal(ours.audio_codes, theirs.audio_codes)


def test_batch_buckets_default_and_validation():
    from moshi_fast.graphs import batch_buckets, bucket_for

    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(1) == (1,) and batch_buckets(3) == (1, 2, 3) and batch_buckets(5, [4, 2, 4]) == (2, 4, 5)
    for bad in ([0], [6], [2.0], [True]):
        with pytest.raises(ValueError, match=r"integers in \[1, 5\]"):
            batch_buckets(5, bad)
    assert [bucket_for(n, (1, 2, 4, 5)) for n in (1, 2, 3, 5)] == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(6, (1, 2, 4, 5))
    with pytest.raises(ValueError, match="batch buckets"):
        _engine(max_batch=2, batch_buckets=[3])


CLOSING_PLAN = [  # (seeds closing before the step, seeds opening before it, the seeds that step, bucket)
    ((), (), (11, 12, 13), 4), ((), (), (12,), 2), ((11,), (), (12, 13), 2), ((), (), (13,), 1),
    ((12,), (), (13,), 1), ((), (14,), (13, 14), 2), ((13,), (), (14,), 1), ((), (), (14,), 1)]
"""Conversations (named by their sampling seed) close and join in any slot of a 4-slot engine."""


def _run_closing_plan(engine: FastMoshi, make_alone, device="cpu") -> None:
    """Runs CLOSING_PLAN on `engine` (frames on `device`): each step runs the expected bucket, and every
    conversation produces exactly what it produces alone in make_alone() (an engine of one slot), through
    every move of its state."""
    streams = {seed: [f[0].to(device) for f in _frames(1, 9, seed=seed)] for seed in (11, 12, 13, 14)}
    slot_of = {seed: engine.open(seed=seed) for seed in (11, 12, 13)}
    assert list(slot_of.values()) == [0, 1, 2]
    outputs = {seed: [] for seed in streams}
    for closing, opening, stepping, bucket in CLOSING_PLAN:
        for seed in closing:
            engine.close(slot_of.pop(seed))
        for seed in opening:
            slot_of[seed] = engine.open(seed=seed)
        out = engine.step({slot_of[seed]: streams[seed][len(outputs[seed])] for seed in stepping})
        assert out.bucket == bucket
        for seed in stepping:
            outputs[seed].append((slot_of[seed], out))
    assert slot_of == {14: 0}, "a new conversation takes the lowest free slot id"
    for seed, produced in outputs.items():
        alone = make_alone()
        alone.open(seed=seed)
        for index, (slot, out) in enumerate(produced):
            expected = alone.step({0: streams[seed][index]})
            row = out.slots.index(slot)
            assert torch.equal(out.text_tokens[row], expected.text_tokens[0]), (seed, index)
            assert torch.equal(out.audio_codes[row], expected.audio_codes[0]), (seed, index)
            torch.testing.assert_close(out.pcm[row], expected.pcm[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_closing_conversations_moves_the_others_to_the_smallest_bucket(backend):
    """Four slots, buckets (1, 2, 4): the open conversations keep the first rows, so each step runs the
    smallest bucket that holds them, and each produces what it produces alone."""
    from moshi_fast import ops

    engine = _engine(max_batch=4, backend=backend)
    assert engine.buckets == (1, 2, 4)
    with ops.reference_ops():
        _run_closing_plan(engine, lambda: _engine(max_batch=1))


def _fast_engine(reads_host: bool, **kwargs) -> FastMoshi:
    """A fast engine whose frame function copies the frames and mask from its host buffers itself (reads_host) or
    takes them copied to the device before its step (fast.moshi.HOST_INPUTS_IN_GRAPH set so while it is built)."""
    from moshi_fast.fast import moshi as fast_moshi

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast_moshi, "HOST_INPUTS_IN_GRAPH", reads_host)
        engine = FastMoshi.random(CONFIG, backend="fast", **kwargs)
    assert engine._graph_reads_host == reads_host and (engine._runner.host_inputs is not None) == reads_host
    return engine


def test_the_frame_reading_host_buffers_serves_each_conversation_as_alone():
    """fast.moshi.HOST_INPUTS_IN_GRAPH: through the closing plan (buckets 1, 2, 4, conversations moving between
    rows) each conversation produces what it produces alone in a fast engine that copies its inputs to the
    device before the step."""
    from moshi_fast import ops

    engine = _fast_engine(True, device="cpu", max_batch=4, seed=5)
    assert engine.buckets == (1, 2, 4)
    with ops.reference_ops():
        _run_closing_plan(engine, lambda: _fast_engine(False, device="cpu", max_batch=1, seed=5))


def test_a_runner_reading_host_inputs_checks_them_and_its_calls():
    from moshi_fast.fast.moshi import FastFrameRunner
    from moshi_fast.graphs import CapturedStep

    engine = _fast_engine(False, device="cpu", max_batch=2, seed=5)
    frames, mask = torch.zeros(2, 1, 1920), torch.zeros(2, dtype=torch.bool)

    def runner(host_inputs, **kwargs):
        return FastFrameRunner(engine.mimi, engine.lm, 2, engine._sampling, torch.device("cpu"),
                               host_inputs=host_inputs, **kwargs)

    for bad, message in [((torch.zeros(2, 1920), mask), "host frames"),
                         ((frames.double(), mask), "host frames"),
                         ((torch.zeros(2, 1, 3840)[..., ::2], mask), "host frames"),
                         ((frames, torch.zeros(3, dtype=torch.bool)), "execution mask"),
                         ((frames, torch.zeros(2)), "execution mask")]:
        with pytest.raises(ValueError, match=message):
            runner(bad)
    with pytest.raises(ValueError, match="teacher-forced"):
        runner((frames, mask), teacher_forcing=True)
    reading = runner((frames, mask))
    with pytest.raises(ValueError, match="step_from_host"):
        reading.step(frames, mask)
    with pytest.raises(ValueError, match="no captured step for a batch of 3"):
        reading.step_from_host(3)
    with pytest.raises(ValueError, match="without host inputs"):
        engine._runner.step_from_host(2)
    with pytest.raises(ValueError, match="needs its device"):
        CapturedStep(lambda: None, [])


@pytest.mark.gpu
def test_the_frame_graph_reading_host_buffers_serves_what_copies_before_it_serve():
    """On CUDA, where the copies from the pinned host buffers are nodes of each bucket's captured graph: the
    closing plan against each conversation alone in a plain engine, then whole-batch steps with seeded sampling,
    the same bits as an engine that copies its inputs before the replay."""
    fast = dict(device="cuda", dtype=torch.float32)
    engine = _fast_engine(True, max_batch=4, seed=5, **fast)
    assert engine._host.frames.is_pinned() and engine._host.mask.is_pinned()
    _run_closing_plan(engine, lambda: _fast_engine(False, max_batch=1, seed=5, **fast), device="cuda")
    reading, plain = (_fast_engine(reads_host, max_batch=2, seed=3, **fast) for reads_host in (True, False))
    for frame in _frames(2, 6, seed=8):
        ours, theirs = reading.step(frame), plain.step(frame)
        assert torch.equal(ours.text_tokens, theirs.text_tokens) and torch.equal(ours.audio_codes, theirs.audio_codes)
        assert torch.equal(ours.pcm, theirs.pcm)


@pytest.mark.gpu
def test_bucket_graphs_serve_each_conversation_as_alone_on_the_gpu():
    """The same plan on CUDA: the tiny preset in fp32 on the fast backend's kernels, one captured graph per
    bucket (1, 2, 4) replayed as conversations move between rows, against each conversation alone in a
    one-slot fast engine (its own graph); then seeded sampling inside the graphs repeats and differs."""
    fast = dict(device="cuda", backend="fast", dtype=torch.float32)
    engine = FastMoshi.random(CONFIG, max_batch=4, seed=5, **fast)
    assert engine.buckets == (1, 2, 4)
    _run_closing_plan(engine, lambda: FastMoshi.random(CONFIG, max_batch=1, seed=5, **fast), device="cuda")
    frames = [f.cuda() for f in _frames(2, 6)]
    run = lambda engine: torch.stack([engine.step(f).audio_codes for f in frames])  # noqa: E731
    same = [run(FastMoshi.random(CONFIG, max_batch=2, seed=3, **fast)) for _ in range(2)]
    other = run(FastMoshi.random(CONFIG, max_batch=2, seed=4, **fast))
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], other)


def _frame_output(batch: int, frame_size: int, columns: int, device: str) -> SimpleNamespace:
    return SimpleNamespace(pcm=torch.arange(batch * frame_size, dtype=torch.float32, device=device).view(batch, 1, -1),
                           tokens=torch.arange(batch * columns, device=device).view(batch, columns))


def test_host_buffers_hand_out_rows_in_slot_order_and_write_each_steps_mask():
    """receive gives the caller its own copies of the given rows in their order (rows in order and moved ones);
    set_mask leaves the bucket's mask True at exactly the given rows, whatever mask came before."""
    host = engine_module._HostBuffers(4, 6, 3, torch.device("cpu"))
    out = _frame_output(4, 6, 3, "cpu")
    for rows in ([0, 1, 2, 3], [0, 1], [2, 0, 3]):
        pcm, tokens = host.receive(out, 4, rows)
        assert np.array_equal(pcm, out.pcm[rows, 0].numpy()) and np.array_equal(tokens, out.tokens[rows].numpy())
        assert not np.shares_memory(pcm, host._pcm_np) and not np.shares_memory(tokens, host._tokens_np)
    for bucket, rows in ((4, [0, 2]), (4, [0, 2]), (2, [1]), (4, [0, 2]), (4, [3, 1, 0])):
        host.set_mask(bucket, rows)
        assert host.mask[:bucket].tolist() == [row in rows for row in range(bucket)]


@pytest.mark.gpu
def test_host_buffers_wait_for_the_device_only_after_a_step_that_did_not_receive(monkeypatch):
    """A step that received its outputs has synchronised with the copies that read its frames and mask: the next
    step rewrites them at once. After a step that sent and failed before receiving, the next writer waits for the
    device, once."""
    host = engine_module._HostBuffers(2, 6, 3, torch.device("cuda"))
    waits, synchronize = [], torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device) or synchronize(device))
    out = _frame_output(2, 6, 3, "cuda")
    host.writable_frames(2)
    host.set_mask(2, [0])
    host.sent()
    host.receive(out, 2, [0, 1])
    host.writable_frames(2)
    host.set_mask(2, [1])
    assert waits == []
    host.sent()
    host.set_mask(2, [0])
    host.writable_frames(2)
    assert len(waits) == 1 and host.mask.tolist() == [True, False]


def test_whole_batch_steps_follow_each_slot_through_moves():
    """Closing a slot moves state between rows; a whole-batch step still gives each slot (row i of the
    frames and of the output) its own conversation, the closed one's included."""
    moved, still = _engine(max_batch=3), _engine(max_batch=3)
    frames = _frames(3, 5, seed=6)
    for engine in (moved, still):
        for _ in range(3):
            engine.open()
        for frame in frames[:2]:
            engine.step({slot: frame[slot] for slot in range(3)})
    moved.close(0)
    for frame in frames[2:]:
        ours, theirs = moved.step(frame), still.step(frame)
        assert ours.slots == theirs.slots == [0, 1, 2]
        assert torch.equal(ours.audio_codes, theirs.audio_codes)
        torch.testing.assert_close(ours.pcm, theirs.pcm, rtol=1e-5, atol=1e-6)


def _teacher_forced_frames(fast_runner, reference_runner, frames, device, compare, tokens=None) -> None:
    """Steps both frame runners on the same audio, the fast one forced to the tokens the reference
    generated: its greedy ones, or with tokens(t) -> [B, 1 + dep_q] these, forced on both.
    compare(t, fast output, reference output) checks each frame."""
    for t, pcm in enumerate(frames):
        pcm = pcm.to(device)[:, None, :]
        mask = torch.ones(pcm.shape[0], dtype=torch.bool, device=device)
        forced = None if tokens is None else tokens(t).to(device)
        theirs = reference_runner.step(pcm, mask, forced)
        if forced is None:
            forced = torch.cat([theirs.text_logits.argmax(-1, keepdim=True), theirs.audio_logits.argmax(-1)], 1)
        ours = fast_runner.step(pcm, mask, forced)
        compare(t, ours, theirs)


def test_teacher_forced_fast_frames_match_the_reference_frames():
    """The whole frame (encode -> LM step -> decode) teacher-forced with random tokens (nothing greedy
    decoding would produce): the fast backend's frame function (every op's torch reference here; the GPU
    test below runs the kernels under graphs) gives the reference frame's user codes, logits, output tokens
    and audio, B = 2 over 12 frames, fp32."""
    from moshi_fast import ops
    from moshi_fast.engine import _ReferenceFrameRunner
    from moshi_fast.fast.moshi import FastFrameRunner

    fast, reference = (_engine(max_batch=2, backend=b, use_sampling=False) for b in ("fast", "reference"))
    device = torch.device("cpu")
    fast_runner = FastFrameRunner(fast.mimi, fast.lm, 2, fast._sampling, device, teacher_forcing=True)
    reference_runner = _ReferenceFrameRunner(reference.mimi, reference.lm, 2, reference._sampling, device, False)
    with pytest.raises(ValueError, match="teacher_forcing"):
        fast_runner.step(torch.zeros(2, 1, 1920), torch.ones(2, dtype=torch.bool))

    def compare(t, ours, theirs):
        assert torch.equal(ours.user_codes, theirs.user_codes), t
        assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.valid, theirs.valid), t
        torch.testing.assert_close(ours.text_logits, theirs.text_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.audio_logits, theirs.audio_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.pcm, theirs.pcm, rtol=1e-4, atol=1e-5)

    c = CONFIG.lm
    generator = torch.Generator().manual_seed(4)
    tokens = [torch.cat([torch.randint(0, c.text_card, (2, 1), generator=generator),
                         torch.randint(0, c.card, (2, c.dep_q), generator=generator)], 1) for _ in range(12)]
    with ops.reference_ops():
        _teacher_forced_frames(fast_runner, reference_runner, _frames(2, 12, seed=9), device, compare,
                               tokens=tokens.__getitem__)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_real_config_teacher_forced_frames_on_the_gpu(batch, no_tf32):
    """Moshi's real shapes in fp32 (context 400, so that 8 slots of both engines' caches fit an H100), 200
    frames of speech-like audio: the fast frame under its CUDA graph, forced to the reference frame's
    greedy tokens. The two codecs agree on >= 99.9% of the user's codes; for each slot, as long as they
    have agreed on all of them (the LM's input is then the same), the logits are within 1e-2 (relative) of
    the reference's and the audio within 1e-3. TF32 off: the reference codec's cuDNN convs are the fp32 spec."""
    import dataclasses

    from moshi_fast.config import moshiko
    from moshi_fast.engine import _ReferenceFrameRunner
    from moshi_fast.fast.moshi import FastFrameRunner
    from moshi_fast.reference.lm import SamplingParams
    from moshi_fast.reference.mimi import Mimi

    from .helpers import rel_err

    config = dataclasses.replace(moshiko(), lm=dataclasses.replace(moshiko().lm, context=400))
    device = torch.device("cuda")
    fast = FastMoshi.random(config, device=device, backend="fast", dtype=torch.float32, use_sampling=False)
    reference_mimi = Mimi(config.mimi).to(device).eval().requires_grad_(False)
    reference_mimi.load_state_dict(fast.mimi.state_dict())

    def greedy():
        full = lambda value, dtype: torch.full((batch,), value, dtype=dtype, device=device)  # noqa: E731
        return SamplingParams(full(0.0, torch.float32), full(25, torch.long), full(0.0, torch.float32),
                              full(250, torch.long), torch.arange(batch, device=device), 25, 250)

    fast_runner = FastFrameRunner(fast.mimi, fast.lm, batch, greedy(), device, buckets=[batch], teacher_forcing=True)
    # The reference LM runs on the same (fast) LM object: its parameters are the reference's.
    reference_runner = _ReferenceFrameRunner(reference_mimi, fast.lm, batch, greedy(), device, False)
    in_sync = torch.ones(batch, dtype=torch.bool)
    codes, worst = {"equal": 0, "all": 0}, {"logits": 0.0, "pcm": 0.0}

    def compare(t, ours, theirs):
        same = (ours.user_codes == theirs.user_codes).cpu()
        codes["equal"] += int(same.sum())
        codes["all"] += same.numel()
        in_sync.logical_and_(same.all(-1))
        for row in in_sync.nonzero()[:, 0].tolist():
            for o, r in ((ours.text_logits[row], theirs.text_logits[row]),
                         (ours.audio_logits[row], theirs.audio_logits[row])):
                error = rel_err(o, r)
                assert error <= 1e-2, (t, row, error)
                worst["logits"] = max(worst["logits"], error)
            if bool(theirs.valid[row]):
                assert torch.equal(ours.tokens[row], theirs.tokens[row]), (t, row)
                error = rel_err(ours.pcm[row], theirs.pcm[row])
                assert error <= 1e-3, (t, row, error)
                worst["pcm"] = max(worst["pcm"], error)

    with torch.no_grad():
        _teacher_forced_frames(fast_runner, reference_runner, _frames(batch, 200, seed=batch), device, compare)
    print(f"\nteacher-forced frames, fp32, B={batch}, 200 frames: user codes equal {codes['equal']}/{codes['all']}; "
          f"{int(in_sync.sum())}/{batch} slots in sync to the end; worst logits rel err {worst['logits']:.2e}, "
          f"worst pcm rel err {worst['pcm']:.2e}")
    assert codes["equal"] >= 0.999 * codes["all"]


@pytest.mark.gpu
def test_ten_thousand_frames_keep_flat_time_and_memory():
    """13 minutes of conversation on the fast engine at Moshi's real size (B = 1): the 3000-token window
    wraps three times; once it is full, frame time stays flat and no GPU memory is allocated."""
    import time

    engine = FastMoshi.random(device="cuda", backend="fast", max_batch=1)
    frames = [f.cuda() for f in _frames(1, 50, seed=2)]
    times, memory = [], {}
    for t in range(10_000):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step(frames[t % len(frames)])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if t in (10, 9_999):
            memory[t] = torch.cuda.memory_allocated()
    window = lambda first: sorted(times[first:first + 500])[250] * 1000  # noqa: E731
    early, full, late = window(500), window(3_500), window(9_500)
    print(f"\nB=1 frame p50: {early:.2f} ms at frames 500-999, {full:.2f} ms at 3500-3999, {late:.2f} ms at "
          f"9500-9999; GPU memory allocated {memory[10] / 1e9:.3f} GB at frame 10, {memory[9_999] / 1e9:.3f} GB "
          f"at frame 9999")
    assert late <= 1.05 * full
    assert memory[9_999] == memory[10]
