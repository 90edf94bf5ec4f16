"""delay_line_in / delay_line_out kernels vs their torch references (LMGen's delay-line bookkeeping):
the same tokens, line, frame counter and valid flags, bit for bit."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import pytest
import torch

from moshi_fast import ops
from moshi_fast.config import moshiko
from moshi_fast.kernels.delay_line import delay_line_in, delay_line_in_ref, delay_line_out, delay_line_out_ref
from moshi_fast.reference.lm import UNGENERATED

POISON = -12345
"""What outputs, and the gaps between a strided operand's elements, hold before a kernel runs: no token
or line entry of a test has this value."""


class LineConfig(NamedTuple):
    """A delay line's layout: per-stream delays, how many leading streams are generated and how many
    trailing ones are the user's, the line's span, each stream's initial token and the input order."""
    delays: tuple[int, ...]
    own: int
    user: int
    span: int
    initial: tuple[int, ...]
    order: tuple[int, ...]

    @property
    def streams(self) -> int:
        return len(self.delays)

    def tensors(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(delays, initial, order) as int64 device tensors."""
        return tuple(torch.tensor(v, dtype=torch.int64, device=device)
                     for v in (self.delays, self.initial, self.order))


def moshiko_line() -> LineConfig:
    c = moshiko().lm
    initial = (c.text_initial_token,) + (c.audio_initial_token,) * c.n_q
    order = (*range(1, c.num_streams), 0)
    return LineConfig(c.delays, 1 + c.dep_q, c.n_q - c.dep_q, c.max_delay + 2, initial, order)


CONFIGS = {
    "moshiko": moshiko_line(),
    # A generated stream (1) and a user stream (4) of delay max_delay, a user stream (3) of delay 0, a
    # permuted order.
    "odd": LineConfig((0, 3, 1, 0, 3), 3, 2, 5, (901, 902, 903, 904, 905), (2, 4, 0, 3, 1)),
    # A span shorter than the delays: the user stream (delay 2) writes where it reads, the generated
    # stream of delay 0 outputs the token it stores.
    "short-span": LineConfig((0, 1, 2), 2, 1, 2, (71, 72, 73), (1, 2, 0)),
}
FRAME_STARTS = ("negative", "before-delays", "at-max-delay", "after-max-delay", "wrapped")


def frames(config: LineConfig, batch: int, start: str) -> torch.Tensor:
    """Slot b's frame: b frames after the start, which is 0, max_delay, max_delay + 1, several spans on,
    or several spans before 0 (no LM step starts there, but the references define the line positions of
    negative frames as torch's % does, in [0, span))."""
    max_delay = max(config.delays)
    first = {"negative": -3 * config.span - 1, "before-delays": 0, "at-max-delay": max_delay,
             "after-max-delay": max_delay + 1, "wrapped": 7 * config.span + 1}[start]
    return first + torch.arange(batch)


def random_line(config: LineConfig, batch: int) -> torch.Tensor:
    """[B, S, span] tokens, large and distinct enough that a wrong read shows, some not generated yet."""
    line = torch.randint(0, 2 ** 40, (batch, config.streams, config.span))
    line[torch.rand(line.shape) < 0.2] = UNGENERATED
    return line


def mixed_mask(batch: int) -> torch.Tensor:
    """Every other slot runs (slot 0 does): from two slots on, some run and some do not."""
    return torch.arange(batch) % 2 == 0


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in every other element of a wider tensor along the last dimension."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), POISON, dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def run_in(state, expected_state, mask, codes, delays, initial, order, out=None) -> torch.Tensor:
    """delay_line_in on state (line, frame), its reference on expected_state (a copy): asserts the same
    tokens and line; returns the kernel's tokens."""
    tokens = delay_line_in(*state, mask, codes, delays, initial, order, out=out)
    assert torch.equal(tokens, delay_line_in_ref(*expected_state, mask, codes, delays, initial, order))
    assert torch.equal(state[0], expected_state[0])
    return tokens


def run_out(state, expected_state, mask, generated, delays, out=None,
            valid_out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """delay_line_out on state (line, frame), its reference on expected_state (a copy): asserts the same
    tokens, valid flags, line and frames; returns the kernel's (tokens, valid)."""
    tokens, valid = delay_line_out(*state, mask, generated, delays, out=out, valid_out=valid_out)
    expected_tokens, expected_valid = delay_line_out_ref(*expected_state, mask, generated, delays)
    assert torch.equal(tokens, expected_tokens) and torch.equal(valid, expected_valid)
    assert torch.equal(state[0], expected_state[0]) and torch.equal(state[1], expected_state[1])
    return tokens, valid


def copies(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.clone() for t in tensors)


def slot_cases(test):
    """Both halves' cases: every frame start, line config and batch, out given or allocated."""
    for mark in (pytest.mark.parametrize("given_out", [True, False], ids=["out-given", "out-allocated"]),
                 pytest.mark.parametrize("batch", [1, 3, 5]),
                 pytest.mark.parametrize("config_name", list(CONFIGS)),
                 pytest.mark.parametrize("start", FRAME_STARTS)):
        test = mark(test)
    return test


def slot_state(config_name: str, batch: int, start: str):
    """(config, state (line, frame), the mixed execution mask, a copy of the state before the call)."""
    config = CONFIGS[config_name]
    state = (random_line(config, batch), frames(config, batch, start))
    return config, state, mixed_mask(batch), copies(*state)


@slot_cases
def test_delay_line_in_matches_reference(batch, config_name, start, given_out):
    config, state, mask, before = slot_state(config_name, batch, start)
    delays, initial, order = config.tensors()
    codes = torch.randint(0, 2 ** 40, (batch, config.user))
    out = torch.full((batch, config.streams), POISON) if given_out else None
    tokens = run_in(state, copies(*state), mask, codes, delays, initial, order, out=out)
    assert tokens is out or not given_out
    line = state[0]
    assert torch.equal(line[~mask], before[0][~mask])
    assert not torch.equal(line[mask], before[0][mask])
    assert torch.equal(state[1], before[1])


@slot_cases
def test_delay_line_out_matches_reference(batch, config_name, start, given_out):
    config, state, mask, before = slot_state(config_name, batch, start)
    delays, _, _ = config.tensors()
    generated = torch.randint(0, 2 ** 40, (batch, config.own))
    out, valid = ((torch.full((batch, config.own), POISON), torch.tensor([True, False] * batch)[:batch])
                  if given_out else (None, None))
    tokens, flags = run_out(state, copies(*state), mask, generated, delays, out=out, valid_out=valid)
    assert (tokens is out and flags is valid) or not given_out
    for now, then in zip(state, before):
        assert torch.equal(now[~mask], then[~mask])
    assert torch.equal(state[1][mask], before[1][mask] + 1)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_delay_line_runs_frames_through_several_wraps(config_name):
    """Frame after frame from an empty line, as the LM step uses it (in, then out), with slots that
    skip frames: every token and flag, the line and the frame counters, against the references."""
    config = CONFIGS[config_name]
    delays, initial, order = config.tensors()
    batch = 3
    state = (torch.full((batch, config.streams, config.span), UNGENERATED),
             torch.zeros(batch, dtype=torch.int64))
    expected_state = copies(*state)
    for t in range(4 * config.span + max(config.delays)):
        mask = torch.tensor([True, t % 3 != 2, t % 2 == 0])
        codes = torch.randint(0, 2048, (batch, config.user))
        run_in(state, expected_state, mask, codes, delays, initial, order)
        run_out(state, expected_state, mask, torch.randint(0, 2048, (batch, config.own)), delays)
    assert len(set(state[1].tolist())) == batch


def test_delay_line_takes_strided_operands():
    """Every operand a view with gaps (the line a slice of a longer one), the generated tokens the
    transposed [G, B] buffer the LM step samples into."""
    config = CONFIGS["odd"]
    delays, initial, order = (strided(t) for t in config.tensors())
    batch = 5
    state = strided(random_line(config, batch)), strided(frames(config, batch, "after-max-delay"))
    mask = strided(mixed_mask(batch))
    expected_state = copies(*state)
    codes = strided(torch.randint(0, 2048, (batch, config.user)))
    run_in(state, expected_state, mask, codes, delays, initial, order,
           out=strided(torch.full((batch, config.streams), POISON)))
    generated = torch.randint(0, 2048, (config.own, batch)).t()
    out = strided(torch.full((batch, config.own), POISON))
    run_out(state, expected_state, mask, generated, delays, out=out)


def test_delay_line_in_reads_in_any_order():
    """An order that repeats a stream and leaves another out still writes every user stream."""
    config = CONFIGS["odd"]
    delays, initial, _ = config.tensors()
    batch = 3
    state, mask = (random_line(config, batch), frames(config, batch, "wrapped")), mixed_mask(batch)
    codes = torch.randint(0, 2048, (batch, config.user))
    run_in(state, copies(*state), mask, codes, delays, initial, torch.tensor([4, 4, 0, 1, 2]))


def test_delay_line_of_no_slots_returns_outputs():
    config = CONFIGS["odd"]
    delays, initial, order = config.tensors()
    line = torch.zeros(0, config.streams, config.span, dtype=torch.int64)
    frame, mask = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)
    no_tokens = torch.zeros(0, config.user, dtype=torch.int64)
    assert delay_line_in(line, frame, mask, no_tokens, delays, initial, order).shape == (0, config.streams)
    out, valid = delay_line_out(line, frame, mask, torch.zeros(0, config.own, dtype=torch.int64), delays)
    assert out.shape == (0, config.own) and valid.shape == (0,)


def step_operands(config: LineConfig, batch: int, start: str):
    """(delays, initial, order, line, frame, mask, codes, generated): one step's operands of `batch` slots, the
    line random, the frame counters from `start` (see frames), some slots masked off."""
    delays, initial, order = config.tensors()
    line, frame, mask = random_line(config, batch), frames(config, batch, start), mixed_mask(batch)
    codes = torch.randint(0, 2048, (batch, config.user))
    generated = torch.randint(0, 2048, (batch, config.own))
    return delays, initial, order, line, frame, mask, codes, generated


def test_ops_delay_line_runs_the_kernel_or_the_reference():
    delays, initial, order, line, frame, mask, codes, generated = step_operands(CONFIGS["moshiko"], 3,
                                                                                "before-delays")
    results = []
    for dispatch in (contextlib.nullcontext, ops.reference_ops):
        state = line.clone(), frame.clone()
        with dispatch():
            tokens = ops.delay_line_in(*state, mask, codes, delays, initial, order)
            out, valid = ops.delay_line_out(*state, mask, generated, delays)
        results.append((tokens, out, valid, *state))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_delay_line_argument_checks():
    config = CONFIGS["odd"]
    batch = 2
    delays, initial, order, line, frame, mask, codes, generated = step_operands(config, batch, "wrapped")
    with pytest.raises(TypeError, match="line must be torch.int64"):
        delay_line_in(line.int(), frame, mask, codes, delays, initial, order)
    with pytest.raises(ValueError, match=r"line must be \[B, S, T\]"):
        delay_line_out(line[0], frame, mask, generated, delays)
    with pytest.raises(ValueError, match="at least one stream and one position"):
        delay_line_out(line[..., :0], frame, mask, generated, delays)
    with pytest.raises(TypeError, match="frame must be torch.int64"):
        delay_line_in(line, frame.int(), mask, codes, delays, initial, order)
    with pytest.raises(ValueError, match=r"frame must be \[2\] \(one frame index per slot\)"):
        delay_line_out(line, frame[:1], mask, generated, delays)
    with pytest.raises(TypeError, match="exec_mask must be torch.bool"):
        delay_line_in(line, frame, mask.long(), codes, delays, initial, order)
    with pytest.raises(ValueError, match=r"exec_mask must be \[2\]"):
        delay_line_out(line, frame, mask[None], generated, delays)
    with pytest.raises(ValueError, match=r"delays must be \[5\] \(one delay per stream\)"):
        delay_line_out(line, frame, mask, generated, delays[:4])
    with pytest.raises(TypeError, match="initial must be torch.int64"):
        delay_line_in(line, frame, mask, codes, delays, initial.int(), order)
    with pytest.raises(ValueError, match=r"order must be \[5\] \(one stream per output column\)"):
        delay_line_in(line, frame, mask, codes, delays, initial, order[:3])
    with pytest.raises(TypeError, match="user_codes must be torch.int64"):
        delay_line_in(line, frame, mask, codes.int(), delays, initial, order)
    with pytest.raises(ValueError, match=r"user_codes must be \[2, n\] with n <= 5"):
        delay_line_in(line, frame, mask, torch.zeros(batch, 6, dtype=torch.int64), delays, initial, order)
    with pytest.raises(ValueError, match=r"generated must be \[2, n\]"):
        delay_line_out(line, frame, mask, generated[:1], delays)
    with pytest.raises(ValueError, match=r"out must be \[2, 5\] torch.int64"):
        delay_line_in(line, frame, mask, codes, delays, initial, order, out=torch.zeros(batch, 5).int())
    with pytest.raises(ValueError, match=r"out must be \[2, 3\] torch.int64"):
        delay_line_out(line, frame, mask, generated, delays, out=torch.zeros(batch, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"valid_out must be \[2\] torch.bool"):
        delay_line_out(line, frame, mask, generated, delays, valid_out=torch.zeros(batch, dtype=torch.int64))
    with pytest.raises(ValueError, match="must not overlap the line"):
        delay_line_in(line, frame, mask, codes, delays, initial, order, out=line[:, :, 0])
    with pytest.raises(ValueError, match="must not overlap the line or the frame counter"):
        delay_line_out(line, frame, mask, generated, delays, out=frame[:, None].expand(batch, config.own))
    with pytest.raises(ValueError, match="one CUDA device"):
        delay_line_in(line, frame, mask, codes, delays, initial, order.to("meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_delay_line_replays_in_a_cuda_graph(batch):
    """Moshi's line captured once (in, then out), replayed frame after frame with new codes, tokens and
    masks: the same results as the references run eagerly."""
    config = CONFIGS["moshiko"]
    delays, initial, order = config.tensors("cuda")
    state = (torch.full((batch, config.streams, config.span), UNGENERATED, device="cuda"),
             torch.zeros(batch, dtype=torch.int64, device="cuda"))
    mask = torch.ones(batch, dtype=torch.bool, device="cuda")
    codes = torch.zeros(batch, config.user, dtype=torch.int64, device="cuda")
    generated = torch.zeros(config.own, batch, dtype=torch.int64, device="cuda")
    tokens = torch.empty(batch, config.streams, dtype=torch.int64, device="cuda")
    out = torch.empty(batch, config.own, dtype=torch.int64, device="cuda")
    valid = torch.empty(batch, dtype=torch.bool, device="cuda")

    def step():
        delay_line_in(*state, mask, codes, delays, initial, order, out=tokens)
        delay_line_out(*state, mask, generated.t(), delays, out=out, valid_out=valid)

    step()
    state[0].fill_(UNGENERATED)
    state[1].zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    expected_state = copies(*state)
    for _ in range(7):
        mask.copy_(torch.rand(batch, device="cuda") < 0.7)
        codes.copy_(torch.randint(0, 2048, codes.shape, device="cuda"))
        generated.copy_(torch.randint(0, 2048, generated.shape, device="cuda"))
        graph.replay()
        assert torch.equal(tokens, delay_line_in_ref(*expected_state, mask, codes, delays, initial, order))
        expected_out, expected_valid = delay_line_out_ref(*expected_state, mask, generated.t(), delays)
        assert torch.equal(out, expected_out) and torch.equal(valid, expected_valid)
        assert all(torch.equal(a, b) for a, b in zip(state, expected_state))
