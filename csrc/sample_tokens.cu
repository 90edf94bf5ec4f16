// The torch op moshi_fast::sample_tokens (schema in bindings.cpp): argument checks, device and stream, launch of the
// one-block-per-row sampling kernel in sample_tokens_kernel.cuh.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "sample_tokens_kernel.cuh"

namespace moshi_fast {
namespace {

void check_vector(const at::Tensor& tensor, const char* name, at::ScalarType dtype, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(tensor.device() == logits.device(), "sample_tokens: ", name, " must be on the logits' device ",
                    logits.device(), ", got ", tensor.device());
  TORCH_CHECK_TYPE(tensor.scalar_type() == dtype, "sample_tokens: ", name, " must be ", dtype, ", got ",
                   tensor.scalar_type());
  TORCH_CHECK_VALUE(tensor.dim() == 1 && tensor.size(0) == logits.size(0), "sample_tokens: ", name, " must be [",
                    logits.size(0), "], got ", tensor.sizes());
}

// out[b] = one token of logits[b] (see sample_tokens_kernel.cuh for the semantics); programmatic: launch with
// programmatic dependent launch (the caller checks that the device supports it).
void sample_tokens(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                   int64_t max_top_k, const at::Tensor& seed, const at::Tensor& counter, int64_t draw, at::Tensor& out,
                   bool programmatic, bool warp_kernel, bool vector_loads, bool radix_select) {
  TORCH_CHECK_VALUE(logits.is_cuda(), "sample_tokens runs on CUDA tensors; logits are on ", logits.device());
  TORCH_CHECK_VALUE(logits.dim() == 2, "sample_tokens: logits must be [B, V], got ", logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat,
                   "sample_tokens: logits must be bfloat16 or float32, got ", logits.scalar_type());
  const int64_t vocab = logits.size(1);
  TORCH_CHECK_VALUE(vocab > 0 && vocab < kSampleMaxVocab, "sample_tokens: need 0 < V < ", kSampleMaxVocab, ", got ",
                    vocab);
  TORCH_CHECK_VALUE(max_top_k >= 1, "sample_tokens: max_top_k must be >= 1, got ", max_top_k);
  const int64_t top_k_cap = max_top_k < vocab ? max_top_k : vocab;
  TORCH_CHECK_VALUE(top_k_cap <= kSampleMaxCandidates, "sample_tokens: min(max_top_k, V) must be at most ",
                    kSampleMaxCandidates, ", got ", top_k_cap);
  TORCH_CHECK_VALUE(draw >= 0 && draw < (int64_t{1} << 31), "sample_tokens: draw must be in [0, 2**31), got ", draw);
  TORCH_CHECK_VALUE(logits.size(0) <= (int64_t{1} << 31) - 1, "sample_tokens: too many rows");
  check_vector(temperature, "temperature", at::kFloat, logits);
  check_vector(top_k, "top_k", at::kLong, logits);
  check_vector(seed, "seed", at::kLong, logits);
  check_vector(counter, "counter", at::kLong, logits);
  check_vector(out, "out", at::kLong, logits);

  const c10::cuda::CUDAGuard device_guard(logits.device());
  const SampleTokensArgs args{
      logits.const_data_ptr(),
      logits.stride(0),
      logits.stride(1),
      temperature.const_data_ptr<float>(),
      top_k.const_data_ptr<int64_t>(),
      seed.const_data_ptr<int64_t>(),
      counter.const_data_ptr<int64_t>(),
      out.mutable_data_ptr<int64_t>(),
      temperature.stride(0),
      top_k.stride(0),
      seed.stride(0),
      counter.stride(0),
      out.stride(0),
      static_cast<int>(logits.size(0)),
      static_cast<int>(vocab),
      static_cast<int>(top_k_cap),
      static_cast<int>(draw),
      logits.scalar_type() == at::kBFloat16,
      vector_loads && logits.stride(1) == 1 &&
          (logits.stride(0) * static_cast<int64_t>(logits.element_size())) % 16 == 0 &&
          reinterpret_cast<std::uintptr_t>(logits.const_data_ptr()) % 16 == 0,
      warp_kernel,
      radix_select,
  };
  C10_CUDA_CHECK(launch_sample_tokens(args, c10::cuda::getCurrentCUDAStream(), programmatic));
}

}  // namespace
}  // namespace moshi_fast

TORCH_LIBRARY_IMPL(moshi_fast, CUDA, m) {
  m.impl("sample_tokens", &moshi_fast::sample_tokens);
}
