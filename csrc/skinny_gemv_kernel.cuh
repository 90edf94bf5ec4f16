// Weight-streaming GEMV for decode: out[M, N] = x[M, K] @ weight[N, K]^T (+ residual[M, N]), M = 1..64, bf16 in
// and out, fp32 accumulation, rounded once; optionally with the language model's RMSNorm of x fused before the
// product and its SiLU gate after it. Device code and a launcher on raw pointers and a stream, free of torch (the
// torch op, with its argument checks, is skinny_gemv.cu).
//
// Fusions (each a template instance):
//   norm:  x is replaced by bf16(x * (norm_weight * rsqrt(eps + mean(x^2)))) row by row, the RMSNorm of the
//          reference (fp32 math, rounded to bf16 before the product, as skinny_linear does). Every block computes
//          the M row scales itself from x (M K bf16, read from L2: 2 KB a block at the depth transformer's K = 1024
//          and M = 1), while its first weight loads are in flight; the normalised x is made in registers as it is
//          loaded, never stored.
//   norm, scaled after the product (norm_after): the same RMSNorm with its row scale moved past the sum,
//          out = rsqrt(eps + mean(x^2)) * (bf16(x * norm_weight) @ W^T), the scale applied in fp32 before the gate
//          and the residual. The warps sum x's squares from the pieces they load for the product anyway, and the
//          block adds those partials up with its product partials: nothing runs before the first product (no pass
//          over x, no block barrier), which is what a fused norm costs every wave of blocks. The same function as
//          the norm above with another rounding: x * norm_weight is rounded to bf16 instead of x * norm_weight *
//          scale (one rounding either way).
//   gated: the weight is [2N, K], gate rows then up rows, and out = silu(x W[:N]^T) * (x W[N:]^T) (the SiLU-gated
//          FFN input). A block's 16 A-operand rows are 8 gate rows and the 8 matching up rows, so every lane holds
//          the gate and up sums of the same outputs and the gate is applied in the epilogue.
//
// Shapes served: the language model's decode linears at batch <= 8. Helium K = 4096 -> N = 12288 (qkv), 4096
// (attention out), 22528 (gate_up), 32000 (text head); K = 11264 -> 4096 (down). Depth transformer K = 1024 ->
// 3072, 1024, 5632; K = 2816 -> 1024, also at batch 9..32 (column groups, below; the kernel takes up to 64 rows,
// and ops.CUDA_GEMV_MANY_ROWS keeps 64 on the Triton product, which was faster there in the frame's graph).
//
// Floor: the weight, 2 N K bytes, is read once; x (2 M K), out (2 M N) and the residual (2 M N) are noise beside
// it at M <= 8. Helium's qkv 100.7 MB, attention out 33.6 MB, gate_up 184.5 MB, down 92.3 MB, text head 262 MB:
// at the H200's measured 4.23 TB/s copy bandwidth 23.8, 7.9, 43.6, 21.8 and 62.0 us. The depth transformer's
// 6.3, 2.1, 11.5 and 5.8 MB: 1.5, 0.5, 2.7 and 1.4 us, where launch latency dominates.
//
// Why it can beat a Triton tile here: the weight goes from global memory straight into the tensor cores' operand
// registers, with no shared-memory staging, no pipeline barriers and no layout conversions, so a warp spends
// about two dozen instructions per 4 KB of weight: twelve 16-byte loads a lane, then eight mma.sync.
//
// Work split: a block owns 16 consecutive weight rows (a tile; gated: 8 gate rows and their 8 up rows) over all of
// K; its warps take the tile's K steps (128 elements, 256 bytes of each row) round robin, so a block streams 16
// rows x 256 bytes per warp at a time, and sums its warps' fp32 partials in shared memory in warp order
// (deterministic, no workspace, no atomics). The grid is one block per tile (64 to 2816 at the model's shapes),
// started by the hardware as SMs free up; up to 16 warps split a tile's K (skinny_gemv_default_warps).
//
// Programmatic dependent launch (Hopper): launched with it, a block requests its first step's weight, then waits for
// the previous kernel on the stream (griddepcontrol.wait) before it reads x, so that its launch and its first weight
// round trip overlap the previous kernel's tail; it then lets the next kernel's blocks start. With early_residual the
// residual is requested right after that wait, with x, so that its round trip overlaps the products instead of
// following the block's reduction (on an H100 0.05 ms of the one-conversation frame, 0.04 ms at eight).
//
// Products: mma.m16n8k16 with the weight as the 16 x 16 A operand (16 rows x 16 of K) and x as the 16 x 8 B
// operand (16 of K x 8 rows of x; columns >= M repeat row M - 1 and are not stored). See load_weight_step for how
// whole 16-byte loads fill both.
//
// Column groups (M > 8): x's rows go in groups of 8, group j being the B operand of rows 8 j .. 8 j + 7, and a
// warp multiplies each K step's weight, loaded into registers once, with every group in turn (one accumulator a
// group), so the weight is still streamed once. Each block then reads all of x (M K bf16) through L1: at the depth
// transformer's K (1024, 2816) and M = 64 that is 128 and 360 KB, shared by the blocks of an SM, against 32 and 90
// KB of weight a block. Helium's K = 4096 and 11264 would make x's traffic dwarf the weight's: not served.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "programmatic_launch.cuh"

