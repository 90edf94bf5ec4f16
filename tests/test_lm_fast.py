"""The fast LM step against the reference StreamingLM (the spec): the same tokens and logits, frame by
frame, with slots that skip frames or restart, teacher forcing, the window wrap, and on the GPU the
real config in bf16 (teacher-forced logits over 200 frames) and graph replays."""
import dataclasses
import types

import pytest
import torch

from moshi_fast import cuda_ext, ops
from moshi_fast.config import moshiko, tiny
from moshi_fast.engine import _random_module
from moshi_fast.fast.lm import FastLM, FastLMRunner, overlap_text_sampling
from moshi_fast.graphs import SideStream
from moshi_fast.reference.lm import SamplingParams, StreamingLM

from .helpers import rel_err


def build(config, dtype=torch.float32, device="cpu", seed=3, fused_depth=False):
    return _random_module(lambda: FastLM(config), dtype, torch.device(device), seed).prepare(fused_depth)


def sampling_params(batch, device="cpu", greedy=False, top_k_text=5, top_k=20):
    full = lambda value, dtype: torch.full((batch,), value, dtype=dtype, device=device)  # noqa: E731
    return SamplingParams(
        text_temperature=full(0.0 if greedy else 0.7, torch.float32),
        text_top_k=torch.arange(batch, device=device) % top_k_text + 1,
        audio_temperature=full(0.0 if greedy else 0.8, torch.float32),
        audio_top_k=full(top_k, torch.long), seed=100 + torch.arange(batch, device=device),
        max_text_top_k=top_k_text, max_audio_top_k=top_k)


def schedule(frames, batch, seed=0):
    """Per frame: the execution mask (slot 1 skips every third frame) and the slots restarted before it
    (slot 2 at frame frames // 2)."""
    generator = torch.Generator().manual_seed(seed)
    masks, resets = [], []
    for t in range(frames):
        mask = torch.ones(batch, dtype=torch.bool)
        if batch > 1 and t % 3 == 2:
            mask[1] = False
        masks.append(mask)
        reset = torch.zeros(batch, dtype=torch.bool)
        if batch > 2 and t == frames // 2:
            reset[2] = True
        resets.append(reset)
    codes = torch.randint(0, 2048, (frames, batch, 8), generator=generator)
    return masks, resets, codes


def compare_streams(config, frames, batch, kernels, greedy, forced=False, device="cpu", dtype=torch.float32,
                    tolerance=1e-4, fused_depth=False, kv_dtype=None):
    lm = build(config, dtype, device, fused_depth=fused_depth)
    params = sampling_params(batch, device, greedy)
    reference = StreamingLM(lm)
    state = reference.init_state(batch, kv_dtype)
    runner = FastLMRunner(lm, batch, params, torch.device(device), teacher_forcing=forced, kv_dtype=kv_dtype)
    masks, resets, codes = schedule(frames, batch)
    codes = codes % config.card
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for t in range(frames):
        mask, reset, user = masks[t].to(device), resets[t].to(device), codes[t].to(device)
        if reset.any():
            state.reset(reset)
            runner.reset(reset)
        teacher = None
        if forced:
            teacher = torch.cat([torch.randint(0, config.text_card, (batch, 1), generator=generator),
                                 torch.randint(0, config.card, (batch, config.dep_q), generator=generator)],
                                dim=1).to(device)
        with torch.no_grad():
            expected = reference.step(user, state, mask, params, forced=teacher)
            if kernels:
                got = runner.step(user, mask, teacher)
            else:
                with ops.reference_ops():
                    got = runner.step(user, mask, teacher)
        assert torch.equal(got.valid, expected.valid), t
        assert torch.equal(got.tokens[mask], expected.tokens[mask]), t
        worst = max(worst, rel_err(got.text_logits[mask].float(), expected.text_logits[mask]),
                    rel_err(got.audio_logits[mask].float(), expected.audio_logits[mask]))
    assert worst <= tolerance, worst
    return worst


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_fast_step_matches_reference_ops(greedy):
    """The fast step's wiring (ops' torch references): tokens equal, logits equal to rounding."""
    compare_streams(tiny().lm, frames=10, batch=3, kernels=False, greedy=greedy)


