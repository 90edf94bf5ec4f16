// The torch ops moshi_fast::mimi_transformer_f32 and moshi_fast::mimi_transformer_max_clusters (schemas in
// bindings.cpp): argument checks, device and stream, and the cluster launch of mimi_transformer_kernel.cuh.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "mimi_transformer_kernel.cuh"

namespace moshi_fast {
namespace {

void check_parameter(const at::Tensor& tensor, const char* name, int64_t layer, at::IntArrayRef shape,
                     const at::Tensor& x) {
  TORCH_CHECK_VALUE(tensor.device() == x.device(), "mimi_transformer_f32: ", name, "[", layer,
                    "] must be on x's device ", x.device(), ", got ", tensor.device());
  TORCH_CHECK_TYPE(tensor.scalar_type() == at::kFloat, "mimi_transformer_f32: ", name, "[", layer,
                   "] must be float32, got ", tensor.scalar_type());
  TORCH_CHECK_VALUE(tensor.sizes() == shape && tensor.is_contiguous(), "mimi_transformer_f32: ", name, "[", layer,
                    "] must be contiguous of shape ", shape, ", got ", tensor.sizes(), " with strides ",
                    tensor.strides());
  // Bulk copies read 16-byte aligned sources.
  TORCH_CHECK_VALUE(reinterpret_cast<std::uintptr_t>(tensor.const_data_ptr()) % 16 == 0, "mimi_transformer_f32: ",
                    name, "[", layer, "] must start 16-byte aligned");
}

// x [1, 2, 512] fp32, updated in place through every layer (see mimi_transformer_kernel.cuh); frame int32 [>= 1],
// its first entry the slot's frame counter; the lists hold one tensor a layer, the rings [1, 8, R, 64] (R <= 256).
void mimi_transformer_f32(at::Tensor& x, const at::Tensor& frame, at::TensorList norm1_weight,
                          at::TensorList norm1_bias, at::TensorList qkv, at::TensorList out_proj,
                          at::TensorList norm2_weight, at::TensorList norm2_bias, at::TensorList fc1,
                          at::TensorList fc2, at::TensorList ring_k, at::TensorList ring_v, double eps,
                          double max_period, bool programmatic) {
  TORCH_CHECK_VALUE(x.is_cuda(), "mimi_transformer_f32 runs on CUDA tensors; x is on ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "mimi_transformer_f32: x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) == 1 && x.size(1) == kMimiSteps && x.size(2) == kMimiWidth &&
                        x.is_contiguous(),
                    "mimi_transformer_f32: x must be contiguous [1, ", kMimiSteps, ", ", kMimiWidth, "], got ",
                    x.sizes());
  TORCH_CHECK_VALUE(reinterpret_cast<std::uintptr_t>(x.const_data_ptr()) % 16 == 0,
                    "mimi_transformer_f32: x must start 16-byte aligned");
  TORCH_CHECK_VALUE(frame.device() == x.device(), "mimi_transformer_f32: frame must be on x's device");
  TORCH_CHECK_TYPE(frame.scalar_type() == at::kInt, "mimi_transformer_f32: frame must be int32, got ",
                   frame.scalar_type());
  TORCH_CHECK_VALUE(frame.dim() == 1 && frame.size(0) >= 1, "mimi_transformer_f32: frame must be [B >= 1], got ",
                    frame.sizes());
  const int64_t layers = static_cast<int64_t>(qkv.size());
  TORCH_CHECK_VALUE(layers >= 1 && layers <= kMimiMaxLayers, "mimi_transformer_f32: 1 to ", kMimiMaxLayers,
                    " layers, got ", layers);
  for (const at::TensorList list : {norm1_weight, norm1_bias, out_proj, norm2_weight, norm2_bias, fc1, fc2, ring_k,
                                    ring_v}) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(list.size()) == layers,
                      "mimi_transformer_f32: every list must hold one tensor a layer (", layers, ")");
  }
  TORCH_CHECK_VALUE(ring_k[0].dim() == 4, "mimi_transformer_f32: ring_k[0] must be [1, ", kMimiHeads, ", R, ",
                    kMimiHeadDim, "], got ", ring_k[0].sizes());
  const int64_t context = ring_k[0].size(2);
  TORCH_CHECK_VALUE(context >= kMimiSteps && context <= kMimiMaxContext, "mimi_transformer_f32: the rings' capacity "
                    "must be ", kMimiSteps, " to ", kMimiMaxContext, ", got ", context);
  TORCH_CHECK_VALUE(max_period > 0, "mimi_transformer_f32: max_period must be positive, got ", max_period);

  MimiTransformerArgs args{};
  for (int64_t i = 0; i < layers; ++i) {
    check_parameter(norm1_weight[i], "norm1_weight", i, {kMimiWidth}, x);
    check_parameter(norm1_bias[i], "norm1_bias", i, {kMimiWidth}, x);
    check_parameter(qkv[i], "qkv", i, {3 * kMimiWidth, kMimiWidth}, x);
    check_parameter(out_proj[i], "out_proj", i, {kMimiWidth, kMimiWidth}, x);
    check_parameter(norm2_weight[i], "norm2_weight", i, {kMimiWidth}, x);
    check_parameter(norm2_bias[i], "norm2_bias", i, {kMimiWidth}, x);
    check_parameter(fc1[i], "fc1", i, {kMimiFfn, kMimiWidth}, x);
    check_parameter(fc2[i], "fc2", i, {kMimiWidth, kMimiFfn}, x);
    check_parameter(ring_k[i], "ring_k", i, {1, kMimiHeads, context, kMimiHeadDim}, x);
    check_parameter(ring_v[i], "ring_v", i, {1, kMimiHeads, context, kMimiHeadDim}, x);
    args.layer[i] = MimiLayerWeights{
        norm1_weight[i].const_data_ptr<float>(), norm1_bias[i].const_data_ptr<float>(),
        qkv[i].const_data_ptr<float>(),          out_proj[i].const_data_ptr<float>(),
        norm2_weight[i].const_data_ptr<float>(), norm2_bias[i].const_data_ptr<float>(),
        fc1[i].const_data_ptr<float>(),          fc2[i].const_data_ptr<float>(),
        ring_k[i].mutable_data_ptr<float>(),     ring_v[i].mutable_data_ptr<float>(),
    };
  }
  args.x = x.mutable_data_ptr<float>();
  args.frame = frame.const_data_ptr<int>();
  args.layers = static_cast<int>(layers);
  args.context = static_cast<int>(context);
  args.eps = static_cast<float>(eps);
  args.rope_step = static_cast<float>(-std::log(max_period) * 2.0 / kMimiHeadDim);

  const c10::cuda::CUDAGuard device_guard(x.device());
  C10_CUDA_CHECK(launch_mimi_transformer_f32(args, c10::cuda::getCurrentCUDAStream(), programmatic));
}

// On x's device.
int64_t mimi_transformer_max_clusters(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "mimi_transformer_max_clusters: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int clusters = mimi_transformer_cluster_capacity();
  // A failed query leaves an error behind; the answer 0 says enough.
  (void)cudaGetLastError();
  return clusters;
}

}  // namespace
}  // namespace moshi_fast

TORCH_LIBRARY_IMPL(moshi_fast, CUDA, m) {
  m.impl("mimi_transformer_f32", &moshi_fast::mimi_transformer_f32);
  m.impl("mimi_transformer_max_clusters", &moshi_fast::mimi_transformer_max_clusters);
}