namespace moshi_fast {

// Weight rows a block owns: the A operand's 16 rows.
constexpr int kGemvTileRows = 16;
// Rows of x in a column group: the B operand's 8 columns.
constexpr int kGemvGroupRows = 8;
// Column groups at most, and so rows of x at most.
constexpr int kGemvMaxGroups = 8;
constexpr int kGemvMaxRows = kGemvGroupRows * kGemvMaxGroups;
// 16-byte loads a lane issues per weight row (and of x) before its first product of a step: with 16 rows a warp,
// 4 KB of weight in flight per warp.
constexpr int kGemvLoadsPerRow = 4;
// K elements a warp multiplies per step: 4 lanes per row x 8 bf16 per load x the loads per row.
constexpr int kGemvStepK = 4 * 8 * kGemvLoadsPerRow;
// Warps a block may split its tile's K across (the shared-memory partials are sized for it).
constexpr int kGemvMaxWarps = 16;

// Warps a block of this many column groups may split K across: 16 up to 2 groups, else 8, whose 256 threads may
// take the up to 178 registers the 4- and 8-group instances use without spilling (512 threads cap a thread at 128),
// and whose partials [groups][warps][32] float4 stay within 32 KB of static shared memory.
__host__ __device__ constexpr int gemv_max_warps(int groups) { return groups <= 2 ? kGemvMaxWarps : kGemvMaxWarps / 2; }

// How an instance applies the RMSNorm of x (a template argument): not at all, before the product (x normalised as
// the reference rounds it) or after it (norm_after: x * norm_weight multiplied, the row scale applied to the sums).
enum GemvNorm : int { kGemvNoNorm, kGemvNormBefore, kGemvNormAfter };

// Column groups of a launch: the fewest powers of two covering `rows` (each a template instance).
inline int gemv_groups(int rows) {
  int groups = 1;
  while (groups * kGemvGroupRows < rows) groups *= 2;
  return groups;
}

struct SkinnyGemvArgs {
  const __nv_bfloat16* x;            // [rows, k] contiguous, 16-byte aligned
  const __nv_bfloat16* weight;       // [n, k] contiguous, 16-byte aligned ([2 n, k] when gated)
  const __nv_bfloat16* residual;     // [rows, n] contiguous, or null; may be out itself
  __nv_bfloat16* out;                // [rows, n] contiguous; overlaps neither x nor the weight
  const __nv_bfloat16* norm_weight;  // [k] contiguous, 16-byte aligned: RMSNorm x first; or null
  float eps;                         // the RMSNorm's epsilon
  bool norm_after;                   // with norm_weight: the row scale applied after the product (see above)
  bool gated;                        // out = silu(gate) * up of the weight's two halves
  bool early_residual;               // each thread requests its first residual element before the products
  int rows;                          // 1..kGemvMaxRows
  int n;                             // output columns, at most (INT_MAX - kGemvTileRows) / 2: indices stay 32-bit
  int k;                             // a positive multiple of 8: every row starts 16-byte aligned
};

namespace detail {

// The weight is read once: it bypasses L1, which then keeps x for every warp of the SM, and the first request of
// a step asks L2 for the whole 256-byte block of the row that the step covers.
__device__ __forceinline__ uint4 load_weight(const __nv_bfloat16* address) {
  uint4 value;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(value.x), "=r"(value.y), "=r"(value.z), "=r"(value.w)
      : "l"(address));
  return value;
}

__device__ __forceinline__ uint4 load_x(const __nv_bfloat16* address) {
  return __ldg(reinterpret_cast<const uint4*>(address));
}

// acc[16 x 8] += a[16 x 16] b[16 x 8] in fp32; the bf16 products are exact in fp32.
__device__ __forceinline__ void mma_16x8x16(float (&acc)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

struct StepOperands {
  uint4 weight_lo[kGemvLoadsPerRow];  // the lane's weight row g of the tile
  uint4 weight_hi[kGemvLoadsPerRow];  // its row g + 8
  uint4 x[kGemvLoadsPerRow];          // its row g of x
};

// Lane (g = lane / 4, t = lane % 4) loads, for u < kGemvLoadsPerRow, the 8 elements at K offset k0 + 32 u + 8 t of
// its rows: the four lanes of a row read 64 contiguous bytes per load, 256 over the step. The sum over K may run
// in any order that A and B agree on. The mma's fragments give lane (g, t) the K slots {2t, 2t + 1} (one 32-bit
// register) and {2t + 8, 2t + 9} (another) of A's rows g and g + 8 and of B's column g: words 0 and 1 of each
// 16-byte load fill those slots for one mma and words 2 and 3 for a second, identically in A and B, so the loads
// feed the tensor cores as they arrive, without shuffles or shared memory.
//
// A step past the end of K (the last one, when K is not a multiple of kGemvStepK) loads only the 16-byte pieces
// inside K and zeroes both operands elsewhere; K being a multiple of 8, no piece straddles the end.
__device__ __forceinline__ bool piece_inside(int k0, int u, int lane_k, int k) { return k0 + 32 * u + lane_k < k; }

__device__ __forceinline__ void load_weight_step(StepOperands& operands, const __nv_bfloat16* weight_lo,
                                                 const __nv_bfloat16* weight_hi, int k0, int lane_k, int k) {
  if (k0 + kGemvStepK <= k) {
#pragma unroll
    for (int u = 0; u < kGemvLoadsPerRow; ++u) {
      operands.weight_lo[u] = load_weight(weight_lo + k0 + 32 * u);
      operands.weight_hi[u] = load_weight(weight_hi + k0 + 32 * u);
    }
    return;
  }
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int u = 0; u < kGemvLoadsPerRow; ++u) {
    const bool inside = piece_inside(k0, u, lane_k, k);
    operands.weight_lo[u] = inside ? load_weight(weight_lo + k0 + 32 * u) : zero;
    operands.weight_hi[u] = inside ? load_weight(weight_hi + k0 + 32 * u) : zero;
  }
}

// The step's x pieces (the kernels without the norm); pieces past K are zero.
__device__ __forceinline__ void load_x_step(StepOperands& operands, const __nv_bfloat16* x, int k0, int lane_k,
                                            int k) {
  if (k0 + kGemvStepK <= k) {
#pragma unroll
    for (int u = 0; u < kGemvLoadsPerRow; ++u) operands.x[u] = load_x(x + k0 + 32 * u);
    return;
  }
#pragma unroll
  for (int u = 0; u < kGemvLoadsPerRow; ++u)
    operands.x[u] = piece_inside(k0, u, lane_k, k) ? load_x(x + k0 + 32 * u) : make_uint4(0, 0, 0, 0);
}

// bf16(x * (norm_weight * scale)) for 8 elements: the reference's RMSNorm, in its order of fp32 products (no
// sum is involved, so fast-math contraction cannot change it). kScaleAfter (the norm scaled after the product):
// bf16(x * norm_weight) instead, x's squares added to *square_sum in fp32 (pieces past K are zero and add nothing).
template <bool kScaleAfter = false>
__device__ __forceinline__ uint4 normalize_piece(uint4 x, uint4 norm_weight, float scale, float* square_sum = nullptr) {
  uint4 result;
  const __nv_bfloat162* xs = reinterpret_cast<const __nv_bfloat162*>(&x);
  const __nv_bfloat162* ws = reinterpret_cast<const __nv_bfloat162*>(&norm_weight);
  __nv_bfloat162* rs = reinterpret_cast<__nv_bfloat162*>(&result);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 xf = __bfloat1622float2(xs[j]);
    const float2 wf = __bfloat1622float2(ws[j]);
    if constexpr (kScaleAfter) {
      *square_sum += xf.x * xf.x + xf.y * xf.y;
      rs[j] = __floats2bfloat162_rn(xf.x * wf.x, xf.y * wf.y);
    } else {
      rs[j] = __floats2bfloat162_rn(xf.x * (wf.x * scale), xf.y * (wf.y * scale));
    }
  }
  return result;
}

