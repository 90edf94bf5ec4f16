// A whole Mimi transformer (every layer) for one conversation's frame in one launch: a cluster of 16 blocks on 16
// SMs (Hopper thread-block clusters) that streams the fp32 weights through shared memory with bulk copies and passes
// the activations between its blocks through distributed shared memory. Device code and a launcher on raw pointers
// and a stream, free of torch (the torch op, with its argument checks, is mimi_transformer.cu).
//
// What it computes (the spec is moshi_fast.cuda_ext.mimi_transformer_ref): x [T = 2, W = 512] fp32, in place, through
// each layer of Mimi's streaming transformer,
//   x += (scale1 W_out) attend(RoPE(q), ring of RoPE(k), v),  q | k | v = W_qkv LayerNorm1(x)
//   x += (scale2 W_fc2) gelu(W_fc1 LayerNorm2(x))
// with 8 heads of 64, the two new steps at positions 2 frame and 2 frame + 1, their keys and values written into the
// layer's ring [H, R, 64] (R <= 256) at position % R before attending, and the ring's visibility rule of
// kernels/ring_attention.py (a query sees the written rows no later than itself; the row its own step replaces is
// gone). No biases but LayerNorm's; the layer scales come folded into W_out and W_fc2.
//
// Why: at one conversation the transformer is a chain of small dependent products (8 layers x 5 launches in the
// default path, 20 us a layer on an H100 for 12.6 MB of weights, about 4 us of copy bandwidth). Each launch pays a
// round trip through global memory for its input and a grid-wide completion; here the chain's links are cluster
// barriers and remote shared-memory stores, and the weights do not wait for them: they depend on nothing the chain
// computes, so a producer warp a block streams its block's share of every layer's weights (and, after the wait for
// the previous kernel, the ring's rows) into a ring of shared-memory stages as fast as the stages free up, across
// phases and layers, and asks L2 for the chunks further ahead.
//
// Work split (rank b = 0..15 in the cluster; every block holds the whole residual stream x, identical everywhere):
//   qkv:   rows [96 b, 96 b + 96) of W_qkv (196 KB), each output stored into every block's copy of qkv [T, 1536].
//   attention: head b % 8 over ring rows [P p, P p + P), p = b / 8, P = ceil(R / 2) (the ring's half, 32 KB of keys
//          and 32 KB of values at R = 250, copied in as four chunks of the stream); each block stores its softmax
//          partials (max, sum, weighted values) of both steps into every block.
//   out:   every block combines the 16 partials into the attention output, then rows [32 b, 32 b + 32) of W_out
//          (64 KB) and the residual; the new x columns go to every block.
//   fc1:   rows [128 b, 128 b + 128) of W_fc1 (256 KB), GELU, the hidden columns to every block.
//   fc2:   rows [32 b, 32 b + 32) of W_fc2 (256 KB), in quarters of K; the quarters summed in order, the residual
//          added, the new x columns to every block.
// Each phase ends with a cluster barrier (release / acquire: the remote stores before it are visible after it). A
// layer streams 788 KB a block (12.6 MB in all) and 64 KB of its ring half.
//
// Weight stream: chunks of 8 rows x 512 of K (16 KB; fc2's rows in four such quarters; the norm parameters and the
// ring halves are chunks too) in kStages shared-memory stages, each with an empty barrier (its consumer is done
// with it), and each chunk with a full barrier (its bytes landed; 2 kStages of them, reused in turn). Warp 8 is the
// producer: in each phase it issues every chunk whose stage the phase itself frees (up to kStages past the phase's
// last chunk), then joins the phase's cluster barrier; it waits only for chunks the consumers take without waiting
// for it, so no wait cycle exists. The parameters' chunks go out before the wait for the previous kernel (no kernel
// writes them); nothing else does.
//
// Products: exact fp32 FMAs on the CUDA cores. A phase's weight chunks go round robin to the 8 consumer warps; a
// warp multiplies its chunk's 8 rows with the 16 input elements of both steps its lanes hold in registers (16-byte
// pieces, consecutive lanes on consecutive pieces: no bank conflicts; 16 independent sums a lane), then sums the 16
// (row, step) totals over its lanes by halving exchanges (16 shuffles for the 16 totals, each lane pair ending with
// one) and the pair stores it into the 16 blocks, 8 each.
//
// Floor: the weights, 12.6 MB a layer (100.7 MB for Mimi's 8 layers), and the rings' 1 MB a layer, read once: 36 us
// at an H100's 3.03 TB/s of copy bandwidth. What 16 SMs can pull is the question this kernel's benchmark answers.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "programmatic_launch.cuh"

