// fp32 weight-streaming GEMV for the codec's transformer layers: out[M, N] = act(norm(x)[M, K] @ weight[N, K]^T)
// (+ residual[M, N]), M = 1..16, fp32 in and out, exact fp32 products on the CUDA cores (no TF32). Device code and a
// launcher on raw pointers and a stream, free of torch (the torch op, with its argument checks, is
// skinny_gemv_f32.cu).
//
// Shapes served: Mimi's transformer layers at one to eight conversations (M = 2 steps a conversation, K = 512 or
// 2048): qkv 512 -> 1536 and fc1 512 -> 2048 after their LayerNorm, the attention output 512 -> 512 and fc2
// 2048 -> 512 with the residual (their layer scale folded into the weight), fc1 with the exact GELU.
//
// Fusions (each a template instance):
//   norm:  x is replaced by (x - mean) * rsqrt(var + eps) * norm_weight + norm_bias row by row (the LayerNorm of
//          F.layer_norm: biased variance, fp32), computed in registers as x is loaded, never stored. Every block
//          computes the M rows' mean and variance itself, two passes over x from L2 (2 KB a row at K = 512), while
//          its weight loads are in flight.
//   gelu:  out = gelu(sum) with the exact (erf) GELU, before the residual.
//
// Floor: the weight, 4 N K bytes, is read once; x, out and the residual are noise beside it. Mimi's qkv 3.1 MB, out
// 1.0 MB, fc1 4.2 MB, fc2 4.2 MB: 0.7 to 1.4 us at 3-4 TB/s, where launch and round-trip latency dominate. That is
// what this kernel is for: each warp's whole share of the weight is requested before the wait for the previous
// kernel (with a programmatic dependent launch), so that after the wait only x's round trip to L2, the products and
// one block reduction remain; the Triton product (kernels/skinny_linear.py) streams the weight in chunks after its
// wait and runs the LayerNorm in a launch of its own.
//
// Work split: a block owns 8 consecutive weight rows (a tile) over all of K; lane (g = lane / 4, t = lane % 4) of a
// warp holds row g, and the four lanes of a row read its 128-element K steps in 16-byte pieces (piece u of lane t at K
// offset 16 u + 4 t: the four lanes read 64 contiguous bytes per load, 512 over the step). The warps take the tile's K
// steps round robin (up to 16 warps: K = 2048 in one step a warp; 8 at 16 rows), so a block holds up to 16 x 4 KB of
// weight in flight. Each lane keeps one fp32 sum per x row (over its pieces, in K order), the four lanes of a row add
// theirs by two butterfly shuffles, and the block adds its warps' sums in warp order (deterministic, no workspace, no
// atomics). The grid is one block per tile (64 to 256 at Mimi's shapes).

#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "programmatic_launch.cuh"

namespace moshi_fast {

// Weight rows a block owns: one per group of four lanes.
constexpr int kGemvF32TileRows = 8;
// 16-byte loads a lane issues per K step: 8 pieces of 4 floats, 128 K elements over a row's four lanes.
constexpr int kGemvF32LoadsPerStep = 8;
constexpr int kGemvF32StepK = 4 * 4 * kGemvF32LoadsPerStep;
constexpr int kGemvF32MaxWarps = 16;
constexpr int kGemvF32MaxRows = 16;

// Warps a block of this many x rows may split K across: 16 up to 8 rows, else 8, whose 256 threads may take the 136
// to 190 registers the 16-row instances use without spilling (512 threads cap a thread at 128: they spilled).
__host__ __device__ constexpr int skinny_gemv_f32_max_warps(int rows) {
  return rows <= 8 ? kGemvF32MaxWarps : kGemvF32MaxWarps / 2;
}

struct SkinnyGemvF32Args {
  const float* x;            // [rows, k] contiguous, 16-byte aligned
  const float* weight;       // [n, k] contiguous, 16-byte aligned
  const float* residual;     // [rows, n] contiguous, or null; may be out itself
  float* out;                // [rows, n] contiguous; overlaps neither x nor the weight
  const float* norm_weight;  // [k] contiguous, 16-byte aligned: LayerNorm x first; or null
  const float* norm_bias;    // [k] contiguous, 16-byte aligned, or null (with norm_weight only)
  float eps;                 // the LayerNorm's epsilon
  bool gelu;                 // out = gelu(sum) (+ residual)
  int rows;                  // 1..kGemvF32MaxRows
  int n;                     // output columns, at most INT_MAX - kGemvF32TileRows: indices stay 32-bit
  int k;                     // a positive multiple of 4: every row starts 16-byte aligned
};

// Warps a block splits its tile's K across by default: one a K step, at most skinny_gemv_f32_max_warps(rows).
inline int skinny_gemv_f32_default_warps(int k, int rows) {
  const int steps = (k + kGemvF32StepK - 1) / kGemvF32StepK;
  const int most = skinny_gemv_f32_max_warps(rows);
  return steps < most ? steps : most;
}

// The x-row instances: the fewest of 2, 4, 8, 16 covering `rows`.
inline int skinny_gemv_f32_row_instance(int rows) {
  int instance = 2;
  while (instance < rows) instance *= 2;
  return instance;
}

namespace f32_detail {

// The weight is read once: it bypasses L1, and the first request of a step asks L2 for the row's whole 256-byte
// block of the step.
__device__ __forceinline__ float4 load_weight(const float* address) {
  float4 value;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.f32 {%0, %1, %2, %3}, [%4];"
      : "=f"(value.x), "=f"(value.y), "=f"(value.z), "=f"(value.w)
      : "l"(address));
  return value;
}

// x, and the norm's weight and bias: every warp of an SM reads the same pieces, through L1.
__device__ __forceinline__ float4 load_shared_operand(const float* address) {
  return __ldg(reinterpret_cast<const float4*>(address));
}

// Pieces past K (the last step, when K is not a multiple of kGemvF32StepK) are zero in both operands; K being a
// multiple of 4, no piece straddles the end.
__device__ __forceinline__ bool piece_inside(int k0, int u, int lane_k, int k) { return k0 + 16 * u + lane_k < k; }

__device__ __forceinline__ void load_weight_step(float4 (&pieces)[kGemvF32LoadsPerStep], const float* row, int k0,
                                                 int lane_k, int k) {
  const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int u = 0; u < kGemvF32LoadsPerStep; ++u)
    pieces[u] = piece_inside(k0, u, lane_k, k) ? load_weight(row + k0 + 16 * u) : zero;
}

