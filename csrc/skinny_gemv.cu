// The torch op moshi_fast::gemv_bf16 (schema in bindings.cpp): argument checks, device and stream, launch of the
// weight-streaming GEMV (with its optional RMSNorm and SiLU gate) in skinny_gemv_kernel.cuh.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "skinny_gemv_kernel.cuh"

namespace moshi_fast {
namespace {

void check_matrix(const at::Tensor& tensor, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(tensor.device() == x.device(), "gemv_bf16: ", name, " must be on x's device ", x.device(),
                    ", got ", tensor.device());
  TORCH_CHECK_TYPE(tensor.scalar_type() == at::kBFloat16, "gemv_bf16: ", name, " must be bfloat16, got ",
                   tensor.scalar_type());
  TORCH_CHECK_VALUE(tensor.dim() == 2, "gemv_bf16: ", name, " must be 2-D, got shape ", tensor.sizes());
  TORCH_CHECK_VALUE(tensor.is_contiguous(), "gemv_bf16: ", name, " must be contiguous, got strides ",
                    tensor.strides());
}

void check_aligned(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_VALUE(reinterpret_cast<std::uintptr_t>(tensor.const_data_ptr()) % 16 == 0, "gemv_bf16: ", name,
                    " must start 16-byte aligned (it is read in 16-byte pieces); a view at an odd offset is not");
}

void check_output_shape(const at::Tensor& tensor, const char* name, int64_t rows, int64_t n) {
  TORCH_CHECK_VALUE(tensor.size(0) == rows && tensor.size(1) == n, "gemv_bf16: ", name, " must have shape [",
                    rows, ", ", n, "], got ", tensor.sizes());
}

// out = act(norm(x) @ weight.T) (+ residual), see skinny_gemv_kernel.cuh: norm_weight given, x is RMSNormed with it
// and eps first (norm_after: its row scale applied after the product); gated, the weight holds the gate rows then the
// up rows and out = silu(gate) * up; early_residual: each thread requests its first residual element before the
// products (skinny_gemv_kernel.cuh). warps_per_block 0 takes the default split of each tile's K
// (skinny_gemv_default_warps); 1..16 forces one, for measuring.
// programmatic: launch with programmatic dependent launch (the caller checks that the device supports it).
void gemv_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
               at::Tensor& out, int64_t warps_per_block, const std::optional<at::Tensor>& norm_weight, double eps,
               bool gated, bool programmatic, bool norm_after, bool early_residual) {
  TORCH_CHECK_VALUE(x.is_cuda(), "gemv_bf16 runs on CUDA tensors; x is on ", x.device());
  check_matrix(x, "x", x);
  check_matrix(weight, "weight", x);
  check_matrix(out, "out", x);
  const int64_t rows = x.size(0);
  const int64_t k = x.size(1);
  TORCH_CHECK_VALUE(!gated || weight.size(0) % 2 == 0, "gemv_bf16: a gated weight has an even number of rows, got ",
                    weight.size(0));
  const int64_t n = gated ? weight.size(0) / 2 : weight.size(0);
  TORCH_CHECK_VALUE(rows >= 1 && rows <= kGemvMaxRows, "gemv_bf16: x must have 1 to ", kGemvMaxRows,
                    " rows, got ", rows);
  TORCH_CHECK_VALUE(weight.size(1) == k, "gemv_bf16: x ", x.sizes(), " and weight ", weight.sizes(),
                    " do not match along K");
  TORCH_CHECK_VALUE(k > 0 && k % 8 == 0, "gemv_bf16: K must be a positive multiple of 8, got ", k);
  TORCH_CHECK_VALUE(n >= 1, "gemv_bf16: weight must have at least one row");
  TORCH_CHECK_VALUE(2 * n <= std::numeric_limits<int>::max() - kGemvTileRows && k <= std::numeric_limits<int>::max(),
                    "gemv_bf16: N and K must fit 32-bit integers, got ", n, " and ", k);
  check_output_shape(out, "out", rows, n);
  check_aligned(x, "x");
  check_aligned(weight, "weight");
  // x and the weight are read through the non-coherent (read-only) cache path while out is written.
  TORCH_CHECK_VALUE(at::get_overlap_status(out, x) == at::MemOverlapStatus::No, "gemv_bf16: out overlaps x");
  TORCH_CHECK_VALUE(at::get_overlap_status(out, weight) == at::MemOverlapStatus::No,
                    "gemv_bf16: out overlaps weight");
  if (residual.has_value()) {
    check_matrix(*residual, "residual", x);
    check_output_shape(*residual, "residual", rows, n);
    const at::MemOverlapStatus overlap = at::get_overlap_status(*residual, out);
    TORCH_CHECK_VALUE(overlap == at::MemOverlapStatus::No || overlap == at::MemOverlapStatus::Full,
                      "gemv_bf16: residual overlaps out without being out itself");
  }
  if (norm_weight.has_value()) {
    const at::Tensor& w = *norm_weight;
    TORCH_CHECK_VALUE(w.device() == x.device(), "gemv_bf16: norm_weight must be on x's device");
    TORCH_CHECK_TYPE(w.scalar_type() == at::kBFloat16, "gemv_bf16: norm_weight must be bfloat16, got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == k && w.is_contiguous(), "gemv_bf16: norm_weight must be [K] = [",
                      k, "] contiguous, got ", w.sizes());
    check_aligned(w, "norm_weight");
    TORCH_CHECK_VALUE(at::get_overlap_status(out, w) == at::MemOverlapStatus::No, "gemv_bf16: out overlaps norm_weight");
  }
  TORCH_CHECK_VALUE(!norm_after || norm_weight.has_value(), "gemv_bf16: norm_after needs norm_weight");
  const int most_warps = gemv_max_warps(gemv_groups(static_cast<int>(rows)));
  TORCH_CHECK_VALUE(warps_per_block >= 0 && warps_per_block <= most_warps,
                    "gemv_bf16: warps_per_block must be 0 (the default) or 1 to ", most_warps, " at ", rows,
                    " rows, got ", warps_per_block);

  const c10::cuda::CUDAGuard device_guard(x.device());
  const int warps = warps_per_block > 0
                        ? static_cast<int>(warps_per_block)
                        : skinny_gemv_default_warps(static_cast<int>(k), static_cast<int>(rows));
  const SkinnyGemvArgs args{
      reinterpret_cast<const __nv_bfloat16*>(x.const_data_ptr()),
      reinterpret_cast<const __nv_bfloat16*>(weight.const_data_ptr()),
      residual.has_value() ? reinterpret_cast<const __nv_bfloat16*>(residual->const_data_ptr()) : nullptr,
      reinterpret_cast<__nv_bfloat16*>(out.mutable_data_ptr()),
      norm_weight.has_value() ? reinterpret_cast<const __nv_bfloat16*>(norm_weight->const_data_ptr()) : nullptr,
      static_cast<float>(eps),
      norm_after,
      gated,
      early_residual,
      static_cast<int>(rows),
      static_cast<int>(n),
      static_cast<int>(k),
  };
  C10_CUDA_CHECK(launch_skinny_gemv_bf16(args, warps, c10::cuda::getCurrentCUDAStream(), programmatic));
}

}  // namespace
}  // namespace moshi_fast

TORCH_LIBRARY_IMPL(moshi_fast, CUDA, m) {
  m.impl("gemv_bf16", &moshi_fast::gemv_bf16);
}
