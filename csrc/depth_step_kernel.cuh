// One codebook step of the depth transformer in one persistent launch, bf16, batch <= 8: the previous token's
// embedding, L layers (RMSNorm -> qkv -> attention over this frame's steps -> out + residual -> RMSNorm -> gate_up
// -> SiLU gate -> down + residual) and the step's head. Device code and a launcher on raw pointers and a stream, free
// of torch (the torch op, with its argument checks, is depth_step.cu). The spec is kernels/depth_step.py's
// depth_step_ref, the unfused op sequence; the semantics (rounding points, fp32 math) are those of the Triton
// kernel in that file, and the module doc there gives the operands' shapes.
//
// Why a second implementation: at batch 1 the unfused step is 32 launches of 2-12 MB each, each paying its launch
// and a DRAM round trip before its first product (about 130 us a step against a 37 us byte floor on an H200); the
// Triton persistent kernel saves the launches but waits out every memory latency after each of its 26 grid
// barriers (about 10 us a phase). Here the weights, which no phase writes, stream into shared memory ahead of the
// math, across the barriers: a block's loads of the next phases' weights are in flight while it computes, waits
// at a barrier, or has no tile in a phase, so that each block streams its share of the step's weights without
// pause, and the critical path is the barriers plus small computations on data already on chip.
//
// Work split. The grid is one block per SM (all resident at once: the barriers spin). Every product phase
// (qkv, out, gate_up, down of each layer, then the head) cuts its weight into tiles of 16 rows (gated: 8 gate rows
// and their 8 up rows) over all of K, and each tile into chunks of up to kDepthChunkK elements of K. Tiles go
// round robin to the blocks, each phase starting at the block after the previous phase's last tile, so that the
// blocks' byte counts over a step even out. A block's sequence of chunks over the whole step is fixed by the
// shapes alone: a producer cursor walks it kDepthStages chunks ahead of the consumer, issuing each chunk's
// cp.async copies into a ring of shared-memory slots. The consumer takes each chunk in turn: warp w multiplies the
// chunk's K-step w (128 elements) with mma.m16n8k16, the weight as the A operand (from shared memory) and the
// activation rows as the B operand (from registers, loaded once per phase); a tile's warps' fp32 partials are
// summed in shared memory in warp order (deterministic) and rounded once in the epilogue.
//
// Phases of a layer, separated by grid barriers:
//   qkv      RMSNorm(x) (each block computes the B row scales itself; layer 0 first adds the embedding, every block
//            for itself, without storing it) -> the qkv scratch [B, 3D]; key and value columns also go into the
//            caches at `step`
//   attend   one warp per (row, head): the query against the cached keys 0..step, fp32 softmax, the output rounded
//            into the attention scratch [B, D]
//   out      x = round(attention @ out^T + x) (layer 0: x + embedding, rounded, as the residual); a tile's columns
//            of x are read and written by its block alone
//   gate_up  RMSNorm(x) -> silu(gate) * up, rounded, into the hidden scratch [B, Hd]
//   down     x = round(hidden @ down^T + x)
// then the head: logits = round(x @ head^T). 5 L barriers a step (30 at Moshi's 6 layers).
//
// Memory ordering. Activations written during the launch are read with ld.global.cg (at L2: the L1 of an SM is not
// coherent with other SMs' writes). The barrier (grid_barrier) releases every write of the block before its arrival
// and acquires the others' before anyone passes it.
//
// Floor at Moshi's config (D = 1024, Hd = 2816, H = 16 x 64, L = 6, card = 2048): 158,359,552 bytes of weights a
// step (kernels/depth_step.py), 37.4 us at the H200's measured 4.23 TB/s copy bandwidth.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "programmatic_launch.cuh"
#include "skinny_gemv_kernel.cuh"