__device__ __forceinline__ float4 load_piece(const float* row, int k0, int u, int lane_k, int k) {
  return piece_inside(k0, u, lane_k, k) ? load_shared_operand(row + k0 + 16 * u) : make_float4(0.f, 0.f, 0.f, 0.f);
}

// (x - mean) * rstd * weight + bias for 4 elements, in F.layer_norm's order of operations.
__device__ __forceinline__ float4 layer_norm_piece(float4 x, float mean, float rstd, float4 weight, float4 bias) {
  return make_float4((x.x - mean) * rstd * weight.x + bias.x, (x.y - mean) * rstd * weight.y + bias.y,
                     (x.z - mean) * rstd * weight.z + bias.z, (x.w - mean) * rstd * weight.w + bias.w);
}

__device__ __forceinline__ float dot_piece(float acc, float4 w, float4 x) {
  acc = fmaf(w.x, x.x, acc);
  acc = fmaf(w.y, x.y, acc);
  acc = fmaf(w.z, x.z, acc);
  return fmaf(w.w, x.w, acc);
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// mean[m] and rstd[m] = rsqrt(var + eps) of each x row (biased variance), a warp a row (rows round robin over the
// warps): a pass for the mean, a second for the squared deviations from it (as exact as the two-pass formula; the
// row is in L1 by then).
__device__ __forceinline__ void layer_norm_statistics(const SkinnyGemvF32Args& args, float* means, float* rstds,
                                                      int warp, int warps, int lane) {
  for (int m = warp; m < args.rows; m += warps) {
    const float* row = args.x + static_cast<int64_t>(m) * args.k;
    float sum = 0.f;
    for (int i = 4 * lane; i < args.k; i += 4 * 32) {
      const float4 v = load_shared_operand(row + i);
      sum += (v.x + v.y) + (v.z + v.w);
    }
    const float mean = warp_sum(sum) / static_cast<float>(args.k);
    float squares = 0.f;
    for (int i = 4 * lane; i < args.k; i += 4 * 32) {
      const float4 v = load_shared_operand(row + i);
      const float4 d = make_float4(v.x - mean, v.y - mean, v.z - mean, v.w - mean);
      squares += (d.x * d.x + d.y * d.y) + (d.z * d.z + d.w * d.w);
    }
    const float variance = warp_sum(squares) / static_cast<float>(args.k);
    if (lane == 0) {
      means[m] = mean;
      rstds[m] = rsqrtf(variance + args.eps);
    }
  }
}

template <bool kNorm, int kRows>
__global__ void __launch_bounds__(skinny_gemv_f32_max_warps(kRows) * 32)
    skinny_gemv_f32_kernel(SkinnyGemvF32Args args) {
  static_assert(kRows >= 2 && kRows <= kGemvF32MaxRows && (kRows & (kRows - 1)) == 0,
                "x rows: a power of two from 2 to kGemvF32MaxRows");
  __shared__ float warp_sums[kGemvF32MaxWarps][kRows][kGemvF32TileRows];
  __shared__ float row_means[kRows];
  __shared__ float row_rstds[kRows];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  const int group = lane / 4;
  const int lane_k = 4 * (lane % 4);
  const int tile_row = blockIdx.x * kGemvF32TileRows;

  // Rows past N, and x rows past M, read the last valid row instead: their sums are never stored, and the loop
  // needs no predicates.
  const float* weight_row = args.weight + static_cast<int64_t>(min(tile_row + group, args.n - 1)) * args.k + lane_k;
  const float* x_lane = args.x + lane_k;

  const int steps = (args.k + kGemvF32StepK - 1) / kGemvF32StepK;
  float4 weight[kGemvF32LoadsPerStep];
  // The first step's weight is requested before the wait: no kernel of a frame writes weights, so it can be in
  // flight while the previous kernel finishes (with a programmatic dependent launch) and while the block computes
  // the LayerNorm's statistics. At Mimi's shapes that is each warp's whole share.
  if (warp < steps) load_weight_step(weight, weight_row, warp * kGemvF32StepK, lane_k, args.k);
  await_previous_kernel();

  float means[kRows], rstds[kRows];
  if constexpr (kNorm) {
    layer_norm_statistics(args, row_means, row_rstds, warp, warps, lane);
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      means[m] = row_means[min(m, args.rows - 1)];
      rstds[m] = row_rstds[min(m, args.rows - 1)];
    }
  }
  const float* norm_weight = kNorm ? args.norm_weight + lane_k : nullptr;
  const float* norm_bias = kNorm && args.norm_bias != nullptr ? args.norm_bias + lane_k : nullptr;

  float acc[kRows];
#pragma unroll
  for (int m = 0; m < kRows; ++m) acc[m] = 0.f;
  for (int step = warp; step < steps; step += warps) {
    const int k0 = step * kGemvF32StepK;
    if (step != warp) load_weight_step(weight, weight_row, k0, lane_k, args.k);
#pragma unroll
    for (int u = 0; u < kGemvF32LoadsPerStep; ++u) {
      float4 gamma = make_float4(0.f, 0.f, 0.f, 0.f), beta = gamma;
      if constexpr (kNorm) {
        gamma = load_piece(norm_weight, k0, u, lane_k, args.k);
        if (norm_bias != nullptr) beta = load_piece(norm_bias, k0, u, lane_k, args.k);
      }
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        float4 x = load_piece(x_lane + static_cast<int64_t>(min(m, args.rows - 1)) * args.k, k0, u, lane_k, args.k);
        // Past K both pieces are zero, and so is the product, whatever the norm makes of x.
        if constexpr (kNorm) x = layer_norm_piece(x, means[m], rstds[m], gamma, beta);
        acc[m] = dot_piece(acc[m], weight[u], x);
      }
    }
  }

  // The four lanes of a row hold its sums over their K offsets: after two butterfly steps each holds the total,
  // and lane t stores the x rows m = t mod 4.
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
    float sum = acc[m];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (m % 4 == lane % 4) warp_sums[warp][m][group] = sum;
  }
  __syncthreads();

  // Thread e finishes out[m = e / 8, tile_row + e % 8].
  for (int e = threadIdx.x; e < kRows * kGemvF32TileRows; e += blockDim.x) {
    const int m = e / kGemvF32TileRows;
    const int column = tile_row + e % kGemvF32TileRows;
    if (m >= args.rows || column >= args.n) continue;
    float sum = 0.f;
    for (int w = 0; w < warps; ++w) sum += warp_sums[w][m][e % kGemvF32TileRows];
    if (args.gelu) sum = 0.5f * sum * (1.f + erff(sum * 0.70710678118654752f));
    // One thread reads and writes each element, so the residual may be out itself.
    const int64_t index = static_cast<int64_t>(m) * args.n + column;
    if (args.residual != nullptr) sum += args.residual[index];
    args.out[index] = sum;
  }
}

