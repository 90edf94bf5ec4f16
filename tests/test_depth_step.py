"""depth_step (one persistent launch a codebook step) against depth_step_ref, the unfused op sequence:
odd shapes phase by phase in the interpreter (fp32), NaN-poisoned scratch and cache positions past the
step, strided views of stacked weights, the counters left at zero, argument checks; on the GPU at
Moshi's shapes in bf16: the single launch bitwise equal to the phase-by-phase launches, close to the
reference, and replayed in a CUDA graph."""
import pytest
import torch

from moshi_fast.kernels.depth_step import (depth_step, depth_step_phases, depth_step_ref, depth_step_scratch)

from .helpers import graph_after_warmup, rel_err

TINY = dict(layers=2, dim=48, heads=3, hidden=40, card=37, steps=5, tables=5, table_rows=20)
MOSHI = dict(layers=6, dim=1024, heads=16, hidden=2816, card=2048, steps=8, tables=8, table_rows=2049)


class Weights:
    """One frame's depth-transformer weights: every projection stacked [L, S, ...] (as FastLM.prepare
    lays them out), the heads [S, card, D], the concatenated embedding tables."""

    def __init__(self, layers, dim, heads, hidden, card, steps, tables, table_rows, dtype=torch.float32,
                 device="cpu"):
        def weight(*shape):
            return (torch.randn(*shape) / shape[-1] ** 0.5).to(device, dtype)

        self.config = dict(layers=layers, dim=dim, heads=heads, hidden=hidden, card=card, steps=steps)
        self.qkv = weight(layers, steps, 3 * dim, dim)
        self.out_proj = weight(layers, steps, dim, dim)
        self.gate_up = weight(layers, steps, 2 * hidden, dim)
        self.down = weight(layers, steps, dim, hidden)
        self.heads = weight(steps, card, dim)
        # Strided [L, D] views: the kernel takes any layer stride.
        self.norm1 = (1 + 0.2 * torch.randn(layers, dim + 3)).to(device, dtype)[:, :dim]
        self.norm2 = (1 + 0.2 * torch.randn(layers, dim + 3)).to(device, dtype)[:, :dim]
        self.table = torch.randn(tables * table_rows, dim).to(device, dtype)
        self.table_rows = table_rows
        self.offsets = torch.arange(tables, device=device) * table_rows

    def step_args(self, step, x, previous, k_cache, v_cache, logits_out, scratch):
        return dict(x=x, previous=previous, embed_table=self.table, embed_row_offset=self.offsets[step:step + 1],
                    norm1=self.norm1, qkv=self.qkv[:, step], out_proj=self.out_proj[:, step], norm2=self.norm2,
                    gate_up=self.gate_up[:, step], down=self.down[:, step], head=self.heads[step],
                    k_cache=k_cache, v_cache=v_cache, step=step, eps=1e-6, logits_out=logits_out, scratch=scratch)


class Frame:
    """The per-frame tensors of B slots: x [B, S, D] (each step's in_proj output, row-strided views),
    previous tokens, the KV caches (positions past the current step NaN), logits [B, S, card] (NaN), the
    scratch (NaN)."""

    def __init__(self, weights, batch, step, device="cpu", dtype=torch.float32):
        c = weights.config
        self.x = torch.randn(batch, c["steps"], c["dim"]).to(device, dtype)
        self.previous = torch.randint(0, weights.table_rows, (batch,), device=device)
        head_dim = c["dim"] // c["heads"]
        cache_shape = (c["layers"], batch, c["heads"], c["steps"], head_dim)
        self.k_cache = torch.randn(cache_shape).to(device, dtype)
        self.v_cache = torch.randn(cache_shape).to(device, dtype)
        self.k_cache[:, :, :, step:] = float("nan")
        self.v_cache[:, :, :, step:] = float("nan")
        self.logits = torch.full((batch, c["steps"], c["card"]), float("nan"), device=device, dtype=dtype)
        self.scratch = depth_step_scratch(batch, c["dim"], c["hidden"], c["heads"], dtype, device)
        for buffer in (self.scratch.qkv, self.scratch.attention, self.scratch.hidden):
            buffer.fill_(float("nan"))

    def clone(self):
        copy = object.__new__(Frame)
        copy.__dict__ = {name: value.clone() if isinstance(value, torch.Tensor) else value
                         for name, value in self.__dict__.items()}
        return copy

    def args(self, weights, step):
        return weights.step_args(step, self.x[:, step], self.previous, self.k_cache, self.v_cache,
                                 self.logits[:, step], self.scratch)