// The step's x pieces and the norm weight's at the same K, loaded together, then x normalised in registers;
// pieces past K are zero in both (one column group).
__device__ __forceinline__ void load_normalized_x_step(StepOperands& operands, const __nv_bfloat16* x,
                                                       const __nv_bfloat16* norm_weight, float scale, int k0,
                                                       int lane_k, int k) {
  uint4 weights[kGemvLoadsPerRow];
  if (k0 + kGemvStepK <= k) {
#pragma unroll
    for (int u = 0; u < kGemvLoadsPerRow; ++u) {
      operands.x[u] = load_x(x + k0 + 32 * u);
      weights[u] = load_x(norm_weight + k0 + 32 * u);
    }
  } else {
    const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < kGemvLoadsPerRow; ++u) {
      const bool inside = piece_inside(k0, u, lane_k, k);
      operands.x[u] = inside ? load_x(x + k0 + 32 * u) : zero;
      weights[u] = inside ? load_x(norm_weight + k0 + 32 * u) : zero;
    }
  }
#pragma unroll
  for (int u = 0; u < kGemvLoadsPerRow; ++u) operands.x[u] = normalize_piece(operands.x[u], weights[u], scale);
}

// The step's norm weight pieces (at the same K as x's), loaded once for every column group; pieces past K are
// zero.
__device__ __forceinline__ void load_norm_weight_step(uint4 (&pieces)[kGemvLoadsPerRow],
                                                      const __nv_bfloat16* norm_weight, int k0, int lane_k, int k) {
  if (k0 + kGemvStepK <= k) {
#pragma unroll
    for (int u = 0; u < kGemvLoadsPerRow; ++u) pieces[u] = load_x(norm_weight + k0 + 32 * u);
    return;
  }
#pragma unroll
  for (int u = 0; u < kGemvLoadsPerRow; ++u)
    pieces[u] = piece_inside(k0, u, lane_k, k) ? load_x(norm_weight + k0 + 32 * u) : make_uint4(0, 0, 0, 0);
}

