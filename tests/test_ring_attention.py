"""ring_attention kernel vs its torch reference and the reference model's ring semantics."""
import pytest
import torch

from moshi_fast.kernels.ring_attention import ring_attention, ring_attention_ref
from moshi_fast.reference.attention import add_ring, attend, ring_write, rope_interleaved, split_heads
from moshi_fast.reference.state import SlotState

from .helpers import rel_err


@pytest.mark.parametrize("batch, steps, heads, head_dim, capacity", [
    pytest.param(2, 2, 3, 32, 7, id="wraps"),
    pytest.param(3, 1, 2, 32, 5, id="one-step"),
    pytest.param(1, 3, 1, 64, 70, id="long-ring"),
])
def test_ring_attention_matches_reference_over_frames(batch, steps, heads, head_dim, capacity):
    ring_k, ring_v = torch.randn(2, batch, heads, capacity, head_dim).unbind(0)
    ring_k_ref, ring_v_ref = ring_k.clone(), ring_v.clone()
    start = torch.tensor([0, 3, 1][:batch], dtype=torch.int32)
    for step in range(6):
        frame = start + step
        qkv = torch.randn(batch, steps, 3 * heads * head_dim)
        expected = ring_attention_ref(qkv, ring_k_ref, ring_v_ref, frame, 10000.0)
        out = torch.full((batch, steps, heads * head_dim), float("nan"))
        ring_attention(qkv, ring_k, ring_v, frame, 10000.0, out=out)
        assert not out.isnan().any()
        assert rel_err(out, expected) < 1e-5, step
        written = (frame.long()[:, None] * steps + torch.arange(steps)) % capacity
        for b in range(batch):
            assert rel_err(ring_k[b][:, written[b]], ring_k_ref[b][:, written[b]]) < 1e-6


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
