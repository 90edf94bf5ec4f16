"""The single dispatch point of the fast models: every op they use, and where it runs.

Each op runs its Triton kernel when its tensors are on CUDA (or on the CPU under Triton's
interpreter), and otherwise its torch reference from the same kernel file, so that the fast models
also run, more slowly, on a plain CPU. Nothing else in moshi_fast.fast chooses a backend.
Kernels that split a reduction across programs take a `SplitWorkspace` allocated once by the
caller's cache (sized with the `*_workspace_size` functions re-exported here).
On Hopper and later GPUs every kernel launches with programmatic dependent launch, so that each one's
launch and first weight requests overlap the previous kernel's tail (kernels/_utils.pdl); MOSHI_FAST_PDL=0,
or `programmatic_launch(False)` around a graph's capture, turns it off.
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import cuda_ext
from .kernels._utils import SplitWorkspace, can_launch, programmatic_launch, split_tf32
from .kernels.conv1d_stream import conv1d_stream as _conv1d_stream_kernel
from .kernels.conv1d_stream import conv1d_stream_ref, conv1d_stream_workspace_size
from .kernels.conv_transpose1d_stream import conv_transpose1d_stream as _conv_transpose1d_stream_kernel
from .kernels.conv_transpose1d_stream import (conv_transpose1d_stream_ref, conv_transpose1d_stream_workspace_size,
                                              pack_conv_transpose_weight)
from .kernels.delay_line import delay_line_in as _delay_line_in_kernel
from .kernels.delay_line import delay_line_in_ref, delay_line_out_ref
from .kernels.delay_line import delay_line_out as _delay_line_out_kernel
from .kernels.depth_attention import depth_attention as _depth_attention_kernel
from .kernels.depth_attention import depth_attention_ref
from .kernels.depth_step import depth_step as _depth_step_kernel
from .kernels.depth_step import depth_step_ref, depth_step_scratch
from .kernels.embed_sum import embed_sum as _embed_sum_kernel
from .kernels.embed_sum import embed_sum_ref
from .kernels.norm_rows import norm_rows as _norm_rows_kernel
from .kernels.norm_rows import norm_rows_ref
from .kernels.paged_attention import paged_attention as _paged_attention_kernel
from .kernels.paged_attention import paged_attention_ref
from .kernels.paged_attention import paged_attention_workspace_size as _paged_attention_workspace_size
from .kernels.ring_attention import ring_attention as _ring_attention_kernel
from .kernels.ring_attention import ring_attention_ref, ring_attention_workspace_size
from .kernels.rvq_decode import rvq_decode as _rvq_decode_kernel
from .kernels.rvq_decode import rvq_decode_ref
from .kernels.rvq_encode import rvq_encode as _rvq_encode_kernel
from .kernels.rvq_encode import rvq_encode_ref, rvq_encode_scratch
from .kernels.sample_tokens import sample_tokens as _sample_tokens_kernel
from .kernels.sample_tokens import sample_tokens_ref
from .kernels.skinny_linear import skinny_linear as _skinny_linear_kernel
from .kernels.skinny_linear import as_norm, skinny_linear_ref, skinny_linear_tiles, skinny_linear_workspace_size
from .kernels.tuned import any_tuned_plan, shape_key

_kernels_enabled = True


@contextlib.contextmanager
def reference_ops():
    """Runs every op's torch reference inside the block, even where its kernel could launch (to test a
    fast model's wiring on the CPU without the slow interpreter, or to bisect a kernel on the GPU)."""
    global _kernels_enabled
    saved, _kernels_enabled = _kernels_enabled, False
    try:
        yield
    finally:
        _kernels_enabled = saved


CUDA_SAMPLING_ENV = "MOSHI_FAST_CUDA_SAMPLING"
"""Environment variable: "0" makes `sample_tokens` keep the Triton kernel for every dtype by default."""
_cuda_sampling = os.environ.get(CUDA_SAMPLING_ENV, "1") == "1"


@contextlib.contextmanager
def cuda_sampling(enabled: bool = True):
    """Inside the block (and in CUDA graphs captured inside it), `sample_tokens` runs the CUDA extension's
    sampling kernel on bf16 logits where it is built and takes the operands, or never (not enabled). On by
    default (MOSHI_FAST_CUDA_SAMPLING=0 turns it off for a process): on an H100 it drew an audio token (V = 2048)
    in 6.2 us against the Triton kernel's 17.5 us and a text token (V = 32000) in 25.1 against 29.6 us, bf16 at
    B = 1, and as much faster at B = 8 and 64 (bench/RESULTS.md). fp32 logits keep the Triton kernel, which was
    as fast or faster there. bench_lm_step.py and bench_frame.py time the Triton kernel beside it with
    --triton-sampling."""
    global _cuda_sampling
    saved, _cuda_sampling = _cuda_sampling, enabled
    try:
        yield
    finally:
        _cuda_sampling = saved