template <bool kNorm>
cudaError_t launch_rows(const SkinnyGemvF32Args& args, int warps, cudaStream_t stream, bool programmatic) {
  const dim3 grid((args.n + kGemvF32TileRows - 1) / kGemvF32TileRows);
  const dim3 block(warps * 32);
  switch (skinny_gemv_f32_row_instance(args.rows)) {
    case 2:
      return launch_kernel(skinny_gemv_f32_kernel<kNorm, 2>, grid, block, stream, programmatic, args);
    case 4:
      return launch_kernel(skinny_gemv_f32_kernel<kNorm, 4>, grid, block, stream, programmatic, args);
    case 8:
      return launch_kernel(skinny_gemv_f32_kernel<kNorm, 8>, grid, block, stream, programmatic, args);
    default:
      return launch_kernel(skinny_gemv_f32_kernel<kNorm, 16>, grid, block, stream, programmatic, args);
  }
}

}  // namespace f32_detail

// Launches on `stream` (no allocation, no synchronisation: graph-capturable); rows in 1..kGemvF32MaxRows, warps in
// 1..skinny_gemv_f32_max_warps(rows). programmatic: a programmatic dependent launch (Hopper and later), which the
// kernel's await_previous_kernel makes safe after any kernel.
inline cudaError_t launch_skinny_gemv_f32(const SkinnyGemvF32Args& args, int warps, cudaStream_t stream,
                                          bool programmatic) {
  return args.norm_weight != nullptr ? f32_detail::launch_rows<true>(args, warps, stream, programmatic)
                                     : f32_detail::launch_rows<false>(args, warps, stream, programmatic);
}

}  // namespace moshi_fast