namespace moshi_fast {

constexpr int kDepthWarps = 8;
constexpr int kDepthThreads = kDepthWarps * 32;
// K elements of a chunk: one K-step (kGemvStepK) per warp.
constexpr int kDepthChunkK = kDepthWarps * kGemvStepK;
// The widest K served: a tile's chunks' activation pieces are held in registers (kDepthMaxChunks per warp).
constexpr int kDepthMaxChunks = 3;
constexpr int kDepthMaxK = kDepthMaxChunks * kDepthChunkK;
// Chunks in flight per block: 6 x 33 KB of shared memory.
constexpr int kDepthStages = 6;
// A chunk row's pitch in shared memory, in elements: 64 bytes past the row's 2 KB, so that the 16-byte reads of one
// quarter warp (the 4 lanes of row g and the 4 of row g + 1) fall in distinct banks.
constexpr int kDepthRowPitch = kDepthChunkK + 32;
constexpr int kDepthSlotElements = kGemvTileRows * kDepthRowPitch;
constexpr int kDepthHeadDim = 64;
constexpr int kDepthMaxSteps = 16;

struct DepthStepArgs {
  __nv_bfloat16* x;                       // [rows, dim], row stride x_stride: in_proj[step](h) in, residual out
  const int64_t* previous;                // [rows]: the token this step embeds
  const __nv_bfloat16* embed_table;       // [R, dim] contiguous
  const int64_t* embed_row_offset;        // [1]: token t is row embed_row_offset[0] + t
  const __nv_bfloat16* norm1;             // [layers, dim], layer stride norm_stride
  const __nv_bfloat16* norm2;             // [layers, dim], layer stride norm_stride
  const __nv_bfloat16* qkv;               // [layers, 3 dim, dim], layer stride qkv_stride, contiguous rows
  const __nv_bfloat16* out_proj;          // [layers, dim, dim], layer stride out_stride
  const __nv_bfloat16* gate_up;           // [layers, 2 hidden, dim], layer stride gate_up_stride
  const __nv_bfloat16* down;              // [layers, dim, hidden], layer stride down_stride
  const __nv_bfloat16* head;              // [card, dim] contiguous
  __nv_bfloat16* k_cache;                 // [layers, rows, heads, steps, 64] contiguous
  __nv_bfloat16* v_cache;
  __nv_bfloat16* logits;                  // [rows, card], row stride logits_stride
  __nv_bfloat16* qkv_scratch;             // [rows, 3 dim] contiguous
  __nv_bfloat16* attention_scratch;       // [rows, dim] contiguous
  __nv_bfloat16* hidden_scratch;          // [rows, hidden] contiguous
  unsigned* barrier;                      // [2]: arrivals (0 between barriers), generation (any value)
  int64_t x_stride, norm_stride, qkv_stride, out_stride, gate_up_stride, down_stride, logits_stride;
  float eps;
  int rows, dim, hidden, heads, steps, step, layers, card;
};

namespace detail {

enum DepthPhase { kQkv = 0, kOut = 1, kGateUp = 2, kDown = 3, kHead = 4 };

// A product phase: its weight, shape and tiling. Phase index p = 4 layer + kind for the layers' products, 4 L for
// the head.
struct ProductPhase {
  const __nv_bfloat16* weight;
  int kind;
  int n;       // output columns
  int k;
  bool gated;
  int tiles;
  int chunks;  // per tile
};

__device__ __forceinline__ ProductPhase product_phase(const DepthStepArgs& a, int p) {
  const int layer = p / 4;
  const int kind = p >= 4 * a.layers ? kHead : p % 4;
  ProductPhase phase;
  phase.kind = kind;
  phase.gated = kind == kGateUp;
  switch (kind) {
    case kQkv:
      phase.weight = a.qkv + layer * a.qkv_stride, phase.n = 3 * a.dim, phase.k = a.dim;
      break;
    case kOut:
      phase.weight = a.out_proj + layer * a.out_stride, phase.n = a.dim, phase.k = a.dim;
      break;
    case kGateUp:
      phase.weight = a.gate_up + layer * a.gate_up_stride, phase.n = a.hidden, phase.k = a.dim;
      break;
    case kDown:
      phase.weight = a.down + layer * a.down_stride, phase.n = a.dim, phase.k = a.hidden;
      break;
    default:
      phase.weight = a.head, phase.n = a.card, phase.k = a.dim;
      break;
  }
  const int columns = phase.gated ? kGemvTileRows / 2 : kGemvTileRows;
  phase.tiles = (phase.n + columns - 1) / columns;
  phase.chunks = (phase.k + kDepthChunkK - 1) / kDepthChunkK;
  return phase;
}

// The block's first tile of a phase whose tiles start at block `first_block`.
__device__ __forceinline__ int first_tile(int first_block) {
  const int blocks = static_cast<int>(gridDim.x);
  return (static_cast<int>(blockIdx.x) - first_block + blocks) % blocks;
}

// Walks the block's chunks over the step, phase by phase: (phase, tile, chunk), in the consumer's order.
struct ChunkCursor {
  int phase;        // product phase index; phases() when past the end
  int first_block;  // the block that owns the phase's tile 0
  int tile;
  int chunk;
  ProductPhase current;

