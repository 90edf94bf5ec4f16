"""ring_attention at Mimi's shapes (8 heads x 64, ring of 250, 2 new steps) beside torch SDPA over the ring."""
import pytest
import torch

from moshi_fast.kernels._utils import SplitWorkspace
from moshi_fast.kernels.ring_attention import ring_attention, ring_attention_workspace_size

GPU = torch.cuda.is_available()


@pytest.mark.parametrize("batch", [1, 8, 64] if GPU else [2])
def test_ring_attention(measure, device, batch):
    heads, head_dim, capacity, steps = (8, 64, 250, 2) if GPU else (2, 32, 7, 2)
    qkv = torch.randn(batch, steps, 3 * heads * head_dim, device=device)
    ring_k = torch.randn(batch, heads, capacity, head_dim, device=device)
    ring_v = torch.randn_like(ring_k)
    frame = torch.full((batch,), 1000, dtype=torch.int32, device=device)
    out = torch.empty(batch, steps, heads * head_dim, device=device)
    workspace = SplitWorkspace(*ring_attention_workspace_size(batch, heads, steps, head_dim, capacity),
                               device)

    def fast():
        ring_attention(qkv, ring_k, ring_v, frame, 10000.0, out=out, workspace=workspace)

    mask = torch.ones(batch, 1, steps, capacity, dtype=torch.bool, device=device)

    def torch_path():
        q, k, v = qkv.view(batch, steps, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        ring_k[:, :, :steps] = k
        ring_v[:, :, :steps] = v
        return torch.nn.functional.scaled_dot_product_attention(q, ring_k, ring_v, mask)

    moved = 4 * (2 * ring_k.numel() + qkv.numel() + out.numel())
    measure(fast, moved, torch_path, op="ring_attention", batch=batch, heads=heads, head_dim=head_dim,
            capacity=capacity)