// The step's x pieces normalised in registers with the norm weight's pieces at the same K and the row's scale;
// pieces past K are zero in both, and stay zero.
__device__ __forceinline__ void normalize_x_step(StepOperands& operands,
                                                 const uint4 (&norm_pieces)[kGemvLoadsPerRow], float scale) {
#pragma unroll
  for (int u = 0; u < kGemvLoadsPerRow; ++u) operands.x[u] = normalize_piece(operands.x[u], norm_pieces[u], scale);
}

// The step's x pieces weighed by the norm weight's pieces at the same K, their squares added to square_sum (the
// norm scaled after the product).
__device__ __forceinline__ void weigh_x_step(StepOperands& operands, const uint4 (&norm_pieces)[kGemvLoadsPerRow],
                                             float& square_sum) {
#pragma unroll
  for (int u = 0; u < kGemvLoadsPerRow; ++u)
    operands.x[u] = normalize_piece<true>(operands.x[u], norm_pieces[u], 1.f, &square_sum);
}

// rsqrt(eps + mean(x^2)) of x row `row` of a column group from the warps' partial sums of its squares
// [warps][kGemvGroupRows], added in warp order (deterministic).
__device__ __forceinline__ float row_scale_from_partials(const float (*square_partials)[kGemvGroupRows], int warps,
                                                        int row, int k, float eps) {
  float sum = 0.f;
  for (int w = 0; w < warps; ++w) sum += square_partials[w][row];
  return rsqrtf(eps + sum / static_cast<float>(k));
}