TEXT_SAMPLER_WARP_KERNEL = True
"""Whether `sample_tokens` gives the CUDA extension's warp-reduction kernel the text rows it takes (bf16, 8192 < V
<= 32768, max_top_k <= 32; `cuda_ext.sample_tokens`'s warp_kernel): the same tokens as the block-wide kernel. On an
H100 (bench/results/2026-12-07_H100_25ace8c_sampler_variants.json) the text row took 16.3 us on it against 20.0 on
the block kernel, both with 16-byte loads (26.2 without), at B = 1; the benchmarks' --text-sampler-block-kernel times
the block kernel beside it."""
SAMPLER_VECTOR_LOADS = True
"""Whether the CUDA extension's sampler reads contiguous, 16-byte aligned logit rows in 16-byte pieces
(`cuda_ext.sample_tokens`'s vector_loads; the same keys). On an H100 (same file as above) the audio row took 5.3
against 6.2 us at B = 1, the text row on the block kernel 20.0 against 26.2; the benchmarks' --sampler-scalar-loads
time the scalar loads beside it."""
SAMPLER_RADIX_SELECT = True
"""Whether the CUDA extension's block-wide sampler (the audio rows) finds the k-th largest logit by radix select (two
passes of a shared-memory histogram for bf16 keys) instead of bisection (16 to 30 block-wide reductions), and counts
the candidates' ranks 16 bytes at a time (`cuda_ext.sample_tokens`'s radix_select; the same candidates, ranks and
tokens). On an H100 (bench/results/2026-12-07_H100_3f0c76a_sampler_radix_select.json) the audio row took 4.95 against
6.01 us at B = 1 (5.13 against 6.08 at 64), and the frame's 8 audio samplers 40.3 us of its chain against 46.9 in the
previous profile; the benchmarks' --sampler-bisection time the bisection beside it."""


CUDA_DEPTH_STEP_ENV = "MOSHI_FAST_CUDA_DEPTH_STEP"
"""Environment variable: "1" makes the fast LM run each depth-transformer step as the CUDA extension's persistent
kernel where it takes the operands (`cuda_depth_step`)."""
_cuda_depth_step = os.environ.get(CUDA_DEPTH_STEP_ENV, "0") == "1"


@contextlib.contextmanager
def cuda_depth_step(enabled: bool = True):
    """Inside the block (and in CUDA graphs captured inside it), `depth_step` runs the CUDA extension's persistent
    kernel (csrc/depth_step_kernel.cuh: bf16, B <= 8) where it is built and takes the operands, and
    `uses_cuda_depth_step` says so, so that the fast LM fuses each depth-transformer step into it; or never (not
    enabled). Off by default: measured slower than the unfused sequence (H100, git 086f0e8, bench/RESULTS.md: the
    depth transformer of a B = 1 LM step 1.78 ms with it, 1.00 ms without). MOSHI_FAST_CUDA_DEPTH_STEP=1 turns it on
    for a process; bench_lm_step.py and bench_frame.py time it beside the default with --cuda-depth-step."""
    global _cuda_depth_step
    saved, _cuda_depth_step = _cuda_depth_step, enabled
    try:
        yield
    finally:
        _cuda_depth_step = saved


def settle_weights(module: torch.nn.Module) -> None:
    """Waits until every write to the module's parameters and buffers on CUDA devices has finished. Kernels
    launched with programmatic dependent launch read weights before they wait for the previous kernel
    (kernels/_utils.pdl), so a fast model's `prepare()`, which derives weights on the GPU, ends with this."""
    devices = {t.device for t in (*module.parameters(), *module.buffers()) if t.is_cuda}
    for device in devices:
        torch.cuda.synchronize(device)


def tuned_split_weight(op: str, *dims) -> bool:
    """Whether a measured plan of the conv `op` ("conv1d": C_in, C_out, K, S, T_in; "convtr": the same and groups),
    at any swept batch, reads its weight as two tf32 parts (split_weight), so that a model prepares them once."""
    return any_tuned_plan(op, shape_key(*dims), "split_weight")


def _use_kernel(*tensors) -> bool:
    return _kernels_enabled and can_launch(*tensors)


def conv1d_stream(x, state, frame, weight, bias, stride, elu_input=False, residual=None, replicate=False, out=None,
                  workspace: SplitWorkspace | None = None, weight_parts=None):
    """Streaming causal conv1d with carried history (kernels/conv1d_stream.py); `weight_parts` is
    `split_tf32(weight)`, made once where a tuned plan reads it (tuned_split_weight)."""
    if _use_kernel(x, state, weight):
        return _conv1d_stream_kernel(x, state, frame, weight, bias, stride, elu_input, residual, replicate, out=out,
                                     workspace=workspace, weight_parts=weight_parts)
    return conv1d_stream_ref(x, state, frame, weight, bias, stride, elu_input, residual, replicate, out=out)