def test_fused_depth_step_matches_reference():
    """prepare(fused_depth=True): each depth step is one ops.depth_step (its torch reference here)."""
    compare_streams(tiny().lm, frames=6, batch=3, kernels=False, greedy=False, fused_depth=True)


def test_fast_step_matches_reference_kernels():
    """The same with every Triton kernel (interpreter on the CPU)."""
    compare_streams(tiny().lm, frames=4, batch=3, kernels=True, greedy=False)


def test_teacher_forcing_matches_reference():
    compare_streams(tiny().lm, frames=6, batch=2, kernels=False, greedy=False, forced=True)


@pytest.mark.parametrize("kernels", [False, True], ids=["torch-references", "kernels"])
def test_fp8_kv_cache_matches_reference(kernels):
    """Helium's keys and values in e4m3 in both (the reference's ring and the paged pool round them alike),
    across a window wrap: the same tokens, logits equal to rounding."""
    config = dataclasses.replace(tiny().lm, context=5)
    compare_streams(config, frames=7 if kernels else 12, batch=3, kernels=kernels, greedy=False,
                    kv_dtype=torch.float8_e4m3fn)


def test_window_wrap_matches_reference():
    """A context of 5 frames: the paged window recycles pages while the reference's ring wraps."""
    config = dataclasses.replace(tiny().lm, context=5)
    compare_streams(config, frames=14, batch=3, kernels=False, greedy=True)


def test_skipped_slot_keeps_its_state():
    """A slot outside the execution mask: its delay line, frame counter and KV position do not move."""
    config = tiny().lm
    lm = build(config)
    runner = FastLMRunner(lm, 2, sampling_params(2), torch.device("cpu"))
    codes = torch.randint(0, config.card, (2, config.dep_q))
    with ops.reference_ops(), torch.no_grad():
        runner.step(codes, torch.tensor([True, True]))
        before = (runner.cache.tokens[1].clone(), runner.cache.frame[1].item(), runner.cache.kv.positions[1].item())
        out = runner.step(codes, torch.tensor([True, False]))
    assert not out.valid[1]
    assert torch.equal(runner.cache.tokens[1], before[0])
    assert (runner.cache.frame[1].item(), runner.cache.kv.positions[1].item()) == before[1:]


def _clear_argmax(ours: torch.Tensor, theirs: torch.Tensor, margin: float) -> tuple[int, int]:
    """(positions where theirs' top-2 margin is clear, of which ours has the same argmax); logits
    [..., V]. Clear: a margin above `margin` times the logits' standard deviation."""
    top2 = theirs.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > margin * theirs.std(dim=-1)
    return int(clear.sum()), int((ours.float().argmax(-1) == theirs.argmax(-1))[clear].sum())