namespace moshi_fast {

constexpr int kMimiWidth = 512;
constexpr int kMimiHeads = 8;
constexpr int kMimiHeadDim = 64;
constexpr int kMimiFfn = 2048;
constexpr int kMimiSteps = 2;
constexpr int kMimiMaxLayers = 16;
constexpr int kMimiMaxContext = 256;
constexpr int kMimiCluster = 16;
constexpr int kMimiParts = kMimiCluster / kMimiHeads;
constexpr int kMimiMaxPartRows = kMimiMaxContext / kMimiParts;
constexpr int kMimiWarps = 8;                                  // consumers; warp kMimiWarps is the producer
constexpr int kMimiConsumers = kMimiWarps * 32;
constexpr int kMimiThreads = kMimiConsumers + 32;
constexpr int kMimiChunkRows = 8;
constexpr int kMimiChunkBytes = kMimiChunkRows * kMimiWidth * 4;
constexpr int kMimiStages = 10;
// Full barriers: a chunk's is chunk % (2 kStages). The warps of a phase take its chunks in any order, so a warp may
// wait for a chunk before the chunk kStages earlier (another warp's, in the same stage) has landed; the barrier that
// chunk completed last is then 2 kStages chunks back, in an earlier phase (see the static_assert), so the wait's
// parity cannot match a phase not yet begun.
constexpr int kMimiFullBarriers = 2 * kMimiStages;
constexpr int kMimiPrefetchAhead = 24;                         // chunks past the newest issued that L2 is asked for
constexpr int kMimiQuarters = kMimiFfn / kMimiWidth;

static_assert(kMimiSteps == 2 && kMimiChunkRows == 8, "a chunk's 16 (row, step) totals, one a lane pair");
static_assert(kMimiCluster % kMimiHeads == 0, "a head's ring is split between a whole number of blocks");
static_assert(kMimiMaxPartRows * kMimiHeadDim * 4 == 2 * kMimiChunkBytes, "a ring half is two chunks");
static_assert(kMimiHeadDim * 4 == 256, "a ring row is 256 bytes: 64 rows a chunk");

// Output rows of each product a block owns, and the chunks they take.
constexpr int kMimiQkvRows = 3 * kMimiWidth / kMimiCluster;   // 96
constexpr int kMimiOutRows = kMimiWidth / kMimiCluster;       // 32
constexpr int kMimiFc1Rows = kMimiFfn / kMimiCluster;         // 128
constexpr int kMimiFc2Rows = kMimiWidth / kMimiCluster;       // 32

// A layer's chunk sequence, in the order the block consumes it.
constexpr int kMimiNorm1Chunk = 0;
constexpr int kMimiQkvFirst = 1;
constexpr int kMimiQkvChunks = kMimiQkvRows / kMimiChunkRows;                    // 12
constexpr int kMimiRingFirst = kMimiQkvFirst + kMimiQkvChunks;                   // keys 0, 1; values 2, 3
constexpr int kMimiOutFirst = kMimiRingFirst + 4;
constexpr int kMimiOutChunks = kMimiOutRows / kMimiChunkRows;                    // 4
constexpr int kMimiNorm2Chunk = kMimiOutFirst + kMimiOutChunks;
constexpr int kMimiFc1First = kMimiNorm2Chunk + 1;
constexpr int kMimiFc1Chunks = kMimiFc1Rows / kMimiChunkRows;                    // 16
constexpr int kMimiFc2First = kMimiFc1First + kMimiFc1Chunks;
constexpr int kMimiFc2Chunks = kMimiFc2Rows / kMimiChunkRows * kMimiQuarters;    // 16: chunk 4 r + q, quarter q
constexpr int kMimiChunksPerLayer = kMimiFc2First + kMimiFc2Chunks;              // 54
// The phases that end with a cluster barrier (qkv, attention, out, fc1, fc2), and the last chunk of each.
constexpr int kMimiPhases = 5;
__device__ __forceinline__ constexpr int mimi_phase_end(int phase) {
  return phase == 0 ? kMimiRingFirst - 1
         : phase == 1 ? kMimiOutFirst - 1
         : phase == 2 ? kMimiNorm2Chunk - 1
         : phase == 3 ? kMimiFc2First - 1
                      : kMimiChunksPerLayer - 1;
}

static_assert(kMimiWarps % kMimiQuarters == 0, "a consumer warp meets one quarter of fc2's K");
static_assert(kMimiFc2First - kMimiNorm2Chunk < kMimiFullBarriers && kMimiChunksPerLayer - kMimiFc2First <
              kMimiFullBarriers && kMimiRingFirst < kMimiFullBarriers, "a phase spans fewer chunks than full barriers");

struct MimiLayerWeights {
  const float* norm1_weight;  // [W]
  const float* norm1_bias;    // [W]
  const float* qkv;           // [3 W, W]
  const float* out;           // [W, W], scale1 folded in
  const float* norm2_weight;  // [W]
  const float* norm2_bias;    // [W]
  const float* fc1;           // [F, W]
  const float* fc2;           // [W, F], scale2 folded in
  float* ring_k;              // [H, R, D]: the slot's keys after RoPE, at position % R
  float* ring_v;              // [H, R, D]
};

struct MimiTransformerArgs {
  float* x;            // [T, W], updated in place
  const int* frame;    // the slot's frame counter: the new steps sit at positions 2 frame and 2 frame + 1
  int layers;
  int context;         // R, the rings' capacity
  float eps;           // the LayerNorms'
  float rope_step;     // -ln(max_period) * 2 / D: pair i turns at position * exp(i * rope_step)
  MimiLayerWeights layer[kMimiMaxLayers];
};

// Shared memory of a block, after the stages.
struct MimiShared {
  float x[kMimiSteps][kMimiWidth];                 // the residual stream
  float qkv[kMimiSteps][3 * kMimiWidth];
  float partials[kMimiHeads][kMimiParts][kMimiSteps][kMimiHeadDim + 4];  // weighted values, max, sum
  float attended[kMimiSteps][kMimiWidth];
  float hidden[kMimiSteps][kMimiFfn];
  float fc2_partials[kMimiFc2Rows][kMimiQuarters][kMimiSteps];
  float query[kMimiSteps][kMimiHeadDim];           // rotated and scaled
  float key[kMimiSteps][kMimiHeadDim];             // rotated
  float weights[kMimiSteps][kMimiMaxPartRows];     // exp(score - max) of the block's ring rows
  float halves[kMimiSteps][2][kMimiHeadDim];
  float reduce[kMimiWarps][kMimiSteps];
  float stats[kMimiSteps][2];                      // LayerNorm mean, 1 / std
  unsigned long long full[kMimiFullBarriers];
  unsigned long long empty[kMimiStages];
};

constexpr int kMimiSharedBytes = kMimiStages * kMimiChunkBytes + static_cast<int>(sizeof(MimiShared));

__device__ __forceinline__ uint32_t mimi_smem_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void mimi_barrier_init(unsigned long long* barrier, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(mimi_smem_address(barrier)), "r"(count) : "memory");
}

