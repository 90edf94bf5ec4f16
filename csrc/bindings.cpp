// The schemas of moshi_fast's CUDA ops, and the Python module moshi_fast._C: importing it registers the ops as
// torch.ops.moshi_fast.*; their CUDA implementations register themselves from their own files.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(moshi_fast, m) {
  // out[M, N] = x[M, K] @ weight[N, K]^T (+ residual[M, N], which may be out itself), bf16, M <= 8, fp32
  // accumulation rounded once (skinny_gemv.cu). warps_per_block: 0 for the default split of K. norm_weight [K]:
  // x is RMSNormed first (with eps); gated: weight is [2N, K] and out = silu(x gate^T) * (x up^T); programmatic:
  // launched with programmatic dependent launch (Hopper and later).
  m.def("gemv_bf16(Tensor x, Tensor weight, Tensor? residual, Tensor(a!) out, int warps_per_block=0, "
        "Tensor? norm_weight=None, float eps=0., bool gated=False, bool programmatic=False) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "moshi_fast's CUDA kernels, registered as torch.ops.moshi_fast.* when this module is imported";
}
