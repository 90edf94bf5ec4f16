"""ring_attention kernel vs its torch reference and the reference model's ring semantics."""
import pytest
import torch

from moshi_fast.kernels._utils import SplitWorkspace
from moshi_fast.kernels.ring_attention import (MAX_STEPS, ring_attention, ring_attention_candidate_tiles,
                                               ring_attention_ref, ring_attention_workspace_size)
from moshi_fast.reference.attention import add_ring, attend, ring_write, rope_interleaved, split_heads
from moshi_fast.reference.state import SlotState

from .helpers import rel_err


@pytest.mark.parametrize("batch, steps, heads, head_dim, capacity, block_r", [
    pytest.param(2, 2, 3, 32, 7, None, id="wraps"),
    pytest.param(2, 2, 1, 32, 7, 2, id="wraps-4-splits"),
    pytest.param(3, 1, 2, 32, 5, None, id="one-step"),
    pytest.param(3, 1, 1, 32, 5, 2, id="one-step-3-splits"),
    pytest.param(1, 3, 1, 64, 70, None, id="long-ring"),
    pytest.param(1, 3, 1, 64, 70, 16, id="long-ring-5-splits"),
    pytest.param(1, MAX_STEPS, 1, 16, 9, 4, id="max-steps-3-splits"),
    pytest.param(2, 2, 1, 16, 2, None, id="ring-of-new-steps-only"),
])
def test_ring_attention_matches_reference_over_frames(batch, steps, heads, head_dim, capacity, block_r):
    ring_k, ring_v = torch.randn(2, batch, heads, capacity, head_dim).unbind(0)
    ring_k_ref, ring_v_ref = ring_k.clone(), ring_v.clone()
    tiles = {"block_r": block_r} if block_r else None
    sizes = ring_attention_workspace_size(batch, heads, steps, head_dim, capacity, tiles)
    workspace = SplitWorkspace(*sizes, "cpu")
    start = torch.tensor([0, 3, 1][:batch], dtype=torch.int32)
    for step in range(6):
        frame = start + step
        qkv = torch.randn(batch, steps, 3 * heads * head_dim)
        expected = ring_attention_ref(qkv, ring_k_ref, ring_v_ref, frame, 10000.0)
        out = torch.full((batch, steps, heads * head_dim), float("nan"))
        ring_attention(qkv, ring_k, ring_v, frame, 10000.0, out=out, workspace=workspace, tiles=tiles)
        assert not out.isnan().any()
        assert rel_err(out, expected) < 1e-5, step
        assert not workspace.counters.any(), "the combining program resets its counter"
        written = (frame.long()[:, None] * steps + torch.arange(steps)) % capacity
        for b in range(batch):
            assert rel_err(ring_k[b][:, written[b]], ring_k_ref[b][:, written[b]]) < 1e-6
            assert torch.equal(ring_v[b][:, written[b]], ring_v_ref[b][:, written[b]])


@pytest.mark.parametrize("block_r", [None, 4], ids=["whole-ring", "2-splits"])
def test_ring_attention_slot_that_does_not_execute(block_r):
    """Slot 1 does not execute in calls 2 and 3: its frame stays at 2 and its qkv rows are garbage. The
    kernel matches the reference call by call, and when slot 1 runs frame 2 (call 4) its output and
    ring are those of a slot that never saw the idle calls. Slot 2 sits at a large frame counter."""
    batch, steps, heads, head_dim, capacity = 3, 2, 1, 32, 7
    tiles = {"block_r": block_r} if block_r else None
    ring_k, ring_v = torch.randn(2, batch, heads, capacity, head_dim).unbind(0)
    ring_k_ref, ring_v_ref = ring_k.clone(), ring_v.clone()
    twin_k, twin_v = ring_k[1:2].clone(), ring_v[1:2].clone()
    frames = [[0, 0, 1000], [1, 1, 1001], [2, 2, 1002], [3, 2, 1003], [4, 2, 1004], [5, 3, 1005]]
    idle_calls = {2, 3}
    for step, frame in enumerate(frames):
        frame = torch.tensor(frame, dtype=torch.int32)
        qkv = torch.randn(batch, steps, 3 * heads * head_dim)
        expected = ring_attention_ref(qkv, ring_k_ref, ring_v_ref, frame, 10000.0)
        out = ring_attention(qkv, ring_k, ring_v, frame, 10000.0, tiles=tiles)
        assert rel_err(out, expected) < 1e-5, step
        if step not in idle_calls:
            twin_out = ring_attention(qkv[1:2], twin_k, twin_v, frame[1:2], 10000.0, tiles=tiles)
            assert rel_err(out[1:2], twin_out) < 1e-6, step
            assert torch.equal(ring_k[1:2], twin_k) and torch.equal(ring_v[1:2], twin_v), step