__device__ __forceinline__ void mimi_barrier_arrive(unsigned long long* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(mimi_smem_address(barrier)) : "memory");
}

__device__ __forceinline__ void mimi_barrier_expect_bytes(unsigned long long* barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(mimi_smem_address(barrier)),
               "r"(bytes) : "memory");
}

__device__ __forceinline__ void mimi_barrier_wait(unsigned long long* barrier, uint32_t parity) {
  const uint32_t address = mimi_smem_address(barrier);
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done) : "r"(address), "r"(parity) : "memory");
  }
}

// bytes (a multiple of 16, from a 16-byte aligned address) into this block's shared memory, completing on barrier.
__device__ __forceinline__ void mimi_bulk_copy(void* destination, const void* source, uint32_t bytes,
                                               unsigned long long* barrier) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(mimi_smem_address(destination)), "l"(source), "r"(bytes), "r"(mimi_smem_address(barrier)) : "memory");
}

// Asks L2 for bytes (a multiple of 16, from a 16-byte aligned address), without waiting.
__device__ __forceinline__ void mimi_prefetch_l2(const void* source, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(source), "r"(bytes) : "memory");
}

__device__ __forceinline__ uint32_t mimi_cluster_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}

// The address of `local` (this block's shared memory) in block `rank`'s shared memory.
__device__ __forceinline__ uint32_t mimi_peer_address(const void* local, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(mimi_smem_address(local)), "r"(rank));
  return remote;
}

__device__ __forceinline__ void mimi_store_peer(const float* local, uint32_t rank, float value) {
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(mimi_peer_address(local, rank)), "f"(value) : "memory");
}

// Every thread of the cluster (the producer warps too): the remote stores before it are visible after it.
__device__ __forceinline__ void mimi_cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

// The consumer warps only (named barrier 1): the producer warp runs its own course between cluster barriers.
__device__ __forceinline__ void mimi_consumers_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kMimiConsumers) : "memory");
}

__device__ __forceinline__ float mimi_warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