  __device__ __forceinline__ void start(const DepthStepArgs& a) {
    phase = 0;
    first_block = 0;
    current = product_phase(a, 0);
    tile = first_tile(0);
    chunk = 0;
    skip_empty_phases(a);
  }

  __device__ __forceinline__ bool done(const DepthStepArgs& a) const { return phase > 4 * a.layers; }

  __device__ __forceinline__ void skip_empty_phases(const DepthStepArgs& a) {
    while (!done(a) && tile >= current.tiles) {
      first_block = (first_block + current.tiles) % static_cast<int>(gridDim.x);
      ++phase;
      if (done(a)) return;
      current = product_phase(a, phase);
      tile = first_tile(first_block);
    }
  }

  __device__ __forceinline__ void advance(const DepthStepArgs& a) {
    if (++chunk < current.chunks) return;
    chunk = 0;
    tile += static_cast<int>(gridDim.x);
    skip_empty_phases(a);
  }
};

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void copy_async_16(void* destination, const void* source) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(shared_address(destination)),
               "l"(source)
               : "memory");
}

__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// The weight row of A-operand row r (0..15) of a tile: rows past N repeat the last (their results are not stored);
// gated, rows 0..7 are gate rows and 8..15 the matching up rows.
__device__ __forceinline__ const __nv_bfloat16* tile_row(const ProductPhase& phase, int tile, int r) {
  int64_t row;
  if (phase.gated) {
    row = min(tile * (kGemvTileRows / 2) + r % 8, phase.n - 1) + (r >= 8 ? phase.n : 0);
  } else {
    row = min(tile * kGemvTileRows + r, phase.n - 1);
  }
  return phase.weight + row * phase.k;
}

// Issues the copies of the cursor's chunk into `slot` (none past the end of the step); every thread commits one
// group either way, so that the consumer's wait counts groups uniformly.
__device__ __forceinline__ void issue_chunk(const DepthStepArgs& a, const ChunkCursor& cursor, __nv_bfloat16* slot) {
  if (!cursor.done(a)) {
    const int k0 = cursor.chunk * kDepthChunkK;
    const int width = min(kDepthChunkK, cursor.current.k - k0);
    const int pieces_per_row = width / 8;
    for (int i = threadIdx.x; i < kGemvTileRows * (kDepthChunkK / 8); i += kDepthThreads) {
      const int r = i / (kDepthChunkK / 8);
      const int piece = i % (kDepthChunkK / 8);
      if (piece < pieces_per_row) {
        copy_async_16(slot + r * kDepthRowPitch + 8 * piece, tile_row(cursor.current, cursor.tile, r) + k0 + 8 * piece);
      }
    }
  }
  commit_copies();
}

// The ring of shared-memory slots and the producer cursor ahead of the consumer.
struct WeightPipeline {
  __nv_bfloat16* slots;
  ChunkCursor producer;
  int slot;  // the consumer's next slot