def _teacher_forced_run(models: dict, batch: int, frames: int, device) -> dict:
    """Runs every model of {name: (FastLM, fast?[, KV cache dtype])} teacher-forced on the first one's greedy
    tokens (it must be a reference) with the same user codes; returns {name: [(text, audio logits) per
    frame]}."""
    config = next(iter(models.values()))[0].config
    params = sampling_params(batch, device, greedy=True, top_k_text=25, top_k=250)
    mask = torch.ones(batch, dtype=torch.bool, device=device)
    steppers = {}
    for name, (lm, fast, *kv_dtype) in models.items():
        kv_dtype = kv_dtype[0] if kv_dtype else None
        if fast:
            runner = FastLMRunner(lm, batch, params, device, teacher_forcing=True, kv_dtype=kv_dtype)
            steppers[name] = lambda user, forced, runner=runner: runner.step(user, mask, forced)
        else:
            reference = StreamingLM(lm)
            state = reference.init_state(batch, kv_dtype)
            steppers[name] = lambda user, forced, r=reference, s=state: r.step(user, s, mask, params, forced=forced)
    generator = torch.Generator(device=device).manual_seed(5)
    logits = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(frames):
            user = torch.randint(0, config.card, (batch, config.dep_q), device=device, generator=generator)
            forced = None
            for name, step in steppers.items():
                out = step(user, forced)
                if forced is None:
                    forced = torch.cat([out.text_logits.argmax(-1, keepdim=True), out.audio_logits.argmax(-1)], 1)
                logits[name].append((out.text_logits.float().clone(), out.audio_logits.float().clone()))
    return logits


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_real_config_teacher_forced_fp32(batch):
    """Moshi's real LM with random weights in fp32, 200 frames, the reference's greedy tokens forced on
    the fast step (CUDA graph): logits relative error <= 1e-2 at every frame (the issue's bound; the
    print shows the actual), and the same argmax wherever the reference's top-2 margin is clear."""
    device = torch.device("cuda")
    lm = build(moshiko().lm, torch.float32, device)
    logits = _teacher_forced_run({"reference": (lm, False), "fast": (lm, True)}, batch, 200, device)
    worst, checked, equal = 0.0, 0, 0
    for t, (ours, theirs) in enumerate(zip(logits["fast"], logits["reference"])):
        for o, r in zip(ours, theirs):
            error = rel_err(o, r)
            assert error <= 1e-2, (t, error)
            worst = max(worst, error)
            clear, same = _clear_argmax(o, r, margin=0.05)
            checked, equal = checked + clear, equal + same
    print(f"\nfast vs reference LM, fp32, B={batch}, 200 frames teacher-forced: worst logits rel err "
          f"{worst:.2e}; argmax equal at {equal}/{checked} clear-margin positions")
    assert equal == checked


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["default", "triton-attention", "gemv-norm-before"])
def test_real_config_bf16_as_faithful_as_the_bf16_reference(variant, monkeypatch):
    """In bf16 with random weights the reference itself lands ~2% from its fp32 result (rounding through
    38 layers), so two bf16 implementations cannot agree to 1e-2. The bound that means something: the
    fast bf16 step is no farther from the exact (fp32) model than the bf16 reference is, frame by frame
    over 200 teacher-forced frames, and picks the exact model's token wherever its margin is clear.
    variant: the default kernels; Helium's attention on the Triton kernel instead of the CUDA extension's
    (ops.CUDA_PAGED_ATTENTION off); the depth transformer's RMSNorm'd products normalising x before the product
    (ops.CUDA_GEMV_NORM_AFTER off). Two conversations."""
    if variant == "triton-attention":
        monkeypatch.setattr(ops, "CUDA_PAGED_ATTENTION", False)
    if variant == "gemv-norm-before":
        monkeypatch.setattr(ops, "CUDA_GEMV_NORM_AFTER", False)
    if variant != "triton-attention":
        assert cuda_ext.available(), cuda_ext.unavailable_reason()
    device = torch.device("cuda")
    exact = build(moshiko().lm, torch.float32, device)
    lm16 = build(moshiko().lm, torch.bfloat16, device)
    lm16.load_state_dict({k: v.to(torch.bfloat16) for k, v in exact.state_dict().items()})
    lm16.prepare()
    logits = _teacher_forced_run({"exact": (exact, False), "reference": (lm16, False), "fast": (lm16, True)},
                                 batch=2, frames=200, device=device)
    fast_errors, reference_errors, checked, equal = [], [], 0, 0
    for truth, ref, fast in zip(logits["exact"], logits["reference"], logits["fast"]):
        fast_errors.append(max(rel_err(f, e) for f, e in zip(fast, truth)))
        reference_errors.append(max(rel_err(r, e) for r, e in zip(ref, truth)))
        for f, e in zip(fast, truth):
            clear, same = _clear_argmax(f, e, margin=0.25)
            checked, equal = checked + clear, equal + same
    fast_errors, reference_errors = torch.tensor(fast_errors), torch.tensor(reference_errors)
    versus = max(rel_err(f, r) for fast, ref in zip(logits["fast"], logits["reference"])
                 for f, r in zip(fast, ref))
    print(f"\nbf16 ({variant}), 200 frames: logits rel err to fp32, fast mean {fast_errors.mean():.2e} "
          f"max {fast_errors.max():.2e}, bf16 reference mean {reference_errors.mean():.2e} "
          f"max {reference_errors.max():.2e}; fast vs bf16 reference max {versus:.2e}; "
          f"argmax equal to fp32 at {equal}/{checked} clear-margin positions")
    assert fast_errors.mean() <= 1.05 * reference_errors.mean()
    assert (fast_errors <= 1.5 * reference_errors).all()
    assert equal >= 0.99 * checked


