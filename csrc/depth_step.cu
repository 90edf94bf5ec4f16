// The torch op moshi_fast::depth_step_bf16 (schema in bindings.cpp): argument checks, device and stream, launch of the
// persistent depth-transformer step in depth_step_kernel.cuh.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <optional>

#include "depth_step_kernel.cuh"

namespace moshi_fast {
namespace {

void check_on(const at::Tensor& tensor, const char* name, const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(tensor.device() == x.device(), "depth_step_bf16: ", name, " must be on x's device ", x.device(),
                    ", got ", tensor.device());
  TORCH_CHECK_TYPE(tensor.scalar_type() == dtype, "depth_step_bf16: ", name, " must be ", dtype, ", got ",
                   tensor.scalar_type());
}

void check_aligned(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_VALUE(reinterpret_cast<std::uintptr_t>(tensor.const_data_ptr()) % 16 == 0, "depth_step_bf16: ", name,
                    " must start 16-byte aligned (it is read in 16-byte pieces)");
}

// [layers, rows, cols] with contiguous rows (any layer stride, a multiple of 8 elements), 16-byte aligned.
void check_stacked(const at::Tensor& tensor, const char* name, const at::Tensor& x, int64_t layers, int64_t rows,
                   int64_t cols) {
  check_on(tensor, name, x, at::kBFloat16);
  TORCH_CHECK_VALUE(tensor.dim() == 3 && tensor.size(0) == layers && tensor.size(1) == rows && tensor.size(2) == cols,
                    "depth_step_bf16: ", name, " must be [", layers, ", ", rows, ", ", cols, "], got ", tensor.sizes());
  TORCH_CHECK_VALUE(tensor.stride(2) == 1 && tensor.stride(1) == cols && tensor.stride(0) % 8 == 0,
                    "depth_step_bf16: ", name, " must have contiguous rows and a layer stride that is a multiple of "
                    "8, got strides ", tensor.strides());
  check_aligned(tensor, name);
}

// One entry per device: the launch's block count (depth_step_blocks sets the kernel's shared-memory attribute too).
int launch_blocks(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::array<int, 64> blocks{};
  TORCH_CHECK_VALUE(device >= 0 && device < static_cast<c10::DeviceIndex>(blocks.size()),
                    "depth_step_bf16: device index ", device, " out of range");
  const std::lock_guard<std::mutex> lock(mutex);
  if (blocks[device] == 0) {
    int count = 0;
    C10_CUDA_CHECK(depth_step_blocks(device, &count));
    TORCH_CHECK(count > 0, "depth_step_bf16: the kernel's ", depth_step_shared_bytes(),
                " bytes of shared memory do not fit one SM of this device");
    blocks[device] = count;
  }
  return blocks[device];
}

// One codebook step of the depth transformer (see depth_step_kernel.cuh and kernels/depth_step.py's depth_step_ref
// for the semantics): x [B, D] updated in place, logits_out [B, card] written, the caches' column `step` written.
void depth_step_bf16(at::Tensor& x, const at::Tensor& previous, const at::Tensor& embed_table,
                     const at::Tensor& embed_row_offset, const at::Tensor& norm1, const at::Tensor& qkv,
                     const at::Tensor& out_proj, const at::Tensor& norm2, const at::Tensor& gate_up,
                     const at::Tensor& down, const at::Tensor& head, at::Tensor& k_cache, at::Tensor& v_cache,
                     int64_t step, double eps, at::Tensor& logits_out, at::Tensor& qkv_scratch,
                     at::Tensor& hidden_scratch, at::Tensor& arrivals, const std::optional<at::Tensor>& trace,
                     int64_t stages, int64_t refills, bool programmatic) {
  TORCH_CHECK_VALUE(x.is_cuda(), "depth_step_bf16 runs on CUDA tensors; x is on ", x.device());
  check_on(x, "x", x, at::kBFloat16);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.stride(1) == 1 && x.stride(0) % 8 == 0,
                    "depth_step_bf16: x must be [B, D] with unit last stride and a row stride that is a multiple of "
                    "8, got ", x.sizes(), " strides ", x.strides());
  check_aligned(x, "x");
  const int64_t rows = x.size(0);
  const int64_t dim = x.size(1);
  TORCH_CHECK_VALUE(rows >= 1 && rows <= kGemvGroupRows, "depth_step_bf16: x must have 1 to ", kGemvGroupRows,
                    " rows, got ", rows);
  TORCH_CHECK_VALUE(dim % kDepthHeadDim == 0 && dim <= kDepthMaxDim, "depth_step_bf16: D must be a multiple of ",
                    kDepthHeadDim, " and at most ", kDepthMaxDim, ", got ", dim);
  const int64_t layers = norm1.size(0);
  TORCH_CHECK_VALUE(norm1.dim() == 2 && norm2.dim() == 2 && norm1.sizes() == norm2.sizes() && norm1.size(1) == dim &&
                        norm1.stride(1) == 1 && norm1.strides() == norm2.strides() && norm1.stride(0) % 8 == 0,
                    "depth_step_bf16: norm1 and norm2 must be [L, D] with the same strides, contiguous rows and a "
                    "layer stride that is a multiple of 8, got ", norm1.sizes(), " and ", norm2.sizes());
  check_on(norm1, "norm1", x, at::kBFloat16);
  check_on(norm2, "norm2", x, at::kBFloat16);
  check_aligned(norm1, "norm1");
  check_aligned(norm2, "norm2");
  TORCH_CHECK_VALUE(layers >= 1, "depth_step_bf16: need at least one layer");
  TORCH_CHECK_VALUE(gate_up.dim() == 3 && gate_up.size(1) % 2 == 0, "depth_step_bf16: gate_up must be [L, 2 Hd, D], "
                    "got ", gate_up.sizes());
  const int64_t hidden = gate_up.size(1) / 2;
  TORCH_CHECK_VALUE(hidden % 8 == 0 && hidden <= kDepthMaxK, "depth_step_bf16: Hd must be a multiple of 8 and at "
                    "most ", kDepthMaxK, ", got ", hidden);
  check_stacked(qkv, "qkv", x, layers, 3 * dim, dim);
  check_stacked(out_proj, "out_proj", x, layers, dim, dim);
  check_stacked(gate_up, "gate_up", x, layers, 2 * hidden, dim);
  check_stacked(down, "down", x, layers, dim, hidden);
  check_on(head, "head", x, at::kBFloat16);
  TORCH_CHECK_VALUE(head.dim() == 2 && head.size(1) == dim && head.is_contiguous() && head.size(0) >= 1,
                    "depth_step_bf16: head must be [card, D] contiguous, got ", head.sizes());
  check_aligned(head, "head");
  const int64_t card = head.size(0);
  check_on(embed_table, "embed_table", x, at::kBFloat16);
  TORCH_CHECK_VALUE(embed_table.dim() == 2 && embed_table.size(1) == dim && embed_table.is_contiguous(),
                    "depth_step_bf16: embed_table must be [R, D] contiguous, got ", embed_table.sizes());
  check_aligned(embed_table, "embed_table");
  check_on(embed_row_offset, "embed_row_offset", x, at::kLong);
  TORCH_CHECK_VALUE(embed_row_offset.numel() == 1, "depth_step_bf16: embed_row_offset must hold one value");
  check_on(previous, "previous", x, at::kLong);
  TORCH_CHECK_VALUE(previous.dim() == 1 && previous.size(0) == rows && previous.is_contiguous(),
                    "depth_step_bf16: previous must be [B] contiguous, got ", previous.sizes());
  for (at::Tensor* cache : {&k_cache, &v_cache}) {
    check_on(*cache, "k_cache / v_cache", x, at::kBFloat16);
    TORCH_CHECK_VALUE(cache->dim() == 5 && cache->size(0) == layers && cache->size(1) == rows &&
                          cache->size(2) * kDepthHeadDim == dim && cache->size(4) == kDepthHeadDim &&
                          cache->is_contiguous(),
                      "depth_step_bf16: k_cache and v_cache must be [L, B, D / 64, S, 64] contiguous, got ",
                      cache->sizes());
  }
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "depth_step_bf16: k_cache and v_cache differ in shape");
  const int64_t steps = k_cache.size(3);
  TORCH_CHECK_VALUE(steps <= kDepthMaxSteps && step >= 0 && step < steps, "depth_step_bf16: need 0 <= step < S <= ",
                    kDepthMaxSteps, ", got step ", step, " and S ", steps);
  check_on(logits_out, "logits_out", x, at::kBFloat16);
  TORCH_CHECK_VALUE(logits_out.dim() == 2 && logits_out.size(0) == rows && logits_out.size(1) == card &&
                        logits_out.stride(1) == 1,
                    "depth_step_bf16: logits_out must be [B, card] with unit last stride, got ", logits_out.sizes());
  const std::array<std::pair<at::Tensor*, int64_t>, 2> scratches{{{&qkv_scratch, 3 * dim}, {&hidden_scratch, hidden}}};
  for (const auto& [scratch, width] : scratches) {
    check_on(*scratch, "scratch", x, at::kBFloat16);
    TORCH_CHECK_VALUE(scratch->dim() == 2 && scratch->size(0) == rows && scratch->size(1) == width &&
                          scratch->is_contiguous(),
                      "depth_step_bf16: a scratch tensor must be [", rows, ", ", width, "] contiguous, got ",
                      scratch->sizes());
    check_aligned(*scratch, "scratch");
  }
  TORCH_CHECK_VALUE(stages == 0 || (stages >= kDepthMinStages && stages <= kDepthMaxStages),
                    "depth_step_bf16: stages must be 0 (the default, ", kDepthDefaultStages, ") or ", kDepthMinStages,
                    " to ", kDepthMaxStages, ", got ", stages);
  check_on(arrivals, "arrivals", x, at::kLong);
  TORCH_CHECK_VALUE(arrivals.numel() == 1, "depth_step_bf16: arrivals must hold one int64");