  __device__ __forceinline__ void start(const DepthStepArgs& a, __nv_bfloat16* shared_slots) {
    slots = shared_slots;
    slot = 0;
    producer.start(a);
    for (int s = 0; s < kDepthStages; ++s) {
      issue_chunk(a, producer, slots + s * kDepthSlotElements);
      if (!producer.done(a)) producer.advance(a);
    }
  }

  // The next chunk's slot, once its copies (every thread's) have landed.
  __device__ __forceinline__ const __nv_bfloat16* acquire() {
    wait_copies<kDepthStages - 1>();
    __syncthreads();
    return slots + slot * kDepthSlotElements;
  }

  // After every warp is done with the acquired slot: refill it with the chunk kDepthStages ahead.
  __device__ __forceinline__ void release(const DepthStepArgs& a) {
    __syncthreads();
    issue_chunk(a, producer, slots + slot * kDepthSlotElements);
    if (!producer.done(a)) producer.advance(a);
    slot = (slot + 1) % kDepthStages;
  }
};

__device__ __forceinline__ uint4 load_activation(const __nv_bfloat16* address) {
  return __ldcg(reinterpret_cast<const uint4*>(address));
}

// round(a + b) of 8 bf16 pairs in fp32: the embedding add of layer 0.
__device__ __forceinline__ uint4 add_rounded(uint4 a, uint4 b) {
  uint4 result;
  const __nv_bfloat162* as = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* bs = reinterpret_cast<const __nv_bfloat162*>(&b);
  __nv_bfloat162* rs = reinterpret_cast<__nv_bfloat162*>(&result);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 af = __bfloat1622float2(as[j]);
    const float2 bf = __bfloat1622float2(bs[j]);
    rs[j] = __floats2bfloat162_rn(af.x + bf.x, af.y + bf.y);
  }
  return result;
}

// The product's input row m, 8 elements at column c: x (plus the embedding at layer 0), or a scratch.
struct ActivationSource {
  const __nv_bfloat16* base;
  int64_t stride;
  const __nv_bfloat16* embedding;  // [rows] of embedding rows, or null
  int64_t embedding_rows[kGemvMaxRows];

  __device__ __forceinline__ uint4 load(int m, int c) const {
    uint4 value = load_activation(base + m * stride + c);
    if (embedding != nullptr) value = add_rounded(value, __ldg(reinterpret_cast<const uint4*>(
                                                             embedding + embedding_rows[m] + c)));
    return value;
  }
};

// rsqrt(eps + mean(v^2)) of each source row into scales[rows], a warp a row.
__device__ __forceinline__ void source_rms_scales(const ActivationSource& source, int rows, int k, float eps,
                                                  float* scales) {
  const int lane = threadIdx.x % 32;
  for (int m = threadIdx.x / 32; m < rows; m += kDepthWarps) {
    float sum = 0.f;
    for (int c = 8 * lane; c < k; c += 8 * 32) {
      const uint4 piece = source.load(m, c);
      const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&piece);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(pairs[j]);
        sum += f.x * f.x + f.y * f.y;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) scales[m] = rsqrtf(eps + sum / static_cast<float>(k));
  }
}

// Shared memory besides the slots.
struct DepthShared {
  float4 partials[kDepthWarps][32];
  float row_scales[kGemvMaxRows];
};