__device__ __forceinline__ float mimi_warp_max(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// The chunk sequence, as the producer issues it.
class MimiWeightStream {
 public:
  __device__ MimiWeightStream(const MimiTransformerArgs& args, uint32_t rank, unsigned char* stages,
                              MimiShared& shared)
      : args_(args), rank_(rank), stages_(stages), shared_(shared), total_(args.layers * kMimiChunksPerLayer) {}

  // Issues every chunk before `limit` (and, while `before_wait`, before the first ring chunk), each once the
  // release of the chunk kStages before it frees its stage. The producer's lane 0 only.
  __device__ void issue_until(int limit, bool before_wait = false) {
    if (limit > total_) limit = total_;
    if (before_wait && limit > kMimiRingFirst) limit = kMimiRingFirst;
    for (; issued_ < limit; ++issued_) {
      const int stage = issued_ % kMimiStages;
      if (issued_ >= kMimiStages) mimi_barrier_wait(&shared_.empty[stage], (issued_ / kMimiStages - 1) & 1);
      copy(issued_, stages_ + stage * kMimiChunkBytes, &shared_.full[issued_ % kMimiFullBarriers]);
      const int ahead = issued_ + kMimiPrefetchAhead;
      if (ahead < total_ && !is_ring(ahead)) copy(ahead, nullptr, nullptr);
    }
  }

 private:
  __device__ static bool is_ring(int chunk) {
    const int c = chunk % kMimiChunksPerLayer;
    return c >= kMimiRingFirst && c < kMimiOutFirst;
  }

  // One piece of a chunk: copied into the stage (barrier given) or asked of L2 (no barrier).
  __device__ static void piece(unsigned char* destination, const void* source, uint32_t bytes,
                               unsigned long long* full) {
    if (full != nullptr) {
      mimi_bulk_copy(destination, source, bytes, full);
    } else {
      mimi_prefetch_l2(source, bytes);
    }
  }

  // The chunk's pieces into `destination`, completing on `full` (which expects their bytes first); with no barrier,
  // asked of L2 instead.
  __device__ void copy(int chunk, unsigned char* destination, unsigned long long* full) const {
    const MimiLayerWeights& w = args_.layer[chunk / kMimiChunksPerLayer];
    const int c = chunk % kMimiChunksPerLayer;
    if (c == kMimiNorm1Chunk || c == kMimiNorm2Chunk) {
      const bool first = c == kMimiNorm1Chunk;
      if (full != nullptr) mimi_barrier_expect_bytes(full, 2 * kMimiWidth * 4);
      piece(destination, first ? w.norm1_weight : w.norm2_weight, kMimiWidth * 4, full);
      piece(destination + kMimiWidth * 4, first ? w.norm1_bias : w.norm2_bias, kMimiWidth * 4, full);
      return;
    }
    if (c >= kMimiFc2First) {
      // Rows [32 b + 8 r, + 8) of fc2, their quarter q of K: 8 pieces of 2 KB, 8 KB apart.
      const int r = (c - kMimiFc2First) / kMimiQuarters;
      const int q = (c - kMimiFc2First) % kMimiQuarters;
      const float* source = w.fc2 + static_cast<size_t>(rank_ * kMimiFc2Rows + r * kMimiChunkRows) * kMimiFfn +
                            q * kMimiWidth;
      if (full != nullptr) mimi_barrier_expect_bytes(full, kMimiChunkBytes);
      for (int row = 0; row < kMimiChunkRows; ++row) {
        piece(destination + row * kMimiWidth * 4, source + row * kMimiFfn, kMimiWidth * 4, full);
      }
      return;
    }
    const float* source;
    uint32_t bytes = kMimiChunkBytes;
    if (c < kMimiRingFirst) {
      source = w.qkv + static_cast<size_t>(rank_ * kMimiQkvRows + (c - kMimiQkvFirst) * kMimiChunkRows) * kMimiWidth;
    } else if (c < kMimiOutFirst) {
      // The block's half of its head's ring: rows [P part, P part + n) of keys (chunks 0, 1) and values (2, 3).
      const int part_rows = (args_.context + 1) / 2;
      const int part = rank_ / kMimiHeads;
      const int rows = min(part_rows, args_.context - part * part_rows);
      const int half = (c - kMimiRingFirst) % 2;
      const int half_rows = max(0, min(rows - half * 64, 64));
      const float* ring = (c - kMimiRingFirst) < 2 ? w.ring_k : w.ring_v;
      source = ring + (static_cast<size_t>(rank_ % kMimiHeads) * args_.context + part * part_rows + half * 64) *
                          kMimiHeadDim;
      bytes = half_rows * kMimiHeadDim * 4;
      if (bytes == 0) {
        if (full != nullptr) mimi_barrier_arrive(full);
        return;
      }
    } else if (c < kMimiNorm2Chunk) {
      source = w.out + static_cast<size_t>(rank_ * kMimiOutRows + (c - kMimiOutFirst) * kMimiChunkRows) * kMimiWidth;
    } else {
      source = w.fc1 + static_cast<size_t>(rank_ * kMimiFc1Rows + (c - kMimiFc1First) * kMimiChunkRows) * kMimiWidth;
    }
    if (full != nullptr) mimi_barrier_expect_bytes(full, bytes);
    piece(destination, source, bytes, full);
  }

  const MimiTransformerArgs& args_;
  const uint32_t rank_;
  unsigned char* const stages_;
  MimiShared& shared_;
  const int total_;
  int issued_ = 0;
};

// A chunk's stage, waited for (its bytes landed).
__device__ __forceinline__ const float* mimi_chunk(unsigned char* stages, MimiShared& shared, int chunk) {
  mimi_barrier_wait(&shared.full[chunk % kMimiFullBarriers], (chunk / kMimiFullBarriers) & 1);
  return reinterpret_cast<const float*>(stages + (chunk % kMimiStages) * kMimiChunkBytes);
}

// The chunk's stage is free again (its one consumer, or every consumer warp behind a consumer barrier, is done).
__device__ __forceinline__ void mimi_release(MimiShared& shared, int chunk) {
  mimi_barrier_arrive(&shared.empty[chunk % kMimiStages]);
}

// Lane l's share of a K = 512 row: elements 128 i + 4 l + j, i, j < 4 (16-byte pieces, consecutive across lanes).
__device__ __forceinline__ int mimi_lane_element(int lane, int i) { return 128 * i + 4 * lane; }

// The lane's 16 elements of both steps of a [T, 512] activation, from `row_stride` apart.
__device__ __forceinline__ void mimi_lane_slice(const float* rows, int row_stride, int lane,
                                                float (&input)[kMimiSteps][16]) {
#pragma unroll
  for (int t = 0; t < kMimiSteps; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 piece = *reinterpret_cast<const float4*>(rows + t * row_stride + mimi_lane_element(lane, i));
      input[t][4 * i] = piece.x;
      input[t][4 * i + 1] = piece.y;
      input[t][4 * i + 2] = piece.z;
      input[t][4 * i + 3] = piece.w;
    }
  }
}

// Both steps' LayerNorm of x, the lane's 16 elements of each (its parameters the chunk `norm_chunk`, weight then
// bias), read by every consumer warp: statistics by warps 0 and 1, consumer barriers around the chunk's reads.
__device__ __forceinline__ void mimi_layer_norm(unsigned char* stages, MimiShared& shared, int norm_chunk, float eps,
                                                int warp, int lane, float (&input)[kMimiSteps][16]) {
  if (warp < kMimiSteps) {
    const float* row = shared.x[warp];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kMimiWidth / 32; ++i) sum += row[lane + 32 * i];
    const float mean = mimi_warp_sum(sum) / kMimiWidth;
    float squares = 0.f;
#pragma unroll
    for (int i = 0; i < kMimiWidth / 32; ++i) {
      const float centred = row[lane + 32 * i] - mean;
      squares = fmaf(centred, centred, squares);
    }
    const float variance = mimi_warp_sum(squares) / kMimiWidth;
    if (lane == 0) {
      shared.stats[warp][0] = mean;
      shared.stats[warp][1] = rsqrtf(variance + eps);
    }
  }
  mimi_consumers_sync();
  const float* norm = mimi_chunk(stages, shared, norm_chunk);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = mimi_lane_element(lane, i) + j;
