"""depth_step: the depth transformer's 8 codebook steps of one frame (bf16, Moshi's shapes: 6 layers of
D = 1024, Hd = 2816, 16 heads, card 2048), one persistent launch a step (the Triton kernel, and on the GPU
at B <= 8 the CUDA extension's), beside the unfused sequence the fast LM runs by default (embed_sum, then
per layer linear qkv + RMSNorm, depth_attention, linear out + residual, linear gate_up + RMSNorm + SiLU
gate, linear down + residual, then linear head: 32 launches a step, split-K where the default tiles
choose it). The floor counts the 8 steps' weights (158.4 MB a step at Moshi's shapes), the activations
and the KV rows. The issue's target: <= 0.6 ms for the 8 steps at B = 1 on an H200."""
import pytest
import torch

from moshi_fast import cuda_ext, ops
from moshi_fast.config import LMConfig
from moshi_fast.kernels.depth_step import depth_step, depth_step_scratch

GPU = torch.cuda.is_available()
_LM = LMConfig()
SHAPES = (dict(layers=_LM.depformer_num_layers, dim=_LM.depformer_dim, heads=_LM.depformer_num_heads,
               hidden=_LM.depformer_hidden, card=_LM.card, steps=_LM.dep_q) if GPU else
          dict(layers=2, dim=48, heads=3, hidden=40, card=37, steps=3))
DTYPE = torch.bfloat16 if GPU else torch.float32
EPS = _LM.norm_eps


@pytest.mark.parametrize("kernel", ["triton", "cuda"] if GPU else ["triton"])
@pytest.mark.parametrize("batch", [1, 8, 64] if GPU else [2])
def test_depth_step_frame(measure, device, batch, kernel):
    """kernel: the Triton persistent kernel (kernels/depth_step.py) or the CUDA extension's
    (csrc/depth_step_kernel.cuh, B <= 8)."""
    if kernel == "cuda" and batch > cuda_ext.MAX_ROWS:
        pytest.skip("the CUDA depth step serves B <= 8")
    step_kernel = cuda_ext.depth_step if kernel == "cuda" else depth_step
    s = SHAPES
    layers, dim, hidden, card, steps, heads = s["layers"], s["dim"], s["hidden"], s["card"], s["steps"], s["heads"]

    def weight(*shape):
        return (torch.randn(*shape, device=device) / shape[-1] ** 0.5).to(DTYPE)

    qkv, out_proj = weight(layers, steps, 3 * dim, dim), weight(layers, steps, dim, dim)
    gate_up, down = weight(layers, steps, 2 * hidden, dim), weight(layers, steps, dim, hidden)
    heads_w = weight(steps, card, dim)
    norm1 = (1 + 0.1 * torch.randn(layers, dim, device=device)).to(DTYPE)
    norm2 = (1 + 0.1 * torch.randn(layers, dim, device=device)).to(DTYPE)
    table_rows = card + 1
    table = torch.randn(steps * table_rows, dim, device=device).to(DTYPE)
    offsets = torch.arange(steps, device=device) * table_rows
    inputs = torch.randn(batch, steps, dim, device=device).to(DTYPE)
    x = inputs.clone()
    previous = torch.randint(0, card, (steps, batch), device=device)
    cache_shape = (layers, batch, heads, steps, dim // heads)
    k_cache = torch.zeros(cache_shape, device=device, dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    logits = torch.empty(batch, steps, card, device=device, dtype=DTYPE)
    scratch = depth_step_scratch(batch, dim, hidden, heads, DTYPE, device)
    linears = [(3 * dim, dim, False), (dim, dim, False), (hidden, dim, True), (dim, hidden, False), (card, dim, False)]
    needs = [ops.linear_workspace_size(batch, n, k, DTYPE, gated=gated) for n, k, gated in linears]
    workspace = ops.SplitWorkspace(max(n[0] for n in needs), max(n[1] for n in needs), device)

    def fused():
        x.copy_(inputs)
        for step in range(steps):
            step_kernel(x[:, step], previous[step], table, offsets[step:step + 1], norm1, qkv[:, step],
                        out_proj[:, step], norm2, gate_up[:, step], down[:, step], heads_w[step], k_cache, v_cache,
                        step, EPS, logits[:, step], scratch)

    def unfused():
        x.copy_(inputs)
        for step in range(steps):
            h = x[:, step]
            ops.embed_sum(previous[step][:, None], table, offsets[step:step + 1], out=h, accumulate=True)
            for layer in range(layers):
                projected = ops.linear(h, qkv[layer, step], norm=("rms", norm1[layer], EPS), workspace=workspace)
                attended = ops.depth_attention(projected, k_cache[layer], v_cache[layer], step)
                ops.linear(attended, out_proj[layer, step], residual=h, out=h, workspace=workspace)
                ffn = ops.linear(h, gate_up[layer, step], norm=("rms", norm2[layer], EPS), activation="silu_gate",
                                 workspace=workspace)
                ops.linear(ffn, down[layer, step], residual=h, out=h, workspace=workspace)
            ops.linear(h, heads_w[step], out=logits[:, step], workspace=workspace)

    element = DTYPE.itemsize
    weights = steps * (layers * (4 * dim * dim + 3 * hidden * dim + 2 * dim) + card * dim) * element
    # Per step: the embedding row, x read and written, the logits, the key and value rows, the cached rows.
    activations = steps * batch * (4 * dim + card + layers * 2 * dim) * element
    cached = sum(layers * batch * 2 * step * dim for step in range(steps)) * element
    measure(fused, weights + activations + cached, unfused, op=f"depth_step_{kernel}", batch=batch, steps=steps,
            layers=layers, dim=dim, hidden=hidden, dtype=str(DTYPE).removeprefix("torch."),
            baseline="unfused ops sequence (32 launches a step)")
