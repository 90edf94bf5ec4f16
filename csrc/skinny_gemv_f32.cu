// The torch op moshi_fast::gemv_f32 (schema in bindings.cpp): argument checks, device and stream, launch of the fp32
// weight-streaming GEMV (with its optional LayerNorm and GELU) in skinny_gemv_f32_kernel.cuh. moshi_fast/cuda_ext.py
// makes the same checks first and raises Python errors; these stand for callers of the op itself.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "skinny_gemv_f32_kernel.cuh"

namespace moshi_fast {
namespace {

void check_operand(const at::Tensor& tensor, const char* name, const at::Tensor& x, int64_t dims) {
  TORCH_CHECK_VALUE(tensor.device() == x.device(), "gemv_f32: ", name, " must be on x's device ", x.device(),
                    ", got ", tensor.device());
  TORCH_CHECK_TYPE(tensor.scalar_type() == at::kFloat, "gemv_f32: ", name, " must be float32, got ",
                   tensor.scalar_type());
  TORCH_CHECK_VALUE(tensor.dim() == dims, "gemv_f32: ", name, " must be ", dims, "-D, got shape ", tensor.sizes());
  TORCH_CHECK_VALUE(tensor.is_contiguous(), "gemv_f32: ", name, " must be contiguous, got strides ",
                    tensor.strides());
}

void check_read_in_pieces(const at::Tensor& tensor, const char* name, const at::Tensor& out) {
  TORCH_CHECK_VALUE(reinterpret_cast<std::uintptr_t>(tensor.const_data_ptr()) % 16 == 0, "gemv_f32: ", name,
                    " must start 16-byte aligned (it is read in 16-byte pieces)");
  // Read through the non-coherent (read-only) cache path while out is written.
  TORCH_CHECK_VALUE(at::get_overlap_status(out, tensor) == at::MemOverlapStatus::No, "gemv_f32: out overlaps ",
                    name);
}

// out = act(norm(x) @ weight.T) (+ residual), see skinny_gemv_f32_kernel.cuh: norm_weight given, x is LayerNormed
// with it, norm_bias (optional) and eps first; gelu: the exact GELU before the residual. warps_per_block 0 takes the
// default split of each tile's K (skinny_gemv_f32_default_warps); 1..skinny_gemv_f32_max_warps(rows) forces one, for
// measuring.
// programmatic: launch with programmatic dependent launch (the caller checks that the device supports it).
void gemv_f32(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
              at::Tensor& out, int64_t warps_per_block, const std::optional<at::Tensor>& norm_weight,
              const std::optional<at::Tensor>& norm_bias, double eps, bool gelu, bool programmatic) {
  TORCH_CHECK_VALUE(x.is_cuda(), "gemv_f32 runs on CUDA tensors; x is on ", x.device());
  check_operand(x, "x", x, 2);
  check_operand(weight, "weight", x, 2);
  check_operand(out, "out", x, 2);
  const int64_t rows = x.size(0);
  const int64_t k = x.size(1);
  const int64_t n = weight.size(0);
  TORCH_CHECK_VALUE(rows >= 1 && rows <= kGemvF32MaxRows, "gemv_f32: x must have 1 to ", kGemvF32MaxRows,
                    " rows, got ", rows);
  TORCH_CHECK_VALUE(weight.size(1) == k, "gemv_f32: x ", x.sizes(), " and weight ", weight.sizes(),
                    " do not match along K");
  TORCH_CHECK_VALUE(k > 0 && k % 4 == 0, "gemv_f32: K must be a positive multiple of 4, got ", k);
  TORCH_CHECK_VALUE(n >= 1, "gemv_f32: weight must have at least one row");
  TORCH_CHECK_VALUE(n <= std::numeric_limits<int>::max() - kGemvF32TileRows && k <= std::numeric_limits<int>::max(),
                    "gemv_f32: N and K must fit 32-bit integers, got ", n, " and ", k);
  TORCH_CHECK_VALUE(out.size(0) == rows && out.size(1) == n, "gemv_f32: out must have shape [", rows, ", ", n,
                    "], got ", out.sizes());
  check_read_in_pieces(x, "x", out);
  check_read_in_pieces(weight, "weight", out);
  if (residual.has_value()) {
    check_operand(*residual, "residual", x, 2);
    TORCH_CHECK_VALUE(residual->size(0) == rows && residual->size(1) == n, "gemv_f32: residual must have shape [",
                      rows, ", ", n, "], got ", residual->sizes());
    const at::MemOverlapStatus overlap = at::get_overlap_status(*residual, out);
    TORCH_CHECK_VALUE(overlap == at::MemOverlapStatus::No || overlap == at::MemOverlapStatus::Full,
                      "gemv_f32: residual overlaps out without being out itself");
  }
  TORCH_CHECK_VALUE(norm_weight.has_value() || !norm_bias.has_value(), "gemv_f32: norm_bias needs norm_weight");
  for (const auto& [tensor, name] : {std::pair{&norm_weight, "norm_weight"}, std::pair{&norm_bias, "norm_bias"}}) {
    if (!tensor->has_value()) continue;
    check_operand(**tensor, name, x, 1);
    TORCH_CHECK_VALUE((*tensor)->size(0) == k, "gemv_f32: ", name, " must be [K] = [", k, "], got ",
                      (*tensor)->sizes());
    check_read_in_pieces(**tensor, name, out);
  }
  const int most_warps = skinny_gemv_f32_max_warps(static_cast<int>(rows));
  TORCH_CHECK_VALUE(warps_per_block >= 0 && warps_per_block <= most_warps,
                    "gemv_f32: warps_per_block must be 0 (the default) or 1 to ", most_warps, " at ", rows,
                    " rows, got ", warps_per_block);

  const c10::cuda::CUDAGuard device_guard(x.device());
  const int warps = warps_per_block > 0 ? static_cast<int>(warps_per_block)
                                        : skinny_gemv_f32_default_warps(static_cast<int>(k), static_cast<int>(rows));
  const SkinnyGemvF32Args args{
      x.const_data_ptr<float>(),
      weight.const_data_ptr<float>(),
      residual.has_value() ? residual->const_data_ptr<float>() : nullptr,
      out.mutable_data_ptr<float>(),
      norm_weight.has_value() ? norm_weight->const_data_ptr<float>() : nullptr,
      norm_bias.has_value() ? norm_bias->const_data_ptr<float>() : nullptr,
      static_cast<float>(eps),
      gelu,
      static_cast<int>(rows),
      static_cast<int>(n),
      static_cast<int>(k),
  };
  C10_CUDA_CHECK(launch_skinny_gemv_f32(args, warps, c10::cuda::getCurrentCUDAStream(), programmatic));
}

}  // namespace
}  // namespace moshi_fast

TORCH_LIBRARY_IMPL(moshi_fast, CUDA, m) {
  m.impl("gemv_f32", &moshi_fast::gemv_f32);
}