// rsqrt(eps + mean(x^2)) of each x row into scales[rows], a warp a row (rows round robin over the warps), fp32.
__device__ __forceinline__ void row_rms_scales(const SkinnyGemvArgs& args, float* scales, int warp, int warps,
                                               int lane) {
  for (int m = warp; m < args.rows; m += warps) {
    const __nv_bfloat16* row = args.x + static_cast<int64_t>(m) * args.k;
    // kScaleLoads 16-byte pieces a lane in flight at once: one round trip to L2 for K <= 2048, two for 4096.
    constexpr int kScaleLoads = 8;
    float sum = 0.f;
    for (int base = 8 * lane; base < args.k; base += 8 * 32 * kScaleLoads) {
      uint4 pieces[kScaleLoads];
#pragma unroll
      for (int b = 0; b < kScaleLoads; ++b) {
        const int i = base + 8 * 32 * b;
        pieces[b] = i < args.k ? load_x(row + i) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int b = 0; b < kScaleLoads; ++b) {
        const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&pieces[b]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = __bfloat1622float2(pairs[j]);
          sum += f.x * f.x + f.y * f.y;
        }
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) scales[m] = rsqrtf(args.eps + sum / static_cast<float>(args.k));
  }
}

__device__ __forceinline__ void multiply_step(float (&acc)[4], const StepOperands& operands) {
#pragma unroll
  for (int u = 0; u < kGemvLoadsPerRow; ++u) {
    const uint4& lo = operands.weight_lo[u];
    const uint4& hi = operands.weight_hi[u];
    const uint4& x = operands.x[u];
    mma_16x8x16(acc, lo.x, hi.x, lo.y, hi.y, x.x, x.y);
    mma_16x8x16(acc, lo.z, hi.z, lo.w, hi.w, x.z, x.w);
  }
}

// A tile's element (x row m, column_in_tile) summed over the warps' fp32 partials [warps][32] in warp order
// (deterministic): .x the product, .y (gated) its up row's. The accumulator element i of lane (g, t) holds weight
// row g + 8 (i / 2) of the tile (the gate row g for i < 2 and its up row for i >= 2, gated) and x row 2 t + i % 2.
__device__ __forceinline__ float2 tile_element_sums(const float4 (*partials)[32], int warps, int m, int column_in_tile,
                                                   bool gated) {
  const int source_lane = 4 * (column_in_tile % 8) + m / 2;
  const int source_element = 2 * (column_in_tile / 8) + m % 2;
  float2 sums = make_float2(0.f, 0.f);
  for (int w = 0; w < warps; ++w) {
    const float* partial = reinterpret_cast<const float*>(&partials[w][source_lane]);
    sums.x += partial[source_element];
    if (gated) sums.y += partial[source_element + 2];
  }
  return sums;
}