#pragma unroll
      for (int t = 0; t < kMimiSteps; ++t) {
        input[t][4 * i + j] = (shared.x[t][k] - shared.stats[t][0]) * shared.stats[t][1] * norm[k] +
                              norm[kMimiWidth + k];
      }
    }
  }
  mimi_consumers_sync();
  if (warp == 0 && lane == 0) mimi_release(shared, norm_chunk);
}

// One halving exchange of mimi_chunk_dot over sums[0, 2 kWidth): sums[s] keeps entry s + kWidth where the lane's
// bit kOffset is set, s where not, plus the partner lane's copy of the same entry.
template <int kWidth, int kOffset>
__device__ __forceinline__ void mimi_halve(float (&sums)[2 * kMimiChunkRows], int lane) {
  const bool upper = (lane & kOffset) != 0;
#pragma unroll
  for (int s = 0; s < kWidth; ++s) {
    const float send = upper ? sums[s] : sums[s + kWidth];
    const float keep = upper ? sums[s + kWidth] : sums[s];
    sums[s] = keep + __shfl_xor_sync(0xffffffffu, send, kOffset);
  }
}

// Which of a chunk's 16 (row, step) totals lane `lane` ends mimi_chunk_dot with: 2 row + step.
__device__ __forceinline__ int mimi_total_index(int lane) { return (lane >> 1) & 15; }

// The warp's product of a chunk's 8 rows (of 512, in its stage) with both steps' input, released as soon as read;
// returns the total mimi_total_index(lane) (lanes 2 i and 2 i + 1 the same one).
__device__ __forceinline__ float mimi_chunk_dot(unsigned char* stages, MimiShared& shared, int chunk, int lane,
                                                const float (&input)[kMimiSteps][16]) {
  const float* rows = mimi_chunk(stages, shared, chunk);
  float sums[2 * kMimiChunkRows];
#pragma unroll
  for (int s = 0; s < 2 * kMimiChunkRows; ++s) sums[s] = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int r = 0; r < kMimiChunkRows; ++r) {
      const float4 w = *reinterpret_cast<const float4*>(rows + r * kMimiWidth + mimi_lane_element(lane, i));
#pragma unroll
      for (int t = 0; t < kMimiSteps; ++t) {
        float& sum = sums[2 * r + t];
        sum = fmaf(w.x, input[t][4 * i], sum);
        sum = fmaf(w.y, input[t][4 * i + 1], sum);
        sum = fmaf(w.z, input[t][4 * i + 2], sum);
        sum = fmaf(w.w, input[t][4 * i + 3], sum);
      }
    }
  }
  __syncwarp();
  if (lane == 0) mimi_release(shared, chunk);
  // Halving exchanges: at each step a lane keeps the half of its totals that its lane bit selects and adds its
  // partner's copy of that half; after 16, 8, 4 and 2 lanes apart each lane holds one total over 16 lanes, and the
  // last exchange adds its partner's 16.
  mimi_halve<8, 16>(sums, lane);
  mimi_halve<4, 8>(sums, lane);
  mimi_halve<2, 4>(sums, lane);
  mimi_halve<1, 2>(sums, lane);
  return sums[0] + __shfl_xor_sync(0xffffffffu, sums[0], 1);
}

__device__ __forceinline__ float mimi_gelu(float value) {
  return 0.5f * value * (1.f + erff(value * 0.70710678118654752f));
}

// Stores value at local[column] into every block: the lane pair splits the 16 blocks.
__device__ __forceinline__ void mimi_store_all(const float* local, int lane, float value) {
  const uint32_t first = (lane & 1) * (kMimiCluster / 2);
#pragma unroll
  for (uint32_t peer = first; peer < first + kMimiCluster / 2; ++peer) mimi_store_peer(local, peer, value);
}

// The consumers' share of a layer-normed K = 512 product (qkv, fc1): the chunks after `norm_chunk`, round robin over
// the warps, each total (GELU'd with kGelu) stored at column first_column + row of `destination` [T, columns] in
// every block.
template <bool kGelu>
__device__ __forceinline__ void mimi_normed_product(unsigned char* stages, MimiShared& shared, float eps,
                                                    int norm_chunk, int chunks, int first_column, float* destination,
                                                    int columns, int warp, int lane) {
  float input[kMimiSteps][16];
  mimi_layer_norm(stages, shared, norm_chunk, eps, warp, lane, input);
  const int index = mimi_total_index(lane);
  for (int c = warp; c < chunks; c += kMimiWarps) {
    const float total = mimi_chunk_dot(stages, shared, norm_chunk + 1 + c, lane, input);
    const int column = first_column + c * kMimiChunkRows + index / 2;
    mimi_store_all(destination + (index % 2) * columns + column, lane, kGelu ? mimi_gelu(total) : total);
  }
}

// The producer warp's course: the chunks each phase frees, then the phase's cluster barrier, layer after layer.
__device__ __forceinline__ void mimi_produce(const MimiTransformerArgs& args, MimiWeightStream& stream, int lane) {
  for (int layer = 0; layer < args.layers; ++layer) {
    for (int phase = 0; phase < kMimiPhases; ++phase) {
      if (lane == 0) stream.issue_until(layer * kMimiChunksPerLayer + mimi_phase_end(phase) + 1 + kMimiStages);
      __syncwarp();
      mimi_cluster_sync();
    }
  }
}

