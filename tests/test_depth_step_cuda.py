"""The CUDA extension's persistent depth step (csrc/depth_step_kernel.cuh, cuda_ext.depth_step) against
depth_step_ref, the unfused op sequence, on the GPU in bf16: Moshi's shapes at B = 1, 3 and 8 (first and last
step), odd shapes (tails in N and K, three K chunks, one-chunk phases), a whole frame of steps, bitwise
repeatability, a CUDA graph replayed with fresh inputs, the argument checks, and the fast LM with it no
less faithful to the exact model than without it. On the CPU: the dispatch never picks it."""
import dataclasses

import pytest
import torch

from moshi_fast import cuda_ext, ops
from moshi_fast.config import moshiko
from moshi_fast.kernels.depth_step import depth_step_ref, depth_step_scratch

from .helpers import rel_err
from .test_depth_step import MOSHI, TINY, Frame, Weights, assert_graph_replays_a_frame, assert_matches
from .test_lm_fast import _teacher_forced_run, build

# Tails everywhere: a head of 300 rows (not a multiple of 16), Hd = 2200 (three K chunks, the last ending inside
# a 128-wide K-step), D = 192 (a one-chunk K that ends inside a K-step), 5 steps.
ODD = dict(layers=2, dim=192, heads=3, hidden=2200, card=300, steps=5, tables=5, table_rows=301)
SMALL = dict(layers=3, dim=128, heads=2, hidden=200, card=77, steps=4, tables=4, table_rows=78)


def cuda_weights(shapes) -> Weights:
    """bf16 weights on the GPU with contiguous norms: test_depth_step's are strided views (row stride D + 3), which
    the Triton kernel takes and this kernel's 16-byte loads do not (test_argument_checks)."""
    weights = Weights(**shapes, dtype=torch.bfloat16, device="cuda")
    weights.norm1, weights.norm2 = weights.norm1.contiguous(), weights.norm2.contiguous()
    return weights


def assert_same_step_bits(got, expected, step):
    """The step's outputs equal bit for bit (the positions the step does not write hold NaN in both)."""
    assert torch.equal(got.x[:, step], expected.x[:, step])
    assert torch.equal(got.logits[:, step], expected.logits[:, step])
    for cache, reference in ((got.k_cache, expected.k_cache), (got.v_cache, expected.v_cache)):
        assert torch.equal(cache[:, :, :, :step + 1], reference[:, :, :, :step + 1])


def run_cuda(frame, weights, step):
    return cuda_ext.depth_step(**frame.args(weights, step))


@pytest.fixture
def extension():
    assert cuda_ext.available(), cuda_ext.unavailable_reason()


def check_step(shapes, batch, step):
    weights = cuda_weights(shapes)
    frame = Frame(weights, batch, step, "cuda", torch.bfloat16)
    expected = frame.clone()
    logits = run_cuda(frame, weights, step)
    depth_step_ref(**expected.args(weights, step))
    torch.cuda.synchronize()
    assert logits.data_ptr() == frame.logits[:, step].data_ptr()
    assert_matches(frame, expected, step, 1e-2)
    others = torch.cat([frame.logits[:, :step], frame.logits[:, step + 1:]], 1)
    assert others.isnan().all(), "other steps' logits are left alone"


@pytest.mark.gpu
@pytest.mark.parametrize("step", [0, MOSHI["steps"] - 1])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_moshi_shapes(extension, batch, step):
    check_step(MOSHI, batch, step)


@pytest.mark.gpu
@pytest.mark.parametrize("shapes", [ODD, SMALL], ids=["odd", "small"])
@pytest.mark.parametrize("batch", [1, 5])
def test_odd_shapes(extension, shapes, batch):
    check_step(shapes, batch, shapes["steps"] - 2)


@pytest.mark.gpu
def test_a_frame_of_steps(extension):
    """Steps 0..S-1 in turn, each attending over the keys the earlier ones wrote."""
    weights = cuda_weights(MOSHI)
    frame = Frame(weights, 2, 0, "cuda", torch.bfloat16)
    expected = frame.clone()
    for step in range(MOSHI["steps"]):
        run_cuda(frame, weights, step)
        depth_step_ref(**expected.args(weights, step))
    torch.cuda.synchronize()
    assert_matches(frame, expected, MOSHI["steps"] - 1, 1e-2)
    assert rel_err(frame.logits.float(), expected.logits.float()) <= 1e-2