// One product phase of the block: every tile it owns, chunk by chunk from the pipeline, then the epilogue.
// norm_weight: RMSNorm the source first (null: no norm).
__device__ void product_phase_run(const DepthStepArgs& a, int p, int first_block, WeightPipeline& pipeline,
                                  const ActivationSource& source, const __nv_bfloat16* norm_weight,
                                  DepthShared& shared) {
  const ProductPhase phase = product_phase(a, p);
  int tile = first_tile(first_block);
  if (tile >= phase.tiles) return;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int group = lane / 4;
  const int lane_k = 8 * (lane % 4);
  const int x_row = min(group, a.rows - 1);

  if (norm_weight != nullptr) {
    source_rms_scales(source, a.rows, phase.k, a.eps, shared.row_scales);
    __syncthreads();
  }
  // The warp's B-operand pieces for each chunk (K-step chunk * kDepthWarps + warp), normalised; zero past K.
  uint4 x_pieces[kDepthMaxChunks][kGemvLoadsPerRow];
  const float scale = norm_weight != nullptr ? shared.row_scales[x_row] : 1.f;
#pragma unroll
  for (int c = 0; c < kDepthMaxChunks; ++c) {
#pragma unroll
    for (int u = 0; u < kGemvLoadsPerRow; ++u) {
      const int column = c * kDepthChunkK + warp * kGemvStepK + 32 * u + lane_k;
      uint4 piece = make_uint4(0, 0, 0, 0);
      if (c < phase.chunks && column < phase.k) {
        piece = source.load(x_row, column);
        if (norm_weight != nullptr) piece = normalize_piece(piece, __ldg(reinterpret_cast<const uint4*>(
                                                                           norm_weight + column)), scale);
      }
      x_pieces[c][u] = piece;
    }
  }

  for (; tile < phase.tiles; tile += static_cast<int>(gridDim.x)) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int c = 0; c < kDepthMaxChunks; ++c) {
      if (c >= phase.chunks) break;
      const __nv_bfloat16* slot = pipeline.acquire();
      const int k0 = c * kDepthChunkK + warp * kGemvStepK;
      if (k0 < phase.k) {
        StepOperands operands;
        const __nv_bfloat16* lo = slot + group * kDepthRowPitch + warp * kGemvStepK + lane_k;
        const __nv_bfloat16* hi = lo + 8 * kDepthRowPitch;
#pragma unroll
        for (int u = 0; u < kGemvLoadsPerRow; ++u) {
          const bool inside = k0 + 32 * u + lane_k < phase.k;
          operands.weight_lo[u] = inside ? *reinterpret_cast<const uint4*>(lo + 32 * u) : make_uint4(0, 0, 0, 0);
          operands.weight_hi[u] = inside ? *reinterpret_cast<const uint4*>(hi + 32 * u) : make_uint4(0, 0, 0, 0);
          operands.x[u] = x_pieces[c][u];
        }
        multiply_step(acc, operands);
      }
      pipeline.release(a);
    }
    shared.partials[warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    __syncthreads();

    // Thread e finishes row m = e / columns, column tile_column + e % columns.
    const int columns = phase.gated ? kGemvTileRows / 2 : kGemvTileRows;
    const int tile_column = tile * columns;
    for (int e = threadIdx.x; e < kGemvMaxRows * columns; e += kDepthThreads) {
      const int m = e / columns;
      const int column_in_tile = e % columns;
      const int column = tile_column + column_in_tile;
      if (m >= a.rows || column >= phase.n) continue;
      const float2 sums = tile_element_sums(shared.partials, kDepthWarps, m, column_in_tile, phase.gated);
      const float sum = sums.x;
      const float up = sums.y;
      switch (phase.kind) {
        case kQkv: {
          const __nv_bfloat16 value = __float2bfloat16_rn(sum);
          a.qkv_scratch[static_cast<int64_t>(m) * 3 * a.dim + column] = value;
          if (column >= a.dim) {
            const int kv = column / a.dim;  // 1: key, 2: value
            const int within = column - kv * a.dim;
            const int head = within / kDepthHeadDim;
            const int64_t cache_index =
                ((((static_cast<int64_t>(p / 4) * a.rows + m) * a.heads + head) * a.steps + a.step) * kDepthHeadDim) +
                within % kDepthHeadDim;
            (kv == 1 ? a.k_cache : a.v_cache)[cache_index] = value;
          }
          break;
        }
        case kOut:
        case kDown: {
          // One thread reads and writes each element of x. The residual at layer 0's out phase is x plus the
          // embedding, rounded, which this store makes x.
          __nv_bfloat16* target = a.x + m * a.x_stride + column;
          float residual = __bfloat162float(__ldcg(target));
          if (phase.kind == kOut && p == kOut) {
            const __nv_bfloat16* table = a.embed_table + (a.embed_row_offset[0] + a.previous[m]) * a.dim;
            residual = __bfloat162float(__float2bfloat16_rn(residual + __bfloat162float(table[column])));
          }
          *target = __float2bfloat16_rn(sum + residual);
          break;
        }
        case kGateUp:
          a.hidden_scratch[static_cast<int64_t>(m) * a.hidden + column] =
              __float2bfloat16_rn(sum / (1.f + __expf(-sum)) * up);
          break;
        default:
          a.logits[m * a.logits_stride + column] = __float2bfloat16_rn(sum);
          break;
      }
    }
    __syncthreads();
  }
}