@pytest.mark.gpu
def test_real_config_fp8_kv_cache_as_faithful_as_the_reference_with_it():
    """bf16 weights with e4m3 keys and values: the fast step is no farther from the exact model (fp32, fp32
    cache) than the reference with the same 8-bit cache, over 200 teacher-forced frames; prints how far the
    8-bit cache moves the logits beside the bf16 cache (with random weights: indicative only)."""
    device = torch.device("cuda")
    exact = build(moshiko().lm, torch.float32, device)
    lm16 = build(moshiko().lm, torch.bfloat16, device)
    lm16.load_state_dict({k: v.to(torch.bfloat16) for k, v in exact.state_dict().items()})
    lm16.prepare()
    fp8 = torch.float8_e4m3fn
    logits = _teacher_forced_run({"exact": (exact, False), "reference_fp8": (lm16, False, fp8),
                                  "fast_fp8": (lm16, True, fp8), "fast_bf16": (lm16, True)},
                                 batch=2, frames=200, device=device)

    def errors(name):
        return torch.tensor([max(rel_err(o, e) for o, e in zip(ours, truth))
                             for ours, truth in zip(logits[name], logits["exact"])])

    fast, reference, plain = errors("fast_fp8"), errors("reference_fp8"), errors("fast_bf16")
    print(f"\nfp8 KV cache, 200 frames: logits rel err to fp32, fast mean {fast.mean():.2e} max {fast.max():.2e}, "
          f"reference with the fp8 cache mean {reference.mean():.2e} max {reference.max():.2e}; "
          f"fast with the bf16 cache mean {plain.mean():.2e} max {plain.max():.2e}")
    assert fast.mean() <= 1.05 * reference.mean()
    assert (fast <= 1.5 * reference).all()