@pytest.mark.gpu
def test_bitwise_repeatable_and_graph_replays(extension):
    """The same inputs give the same bits twice; a captured frame of the 8 steps replayed with fresh inputs equals
    the eager steps on those inputs."""
    weights = cuda_weights(MOSHI)
    frame = Frame(weights, 8, 0, "cuda", torch.bfloat16)
    inputs = frame.x.clone()

    def run():
        frame.x.copy_(inputs)
        for step in range(MOSHI["steps"]):
            run_cuda(frame, weights, step)

    run()
    first = (frame.x.clone(), frame.logits.clone(), frame.k_cache.clone())
    run()
    assert torch.equal(frame.x, first[0]) and torch.equal(frame.logits, first[1])
    assert torch.equal(frame.k_cache, first[2])
    arrivals = frame.scratch.arrivals.item()
    assert_graph_replays_a_frame(weights, frame, cuda_ext.depth_step, inputs)
    blocks = cuda_ext.depth_step_blocks(frame.x.device)
    assert arrivals % blocks == 0 and frame.scratch.arrivals.item() % blocks == 0, "a multiple of the grid"
    assert arrivals == 2 * MOSHI["steps"] * 4 * MOSHI["layers"] * blocks, "every block arrives at every barrier"


@pytest.mark.gpu
@pytest.mark.parametrize("stages", [cuda_ext.DEPTH_MIN_STAGES, 3, cuda_ext.DEPTH_MAX_STAGES - 1])
@pytest.mark.parametrize("refills", list(cuda_ext.DEPTH_REFILLS))
def test_pipeline_depths_give_the_same_bits(extension, stages, refills):
    """The pipeline's depth and when the warps refill their slots change when the weights arrive, not the math."""
    weights = cuda_weights(MOSHI)
    frame = Frame(weights, 3, 2, "cuda", torch.bfloat16)
    expected = frame.clone()
    cuda_ext.depth_step(**frame.args(weights, 2), stages=stages, refills=refills)
    run_cuda(expected, weights, 2)
    torch.cuda.synchronize()
    assert_same_step_bits(frame, expected, 2)
    for bad in (1, cuda_ext.DEPTH_MAX_STAGES + 1):
        with pytest.raises(ValueError):
            cuda_ext.depth_step(**frame.args(weights, 2), stages=bad)
    with pytest.raises(ValueError):
        cuda_ext.depth_step(**frame.args(weights, 2), refills="barrier")


@pytest.mark.gpu
def test_timeline_orders_the_phases(extension):
    """The launch's timeline: each block's entries in order, and no block starts a phase before every block has
    ended the previous one (the grid barrier between them); without a timeline, the same results."""
    weights = cuda_weights(MOSHI)
    frame = Frame(weights, 1, 3, "cuda", torch.bfloat16)
    expected = frame.clone()
    blocks, layers = cuda_ext.depth_step_blocks(frame.x.device), MOSHI["layers"]
    trace = torch.zeros(blocks, cuda_ext.depth_step_trace_slots(layers), dtype=torch.int64, device="cuda")
    cuda_ext.depth_step(**frame.args(weights, 3), trace=trace)
    run_cuda(expected, weights, 3)
    torch.cuda.synchronize()
    assert_same_step_bits(frame, expected, 3)
    assert (trace > 0).all(), "every block writes every entry"
    assert (trace[:, 1:] >= trace[:, :-1]).all(), "a block's entries follow its order"
    phases = trace[:, 2:].reshape(blocks, 4 * layers + 1, 3)
    ends, starts = phases[:, :-1, 2].amax(0), phases[:, 1:, 0].amin(0)
    assert (starts >= ends).all(), "the barrier lets no block into a phase before the last one has ended the last"