// Every block waits until all have arrived, their writes released to the whole GPU; graph-safe: the arrival count
// returns to 0 and the generation only ever increments (its starting value does not matter).
__device__ __forceinline__ void grid_barrier(unsigned* barrier) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* arrived = barrier;
    unsigned* generation = barrier + 1;
    unsigned seen;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(generation) : "memory");
    __threadfence();
    const unsigned before = atomicAdd(arrived, 1u);
    if (before == gridDim.x - 1) {
      *reinterpret_cast<volatile unsigned*>(arrived) = 0u;
      asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(generation), "r"(seen + 1u) : "memory");
    } else {
      unsigned now;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(now) : "l"(generation) : "memory");
      } while (now == seen);
    }
  }
  __syncthreads();
}

// The attention of layer `layer`: warp-sized work items (row, head), dealt to the blocks' warps.
__device__ void attention_phase(const DepthStepArgs& a, int layer) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int blocks = static_cast<int>(gridDim.x);
  const float scale = rsqrtf(static_cast<float>(kDepthHeadDim));
  for (int item = warp * blocks + static_cast<int>(blockIdx.x); item < a.rows * a.heads; item += kDepthWarps * blocks) {
    const int m = item / a.heads;
    const int head = item % a.heads;
    const int d = 2 * lane;
    const __nv_bfloat16* q_row = a.qkv_scratch + static_cast<int64_t>(m) * 3 * a.dim + head * kDepthHeadDim + d;
    const float2 q = __bfloat1622float2(__ldcg(reinterpret_cast<const __nv_bfloat162*>(q_row)));
    const int64_t base = (((static_cast<int64_t>(layer) * a.rows + m) * a.heads + head) * a.steps) * kDepthHeadDim + d;
    float scores[kDepthMaxSteps];
    float2 values[kDepthMaxSteps];
    float best = -INFINITY;
#pragma unroll
    for (int j = 0; j < kDepthMaxSteps; ++j) {
      if (j > a.step) break;
      const float2 key = __bfloat1622float2(__ldcg(reinterpret_cast<const __nv_bfloat162*>(
          a.k_cache + base + j * kDepthHeadDim)));
      values[j] = __bfloat1622float2(__ldcg(reinterpret_cast<const __nv_bfloat162*>(
          a.v_cache + base + j * kDepthHeadDim)));
      float dot = q.x * key.x + q.y * key.y;
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      scores[j] = dot * scale;
      best = fmaxf(best, scores[j]);
    }
    float total = 0.f;
    float2 result = make_float2(0.f, 0.f);
#pragma unroll
    for (int j = 0; j < kDepthMaxSteps; ++j) {
      if (j > a.step) break;
      const float weight = __expf(scores[j] - best);
      total += weight;
      result.x += weight * values[j].x;
      result.y += weight * values[j].y;
    }
    *reinterpret_cast<__nv_bfloat162*>(a.attention_scratch + static_cast<int64_t>(m) * a.dim + head * kDepthHeadDim +
                                       d) = __floats2bfloat162_rn(result.x / total, result.y / total);
  }
}

