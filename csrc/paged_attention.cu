// The torch op moshi_fast::paged_attention_bf16 (schema in bindings.cpp): argument checks, device and stream, launch
// of the decode attention in paged_attention_kernel.cuh.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "paged_attention_kernel.cuh"

namespace moshi_fast {
namespace {

bool aligned16(const at::Tensor& tensor) { return reinterpret_cast<std::uintptr_t>(tensor.const_data_ptr()) % 16 == 0; }

void check_on(const at::Tensor& tensor, const char* name, at::ScalarType dtype, const at::Tensor& qkv) {
  TORCH_CHECK_VALUE(tensor.device() == qkv.device(), "paged_attention: ", name, " must be on qkv's device ",
                    qkv.device(), ", got ", tensor.device());
  TORCH_CHECK_TYPE(tensor.scalar_type() == dtype, "paged_attention: ", name, " must be ", dtype, ", got ",
                   tensor.scalar_type());
}

// The new token of each running slot: RoPE, its key and value written into their page, and its attention over the
// slot's live window (paged_attention_kernel.cuh). partials / counters: the split workspace (read only when
// splits > 1); programmatic: launch with programmatic dependent launch (the caller checks the device supports it);
// reads_before_wait: with it, the window's first reads go out before the wait (PagedAttentionArgs; only where the
// previous kernel writes none of the cache, mask, positions or page table and starts this one after its own wait).
void paged_attention_bf16(const at::Tensor& qkv, at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& page_table,
                          const at::Tensor& positions, const at::Tensor& exec_mask, int64_t context, double max_period,
                          at::Tensor& out, at::Tensor& partials, at::Tensor& counters, int64_t splits,
                          bool programmatic, bool reads_before_wait) {
  TORCH_CHECK_VALUE(qkv.is_cuda(), "paged_attention runs on CUDA tensors; qkv is on ", qkv.device());
  TORCH_CHECK_TYPE(qkv.scalar_type() == at::kBFloat16, "paged_attention: qkv must be bfloat16, got ",
                   qkv.scalar_type());
  TORCH_CHECK_VALUE(k_pool.dim() == 4 && k_pool.size(3) == kPagedHeadDim,
                    "paged_attention: k_pool must be [P, H, PAGE, ", kPagedHeadDim, "], got ", k_pool.sizes());
  const int64_t heads = k_pool.size(1);
  const int64_t page_size = k_pool.size(2);
  const int64_t batch = qkv.size(0);
  TORCH_CHECK_VALUE(qkv.dim() == 2 && qkv.size(1) == 3 * heads * kPagedHeadDim && qkv.stride(1) == 1,
                    "paged_attention: qkv must be [B, ", 3 * heads * kPagedHeadDim,
                    "] with unit stride in its last dim, got ", qkv.sizes());
  TORCH_CHECK_VALUE(aligned16(qkv) && qkv.stride(0) % 8 == 0, "paged_attention: qkv's rows must be 16-byte aligned");
  check_on(k_pool, "k_pool", at::kBFloat16, qkv);
  check_on(v_pool, "v_pool", at::kBFloat16, qkv);
  TORCH_CHECK_VALUE(v_pool.sizes() == k_pool.sizes() && v_pool.strides() == k_pool.strides(),
                    "paged_attention: k_pool and v_pool must share a shape and layout");
  TORCH_CHECK_VALUE(k_pool.stride(3) == 1 && k_pool.stride(0) % 8 == 0 && k_pool.stride(1) % 8 == 0 &&
                        k_pool.stride(2) % 8 == 0 && aligned16(k_pool) && aligned16(v_pool),
                    "paged_attention: the pools' rows must be 16-byte aligned with unit stride in the head dim");
  TORCH_CHECK_VALUE(page_size > 0 && (page_size & (page_size - 1)) == 0,
                    "paged_attention: the page size must be a power of two, got ", page_size);
  check_on(page_table, "page_table", at::kInt, qkv);
  TORCH_CHECK_VALUE(page_table.dim() == 2 && page_table.stride(1) == 1,
                    "paged_attention: page_table must be [S, N] with unit stride in its last dim");
  const int64_t pages_per_slot = page_table.size(1);
  TORCH_CHECK_VALUE(context > 0 && context < (int64_t{1} << 30) && pages_per_slot * page_size >= context,
                    "paged_attention: a ring of ", pages_per_slot, " pages of ", page_size,
                    " cannot hold a window of ", context);
  TORCH_CHECK_VALUE(positions.device() == qkv.device() &&
                        (positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong),
                    "paged_attention: positions must be int32 or int64 on qkv's device");
  check_on(exec_mask, "exec_mask", at::kBool, qkv);
  TORCH_CHECK_VALUE(positions.dim() == 1 && positions.stride(0) == 1 && exec_mask.dim() == 1 &&
                        exec_mask.stride(0) == 1,
                    "paged_attention: positions and exec_mask must be contiguous vectors");
  TORCH_CHECK_VALUE(page_table.size(0) >= batch && positions.size(0) >= batch && exec_mask.size(0) >= batch,
                    "paged_attention: page_table, positions and exec_mask must cover the ", batch, " slots of qkv");
  check_on(out, "out", at::kBFloat16, qkv);
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == batch && out.size(1) == heads * kPagedHeadDim &&
                        out.stride(1) == 1,
                    "paged_attention: out must be [", batch, ", ", heads * kPagedHeadDim,
                    "] with unit stride in its last dim, got ", out.sizes());
  TORCH_CHECK_VALUE(splits >= 1 && splits <= kPagedMaxSplits, "paged_attention: splits must be in 1..",
                    kPagedMaxSplits, ", got ", splits);
  TORCH_CHECK_VALUE(batch * heads < 65536, "paged_attention: at most 65535 (slot, head) pairs, got ", batch * heads);
  const int page_shift = static_cast<int>(std::log2(static_cast<double>(page_size)));
  TORCH_CHECK_VALUE(paged_attention_run_pages(static_cast<int>(context), static_cast<int>(splits), page_shift) <=
                        kPagedMaxRunPages,
                    "paged_attention: a run of the window spans more than ", kPagedMaxRunPages,
                    " pages; use more splits or larger pages");
  if (splits > 1) {
    check_on(partials, "the workspace's partials", at::kFloat, qkv);
    check_on(counters, "the workspace's counters", at::kInt, qkv);
    TORCH_CHECK_VALUE(partials.is_contiguous() && counters.is_contiguous() &&
                          partials.numel() >= batch * heads * splits * (kPagedHeadDim + 2) &&
                          counters.numel() >= batch * heads,
                      "paged_attention: the split workspace needs ", batch * heads * splits * (kPagedHeadDim + 2),
                      " partial floats and ", batch * heads, " counters");
  }
  if (batch == 0) return;

