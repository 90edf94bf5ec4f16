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

from ._harness import with_depth_triton_linears

GPU = torch.cuda.is_available()
_LM = LMConfig()
SHAPES = (dict(layers=_LM.depformer_num_layers, dim=_LM.depformer_dim, heads=_LM.depformer_num_heads,
               hidden=_LM.depformer_hidden, card=_LM.card, steps=_LM.dep_q) if GPU else
          dict(layers=2, dim=48, heads=3, hidden=40, card=37, steps=3))
DTYPE = torch.bfloat16 if GPU else torch.float32
EPS = _LM.norm_eps


class DepthOperands:
    """Random bf16 weights at SHAPES (fp32 on the CPU), the caches, and x [steps, B, D] codebook-major as the fast
    LM lays out the steps' inputs (each step's rows contiguous)."""

    def __init__(self, batch: int, device):
        s = SHAPES
        layers, dim, hidden, card, steps = s["layers"], s["dim"], s["hidden"], s["card"], s["steps"]

        def weight(*shape):
            return (torch.randn(*shape, device=device) / shape[-1] ** 0.5).to(DTYPE)

        self.steps, self.layers = steps, layers
        self.qkv, self.out_proj = weight(layers, steps, 3 * dim, dim), weight(layers, steps, dim, dim)
        self.gate_up, self.down = weight(layers, steps, 2 * hidden, dim), weight(layers, steps, dim, hidden)
        self.heads = weight(steps, card, dim)
        self.norm1 = (1 + 0.1 * torch.randn(layers, dim, device=device)).to(DTYPE)
        self.norm2 = (1 + 0.1 * torch.randn(layers, dim, device=device)).to(DTYPE)
        table_rows = card + 1
        self.table = torch.randn(steps * table_rows, dim, device=device).to(DTYPE)
        self.offsets = torch.arange(steps, device=device) * table_rows
        self.inputs = torch.randn(steps, batch, dim, device=device).to(DTYPE)
        self.x = self.inputs.clone()
        self.previous = torch.randint(0, card, (steps, batch), device=device)
        cache_shape = (layers, batch, s["heads"], steps, dim // s["heads"])
        self.k_cache = torch.zeros(cache_shape, device=device, dtype=DTYPE)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.logits = torch.empty(batch, steps, card, device=device, dtype=DTYPE)
        self.scratch = depth_step_scratch(batch, dim, hidden, s["heads"], DTYPE, device)
        linears = [(3 * dim, dim, False), (dim, dim, False), (hidden, dim, True), (dim, hidden, False),
                   (card, dim, False)]
        needs = [ops.linear_workspace_size(batch, n, k, DTYPE, gated=gated) for n, k, gated in linears]
        self.workspace = ops.SplitWorkspace(max(n[0] for n in needs), max(n[1] for n in needs), device)
        element = DTYPE.itemsize
        weights = steps * (layers * (4 * dim * dim + 3 * hidden * dim + 2 * dim) + card * dim) * element
        # Per step: the embedding row, x read and written, the logits, the key and value rows, the cached rows.
        activations = steps * batch * (4 * dim + card + layers * 2 * dim) * element
        cached = sum(layers * batch * 2 * step * dim for step in range(steps)) * element
        self.bytes = weights + activations + cached

    def unfused(self):
        """The 8 steps as the fast LM runs them by default (FastLM.depth_step)."""
        self.x.copy_(self.inputs)
        for step in range(self.steps):
            h = self.x[step]
            ops.embed_sum(self.previous[step][:, None], self.table, self.offsets[step:step + 1], out=h,
                          accumulate=True)
            for layer in range(self.layers):
                projected = ops.linear(h, self.qkv[layer, step], norm=("rms", self.norm1[layer], EPS),
                                       workspace=self.workspace)
                attended = ops.depth_attention(projected, self.k_cache[layer], self.v_cache[layer], step)
                ops.linear(attended, self.out_proj[layer, step], residual=h, out=h, workspace=self.workspace)
                ffn = ops.linear(h, self.gate_up[layer, step], norm=("rms", self.norm2[layer], EPS),
                                 activation="silu_gate", workspace=self.workspace)
                ops.linear(ffn, self.down[layer, step], residual=h, out=h, workspace=self.workspace)
            ops.linear(h, self.heads[step], out=self.logits[:, step], workspace=self.workspace)

    def fused(self, step_kernel):
        self.x.copy_(self.inputs)
        for step in range(self.steps):
            step_kernel(self.x[step], self.previous[step], self.table, self.offsets[step:step + 1], self.norm1,
                        self.qkv[:, step], self.out_proj[:, step], self.norm2, self.gate_up[:, step],
                        self.down[:, step], self.heads[step], self.k_cache, self.v_cache, step, EPS,
                        self.logits[:, step], self.scratch)

    def config(self) -> dict:
        s = SHAPES
        return dict(steps=s["steps"], layers=s["layers"], dim=s["dim"], hidden=s["hidden"],
                    dtype=str(DTYPE).removeprefix("torch."))


@pytest.mark.parametrize("kernel", ["triton", "cuda"] if GPU else ["triton"])
@pytest.mark.parametrize("batch", [1, 8, 64] if GPU else [2])
def test_depth_step_frame(measure, device, batch, kernel):
    """kernel: the Triton persistent kernel (kernels/depth_step.py) or the CUDA extension's
    (csrc/depth_step_kernel.cuh, B <= 8), against the default sequence."""
    if kernel == "cuda" and batch > cuda_ext.MAX_ROWS:
        pytest.skip("the CUDA depth step serves B <= 8")
    step_kernel = cuda_ext.depth_step if kernel == "cuda" else depth_step
    o = DepthOperands(batch, device)
    measure(lambda: o.fused(step_kernel), o.bytes, o.unfused, op=f"depth_step_{kernel}", batch=batch,
            **o.config(), baseline="unfused ops sequence (32 launches a step)")


@pytest.mark.parametrize("batch", [8, 16, 32, 64] if GPU else [2])
def test_depth_sequence_products_past_8_rows(measure, device, batch):
    """The default sequence (its products past 8 rows on the CUDA GEMV's column groups up to ops.CUDA_GEMV_MANY_ROWS
    rows) against the same sequence with every product past 8 rows on skinny_linear, the previous default (recorded
    as the baseline): the measurement behind ops.CUDA_GEMV_MANY_ROWS."""
    o = DepthOperands(batch, device)
    measure(o.unfused, o.bytes, lambda: with_depth_triton_linears(o.unfused), op="depth_sequence", batch=batch,
            **o.config(), baseline="the sequence with its products past 8 rows on skinny_linear")