def conv_transpose1d_stream(x, partial, frame, weight, bias, stride, groups=1, elu_input=False, out=None,
                            packed_weight=None, workspace: SplitWorkspace | None = None, weight_parts=None):
    """Streaming transposed conv1d with carried overlap (kernels/conv_transpose1d_stream.py);
    `packed_weight` is `pack_conv_transpose_weight(weight, stride)`, made once, and `weight_parts`
    `split_tf32(packed_weight)`, made once where a tuned plan reads it (tuned_split_weight)."""
    if _use_kernel(x, partial, weight):
        return _conv_transpose1d_stream_kernel(x, partial, frame, weight, bias, stride, groups, elu_input, out=out,
                                               packed_weight=packed_weight, workspace=workspace,
                                               weight_parts=weight_parts)
    return conv_transpose1d_stream_ref(x, partial, frame, weight, bias, stride, groups, elu_input, out=out)


def ring_attention(qkv, ring_k, ring_v, frame, max_period, out=None, workspace: SplitWorkspace | None = None):
    """RoPE + ring KV write + sliding-window attention of the new steps (kernels/ring_attention.py)."""
    if _use_kernel(qkv, ring_k):
        return _ring_attention_kernel(qkv, ring_k, ring_v, frame, max_period, out=out, workspace=workspace)
    return ring_attention_ref(qkv, ring_k, ring_v, frame, max_period, out=out)


CUDA_PAGED_ATTENTION = True
"""Whether `paged_attention` gives the CUDA extension's kernel (csrc/paged_attention_kernel.cuh: bf16, head dim 128,
power-of-two pages) the calls it takes, instead of the Triton kernel. On an H100 (bench/RESULTS.md, 2026-12-07
sixteenth and seventeenth sessions) it took 22.4 against 24.0 us a layer at one conversation and 134 against 149 at
eight, and shortened the frame's GPU span by 0.02 ms at B = 1 and B = 8 and 0.03 ms at B = 32, where both kernels
stream the windows at the copy bandwidth. bench_paged_attention.py times both kernels, bench_frame.py the frame with
the Triton kernel under --triton-paged-attention."""


PAGED_ATTENTION_READS_BEFORE_WAIT = True
"""With the CUDA extension's kernel and programmatic dependent launch, `paged_attention` reads the window's first keys
and values, the mask, positions and page table before it waits for the previous kernel (cuda_ext.paged_attention's
reads_before_wait), where its caller says that kernel is the qkv product (after_qkv_product: Helium's layers do),
which writes none of them; the reads overlap its tail. The same bits; on an H100 the B = 1 frame's GPU span 0.08 ms
shorter, B = 8 0.01 ms (bench/results/2026-12-07_H100_51e2fae_frame_b1_b8_attention_reads_before_wait.json).
bench_frame.py --attention-reads-after-wait times the previous path."""


def uses_cuda_paged_attention(qkv, k_pool, v_pool, page_table, positions, exec_mask, context, out) -> bool:
    """Whether `paged_attention` on these operands runs the CUDA extension's kernel (CUDA_PAGED_ATTENTION on, the
    extension built and taking them)."""
    return (_kernels_enabled and CUDA_PAGED_ATTENTION and qkv.is_cuda
            and cuda_ext.paged_attention_supported(qkv, k_pool, v_pool, page_table, positions, exec_mask, context, out)
            and cuda_ext.available())