@pytest.mark.gpu
def test_graph_replays_draw_fresh_tokens_and_repeat_with_the_seed():
    """Sampling inside the captured graph: successive frames draw fresh noise, and a reset slot with the
    same seed replays the same tokens."""
    config = dataclasses.replace(moshiko().lm, num_layers=2)
    device = torch.device("cuda")
    lm = build(config, torch.bfloat16, device)
    params = sampling_params(2, device, top_k_text=25, top_k=250)
    params.seed[:] = 7
    params.text_top_k[:] = 25
    runner = FastLMRunner(lm, 2, params, device)
    mask = torch.ones(2, dtype=torch.bool, device=device)
    codes = torch.randint(0, config.card, (12, 1, config.dep_q), device=device).expand(-1, 2, -1)
    with torch.no_grad():
        first = [runner.step(codes[t], mask).tokens.clone() for t in range(12)]
        runner.reset(mask)
        second = [runner.step(codes[t], mask).tokens.clone() for t in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    audio = torch.stack([f[0, 1:] for f in first[2:]])
    assert len({tuple(row.tolist()) for row in audio}) > 1
    assert torch.equal(first[-1][0], first[-1][1])


def test_head_inputs_norm_once_for_both_heads_and_change_nothing():
    """out_norm runs once for the text head and the depth transformer's input projection, giving each the rows its
    own norm launch gave it; where norms are fused into the products, each product still gets the norm."""
    config = tiny().lm
    lm = build(config)
    cache = types.SimpleNamespace(workspace=None)
    x = torch.randn(3, config.dim)
    norm = ("rms", lm.out_norm.weight, config.norm_eps)
    rows, shared = lm.head_inputs(x)
    assert shared is None
    assert torch.equal(lm.text_logits(rows, shared, cache), ops.linear(x, lm.text_head, norm=norm))
    projected = ops.linear(x, lm.depth_in_proj, norm=norm).view(3, config.dep_q, -1).transpose(0, 1)
    assert torch.equal(lm.depth_inputs(rows, shared, cache), projected)
    with ops.separate_norms(False):
        rows, fused = lm.head_inputs(x)
    assert rows is x and fused[0] == "rms" and fused[1] is lm.out_norm.weight


def test_overlapped_text_sampling_draws_the_reference_tokens():
    """With the text token drawn on a second stream (the default; a no-op on the CPU, where the work stays in order)
    or before the projection, the step is unchanged: the reference's tokens and logits with slots skipping frames and
    restarting."""
    runner = FastLMRunner(build(tiny().lm), 2, sampling_params(2), torch.device("cpu"))
    assert isinstance(runner.generator.side, SideStream)
    compare_streams(tiny().lm, frames=6, batch=3, kernels=False, greedy=False)
    with overlap_text_sampling(False):
        assert FastLMRunner(build(tiny().lm), 2, sampling_params(2), torch.device("cpu")).generator.side is None
        compare_streams(tiny().lm, frames=6, batch=3, kernels=False, greedy=False)


def assert_same_steps(ours: FastLMRunner, theirs: FastLMRunner, codes: torch.Tensor, mask: torch.Tensor) -> None:
    """Steps both runners through codes [T, B, dep_q] under mask, theirs first each frame: every frame's tokens
    and logits equal bit for bit."""
    with torch.no_grad():
        for t, frame_codes in enumerate(codes):
            expected = theirs.step(frame_codes, mask)
            got = ours.step(frame_codes, mask)
            for name in ("tokens", "valid", "text_logits", "audio_logits"):
                assert torch.equal(getattr(got, name), getattr(expected, name)), (t, name)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_overlapped_text_sampling_is_bitwise_the_same_step_in_a_graph(batch):
    """Moshi's real shapes (two Helium layers), bf16, sampling on: the graph whose text sampling is a parallel branch
    (the default) gives the tokens and logits of the graph that samples before the projection, bit for bit, frame
    after frame."""
    config = dataclasses.replace(moshiko().lm, num_layers=2)
    device = torch.device("cuda")
    lm = build(config, torch.bfloat16, device)
    params = sampling_params(batch, device, top_k_text=25, top_k=250)
    overlapped = FastLMRunner(lm, batch, params, device)
    with overlap_text_sampling(False):
        serial = FastLMRunner(lm, batch, params, device)
    assert overlapped.generator.side is not None and serial.generator.side is None
    mask = torch.ones(batch, dtype=torch.bool, device=device)
    codes = torch.randint(0, config.card, (16, batch, config.dep_q), device=device)
    assert_same_steps(overlapped, serial, codes, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_attention_reads_before_the_wait_give_the_same_steps(batch, monkeypatch):
    """ops.PAGED_ATTENTION_READS_BEFORE_WAIT: Moshi's real shapes (two Helium layers), bf16, sampling on, the step's
    graph with Helium's CUDA attention reading its window before it waits for the qkv product gives the tokens and
    logits of the graph whose attention reads after the wait, bit for bit, frame after frame."""
    assert cuda_ext.available(), cuda_ext.unavailable_reason()
    config = dataclasses.replace(moshiko().lm, num_layers=2)
    device = torch.device("cuda")
    lm = build(config, torch.bfloat16, device)
    params = sampling_params(batch, device, top_k_text=25, top_k=250)
    runners = {}
    for early in (False, True):
        monkeypatch.setattr(ops, "PAGED_ATTENTION_READS_BEFORE_WAIT", early)
        runners[early] = FastLMRunner(lm, batch, params, device)
    mask = torch.ones(batch, dtype=torch.bool, device=device)
    codes = torch.randint(0, config.card, (16, batch, config.dep_q), device=device)
    assert_same_steps(runners[True], runners[False], codes, mask)


@pytest.mark.gpu
def test_overlapped_text_sampling_runs_eagerly_as_in_its_graph():
    """The eager switch (no graph; the side stream's fork and join as real stream waits) gives the captured graph's
    tokens and logits bit for bit, Moshi's real shapes with two Helium layers, B = 3, sampling on."""
    config = dataclasses.replace(moshiko().lm, num_layers=2)
    device = torch.device("cuda")
    lm = build(config, torch.bfloat16, device)
    params = sampling_params(3, device, top_k_text=25, top_k=250)
    graphed = FastLMRunner(lm, 3, params, device)
    eager = FastLMRunner(lm, 3, params, device, eager=True)
    assert graphed.generator.side is not None and eager.generator.side is not None
    mask = torch.ones(3, dtype=torch.bool, device=device)
    codes = torch.randint(0, config.card, (8, 3, config.dep_q), device=device)
    assert_same_steps(eager, graphed, codes, mask)