template <int kNorm, bool kGated, int kGroups>
__global__ void __launch_bounds__(gemv_max_warps(kGroups) * 32) skinny_gemv_bf16_kernel(SkinnyGemvArgs args) {
  static_assert(kGroups >= 1 && kGroups <= kGemvMaxGroups && (kGroups & (kGroups - 1)) == 0,
                "column groups: a power of two up to kGemvMaxGroups");
  // Output columns a block owns: its 16 weight rows, or (gated) their 8 gate-and-up pairs.
  constexpr int kTileColumns = kGated ? kGemvTileRows / 2 : kGemvTileRows;
  constexpr int kWarpsMax = gemv_max_warps(kGroups);
  __shared__ float4 warp_partials[kGroups][kWarpsMax][32];
  __shared__ float row_scales[kGroups * kGemvGroupRows];
  // Norm after the product: each warp's sums of its x pieces' squares, a row of each column group at a time.
  __shared__ float square_partials[kGroups][kNorm == kGemvNormAfter ? kWarpsMax : 1][kGemvGroupRows];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  const int group = lane / 4;
  const int lane_k = 8 * (lane % 4);
  const int tile_column = blockIdx.x * kTileColumns;

  // Rows past N, and x rows past M, read the last valid row instead: their products land only in accumulator
  // rows and columns that are never stored, and the loop needs no predicates.
  int64_t row_lo, row_hi;
  if constexpr (kGated) {
    row_lo = min(tile_column + group, args.n - 1);
    row_hi = row_lo + args.n;
  } else {
    row_lo = min(tile_column + group, args.n - 1);
    row_hi = min(tile_column + group + 8, args.n - 1);
  }
  // The lane's x row in column group j is row 8 j + group of x, x_row[j]; its pieces start at x_lane[j].
  int x_row[kGroups];
  const __nv_bfloat16* x_lane[kGroups];
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    x_row[j] = min(kGemvGroupRows * j + group, args.rows - 1);
    x_lane[j] = args.x + static_cast<int64_t>(x_row[j]) * args.k + lane_k;
  }
  const __nv_bfloat16* weight_lo = args.weight + row_lo * args.k + lane_k;
  const __nv_bfloat16* weight_hi = args.weight + row_hi * args.k + lane_k;
  const __nv_bfloat16* norm_weight = kNorm != kGemvNoNorm ? args.norm_weight + lane_k : nullptr;

  float acc[kGroups][4];
  float square_sums[kGroups];
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    square_sums[j] = 0.f;
  }
  const int steps = (args.k + kGemvStepK - 1) / kGemvStepK;
  StepOperands operands;
  // The first step's weight is requested before the wait: no kernel of a step writes weights, so it can be in flight
  // while the previous kernel finishes (with a programmatic dependent launch) and, with the norm, while the block
  // computes the row scales.
  if (warp < steps) load_weight_step(operands, weight_lo, weight_hi, warp * kGemvStepK, lane_k, args.k);
  await_previous_kernel();
  // early_residual: the residual element a thread adds first (its e = threadIdx.x in the epilogue below) is requested
  // now, so that its round trip to L2 overlaps the products instead of following the block's reduction. A block with
  // at least as many threads as its tile has elements (up to 8 rows x 16 columns: 128, as every default split at the
  // model's shapes) requests all of them now.
  const int first_row = threadIdx.x / kTileColumns;
  const int first_column = tile_column + threadIdx.x % kTileColumns;
  const bool first_in_range = first_row < args.rows && first_column < args.n;
  float first_residual = 0.f;
  if (args.early_residual && args.residual != nullptr && first_in_range)
    first_residual = __bfloat162float(args.residual[static_cast<int64_t>(first_row) * args.n + first_column]);
  float scales[kGroups];
#pragma unroll
  for (int j = 0; j < kGroups; ++j) scales[j] = 1.f;
  if constexpr (kNorm == kGemvNormBefore) {
    row_rms_scales(args, row_scales, warp, warps, lane);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kGroups; ++j) scales[j] = row_scales[x_row[j]];
  }
  for (int step = warp; step < steps; step += warps) {
    const int k0 = step * kGemvStepK;
    if (step != warp) load_weight_step(operands, weight_lo, weight_hi, k0, lane_k, args.k);
    if constexpr (kNorm == kGemvNormBefore && kGroups == 1) {
      load_normalized_x_step(operands, x_lane[0], norm_weight, scales[0], k0, lane_k, args.k);
      multiply_step(acc[0], operands);
    } else {
      uint4 norm_pieces[kGemvLoadsPerRow];
      if constexpr (kNorm != kGemvNoNorm) load_norm_weight_step(norm_pieces, norm_weight, k0, lane_k, args.k);
#pragma unroll
      for (int j = 0; j < kGroups; ++j) {
        load_x_step(operands, x_lane[j], k0, lane_k, args.k);
        if constexpr (kNorm == kGemvNormBefore) normalize_x_step(operands, norm_pieces, scales[j]);
        if constexpr (kNorm == kGemvNormAfter) weigh_x_step(operands, norm_pieces, square_sums[j]);
        multiply_step(acc[j], operands);
      }
    }
  }

#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    warp_partials[j][warp][lane] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
    if constexpr (kNorm == kGemvNormAfter) {
      // The four lanes of a group hold the same x row at the step's four K offsets.
      float sum = square_sums[j];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      if (lane % 4 == 0) square_partials[j][warp][group] = sum;
    }
  }
  __syncthreads();

  // Thread e finishes out[m = e / kTileColumns, tile_column + e % kTileColumns]: consecutive threads write
  // consecutive columns.
  for (int e = threadIdx.x; e < kGroups * kGemvGroupRows * kTileColumns; e += blockDim.x) {
    const int m = e / kTileColumns;
    const int column_in_tile = e % kTileColumns;
    const int column = tile_column + column_in_tile;
    if (m >= args.rows || column >= args.n) continue;
    const int column_group = kGroups == 1 ? 0 : m / kGemvGroupRows;
    float2 sums = tile_element_sums(warp_partials[column_group], warps, m % kGemvGroupRows, column_in_tile, kGated);
    if constexpr (kNorm == kGemvNormAfter) {
      const float scale =
          row_scale_from_partials(square_partials[column_group], warps, m % kGemvGroupRows, args.k, args.eps);
      sums.x *= scale;
      sums.y *= scale;
    }
    float sum = sums.x;
    if constexpr (kGated) sum = sum / (1.f + __expf(-sum)) * sums.y;
    // One thread reads and writes each element, so the residual may be out itself.
    const int64_t index = static_cast<int64_t>(m) * args.n + column;
    if (args.residual != nullptr)
      sum += args.early_residual && e == threadIdx.x ? first_residual : __bfloat162float(args.residual[index]);
    args.out[index] = __float2bfloat16_rn(sum);
  }
}

