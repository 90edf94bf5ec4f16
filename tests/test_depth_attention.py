"""depth_attention kernel vs its torch reference (cache write, then SDPA over steps 0..step)."""
import pytest
import torch

from moshi_fast import ops
from moshi_fast.kernels.depth_attention import depth_attention, depth_attention_ref

from .helpers import rel_err

DEPFORMER = {"heads": 16, "head_dim": 64, "steps": 8}
"""The depth transformer's attention: 16 heads of 64, one cache position per codebook step."""


def step_qkv(batch, heads, head_dim, dtype=torch.float32, device="cpu"):
    """[B, 3 * H * D] random projections in rows wider than the view."""
    width = 3 * heads * head_dim
    return torch.randn(batch, width + 5, device=device).to(dtype)[:, :width]


def poisoned_out(batch, width, dtype=torch.float32, device="cpu"):
    """[B, W] NaN view with a row stride wider than W."""
    return torch.full((batch, width + 3), float("nan"), dtype=dtype, device=device)[:, :width]


def caches_before(batch, heads, steps, head_dim, step, dtype=torch.float32, device="cpu"):
    """(k_cache, v_cache): random at the positions before step, NaN from step on."""
    caches = torch.randn(2, batch, heads, steps, head_dim, device=device).to(dtype)
    caches[:, :, :, step:] = float("nan")
    return caches[0], caches[1]


@pytest.mark.parametrize("batch, heads, head_dim, steps, step", [
    pytest.param(3, 3, 16, 5, 0, id="first-step"),
    pytest.param(3, 3, 16, 5, 1, id="second-step"),
    pytest.param(3, 3, 16, 5, 4, id="last-step"),
    pytest.param(2, 2, 32, 8, 3, id="mid-step"),
    pytest.param(1, 1, 16, 1, 0, id="one-step-cache"),
])
def test_depth_attention_matches_reference(batch, heads, head_dim, steps, step):
    qkv = step_qkv(batch, heads, head_dim)
    k_cache, v_cache = caches_before(batch, heads, steps, head_dim, step)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    expected = depth_attention_ref(qkv, k_expected, v_expected, step)
    out = poisoned_out(batch, heads * head_dim)
    assert depth_attention(qkv, k_cache, v_cache, step, out=out) is out
    assert not out.isnan().any()
    assert rel_err(out, expected) < 1e-5
    assert torch.equal(k_cache[:, :, :step + 1], k_expected[:, :, :step + 1])
    assert torch.equal(v_cache[:, :, :step + 1], v_expected[:, :, :step + 1])
    assert k_cache[:, :, step + 1:].isnan().all() and v_cache[:, :, step + 1:].isnan().all()