@pytest.mark.gpu
@pytest.mark.parametrize("change, error", [
    (lambda w, f: dict(x=f.x[:, 1].float()), TypeError),
    (lambda w, f: dict(previous=f.previous.int()), TypeError),
    (lambda w, f: dict(step=MOSHI["steps"]), ValueError),
    (lambda w, f: dict(qkv=w.qkv[:, 1].transpose(1, 2)), ValueError),
    (lambda w, f: dict(head=w.heads[1][:, :-8]), ValueError),
    (lambda w, f: dict(logits_out=f.logits[:, 1, ::2]), ValueError),
    (lambda w, f: dict(k_cache=f.k_cache[:, :, :, :, :32]), ValueError),
    (lambda w, f: dict(x=f.x[:, 1, 1:]), ValueError),
    (lambda w, f: dict(norm1=torch.cat([w.norm1, w.norm1[:, :3]], 1)[:, :-3],
                       norm2=torch.cat([w.norm2, w.norm2[:, :3]], 1)[:, :-3]), ValueError),
    (lambda w, f: dict(scratch=depth_step_scratch(2, MOSHI["dim"], MOSHI["hidden"], MOSHI["heads"], torch.bfloat16,
                                                  "cuda")), ValueError),
])
def test_argument_checks(extension, change, error):
    """Bad operands raise before any launch, and the dispatch then keeps the Triton kernel."""
    weights = cuda_weights(MOSHI)
    frame = Frame(weights, 3, 1, "cuda", torch.bfloat16)
    valid = frame.args(weights, 1)
    valid.pop("eps")
    assert cuda_ext.depth_step_supported(**valid), "every case starts from operands the kernel takes"
    args = {**frame.args(weights, 1), **change(weights, frame)}
    with pytest.raises(error):
        cuda_ext.depth_step(**args)
    args.pop("eps")
    with ops.cuda_depth_step():
        assert not ops.uses_cuda_depth_step(**args)


@pytest.mark.gpu
def test_more_than_eight_rows_keep_the_triton_kernel(extension):
    weights = cuda_weights(MOSHI)
    frame = Frame(weights, 9, 0, "cuda", torch.bfloat16)
    args = frame.args(weights, 0)
    args.pop("eps")
    with ops.cuda_depth_step():
        assert not ops.uses_cuda_depth_step(**args)
    frame = Frame(weights, 8, 0, "cuda", torch.bfloat16)
    args = frame.args(weights, 0)
    args.pop("eps")
    assert not ops.uses_cuda_depth_step(**args), "off by default"
    with ops.cuda_depth_step():
        assert ops.uses_cuda_depth_step(**args)


def test_never_dispatched_on_the_cpu():
    weights = Weights(**TINY)
    frame = Frame(weights, 2, 0)
    args = frame.args(weights, 0)
    args.pop("eps")
    with ops.cuda_depth_step():
        assert not ops.uses_cuda_depth_step(**args)
    with pytest.raises(ValueError, match="CUDA"):
        cuda_ext._check_depth_step(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_fast_lm_with_it_as_faithful_as_without(extension, batch):
    """Moshi's LM (2 Helium layers, the real depth transformer) in bf16, teacher-forced over 40 frames: with the
    CUDA depth step the fast LM is no farther from the exact (fp32) model than the default fast LM is, and agrees
    with it on the exact model's clear-margin tokens."""
    config = dataclasses.replace(moshiko().lm, num_layers=2)
    device = torch.device("cuda")
    exact = build(config, torch.float32, device)
    lm16 = build(config, torch.bfloat16, device)
    lm16.load_state_dict({k: v.to(torch.bfloat16) for k, v in exact.state_dict().items()})
    lm16.prepare()
    default = _teacher_forced_run({"exact": (exact, False), "fast": (lm16, True)}, batch, 40, device)
    with ops.cuda_depth_step():
        fused = _teacher_forced_run({"exact": (exact, False), "fast": (lm16, True)}, batch, 40, device)
    errors = {}
    for name, run in (("default", default), ("cuda_depth_step", fused)):
        errors[name] = torch.tensor([max(rel_err(f, e) for f, e in zip(fast, truth))
                                     for truth, fast in zip(run["exact"], run["fast"])])
    versus = max(rel_err(a[1], b[1]) for a, b in zip(default["fast"], fused["fast"]))
    print(f"\nB = {batch}: audio logits rel err to fp32, default mean {errors['default'].mean():.2e}, "
          f"CUDA depth step mean {errors['cuda_depth_step'].mean():.2e}; between them max {versus:.2e}")
    assert errors["cuda_depth_step"].mean() <= 1.05 * errors["default"].mean()
    assert (errors["cuda_depth_step"] <= 1.5 * errors["default"]).all()