// The block's half of head `head`'s attention for both steps (see the file's comment), its partials stored into
// every block. The ring chunks are released here.
__device__ __forceinline__ void mimi_attention(const MimiTransformerArgs& args, const MimiLayerWeights& w,
                                               unsigned char* stages, MimiShared& shared, int base, long long frame,
                                               int head, int part, int tid) {
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int context = args.context;
  const int part_rows = (context + 1) / 2;
  const int first_row = part * part_rows;
  const int rows = min(part_rows, context - first_row);
  // After this frame's ring writes, slot s holds position newest - age(s), age = (newest - s) mod R.
  const long long newest = frame * kMimiSteps + kMimiSteps - 1;
  const int newest_slot = static_cast<int>(newest % context);
  const int oldest_written_age = static_cast<int>(newest < context - 1 ? newest : context - 1);
  // Ring row r of the block's half: row r % 64 of the first (r < 64) or second chunk of keys or values.
  float* const keys0 = const_cast<float*>(mimi_chunk(stages, shared, base + kMimiRingFirst));
  float* const keys1 = const_cast<float*>(mimi_chunk(stages, shared, base + kMimiRingFirst + 1));
  float* const values0 = const_cast<float*>(mimi_chunk(stages, shared, base + kMimiRingFirst + 2));
  float* const values1 = const_cast<float*>(mimi_chunk(stages, shared, base + kMimiRingFirst + 3));
  // RoPE of both steps' query (scaled by 1 / sqrt(D)) and key: thread (t, d) for each.
  {
    const int t = (tid / kMimiHeadDim) % kMimiSteps;
    const int d = tid % kMimiHeadDim;
    const bool is_key = tid >= kMimiSteps * kMimiHeadDim;
    const float* source = &shared.qkv[t][(is_key ? kMimiWidth : 0) + head * kMimiHeadDim];
    const float frequency = static_cast<float>(exp(static_cast<double>((d / 2) * args.rope_step)));
    const float angle = static_cast<float>(frame * kMimiSteps + t) * frequency;
    // Accurate sine and cosine of a large angle (positions grow without bound): double precision, not the fast-math
    // intrinsics.
    const float cosine = static_cast<float>(cos(static_cast<double>(angle)));
    const float sine = static_cast<float>(sin(static_cast<double>(angle)));
    const float partner = source[d ^ 1];
    const float rotated = source[d] * cosine + ((d & 1) ? partner : -partner) * sine;
    if (is_key) {
      shared.key[t][d] = rotated;
    } else {
      shared.query[t][d] = rotated * 0.125f;
    }
  }
  mimi_consumers_sync();
  // Step t's key and value replace the ring row of its position: in the block holding that row, in shared memory
  // (this frame's attention) and in the ring (the next frames').
  if (tid < kMimiSteps * kMimiHeadDim) {
    const int t = tid / kMimiHeadDim;
    const int d = tid % kMimiHeadDim;
    const int slot = static_cast<int>((frame * kMimiSteps + t) % context);
    if (slot >= first_row && slot < first_row + rows) {
      const int r = slot - first_row;
      const float value = shared.qkv[t][2 * kMimiWidth + head * kMimiHeadDim + d];
      (r < 64 ? keys0 : keys1)[(r % 64) * kMimiHeadDim + d] = shared.key[t][d];
      (r < 64 ? values0 : values1)[(r % 64) * kMimiHeadDim + d] = value;
      const size_t ring_offset = (static_cast<size_t>(head) * context + slot) * kMimiHeadDim + d;
      w.ring_k[ring_offset] = shared.key[t][d];
      w.ring_v[ring_offset] = value;
      // These stages are refilled by bulk copies (the async proxy) once released.
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
  }
  mimi_consumers_sync();
  // Scores: thread r for ring row first_row + r. Lane l reads the row's 16-byte pieces starting at piece l (mod 16):
  // rows 256 bytes apart would otherwise put every lane on the same banks.
  float score[kMimiSteps] = {-INFINITY, -INFINITY};
  if (tid < rows) {
    const int slot = first_row + tid;
    const int age = slot <= newest_slot ? newest_slot - slot : newest_slot - slot + context;
    const float* key = (tid < 64 ? keys0 : keys1) + (tid % 64) * kMimiHeadDim;
    float dot[kMimiSteps] = {0.f, 0.f};
#pragma unroll
    for (int p = 0; p < kMimiHeadDim / 4; ++p) {
      const int piece = 4 * ((p + lane) % (kMimiHeadDim / 4));
      const float4 k4 = *reinterpret_cast<const float4*>(key + piece);
#pragma unroll
      for (int t = 0; t < kMimiSteps; ++t) {
        const float4 q4 = *reinterpret_cast<const float4*>(&shared.query[t][piece]);
        dot[t] = fmaf(k4.x, q4.x, fmaf(k4.y, q4.y, fmaf(k4.z, q4.z, fmaf(k4.w, q4.w, dot[t]))));
      }
    }
    // Query t sees written rows no later than itself: ages >= T - 1 - t.
#pragma unroll
    for (int t = 0; t < kMimiSteps; ++t) {
      if (age <= oldest_written_age && age >= kMimiSteps - 1 - t) score[t] = dot[t];
    }
  }
#pragma unroll
  for (int t = 0; t < kMimiSteps; ++t) {
    const float m = mimi_warp_max(score[t]);
    if (lane == 0) shared.reduce[warp][t] = m;
  }
  mimi_consumers_sync();
  float maximum[kMimiSteps];
#pragma unroll
  for (int t = 0; t < kMimiSteps; ++t) {
    maximum[t] = -INFINITY;
    for (int v = 0; v < kMimiWarps; ++v) maximum[t] = fmaxf(maximum[t], shared.reduce[v][t]);
  }
  mimi_consumers_sync();
#pragma unroll
  for (int t = 0; t < kMimiSteps; ++t) {
    // A half with no visible row keeps weights 0 (never exp(-inf + inf)).
    const float weight = score[t] == -INFINITY ? 0.f : __expf(score[t] - maximum[t]);
    if (tid < kMimiMaxPartRows) shared.weights[t][tid] = weight;
    const float total = mimi_warp_sum(weight);
    if (lane == 0) shared.reduce[warp][t] = total;
  }
  mimi_consumers_sync();
  // Weighted values: thread (t, half, d) over rows [64 half, 64 half + 64); rows of weight 0 are skipped, so a
  // never-written row's contents (NaN, say) never enter.
  {
    const int t = tid / (2 * kMimiHeadDim);
    const int half = (tid / kMimiHeadDim) % 2;
    const int d = tid % kMimiHeadDim;
    const float* value_rows = half == 0 ? values0 : values1;
    float sum = 0.f;
    const int end = min(64, rows - 64 * half);
    for (int r = 0; r < end; ++r) {
      const float weight = shared.weights[t][64 * half + r];
      if (weight != 0.f) sum = fmaf(weight, value_rows[r * kMimiHeadDim + d], sum);
    }
    shared.halves[t][half][d] = sum;
  }
  mimi_consumers_sync();
  if (tid < 4) mimi_release(shared, base + kMimiRingFirst + tid);
  if (tid < kMimiSteps * kMimiHeadDim) {
    const int t = tid / kMimiHeadDim;
    const int d = tid % kMimiHeadDim;
    const float weighted = shared.halves[t][0][d] + shared.halves[t][1][d];
    float total = 0.f;
    for (int v = 0; v < kMimiWarps; ++v) total += shared.reduce[v][t];
    const float* entry = shared.partials[head][part][t];
    for (uint32_t peer = 0; peer < kMimiCluster; ++peer) {
      mimi_store_peer(entry + d, peer, weighted);
      if (d == 0) {
        mimi_store_peer(entry + kMimiHeadDim, peer, maximum[t]);
        mimi_store_peer(entry + kMimiHeadDim + 1, peer, total);
      }
    }
  }
}

__global__ void __launch_bounds__(kMimiThreads, 1) mimi_transformer_f32_kernel(const __grid_constant__
                                                                               MimiTransformerArgs args) {
  extern __shared__ __align__(128) unsigned char mimi_dynamic_shared[];
  unsigned char* stages = mimi_dynamic_shared;
  MimiShared& shared = *reinterpret_cast<MimiShared*>(mimi_dynamic_shared + kMimiStages * kMimiChunkBytes);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const uint32_t rank = mimi_cluster_rank();
  MimiWeightStream stream(args, rank, stages, shared);

  if (warp == kMimiWarps) {
    if (lane == 0) {
      for (int b = 0; b < kMimiFullBarriers; ++b) mimi_barrier_init(&shared.full[b], 1);
      for (int s = 0; s < kMimiStages; ++s) mimi_barrier_init(&shared.empty[s], 1);
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
      stream.issue_until(kMimiStages, /*before_wait=*/true);
    }
    __syncwarp();
    // Every block of the cluster is running (and its barriers initialised) before any remote store.
    mimi_cluster_sync();
    await_previous_kernel();
    mimi_produce(args, stream, lane);
    return;
  }
  mimi_cluster_sync();
  await_previous_kernel();

  const long long frame = *args.frame;
  for (int e = tid; e < kMimiSteps * kMimiWidth / 4; e += kMimiConsumers) {
    reinterpret_cast<float4*>(&shared.x[0][0])[e] = reinterpret_cast<const float4*>(args.x)[e];
  }
  mimi_consumers_sync();
  const int index = mimi_total_index(lane);
  const int row_in_chunk = index / 2;
  const int step = index % 2;
  float input[kMimiSteps][16];

  for (int layer = 0; layer < args.layers; ++layer) {
    const MimiLayerWeights& w = args.layer[layer];
    const int base = layer * kMimiChunksPerLayer;

    // qkv = W_qkv LayerNorm1(x): the block's 96 rows, each stored into every block.
    mimi_normed_product<false>(stages, shared, args.eps, base + kMimiNorm1Chunk, kMimiQkvChunks,
                               rank * kMimiQkvRows, shared.qkv[0], 3 * kMimiWidth, warp, lane);
    mimi_cluster_sync();

    mimi_attention(args, w, stages, shared, base, frame, rank % kMimiHeads, rank / kMimiHeads, tid);
    mimi_cluster_sync();

    // x += W_out attended: the 16 partials combined, then the block's 32 rows.
    for (int e = tid; e < kMimiSteps * kMimiWidth; e += kMimiConsumers) {
      const int t = e / kMimiWidth;
      const int k = e % kMimiWidth;
      const float* p0 = shared.partials[k / kMimiHeadDim][0][t];
      const float* p1 = shared.partials[k / kMimiHeadDim][1][t];
      // The half holding the query's own key has a finite maximum.
      const float maximum = fmaxf(p0[kMimiHeadDim], p1[kMimiHeadDim]);
      const float w0 = p0[kMimiHeadDim] == -INFINITY ? 0.f : __expf(p0[kMimiHeadDim] - maximum);
      const float w1 = p1[kMimiHeadDim] == -INFINITY ? 0.f : __expf(p1[kMimiHeadDim] - maximum);
      const int d = k % kMimiHeadDim;
      shared.attended[t][k] = (p0[d] * w0 + p1[d] * w1) / (p0[kMimiHeadDim + 1] * w0 + p1[kMimiHeadDim + 1] * w1);
    }
    mimi_consumers_sync();
    mimi_lane_slice(shared.attended[0], kMimiWidth, lane, input);
    for (int c = warp; c < kMimiOutChunks; c += kMimiWarps) {
      const float total = mimi_chunk_dot(stages, shared, base + kMimiOutFirst + c, lane, input);
      const int column = rank * kMimiOutRows + c * kMimiChunkRows + row_in_chunk;
      const float updated = shared.x[step][column] + total;
      // Both lanes of the pair have read x's column before one of them overwrites it in this block.
      __syncwarp();
      mimi_store_all(&shared.x[step][column], lane, updated);
    }
    mimi_cluster_sync();

    // hidden = gelu(W_fc1 LayerNorm2(x)): the block's 128 rows.
    mimi_normed_product<true>(stages, shared, args.eps, base + kMimiNorm2Chunk, kMimiFc1Chunks,
                              rank * kMimiFc1Rows, shared.hidden[0], kMimiFfn, warp, lane);
    mimi_cluster_sync();

    // x += W_fc2 hidden: chunk 4 r + q holds rows [8 r, 8 r + 8) of the block's 32, quarter q of K; a warp's
    // chunks all have quarter warp % 4.
    {
      const int quarter = warp % kMimiQuarters;
      mimi_lane_slice(shared.hidden[0] + quarter * kMimiWidth, kMimiFfn, lane, input);
      for (int c = warp; c < kMimiFc2Chunks; c += kMimiWarps) {
        const float total = mimi_chunk_dot(stages, shared, base + kMimiFc2First + c, lane, input);
        if ((lane & 1) == 0) {
          shared.fc2_partials[(c / kMimiQuarters) * kMimiChunkRows + row_in_chunk][quarter][step] = total;
        }
      }
    }
    mimi_consumers_sync();
    {
      // Thread (row, t, peers 4 g .. 4 g + 3): the quarters summed in order, the residual added.
      const int item = tid / 4;
      const int row = item / kMimiSteps;
      const int t = item % kMimiSteps;
      const int column = rank * kMimiFc2Rows + row;
      const float* quarters = &shared.fc2_partials[row][0][t];
      const float updated = shared.x[t][column] + ((quarters[0] + quarters[kMimiSteps]) +
                                                   (quarters[2 * kMimiSteps] + quarters[3 * kMimiSteps]));
      // Every thread has read x's column before one of them overwrites it in this block.
      mimi_consumers_sync();
      for (uint32_t peer = 4 * (tid % 4); peer < 4 * (tid % 4) + 4; ++peer) {
        mimi_store_peer(&shared.x[t][column], peer, updated);
      }
    }
    mimi_cluster_sync();
  }

  // Every block holds the final x; block b writes its 32 columns of both steps.
  if (tid < kMimiSteps * kMimiOutRows) {
    const int t = tid / kMimiOutRows;
    const int column = rank * kMimiOutRows + tid % kMimiOutRows;
    args.x[t * kMimiWidth + column] = shared.x[t][column];
  }
}

inline cudaError_t mimi_transformer_prepare() {
  static const cudaError_t status = [] {
    cudaError_t error = cudaFuncSetAttribute(mimi_transformer_f32_kernel,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, kMimiSharedBytes);
    if (error != cudaSuccess) return error;
    return cudaFuncSetAttribute(mimi_transformer_f32_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  }();
  return status;
}

inline cudaLaunchConfig_t mimi_transformer_config(cudaStream_t stream, cudaLaunchAttribute* attributes,
                                                   bool programmatic) {
  attributes[0].id = cudaLaunchAttributeClusterDimension;
  attributes[0].val.clusterDim.x = kMimiCluster;
  attributes[0].val.clusterDim.y = 1;
  attributes[0].val.clusterDim.z = 1;
  attributes[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(kMimiCluster);
  config.blockDim = dim3(kMimiThreads);
  config.dynamicSmemBytes = kMimiSharedBytes;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = programmatic ? 2 : 1;
  return config;
}

// How many 16-block clusters of this kernel the current device can hold at once (0: it cannot run here).
inline int mimi_transformer_cluster_capacity() {
  if (mimi_transformer_prepare() != cudaSuccess) return 0;
  cudaLaunchAttribute attributes[2];
  const cudaLaunchConfig_t config = mimi_transformer_config(nullptr, attributes, false);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, mimi_transformer_f32_kernel, &config) != cudaSuccess) return 0;
  return clusters;
}

inline cudaError_t launch_mimi_transformer_f32(const MimiTransformerArgs& args, cudaStream_t stream,
                                               bool programmatic) {
  const cudaError_t prepared = mimi_transformer_prepare();
  if (prepared != cudaSuccess) return prepared;
  cudaLaunchAttribute attributes[2];
  const cudaLaunchConfig_t config = mimi_transformer_config(stream, attributes, programmatic);
  return cudaLaunchKernelEx(&config, mimi_transformer_f32_kernel, args);
}

}  // namespace moshi_fast