def paged_attention_workspace_size(batch: int, heads: int, head_dim: int, context: int, tiles: dict | None = None,
                                   kv_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(partial floats, counters) of a SplitWorkspace that serves `paged_attention` on pools of kv_dtype (None: a
    16-bit cache) whichever kernel runs it: the Triton launcher's plan (or `tiles`) and, where the CUDA extension's
    kernel could take the shape, its default split count too."""
    need = _paged_attention_workspace_size(batch, heads, head_dim, context, tiles, kv_dtype)
    if head_dim != cuda_ext.PAGED_HEAD_DIM or kv_dtype not in (None, torch.bfloat16):
        return need
    cuda_need = cuda_ext.paged_attention_workspace_size(batch, heads, context)
    return max(need[0], cuda_need[0]), max(need[1], cuda_need[1])


def paged_attention(qkv, k_pool, v_pool, page_table, positions, exec_mask, context, max_period, out=None,
                    workspace: SplitWorkspace | None = None, after_qkv_product: bool = False):
    """RoPE + KV write into the page pool + attention over each slot's live window of one new token
    (kernels/paged_attention.py, or the CUDA extension's kernel where `uses_cuda_paged_attention`; the pools, page
    table, positions and mask come from PagedKVCache). after_qkv_product: the kernel issued just before is one of
    this project's products writing qkv: it writes nothing else the attention reads, and lets the next kernel start
    only after its own wait, so every kernel before it has finished. Then, under PAGED_ATTENTION_READS_BEFORE_WAIT,
    the CUDA kernel reads its window before its wait."""
    if uses_cuda_paged_attention(qkv, k_pool, v_pool, page_table, positions, exec_mask, context, out):
        early = after_qkv_product and PAGED_ATTENTION_READS_BEFORE_WAIT
        return cuda_ext.launch_paged_attention(qkv, k_pool, v_pool, page_table, positions, exec_mask, context,
                                               max_period, out, workspace, reads_before_wait=early)
    if _use_kernel(qkv, k_pool):
        return _paged_attention_kernel(qkv, k_pool, v_pool, page_table, positions, exec_mask, context, max_period,
                                       out=out, workspace=workspace)
    return paged_attention_ref(qkv, k_pool, v_pool, page_table, positions, exec_mask, context, max_period, out=out)


def depth_attention(qkv, k_cache, v_cache, step: int, out=None):
    """KV-cache write of codebook step `step` + causal attention over the frame's steps 0..step, no RoPE
    (kernels/depth_attention.py)."""
    fn = _depth_attention_kernel if _use_kernel(qkv, k_cache) else depth_attention_ref
    return fn(qkv, k_cache, v_cache, step, out=out)


def uses_cuda_depth_step(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down, head,
                         k_cache, v_cache, step: int, logits_out, scratch) -> bool:
    """Whether `depth_step` on these operands (without `phases`) runs the CUDA extension's persistent kernel: inside
    `cuda_depth_step()`, where the extension is built and takes them."""
    return (_kernels_enabled and _cuda_depth_step and x.is_cuda
            and cuda_ext.depth_step_supported(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2,
                                              gate_up, down, head, k_cache, v_cache, step, logits_out, scratch)
            and cuda_ext.available())


def depth_step(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down, head, k_cache,
               v_cache, step: int, eps: float, logits_out, scratch, phases=None, cuda: bool | None = None):
    """One codebook step of the depth transformer: embedding add, every layer with the step's weights
    (qkv [L, 3D, D], ... views with a layer stride), KV write at `step`, head logits into logits_out, in
    one persistent launch on CUDA: the CUDA extension's kernel where `uses_cuda_depth_step` (phases None), else
    the Triton kernel (kernels/depth_step.py); scratch from `depth_step_scratch`. cuda: what
    `uses_cuda_depth_step` said of these operands, for a caller that asked already (None: asked here)."""
    if cuda is None:
        cuda = phases is None and uses_cuda_depth_step(x, previous, embed_table, embed_row_offset, norm1, qkv,
                                                       out_proj, norm2, gate_up, down, head, k_cache, v_cache, step,
                                                       logits_out, scratch)
    if cuda:
        return cuda_ext.launch_depth_step(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2,
                                          gate_up, down, head, k_cache, v_cache, step, eps, logits_out, scratch)
    fn = _depth_step_kernel if _use_kernel(x, qkv) else depth_step_ref
    return fn(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down, head, k_cache,
              v_cache, step, eps, logits_out, scratch, phases=phases)


def embed_sum(tokens, table, row_offset, out=None, accumulate=False):
    """Sum of one row per stream of concatenated embedding tables, each add rounded to out's dtype
    as torch's are; added to out when `accumulate` (kernels/embed_sum.py)."""
    fn = _embed_sum_kernel if _use_kernel(tokens, table) else embed_sum_ref
    return fn(tokens, table, row_offset, out=out, accumulate=accumulate)


def delay_line_in(line, frame, exec_mask, user_codes, delays, initial, order, out=None):
    """LMGen's delay line before Helium: the running slots' user codes enter the line, this frame's input
    tokens come out in `order` (kernels/delay_line.py)."""
    fn = _delay_line_in_kernel if _use_kernel(line, frame) else delay_line_in_ref
    return fn(line, frame, exec_mask, user_codes, delays, initial, order, out=out)


def delay_line_out(line, frame, exec_mask, generated, delays, out=None, valid_out=None):
    """LMGen's delay line after the depth transformer: the running slots' generated tokens enter the line
    and their frames advance; returns (the delayed output tokens, valid) (kernels/delay_line.py)."""
    fn = _delay_line_out_kernel if _use_kernel(line, frame) else delay_line_out_ref
    return fn(line, frame, exec_mask, generated, delays, out=out, valid_out=valid_out)


def rvq_encode(latent, input_proj, codebooks, norms, n_semantic, scratch, out=None):
    """Split residual VQ encode, all codebooks in one launch (kernels/rvq_encode.py)."""
    fn = _rvq_encode_kernel if _use_kernel(latent, codebooks) else rvq_encode_ref
    return fn(latent, input_proj, codebooks, norms, n_semantic, scratch, out=out)


def rvq_decode(codes, codebooks, output_proj, n_semantic, out=None):
    """Split residual VQ decode: gathers, sums and both output projections (kernels/rvq_decode.py)."""
    fn = _rvq_decode_kernel if _use_kernel(codebooks) else rvq_decode_ref
    return fn(codes, codebooks, output_proj, n_semantic, out=out)


def sample_tokens(logits, temperature, top_k, max_top_k: int, seed, counter, draw: int, out=None):
    """Temperature + top-k exponential race per slot, the reference sampler's tokens from the same
    (seed, counter, draw) noise, drawn on the GPU without a sync: for bf16 logits the CUDA extension's kernel
    (csrc/sample_tokens_kernel.cuh) where it is built and takes the operands, unless `cuda_sampling(False)`;
    else the Triton kernel (kernels/sample_tokens.py). Both draw the same tokens."""
    if (_kernels_enabled and _cuda_sampling and logits.dtype == torch.bfloat16
            and cuda_ext.sample_tokens_supported(logits, temperature, top_k, max_top_k, seed, counter, out)
            and cuda_ext.available()):
        return cuda_ext.sample_tokens(logits, temperature, top_k, max_top_k, seed, counter, draw, out=out,
                                      warp_kernel=TEXT_SAMPLER_WARP_KERNEL, vector_loads=SAMPLER_VECTOR_LOADS,
                                      radix_select=SAMPLER_RADIX_SELECT)
    fn = _sample_tokens_kernel if _use_kernel(logits, seed) else sample_tokens_ref
    return fn(logits, temperature, top_k, max_top_k, seed, counter, draw, out=out)


CUDA_GEMV_SHAPES = frozenset({
    (1024, 1024, "plain"), (1024, 2816, "plain"), (4096, 11264, "plain"), (2048, 1024, "plain"),
    (3072, 1024, "rms"), (5632, 1024, "rms+silu_gate"),
})
"""(N, K, fusion) of the bf16 products (M <= 8, no bias) that ops.linear gives the CUDA extension's GEMV, where
it beat skinny_linear. fusion "plain": no norm or activation (bench/results/2026-11-22_H200_5180938_cuda_gemv.json,
H200, M = 1 / 4 / 8: the depth transformer's attention output 2.5 vs 3.6 us and FFN output 3.7 vs 4.9 us, Helium's
FFN output 25.7 vs 27.5 us; on the other plain LM shapes skinny_linear was as fast or faster); the depth
transformer's heads (2048 x 1024, bench/results/2026-12-06_H100_f64615c_attention_gemv_depth_head.json, H100):
2.13 / 2.03 / 2.25 vs 4.50 / 4.71 / 4.55 us, taken at B = 1, where the step's logits row is contiguous.
"rms" / "rms+silu_gate": the RMSNorm (and the SiLU gate) fused, at the depth transformer's qkv, 4.1 vs 6.9 us, and
gate_up, 6.8 vs 9.0 us, at M = 1 (bench/results/2026-12-03_H200_89eec6b_cuda_gemv_fused.json; at Helium's fused
shapes neither won clearly). Those runs re-read one weight from L2; with every call's weight cold, as in the frame
(H100, M = 1, bench/results/2026-12-06_H100_f32632b_gemv_warps_cold.json and ..._481e85f_gemv_down_cold.json), the
CUDA GEMV still wins at each of these shapes: depth qkv 3.56 vs 8.02, out 1.98 vs 3.83, gate_up 6.10 vs 10.47, down
3.84 vs 5.63, heads 2.60 vs 4.89 us, Helium's FFN output 31.5 vs 35.0 us."""


CUDA_GEMV_ONE_ROW_SHAPES = frozenset({
    (12288, 4096, "plain"), (4096, 4096, "plain"), (22528, 4096, "silu_gate"), (32000, 4096, "plain"),
    (8192, 4096, "plain"),
})
"""(N, K, fusion) of Helium's products (qkv, attention out, gate_up, the text head, the depth transformer's input
projection) that ops.linear gives the CUDA GEMV at one row only, those with an RMSNorm after its own launch
(norm_rows). On an H100 (bench/results/2026-12-06_H100_0d30b54_frame_b1_b8_helium_cuda_gemv.json, one run) the
frame's GPU span went from 7.214 to 7.062 ms at B = 1 with them on the CUDA GEMV, and from 11.556 to 11.662 ms at
B = 8 (slower), so only one row takes it. With the RMSNorm fused into the GEMV instead both were slower (B = 1
7.82 against 7.44 ms of wall time, ..._8a8a391_frame_b1_b8_helium_cuda_gemv.json). Alone, with the weight cold in L2, each of these products was
faster on the CUDA GEMV than on skinny_linear at 1, 4 and 8 rows (..._8a8a391_gemv_helium_cold.json)."""


CUDA_GEMV_MANY_ROWS_SHAPES = frozenset({
    (3072, 1024, "plain"), (5632, 1024, "silu_gate"), (1024, 1024, "plain"), (1024, 2816, "plain"),
})
"""(N, K, fusion) of the depth transformer's products that ops.linear gives the CUDA GEMV from 9 to
CUDA_GEMV_MANY_ROWS rows too (its column groups; csrc/skinny_gemv_kernel.cuh); up to 8 rows CUDA_GEMV_SHAPES decide.
The RMSNorms run apart (norm_rows, then the plain or gated product): fused, every block would first read all of x's
rows for their scales, up to 128 KB a block at 64 rows. The heads are not here: past one row each step writes a
strided column of the audio logits, which the CUDA GEMV does not take. The depth transformer's 8 codebook steps in a
CUDA graph on an H100 (bench/results/2026-12-06_H100_ed2db73_depth_many_rows.json), µs with these products on the
CUDA GEMV against skinny_linear: B = 16 1167 against 1553, B = 32 1567 against 1851, B = 64 2230 against 2206
(slower: 64 rows stay on skinny_linear)."""
CUDA_GEMV_MANY_ROWS = 32
"""The most rows at which ops.linear gives CUDA_GEMV_MANY_ROWS_SHAPES the CUDA GEMV (see there)."""


def cuda_gemv_serves(n: int, k: int, fusion: str | None, rows: int) -> bool:
    """Whether `linear` gives the CUDA GEMV the product of `rows` rows with a weight [n, k] and this fusion (see
    CUDA_GEMV_SHAPES, CUDA_GEMV_ONE_ROW_SHAPES and CUDA_GEMV_MANY_ROWS_SHAPES), its operands permitting."""
    if fusion is None or not 1 <= rows <= cuda_ext.GEMV_MAX_ROWS:
        return False
    if rows > cuda_ext.GEMV_GROUP_ROWS:
        return rows <= CUDA_GEMV_MANY_ROWS and (n, k, fusion) in CUDA_GEMV_MANY_ROWS_SHAPES
    return (n, k, fusion) in CUDA_GEMV_SHAPES or (rows == 1 and (n, k, fusion) in CUDA_GEMV_ONE_ROW_SHAPES)


def _cuda_gemv_fusion(norm, activation) -> str | None:
    """The CUDA GEMV's name of a linear's fusion (norm an as_norm Norm or None), or None where it has none
    (LayerNorm, GELU)."""
    if activation not in (None, "silu_gate") or (norm is not None and norm.kind != "rms"):
        return None
    parts = (["rms"] if norm else []) + ([activation] if activation else [])
    return "+".join(parts) or "plain"


SEPARATE_NORM_KINDS = ("rms", "layer")
"""The norms `linear` runs as a launch of their own (norm_rows) before a product without a norm, rather than fused
into the product (where the CUDA GEMV does not take it): every program of a fused norm first reads all its rows over
K. norm_rows + product against the fused product, split-K plans, us at B = 1 / 8 / 64 (bench/RESULTS.md):
  - Helium's RMSNorm (H100, git 3dcc8ab): qkv 36.1 / 38.4 / 38.0 against 37.4 / 41.2 / 68.6, gate_up 62.0 / 63.1 /
    69.9 against 64.7 / 68.1 / 121.8, the text head 86.9 / 90.6 / 91.3 against 89.2 / 93.8 / 132.0;
  - Mimi's LayerNorm (fp32, K = 512, 2 B rows; H100, git 87a9604): qkv 3.57 / 5.39 / 13.25 against 3.52 / 7.73 /
    13.98, fc1 + GELU 3.57 / 5.81 / 16.84 against 3.62 / 8.20 / 16.89."""
_separate_norms = True


@contextlib.contextmanager
def separate_norms(enabled: bool = True):
    """Inside the block (and in CUDA graphs captured inside it), `linear` runs the SEPARATE_NORM_KINDS norms in a
    launch of their own (the default), or fuses every norm into its product (not enabled). bench_lm_step.py and
    bench_frame.py time the fused norms beside the default with --fused-norms."""
    global _separate_norms
    saved, _separate_norms = _separate_norms, enabled
    try:
        yield
    finally:
        _separate_norms = saved


def norm_runs_apart(norm) -> bool:
    """Whether `linear` runs this norm (an as_norm Norm or None) in a launch of its own before a product without a
    norm, where it runs the Triton product: a SEPARATE_NORM_KINDS norm, unless inside separate_norms(False)."""
    return norm is not None and _separate_norms and norm.kind in SEPARATE_NORM_KINDS


CUDA_GEMV_NORM_AFTER = True
"""Whether `linear` gives the CUDA_GEMV_NORM_AFTER_SHAPES products, where the CUDA GEMV takes them (with the norm fused
up to 8 rows, after the norm's own launch from 9 to 32), to the CUDA GEMV with the norm fused and its row scale
applied after the product (cuda_ext.gemv's norm_after): no pass over x before the first product. The same function
rounded elsewhere (cuda_ext.gemv_ref). bench_frame.py and bench_lm_step.py time the previous path (the norm applied
to x first) with --gemv-norm-before."""
CUDA_GEMV_NORM_AFTER_SHAPES = frozenset({(3072, 1024, "rms"), (5632, 1024, "rms+silu_gate")})
"""(N, K, fusion) of the products CUDA_GEMV_NORM_AFTER applies to: the depth transformer's qkv and gate_up. On an H100
(bench/results/2026-12-07_H100_fc0de55_frame_b1_norm_after.json, ..._c136155_frame_b1_b8_variants.json) Helium's
products at one row with it, instead of after a norm_rows launch, made the B = 1 frame's GPU span 0.10 ms longer
(7.190 against 7.090 ms), while at B = 8, where only the depth transformer's take it, the span was 0.06 ms shorter.
With these two shapes only (..._44a2e76_frame_b1_b8_b32_variants.json, ..._44a2e76_gemv_norm_after.json), alone
they take 3.43 against 3.61 us (qkv) and 6.08 against 6.17 us (gate_up) at one row, 3.62 / 4.49 and 6.58 / 6.87 at
eight; in the frame, against the CUDA attention's run of the same process, its span was 0.021 ms longer at B = 1
and 0.016 ms shorter at B = 8."""


GEMV_EARLY_RESIDUAL = True
"""Whether `linear`'s CUDA GEMV products with a residual (the depth transformer's attention output and FFN output,
Helium's at one row) request it right after the wait for the previous kernel, before the products, rather than after
the block's reduction: its round trip to L2 then overlaps the products instead of lengthening the chain (the same
bits). On an H100, each pair from one process: the frame's GPU span 6.765 against 6.812 ms at B = 1, 11.256 against
11.296 ms at B = 8 (bench/results/2026-12-07_H100_9bc15ab_frame_b1_b8_gemv_early_residual.json); the LM step 6.23
against 6.25 ms at B = 1 (..._9bc15ab_lm_step_b1_gemv_early_residual.json). bench_frame.py and bench_lm_step.py
time the previous path with --gemv-late-residual."""


def _cuda_gemv(x, weight, residual, out, *, early_residual=None, **fusions):
    """cuda_ext.gemv with the residual requested as GEMV_EARLY_RESIDUAL says (unless early_residual is given)."""
    early = GEMV_EARLY_RESIDUAL if early_residual is None else early_residual
    return cuda_ext.gemv(x, weight, residual, out, early_residual=early, **fusions)


def _uses_cuda_gemv_norm_after(x, weight, bias, norm, activation, residual, out) -> bool:
    """norm: an as_norm Norm or None."""
    if not (CUDA_GEMV_NORM_AFTER and norm is not None and norm.kind == "rms"):
        return False
    if (*weight.shape, _cuda_gemv_fusion(norm, activation)) not in CUDA_GEMV_NORM_AFTER_SHAPES:
        return False
    if _use_cuda_gemv(x, weight, bias, norm, activation, residual, out):
        return True
    return (norm_runs_apart(norm) and _use_cuda_gemv(x, weight, bias, None, activation, residual, out)
            and _gemv_operand(norm.weight))


def _gemv_operand(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % 16 == 0 and t.dtype == torch.bfloat16


def _use_cuda_gemv(x, weight, bias, norm, activation, residual, out) -> bool:
    """norm: an as_norm Norm or None."""
    if not (_kernels_enabled and x.is_cuda and bias is None):
        return False
    if x.dim() != 2 or weight.dim() != 2:
        return False
    if not cuda_gemv_serves(weight.shape[0], weight.shape[1], _cuda_gemv_fusion(norm, activation), x.shape[0]):
        return False
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    operands = [t for t in (x, weight, residual, out, norm.weight if norm else None) if t is not None]
    if not all(_gemv_operand(t) for t in operands):
        return False
    return cuda_ext.available()


def linear(x, weight, *, bias=None, norm=None, activation=None, residual=None, out=None,
           workspace: SplitWorkspace | None = None):
    """act(norm(x) @ weight.T + bias) + residual for few rows, weights streamed once
    (kernels/skinny_linear.py; the CUDA extension's GEMV on the CUDA_GEMV_SHAPES, when it is built); x [M, K],
    norm (weight, bias, eps) for LayerNorm or ("rms", weight, eps), activation None, "gelu" or "silu_gate"
    (weight [2N, K]), residual may be `out`. With CUDA_GEMV_NORM_AFTER on, the CUDA_GEMV_NORM_AFTER_SHAPES products
    apply the norm's row scale after the product."""
    parsed = as_norm(norm)
    if _uses_cuda_gemv_norm_after(x, weight, bias, parsed, activation, residual, out):
        return _cuda_gemv(x, weight, residual, out, norm=(parsed.weight, parsed.eps), gated=activation == "silu_gate",
                          norm_after=True)
    if _use_cuda_gemv(x, weight, bias, parsed, activation, residual, out):
        return _cuda_gemv(x, weight, residual, out, norm=(parsed.weight, parsed.eps) if parsed else None,
                          gated=activation == "silu_gate")
    if not _use_kernel(x, weight):
        return skinny_linear_ref(x, weight, bias=bias, norm=parsed, activation=activation, residual=residual,
                                 out=out, workspace=workspace)
    if norm_runs_apart(parsed):
        # Every program of a fused norm computes all its rows' statistics before its weight stream starts;
        # norm_rows computes each row's once.
        x, parsed = _norm_rows_kernel(x, parsed), None
        if _use_cuda_gemv(x, weight, bias, None, activation, residual, out):
            return _cuda_gemv(x, weight, residual, out, gated=activation == "silu_gate")
    return _skinny_linear_kernel(x, weight, bias=bias, norm=parsed, activation=activation, residual=residual,
                                 out=out, workspace=workspace)


def norm_rows(x, norm, out=None):
    """The rows `linear` multiplies after its norm (kernels/norm_rows.py): RMSNorm in x's dtype, LayerNorm in
    fp32; x [M, K], norm as `linear` takes it."""
    if _use_kernel(x):
        return _norm_rows_kernel(x, norm, out=out)
    return norm_rows_ref(x, norm, out=out)


def linear_workspace_size(m: int, n: int, k: int, dtype, gated: bool = False) -> tuple[int, int]:
    """(partial floats, counters) the default split-K plan of `linear` needs at this shape (n the output
    width; gated: activation="silu_gate", whose weight has 2n rows)."""
    tiles = skinny_linear_tiles(m, n, k, dtype, split_k=True, gated=gated)
    return skinny_linear_workspace_size(m, n, tiles, gated=gated)


def cuda_extension_available() -> bool:
    """True when the CUDA extension moshi_fast._C is loaded (built by setup.py, or JIT-built on a GPU
    machine); only `gemv_cuda` needs it."""
    return cuda_ext.available()


def gemv_cuda(x, weight, residual=None, out=None, *, norm=None, gated=False, norm_after=False, early_residual=None):
    """act(norm(x) @ weight.T) + residual for 1..64 bf16 rows by the CUDA extension's weight-streaming GEMV
    (csrc/skinny_gemv_kernel.cuh; reference cuda_ext.gemv_ref); x [M, K], weight [N, K] ([2N, K] gated),
    residual may be `out`, norm (norm_weight [K], eps) for a fused RMSNorm (norm_after: its row scale applied
    after the product), gated for the SiLU gate, early_residual for the residual requested before the products
    (None: GEMV_EARLY_RESIDUAL). Raises RuntimeError when the extension is unavailable. `linear` calls it on the
    CUDA_GEMV_*SHAPES only; bench/bench_cuda_gemv.py times it beside skinny_linear and cuBLAS."""
    return _cuda_gemv(x, weight, residual, out, norm=norm, gated=gated, norm_after=norm_after,
                      early_residual=early_residual)


__all__ = ["SplitWorkspace", "conv1d_stream", "conv1d_stream_workspace_size", "conv_transpose1d_stream",
           "conv_transpose1d_stream_workspace_size", "cuda_depth_step", "cuda_extension_available", "cuda_gemv_serves",
           "cuda_sampling", "delay_line_in", "delay_line_out", "depth_attention", "depth_step", "depth_step_scratch",
           "embed_sum", "gemv_cuda", "linear", "linear_workspace_size", "norm_rows", "norm_runs_apart",
           "pack_conv_transpose_weight", "paged_attention", "paged_attention_workspace_size", "programmatic_launch",
           "ring_attention", "ring_attention_workspace_size", "rvq_decode", "rvq_encode", "rvq_encode_scratch",
           "sample_tokens", "separate_norms", "settle_weights", "split_tf32", "tuned_split_weight",
           "uses_cuda_depth_step", "uses_cuda_paged_attention"]
