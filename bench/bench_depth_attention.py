"""depth_attention at the depth transformer's shape (16 heads x 64, 8 codebook steps, bf16) at its first
and last step, beside the torch path: the cache write and torch SDPA over positions 0..step."""
import pytest
import torch

from moshi_fast.kernels.depth_attention import depth_attention

GPU = torch.cuda.is_available()
HEADS, HEAD_DIM, STEPS = (16, 64, 8) if GPU else (2, 16, 5)
DTYPE = torch.bfloat16 if GPU else torch.float32


@pytest.mark.parametrize("step", [0, STEPS - 1], ids=["first-step", "last-step"])
@pytest.mark.parametrize("batch", [1, 8, 64] if GPU else [3])
def test_depth_attention(measure, device, batch, step):
    width = HEADS * HEAD_DIM
    qkv = torch.randn(batch, 3 * width, device=device).to(DTYPE)
    k_cache = torch.randn(batch, HEADS, STEPS, HEAD_DIM, device=device).to(DTYPE)
    v_cache = torch.randn_like(k_cache)
    out = torch.empty(batch, width, device=device, dtype=DTYPE)

    def fast():
        depth_attention(qkv, k_cache, v_cache, step, out=out)

    def torch_path():
        q, k, v = qkv.view(batch, 3, HEADS, HEAD_DIM).unbind(1)
        k_cache[:, :, step] = k
        v_cache[:, :, step] = v
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :step + 1],
                                                                v_cache[:, :, :step + 1])

    # q, k, v read, the cached rows before step read, the new key and value rows and out written.
    moved = DTYPE.itemsize * batch * width * (6 + 2 * step)
    measure(fast, moved, torch_path, op="depth_attention", batch=batch, step=step, heads=HEADS,
            head_dim=HEAD_DIM, steps=STEPS)
