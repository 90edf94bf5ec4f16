// The schemas of moshi_fast's CUDA ops, and the Python module moshi_fast._C: importing it registers the ops as
// torch.ops.moshi_fast.*; their CUDA implementations register themselves from their own files.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(moshi_fast, m) {
  // out[M, N] = x[M, K] @ weight[N, K]^T (+ residual[M, N], which may be out itself), bf16, M <= 64, fp32
  // accumulation rounded once (skinny_gemv.cu). warps_per_block: 0 for the default split of K. norm_weight [K]:
  // x is RMSNormed first (with eps; norm_after: the row scale applied to the product instead of x); gated: weight
  // is [2N, K] and out = silu(x gate^T) * (x up^T); programmatic: launched with programmatic dependent launch
  // (Hopper and later); early_residual: the residual requested before the products instead of after them.
  m.def("gemv_bf16(Tensor x, Tensor weight, Tensor? residual, Tensor(a!) out, int warps_per_block=0, "
        "Tensor? norm_weight=None, float eps=0., bool gated=False, bool programmatic=False, "
        "bool norm_after=False, bool early_residual=False) -> ()");
  // out[b] = one token of logits[b, :V] by temperature + top-k exponential race with the counter-based noise of
  // moshi_fast.reference.sampling (sample_tokens.cu); logits bf16 or fp32 [B, V], V < 2^16, min(max_top_k, V)
  // <= 1024; temperature fp32 [B]; top_k, seed, counter, out int64 [B]. warp_kernel: bf16 rows of 8192 < V <=
  // 32768 with min(max_top_k, V) <= 32 take the warp-reduction kernel; vector_loads: contiguous 16-byte aligned rows
  // are read in 16-byte pieces; radix_select: the block-wide kernel finds the k-th key by radix select instead of
  // bisection (all three off here; moshi_fast.ops chooses).
  m.def("sample_tokens(Tensor logits, Tensor temperature, Tensor top_k, int max_top_k, Tensor seed, "
        "Tensor counter, int draw, Tensor(a!) out, bool programmatic=False, bool warp_kernel=False, "
        "bool vector_loads=False, bool radix_select=False) -> ()");
  // Helium's decode attention over the paged KV cache (paged_attention.cu): for each running slot's new token, RoPE,
  // its key and value written into their page and attention over its live window, bf16, head dim 128; the spec is
  // kernels/paged_attention.py's paged_attention_ref. partials / counters: the split workspace, used when splits > 1.
  m.def("paged_attention_bf16(Tensor qkv, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor page_table, Tensor positions, "
        "Tensor exec_mask, int context, float max_period, Tensor(c!) out, Tensor(d!) partials, Tensor(e!) counters, "
        "int splits, bool programmatic=False, bool reads_before_wait=False) -> ()");
  // One codebook step of the depth transformer in one persistent launch (depth_step.cu), bf16, B <= 8: x [B, D]
  // += the embedding of previous [B], then every layer with the step's weights ([L, ...] views with a layer
  // stride), the caches' column `step` written, logits_out [B, card] = the head's; the spec is
  // kernels/depth_step.py's depth_step_ref. The scratches carry the queries and the FFN activations between the
  // phases; arrivals [1] int64 is the grid barrier's count (a multiple of the grid between launches); trace, when
  // given, int64 [blocks, entries] receives the launch's timeline; stages: weight chunks in flight per block (0: the
  // default); refills: when the warps refill their weight slots, 0 after each chunk, 1 warp 0 after the grid-barrier
  // arrivals, 2 every warp once the phase's input rows are read (depth_step_kernel.cuh).
  m.def("depth_step_bf16(Tensor(a!) x, Tensor previous, Tensor embed_table, Tensor embed_row_offset, Tensor norm1, "
        "Tensor qkv, Tensor out_proj, Tensor norm2, Tensor gate_up, Tensor down, Tensor head, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, int step, float eps, Tensor(d!) logits_out, Tensor(e!) qkv_scratch, "
        "Tensor(f!) hidden_scratch, Tensor(g!) arrivals, Tensor(h!)? trace=None, int stages=0, "
        "int refills=0, bool programmatic=False) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "moshi_fast's CUDA kernels, registered as torch.ops.moshi_fast.* when this module is imported";
}