// Blocks in the grid: one per tile of output columns.
inline unsigned skinny_gemv_tiles(int n, bool gated) {
  const int columns = gated ? kGemvTileRows / 2 : kGemvTileRows;
  return static_cast<unsigned>((n + columns - 1) / columns);
}

}  // namespace detail

// Warps a block splits its tile's K across: one a K step, up to gemv_max_warps of its column groups. Timed with every
// call's weight cold in L2 (H100, M = 1, bench/results/2026-12-06_H100_f32632b_gemv_warps_cold.json), this was the
// fastest split or within 4% of it at every shape the LM runs here; at Helium's FFN output (88 steps, 256 tiles) 16
// warps took 31.6 us against 36.6 us for 8, although 8 fit three blocks an SM in one wave and 16 take two waves of one
// block an SM: what counts is the weight in flight per SM. Past 16 rows (4 and 8 column groups) the cap is 8 warps,
// untimed against other splits.
inline int skinny_gemv_default_warps(int k, int rows = 1) {
  const int steps = (k + kGemvStepK - 1) / kGemvStepK;
  const int most = gemv_max_warps(gemv_groups(rows));
  return steps < most ? steps : most;
}

namespace detail {

template <int kNorm, bool kGated, int kGroups>
cudaError_t launch_instance(const SkinnyGemvArgs& args, int warps, cudaStream_t stream, bool programmatic) {
  return launch_kernel(skinny_gemv_bf16_kernel<kNorm, kGated, kGroups>, dim3(skinny_gemv_tiles(args.n, args.gated)),
                       dim3(warps * 32), stream, programmatic, args);
}

template <int kNorm, bool kGated>
cudaError_t launch_groups(const SkinnyGemvArgs& args, int warps, cudaStream_t stream, bool programmatic) {
  switch (gemv_groups(args.rows)) {
    case 1:
      return launch_instance<kNorm, kGated, 1>(args, warps, stream, programmatic);
    case 2:
      return launch_instance<kNorm, kGated, 2>(args, warps, stream, programmatic);
    case 4:
      return launch_instance<kNorm, kGated, 4>(args, warps, stream, programmatic);
    default:
      return launch_instance<kNorm, kGated, 8>(args, warps, stream, programmatic);
  }
}

template <int kNorm>
cudaError_t launch_norm(const SkinnyGemvArgs& args, int warps, cudaStream_t stream, bool programmatic) {
  return args.gated ? launch_groups<kNorm, true>(args, warps, stream, programmatic)
                    : launch_groups<kNorm, false>(args, warps, stream, programmatic);
}

}  // namespace detail

// Launches on `stream` (no allocation, no synchronisation: graph-capturable); rows in 1..kGemvMaxRows, warps in
// 1..gemv_max_warps(gemv_groups(rows)).
// programmatic: a programmatic dependent launch (Hopper and later), which the kernel's await_previous_kernel makes
// safe after any kernel.
inline cudaError_t launch_skinny_gemv_bf16(const SkinnyGemvArgs& args, int warps, cudaStream_t stream,
                                           bool programmatic) {
  if (args.norm_weight == nullptr) return detail::launch_norm<kGemvNoNorm>(args, warps, stream, programmatic);
  if (args.norm_after) return detail::launch_norm<kGemvNormAfter>(args, warps, stream, programmatic);
  return detail::launch_norm<kGemvNormBefore>(args, warps, stream, programmatic);
}

}  // namespace moshi_fast