__global__ void __launch_bounds__(kDepthThreads, 1) depth_step_bf16_kernel(DepthStepArgs a) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  __nv_bfloat16* slots = reinterpret_cast<__nv_bfloat16*>(shared_bytes);
  DepthShared& shared =
      *reinterpret_cast<DepthShared*>(shared_bytes + kDepthStages * kDepthSlotElements * sizeof(__nv_bfloat16));

  // The weights are constant during a step: their first chunks stream in while the previous kernel finishes.
  WeightPipeline pipeline;
  pipeline.start(a, slots);
  await_previous_kernel();

  ActivationSource x_source{a.x, a.x_stride, nullptr, {}};
  ActivationSource embedded = x_source;
  embedded.embedding = a.embed_table;
  for (int m = 0; m < kGemvMaxRows; ++m) {
    embedded.embedding_rows[m] = m < a.rows ? (a.embed_row_offset[0] + a.previous[m]) * a.dim : 0;
  }
  const ActivationSource attention_source{a.attention_scratch, a.dim, nullptr, {}};
  const ActivationSource hidden_source{a.hidden_scratch, a.hidden, nullptr, {}};

  const int blocks = static_cast<int>(gridDim.x);
  int first_block = 0;
  for (int layer = 0; layer < a.layers; ++layer) {
    const int p = 4 * layer;
    ProductPhase phase = product_phase(a, p + kQkv);
    product_phase_run(a, p + kQkv, first_block, pipeline, layer == 0 ? embedded : x_source,
                      a.norm1 + layer * a.norm_stride, shared);
    first_block = (first_block + phase.tiles) % blocks;
    grid_barrier(a.barrier);
    attention_phase(a, layer);
    grid_barrier(a.barrier);
    phase = product_phase(a, p + kOut);
    product_phase_run(a, p + kOut, first_block, pipeline, attention_source, nullptr, shared);
    first_block = (first_block + phase.tiles) % blocks;
    grid_barrier(a.barrier);
    phase = product_phase(a, p + kGateUp);
    product_phase_run(a, p + kGateUp, first_block, pipeline, x_source, a.norm2 + layer * a.norm_stride, shared);
    first_block = (first_block + phase.tiles) % blocks;
    grid_barrier(a.barrier);
    phase = product_phase(a, p + kDown);
    product_phase_run(a, p + kDown, first_block, pipeline, hidden_source, nullptr, shared);
    first_block = (first_block + phase.tiles) % blocks;
    grid_barrier(a.barrier);
  }
  product_phase_run(a, 4 * a.layers, first_block, pipeline, x_source, nullptr, shared);
  wait_copies<0>();
}

}  // namespace detail

inline size_t depth_step_shared_bytes() {
  return kDepthStages * kDepthSlotElements * sizeof(__nv_bfloat16) + sizeof(detail::DepthShared);
}

// Blocks of the launch: one per SM, the most that are surely resident at once (the barriers spin), or 0 when the
// kernel cannot run here (its shared memory does not fit an SM).
inline cudaError_t depth_step_blocks(int device, int* blocks) {
  cudaError_t error = cudaFuncSetAttribute(detail::depth_step_bf16_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(depth_step_shared_bytes()));
  if (error != cudaSuccess) return error;
  int per_sm = 0;
  error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, detail::depth_step_bf16_kernel, kDepthThreads,
                                                        depth_step_shared_bytes());
  if (error != cudaSuccess) return error;
  int multiprocessors = 0;
  error = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
  *blocks = per_sm > 0 ? multiprocessors : 0;
  return error;
}

// Launches on `stream` (no allocation, no synchronisation: graph-capturable) with `blocks` from depth_step_blocks.
inline cudaError_t launch_depth_step_bf16(const DepthStepArgs& args, int blocks, cudaStream_t stream,
                                          bool programmatic) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kDepthThreads);
  config.dynamicSmemBytes = depth_step_shared_bytes();
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, detail::depth_step_bf16_kernel, args);
}

}  // namespace moshi_fast