@pytest.mark.parametrize("block_r", [None, 2], ids=["whole-ring", "4-splits"])
def test_ring_attention_hides_never_written_entries_whatever_they_hold(block_r):
    """A slot reused after a session that left NaN and inf in its ring: from frame 0 on, the kernel
    matches the reference run on a zeroed ring."""
    batch, steps, heads, head_dim, capacity = 1, 2, 1, 32, 7
    tiles = {"block_r": block_r} if block_r else None
    ring_k = torch.full((batch, heads, capacity, head_dim), float("nan"))
    ring_v = torch.full((batch, heads, capacity, head_dim), float("inf"))
    ring_k_ref, ring_v_ref = torch.zeros_like(ring_k), torch.zeros_like(ring_v)
    for frame in range(5):
        frame = torch.tensor([frame], dtype=torch.int32)
        qkv = torch.randn(batch, steps, 3 * heads * head_dim)
        expected = ring_attention_ref(qkv, ring_k_ref, ring_v_ref, frame, 10000.0)
        out = ring_attention(qkv, ring_k, ring_v, frame, 10000.0, tiles=tiles)
        assert out.isfinite().all()
        assert rel_err(out, expected) < 1e-5, frame


def test_ring_attention_is_deterministic_when_split():
    """Two identical calls give the same bits (the last program sums the splits in split order)."""
    batch, steps, heads, head_dim, capacity = 1, 2, 1, 64, 70
    tiles = {"block_r": 16}
    ring_k, ring_v = torch.randn(2, batch, heads, capacity, head_dim).unbind(0)
    qkv = torch.randn(batch, steps, 3 * heads * head_dim)
    frame = torch.tensor([40], dtype=torch.int32)
    results = []
    for _ in range(2):
        ring_k_copy, ring_v_copy = ring_k.clone(), ring_v.clone()
        out = ring_attention(qkv, ring_k_copy, ring_v_copy, frame, 10000.0, tiles=tiles)
        results.append((out, ring_k_copy, ring_v_copy))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_ring_attention_candidate_tiles_all_match_reference():
    batch, steps, heads, head_dim, capacity = 1, 2, 2, 32, 40
    for mimi_batch in (1, 8, 64):
        assert 1 < len(ring_attention_candidate_tiles(mimi_batch, 8, 2, 64, 250)) <= 8
    candidates = ring_attention_candidate_tiles(batch, heads, steps, head_dim, capacity)
    assert 1 < len(candidates) <= 8
    ring_k, ring_v = torch.randn(2, batch, heads, capacity, head_dim).unbind(0)
    qkv = torch.randn(batch, steps, 3 * heads * head_dim)
    frame = torch.tensor([25], dtype=torch.int32)
    expected = ring_attention_ref(qkv, ring_k.clone(), ring_v.clone(), frame, 10000.0)
    for tiles in candidates:
        out = ring_attention(qkv, ring_k.clone(), ring_v.clone(), frame, 10000.0, tiles=tiles)
        assert rel_err(out, expected) < 1e-5, tiles


def test_ring_attention_workspace_size_and_argument_checks():
    batch, steps, heads, head_dim, capacity = 1, 2, 2, 32, 40
    ring_k, ring_v = torch.randn(2, batch, heads, capacity, head_dim).unbind(0)
    frame = torch.zeros(batch, dtype=torch.int32)
    assert ring_attention_workspace_size(batch, heads, steps, head_dim, capacity, {"block_r": 64}) == (0, 0)
    small = SplitWorkspace(1, 1, "cpu")
    with pytest.raises(ValueError, match="workspace too small"):
        ring_attention(torch.randn(batch, steps, 3 * heads * head_dim), ring_k, ring_v, frame, 10000.0,
                       workspace=small, tiles={"block_r": 16})
    with pytest.raises(ValueError, match="new steps per call"):
        ring_attention(torch.randn(batch, MAX_STEPS + 1, 3 * heads * head_dim), ring_k, ring_v, frame,
                       10000.0)
    with pytest.raises(ValueError, match="power of two"):
        ring_attention(torch.randn(batch, steps, 3 * heads * head_dim), ring_k, ring_v, frame, 10000.0,
                       tiles={"block_r": 24})


def test_ring_attention_matches_the_model_attention():
    """Same outputs as the reference transformer's rope + ring_write + attend from a fresh state."""
    batch, steps, heads, head_dim, capacity = 2, 2, 2, 32, 5
    state = SlotState(batch)
    add_ring(state, "l", heads, capacity, head_dim, torch.float32, torch.device("cpu"))
    ring_k, ring_v = torch.zeros(2, batch, heads, capacity, head_dim).unbind(0)
    run = torch.ones(batch, dtype=torch.bool)
    for step in range(5):
        qkv = torch.randn(batch, steps, 3 * heads * head_dim)
        positions = step * steps + torch.arange(steps).expand(batch, -1)
        q, k, v = split_heads(qkv, heads)
        q, k = rope_interleaved(q, positions, 10000.0), rope_interleaved(k, positions, 10000.0)
        ring = ring_write(state, "l", k, v, positions, run)
        expected = attend(q, *ring[:2], positions, ring[2], capacity).transpose(1, 2).reshape(batch, steps, -1)
        got = ring_attention(qkv, ring_k, ring_v, torch.full((batch,), step), 10000.0)
        assert rel_err(got, expected) < 1e-5