  const c10::cuda::CUDAGuard device_guard(qkv.device());
  const PagedAttentionArgs args{
      reinterpret_cast<const __nv_bfloat16*>(qkv.const_data_ptr()),
      reinterpret_cast<__nv_bfloat16*>(k_pool.mutable_data_ptr()),
      reinterpret_cast<__nv_bfloat16*>(v_pool.mutable_data_ptr()),
      page_table.const_data_ptr<int32_t>(),
      positions.const_data_ptr(),
      exec_mask.const_data_ptr<bool>(),
      reinterpret_cast<__nv_bfloat16*>(out.mutable_data_ptr()),
      splits > 1 ? partials.mutable_data_ptr<float>() : nullptr,
      splits > 1 ? counters.mutable_data_ptr<int32_t>() : nullptr,
      qkv.stride(0),
      out.stride(0),
      page_table.stride(0),
      k_pool.stride(0),
      k_pool.stride(1),
      k_pool.stride(2),
      static_cast<int>(batch),
      static_cast<int>(heads),
      static_cast<int>(context),
      page_shift,
      static_cast<int>(pages_per_slot),
      static_cast<int>(splits),
      positions.scalar_type() == at::kLong,
      programmatic && reads_before_wait,
      static_cast<float>(-std::log(max_period) * 2.0 / kPagedHeadDim),
      static_cast<float>(1.0 / std::sqrt(static_cast<double>(kPagedHeadDim)) / std::log(2.0)),
  };
  C10_CUDA_CHECK(launch_paged_attention_bf16(args, c10::cuda::getCurrentCUDAStream(), programmatic));
}

}  // namespace
}  // namespace moshi_fast

TORCH_LIBRARY_IMPL(moshi_fast, CUDA, m) {
  m.impl("paged_attention_bf16", &moshi_fast::paged_attention_bf16);
}