def assert_matches(got, expected, step, tolerance):
    assert not got.logits[:, step].isnan().any() and not got.x[:, step].isnan().any()
    assert rel_err(got.logits[:, step], expected.logits[:, step]) <= tolerance
    assert rel_err(got.x[:, step], expected.x[:, step]) <= tolerance
    for cache, reference in ((got.k_cache, expected.k_cache), (got.v_cache, expected.v_cache)):
        assert rel_err(cache[:, :, :, :step + 1], reference[:, :, :, :step + 1]) <= tolerance
        assert cache[:, :, :, step + 1:].isnan().all(), "positions past the step are left alone"
    # Word 1 is the barrier's sense flag, which keeps its last value between launches by design.
    assert not got.scratch.counters[0].any() and not got.scratch.counters[2:].any(), \
        "the arrival and head counters end at zero"


@pytest.mark.parametrize("step", [0, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_reference_phase_by_phase(batch, step):
    weights = Weights(**TINY)
    frame = Frame(weights, batch, step)
    expected = frame.clone()
    depth_step_ref(**expected.args(weights, step))
    logits = depth_step(**frame.args(weights, step))
    assert logits.data_ptr() == frame.logits[:, step].data_ptr()
    assert_matches(frame, expected, step, 1e-5)


def test_consecutive_steps_of_a_frame():
    """Steps 0..S-1 in turn, each attending over the keys the earlier ones wrote, the scratch shared."""
    weights = Weights(**TINY)
    frame = Frame(weights, 2, 0)
    expected = frame.clone()
    for step in range(TINY["steps"]):
        depth_step_ref(**expected.args(weights, step))
        depth_step(**frame.args(weights, step))
    assert_matches(frame, expected, TINY["steps"] - 1, 1e-5)
    assert rel_err(frame.logits, expected.logits) <= 1e-5


def test_phases_in_several_calls():
    """The phases run in two calls (a prefix, then the rest) give the same result as all at once."""
    weights = Weights(**TINY)
    frame = Frame(weights, 3, 2)
    whole = frame.clone()
    depth_step(**whole.args(weights, 2))
    total = depth_step_phases(TINY["layers"])
    depth_step(**frame.args(weights, 2), phases=range(0, 3))
    depth_step(**frame.args(weights, 2), phases=range(3, total))
    assert torch.equal(frame.logits[:, 2], whole.logits[:, 2]) and torch.equal(frame.x, whole.x)


def _bad(weights, frame, changes):
    """Step 1's arguments with some replaced."""
    return {**frame.args(weights, 1), **changes}


@pytest.mark.parametrize("change, error", [
    (lambda w, f: dict(step=5), ValueError),
    (lambda w, f: dict(step=True), ValueError),
    (lambda w, f: dict(qkv=w.qkv[:, 1].double()), TypeError),
    (lambda w, f: dict(head=w.heads[1][:, :-1]), ValueError),
    (lambda w, f: dict(out_proj=w.out_proj[:, 1].transpose(1, 2)), ValueError),
    (lambda w, f: dict(down=w.down[:, 1, :, :-2]), ValueError),
    (lambda w, f: dict(previous=f.previous.float()), TypeError),
    (lambda w, f: dict(previous=torch.stack([f.previous, f.previous], 1)[:, 0]), ValueError),
    (lambda w, f: dict(x=f.x[:, 1, :-1]), ValueError),
    (lambda w, f: dict(logits_out=f.logits[:, 1, ::2]), ValueError),
    (lambda w, f: dict(k_cache=f.k_cache[:, :, :, :, :8]), ValueError),
    (lambda w, f: dict(v_cache=f.v_cache.transpose(3, 4).contiguous().transpose(3, 4)), ValueError),
    (lambda w, f: dict(scratch=depth_step_scratch(2, 48, 40, 3, torch.float32, "cpu")), ValueError),
    (lambda w, f: dict(phases=range(0, 11)), ValueError),
    (lambda w, f: dict(phases=range(0, 10, 2)), ValueError),
])
def test_argument_checks(change, error):
    weights = Weights(**TINY)
    frame = Frame(weights, 3, 1)
    with pytest.raises(error):
        depth_step(**_bad(weights, frame, change(weights, frame)))


def test_heads_of_sixteen_wide_blocks_only():
    """A head must be a whole number of 16-row output blocks (its attention is computed by the program
    that completes its blocks)."""
    weights = Weights(**{**TINY, "heads": 6})
    frame = Frame(weights, 1, 0)
    with pytest.raises(ValueError, match="head_dim"):
        depth_step(**frame.args(weights, 0))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_moshi_shapes_bf16(batch):
    """One launch equals the phase-by-phase launches bit for bit and the reference within 1e-2, at the
    first and last step."""
    weights = Weights(**MOSHI, dtype=torch.bfloat16, device="cuda")
    total = depth_step_phases(MOSHI["layers"])
    for step in (0, MOSHI["steps"] - 1):
        frame = Frame(weights, batch, step, "cuda", torch.bfloat16)
        by_phase, expected = frame.clone(), frame.clone()
        depth_step(**frame.args(weights, step))
        depth_step(**by_phase.args(weights, step), phases=range(total))
        depth_step_ref(**expected.args(weights, step))
        torch.cuda.synchronize()
        assert torch.equal(frame.logits[:, step], by_phase.logits[:, step])
        assert torch.equal(frame.x, by_phase.x)
        assert torch.equal(frame.k_cache.nan_to_num(), by_phase.k_cache.nan_to_num())
        assert_matches(frame, expected, step, 1e-2)


def assert_graph_replays_a_frame(weights, frame, step_kernel, inputs=None):
    """A captured frame of the steps (step_kernel(**frame.args(weights, step)) each, previous tokens fixed),
    replayed twice with fresh inputs: each replay equals the eager steps on the same inputs. inputs: the x
    each frame starts from (a clone of frame.x by default)."""
    inputs = frame.x.clone() if inputs is None else inputs

    def run():
        frame.x.copy_(inputs)
        for step in range(weights.config["steps"]):
            step_kernel(**frame.args(weights, step))

    graph = graph_after_warmup(run)
    for replay in range(2):
        inputs.copy_(torch.randn(inputs.shape, device="cuda"))
        frame.previous.copy_(torch.randint(0, weights.table_rows, frame.previous.shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        replayed = (frame.x.clone(), frame.logits.clone(), frame.k_cache.clone())
        run()
        torch.cuda.synchronize()
        assert torch.equal(replayed[0], frame.x), replay
        assert torch.equal(replayed[1], frame.logits), replay
        assert torch.equal(replayed[2], frame.k_cache), replay
        assert not frame.scratch.counters[2:].any()


@pytest.mark.gpu
def test_cuda_graph_replays_a_frame():
    """Moshi's 8 steps, one launch each, replayed in a CUDA graph (assert_graph_replays_a_frame)."""
    weights = Weights(**MOSHI, dtype=torch.bfloat16, device="cuda")
    assert_graph_replays_a_frame(weights, Frame(weights, 8, 0, "cuda", torch.bfloat16), depth_step)