def test_depth_attention_over_frames_ignores_the_previous_frames_steps():
    """Two frames of all codebook steps on caches that start as NaN: in the second frame the positions
    past step hold the first frame's keys and values, which must not count."""
    batch, heads, head_dim, steps = 2, 3, 16, 5
    k_cache = torch.full((batch, heads, steps, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    for frame in range(2):
        for step in range(steps):
            qkv = step_qkv(batch, heads, head_dim)
            expected = depth_attention_ref(qkv, k_expected, v_expected, step)
            got = depth_attention(qkv, k_cache, v_cache, step)
            assert rel_err(got, expected) < 1e-5, (frame, step)
            assert torch.equal(k_cache[:, :, :step + 1], k_expected[:, :, :step + 1]), (frame, step)
            assert torch.equal(v_cache[:, :, :step + 1], v_expected[:, :, :step + 1]), (frame, step)


def test_depth_attention_of_no_slots_returns_out():
    k_cache, v_cache = torch.randn(2, 0, 2, 4, 16).unbind(0)
    assert depth_attention(torch.randn(0, 3 * 2 * 16), k_cache, v_cache, 1).shape == (0, 32)


def test_ops_depth_attention_runs_the_kernel_or_the_reference():
    batch, heads, head_dim, steps, step = 2, 2, 16, 4, 2
    qkv = step_qkv(batch, heads, head_dim)
    k_cache, v_cache = caches_before(batch, heads, steps, head_dim, step)
    expected = depth_attention_ref(qkv, k_cache.clone(), v_cache.clone(), step)
    assert rel_err(ops.depth_attention(qkv, k_cache.clone(), v_cache.clone(), step), expected) < 1e-5
    with ops.reference_ops():
        assert torch.equal(ops.depth_attention(qkv, k_cache.clone(), v_cache.clone(), step), expected)


def test_depth_attention_argument_checks():
    batch, heads, head_dim, steps = 2, 2, 16, 4
    qkv = step_qkv(batch, heads, head_dim)
    k_cache, v_cache = torch.randn(2, batch, heads, steps, head_dim).unbind(0)
    with pytest.raises(TypeError, match="qkv must be float32 or bfloat16"):
        depth_attention(qkv.half(), k_cache.half(), v_cache.half(), 0)
    with pytest.raises(TypeError, match="must have qkv's dtype"):
        depth_attention(qkv, k_cache.bfloat16(), v_cache, 0)
    with pytest.raises(ValueError, match=r"k_cache must be \[B, H, S, D\]"):
        depth_attention(qkv, k_cache[0], v_cache[0], 0)
    with pytest.raises(ValueError, match="contiguous"):
        depth_attention(qkv, k_cache.transpose(1, 2).contiguous().transpose(1, 2), v_cache, 0)
    with pytest.raises(ValueError, match="of one shape"):
        depth_attention(qkv, k_cache, v_cache[:, :, :2], 0)
    with pytest.raises(ValueError, match="power of two"):
        depth_attention(step_qkv(batch, heads, 12), *torch.randn(2, batch, heads, steps, 12).unbind(0), 0)
    with pytest.raises(ValueError, match=r"qkv must be \[2, 96\]"):
        depth_attention(qkv[:, :-1], k_cache, v_cache, 0)
    with pytest.raises(ValueError, match="unit stride in its last dim"):
        depth_attention(torch.randn(3 * heads * head_dim, batch).t(), k_cache, v_cache, 0)
    for step in (-1, steps, 1.0, torch.tensor(1)):
        with pytest.raises(ValueError, match=r"step must be a Python int in \[0, 4\)"):
            depth_attention(qkv, k_cache, v_cache, step)
    with pytest.raises(ValueError, match=r"out must be \[2, 32\] torch.float32"):
        depth_attention(qkv, k_cache, v_cache, 0, out=torch.empty(batch, 32, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_depth_attention_bf16_at_the_real_shape_on_gpu(batch):
    heads, head_dim, steps = DEPFORMER["heads"], DEPFORMER["head_dim"], DEPFORMER["steps"]
    k_cache, v_cache = caches_before(batch, heads, steps, head_dim, 0, torch.bfloat16, "cuda")
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    for step in range(steps):
        qkv = step_qkv(batch, heads, head_dim, torch.bfloat16, "cuda")
        expected = depth_attention_ref(qkv, k_expected, v_expected, step)
        out = poisoned_out(batch, heads * head_dim, torch.bfloat16, "cuda")
        depth_attention(qkv, k_cache, v_cache, step, out=out)
        assert rel_err(out, expected) <= 1e-2, step
        assert torch.equal(k_cache[:, :, :step + 1], k_expected[:, :, :step + 1]), step
        assert torch.equal(v_cache[:, :, :step + 1], v_expected[:, :, :step + 1]), step


@pytest.mark.gpu
def test_depth_attention_frame_replays_in_a_cuda_graph():
    """The depth transformer's 8 steps captured once: each replay with new projections matches the
    reference run step by step, whatever the previous replay left in the caches."""
    batch, heads, head_dim, steps = 8, DEPFORMER["heads"], DEPFORMER["head_dim"], DEPFORMER["steps"]
    qkvs = torch.empty(steps, batch, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16)
    outs = torch.empty(steps, batch, heads * head_dim, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = caches_before(batch, heads, steps, head_dim, 0, torch.bfloat16, "cuda")

    def frame():
        for step in range(steps):
            depth_attention(qkvs[step], k_cache, v_cache, step, out=outs[step])

    qkvs.normal_()
    frame()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        frame()
    for _ in range(2):
        qkvs.normal_()
        graph.replay()
        k_expected, v_expected = caches_before(batch, heads, steps, head_dim, 0, torch.bfloat16, "cuda")
        for step in range(steps):
            expected = depth_attention_ref(qkvs[step], k_expected, v_expected, step)
            assert rel_err(outs[step], expected) <= 1e-2, step
        assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