  const c10::cuda::CUDAGuard device_guard(x.device());
  const int blocks = launch_blocks(x.device().index());
  if (trace.has_value()) {
    const int entries = depth_step_trace_slots(static_cast<int>(layers));
    check_on(*trace, "trace", x, at::kLong);
    TORCH_CHECK_VALUE(trace->dim() == 2 && trace->size(0) == blocks && trace->size(1) == entries &&
                          trace->is_contiguous(),
                      "depth_step_bf16: trace must be [", blocks, ", ", entries,
                      "] contiguous (blocks of the launch, entries of a block), got ", trace->sizes());
  }
  DepthStepArgs args{};
  args.x = reinterpret_cast<__nv_bfloat16*>(x.mutable_data_ptr());
  args.previous = previous.const_data_ptr<int64_t>();
  args.embed_table = reinterpret_cast<const __nv_bfloat16*>(embed_table.const_data_ptr());
  args.embed_row_offset = embed_row_offset.const_data_ptr<int64_t>();
  args.norm1 = reinterpret_cast<const __nv_bfloat16*>(norm1.const_data_ptr());
  args.norm2 = reinterpret_cast<const __nv_bfloat16*>(norm2.const_data_ptr());
  args.qkv = reinterpret_cast<const __nv_bfloat16*>(qkv.const_data_ptr());
  args.out_proj = reinterpret_cast<const __nv_bfloat16*>(out_proj.const_data_ptr());
  args.gate_up = reinterpret_cast<const __nv_bfloat16*>(gate_up.const_data_ptr());
  args.down = reinterpret_cast<const __nv_bfloat16*>(down.const_data_ptr());
  args.head = reinterpret_cast<const __nv_bfloat16*>(head.const_data_ptr());
  args.k_cache = reinterpret_cast<__nv_bfloat16*>(k_cache.mutable_data_ptr());
  args.v_cache = reinterpret_cast<__nv_bfloat16*>(v_cache.mutable_data_ptr());
  args.logits = reinterpret_cast<__nv_bfloat16*>(logits_out.mutable_data_ptr());
  args.qkv_scratch = reinterpret_cast<__nv_bfloat16*>(qkv_scratch.mutable_data_ptr());
  args.hidden_scratch = reinterpret_cast<__nv_bfloat16*>(hidden_scratch.mutable_data_ptr());
  args.arrivals = reinterpret_cast<unsigned long long*>(arrivals.mutable_data_ptr<int64_t>());
  args.trace = trace.has_value() ? reinterpret_cast<long long*>(trace->mutable_data_ptr<int64_t>()) : nullptr;
  args.x_stride = x.stride(0);
  args.norm_stride = norm1.stride(0);
  args.qkv_stride = qkv.stride(0);
  args.out_stride = out_proj.stride(0);
  args.gate_up_stride = gate_up.stride(0);
  args.down_stride = down.stride(0);
  args.logits_stride = logits_out.stride(0);
  args.eps = static_cast<float>(eps);
  args.rows = static_cast<int>(rows);
  args.dim = static_cast<int>(dim);
  args.hidden = static_cast<int>(hidden);
  args.heads = static_cast<int>(dim / kDepthHeadDim);
  args.steps = static_cast<int>(steps);
  args.step = static_cast<int>(step);
  args.layers = static_cast<int>(layers);
  args.card = static_cast<int>(card);
  args.stages = stages == 0 ? kDepthDefaultStages : static_cast<int>(stages);
  TORCH_CHECK_VALUE(refills >= kRefillAfterChunk && refills <= kRefillAfterInputs, "depth_step_bf16: refills must be ",
                    kRefillAfterChunk, " to ", kRefillAfterInputs, ", got ", refills);
  args.refills = static_cast<int>(refills);
  const int block_chunks = depth_step_max_block_chunks(args, blocks);
  TORCH_CHECK_VALUE(block_chunks <= kDepthMaxBlockChunks, "depth_step_bf16: these shapes give a block ", block_chunks,
                    " weight chunks a step on ", blocks, " blocks; the kernel holds at most ", kDepthMaxBlockChunks);
  C10_CUDA_CHECK(launch_depth_step_bf16(args, blocks, c10::cuda::getCurrentCUDAStream(), programmatic));
}

}  // namespace
}  // namespace moshi_fast

TORCH_LIBRARY_IMPL(moshi_fast, CUDA, m) {
  m.impl("depth_step_bf16", &moshi_fast::depth_step_bf16);
}
