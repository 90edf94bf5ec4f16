"""depth_attention at the depth transformer's shape (16 heads x 64, 8 codebook steps, bf16) at its first
and last step, beside the torch path: the cache write and torch SDPA over positions 0..step. And the attention
with the layer's output projection (1024 x 1024, residual in place) as the CUDA extension's one fused launch
(cuda_ext.depth_attention_gemv), beside the two launches the LM step makes otherwise (depth_attention, then
the CUDA GEMV: two_launch_us) and the torch path (the cache write, SDPA, F.linear and the add)."""
import pytest
import torch
import torch.nn.functional as F

from moshi_fast import cuda_ext
from moshi_fast.kernels.depth_attention import depth_attention

from ._harness import graph_time

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


@pytest.mark.skipif(not cuda_ext.available(),
                    reason=f"the CUDA extension is unavailable: {cuda_ext.unavailable_reason()}")
@pytest.mark.parametrize("step", [0, STEPS - 1], ids=["first-step", "last-step"])
@pytest.mark.parametrize("batch", [1, 4, 8])
def test_depth_attention_out_projection_fused(measure, device, batch, step):
    width = HEADS * HEAD_DIM
    qkv = torch.randn(batch, 3 * width, device=device).to(DTYPE)
    k_cache = torch.randn(batch, HEADS, STEPS, HEAD_DIM, device=device).to(DTYPE)
    v_cache = torch.randn_like(k_cache)
    weight = (torch.randn(width, width, device=device) / width ** 0.5).to(DTYPE)
    hidden = torch.randn(batch, width, device=device).to(DTYPE)
    attended = torch.empty(batch, width, device=device, dtype=DTYPE)

    def fused():
        cuda_ext.depth_attention_gemv(qkv, k_cache, v_cache, step, weight, hidden, hidden)

    def two_launches():
        depth_attention(qkv, k_cache, v_cache, step, out=attended)
        cuda_ext.gemv(attended, weight, hidden, hidden)

    def torch_path():
        q, k, v = qkv.view(batch, 3, HEADS, HEAD_DIM).unbind(1)
        k_cache[:, :, step] = k
        v_cache[:, :, step] = v
        result = F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :step + 1], v_cache[:, :, :step + 1])
        hidden.add_(F.linear(result.reshape(batch, width), weight))

    # The weight, then the attention's bytes (q, k, v, the cached rows, the new rows written) and the hidden
    # state read and written; every block's re-reads of the attention's inputs hit L2 and are not counted.
    moved = weight.nbytes + DTYPE.itemsize * batch * width * (5 + 2 * step) + 2 * hidden.nbytes
    extra = measure(fused, moved, torch_path, op="depth_attention_gemv", batch=batch, step=step, heads=HEADS,
                    head_dim=HEAD_DIM, steps=STEPS)
    two_launch = graph_time(two_launches)
    extra.update(two_launch_us=two_launch * 1e6, speedup_vs_two_launches=two_launch * 1e6 / extra["us"])
    measure.benchmark.extra_info.update(extra)
