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
// pause, and the critical path is the barriers plus small computations on data already on chip. Measured (H100,
// bench/trace_depth_step.py, B = 1), it is not that yet: 175 us a step against 114 us for the default launches, the
// barrier about 1 us from its last arrival, but a phase's read of its input rows 1.5-3 us (0.5 us in the head phase,
// when no weights stream) and a one-chunk tile 1.7 us, with 2 to 6 chunks in flight alike (bench/RESULTS.md). That
// was a block-wide ring with a cursor. With the per-warp pipeline below (H100, 2026-12-07): 139-149 us a step
// against 114 us, at every refill point and pipeline depth; a phase's barrier 1.4-2.4 us, its input rows 1.9-2.1 us
// where an RMSNorm or the attention works on them (1.0 us at down, 0.5 us at the head) whether or not refills are
// queued ahead of them, its last tile 1.2-2.9 us.
//
// Work split. The grid is one block per SM (all resident at once: the barriers spin). Every product phase
// (qkv, out, gate_up, down of each layer, then the head) cuts its weight into tiles of 16 rows (gated: 8 gate rows
// and their 8 up rows) over all of K, and each tile into chunks of up to kDepthChunkK elements of K. Tiles go
// round robin to the blocks, each phase starting at the block after the previous phase's last tile, so that the
// blocks' byte counts over a step even out. A block's sequence of chunks over the whole step is fixed by the
// shapes alone: warp 0 writes it into a table in shared memory at the start (one record a chunk: where its rows
// start), and the copies run `stages` chunks ahead of the products through a ring of shared-memory slots. Warp w
// owns K-step w (128 elements) of every chunk: it copies that part (cp.async), waits for its own copies, and
// multiplies it with mma.m16n8k16, the weight as the A operand (from shared memory) and the activation rows as the
// B operand (from registers, loaded once per phase), then refills the part with the chunk `stages` ahead; a
// chunk needs no block barrier. A tile's warps' fp32 partials are summed in shared memory in warp order
// (deterministic) and rounded once in the epilogue.
//
// Phases of a layer, separated by grid barriers:
//   qkv      RMSNorm(x) (layer 0 first adds the embedding, every block for itself, without storing it) -> queries
//            into the qkv scratch [B, 3D], keys and values into the caches at `step`
//   out      every block with an out tile first computes the attention of every (row, head) itself (the query against
//            the cached keys 0..step, fp32 online softmax, rounded) into shared memory, then x = round(attention @
//            out^T + x) (layer 0: x + embedding, rounded, as the residual); a tile's columns of x are read and
//            written by its block alone
//   gate_up  RMSNorm(x) -> silu(gate) * up, rounded, into the hidden scratch [B, Hd]
//   down     x = round(hidden @ down^T + x)
// then the head: logits = round(x @ head^T). 4 L barriers a step (24 at Moshi's 6 layers). A phase reads its input
// rows once: each block's warps hold every element of them as B-operand pieces, and an RMSNorm's sums of squares
// are summed from those pieces.
//
// Memory ordering. Activations written during the launch are read with ld.global.cg (at L2: the L1 of an SM is not
// coherent with other SMs' writes). The barrier (GridBarrier) releases every write of the block with its arrival
// and acquires the others' before anyone passes it.
//
// The barrier is one 64-bit arrival count that only grows: each block adds 1 (a release reduction, which does not
// wait for an answer) and polls until the count reaches its target, a multiple of the grid; between launches the
// count is a multiple of the grid, so a block learns the launch's base from one read at its start. An arrival
// waits for the block's writes to be acknowledged, then for the poll that sees the last arrival (the
// sense-reversal barrier this replaced also read a generation word, fenced and waited for a returned atomic
// before it, and the last block stored the new generation after its atomic).
//
// Timeline (DepthStepArgs::trace, for bench/trace_depth_step.py): when given, thread 0 of each block writes the
// GPU's global timer (ns) at its start, after the wait for the previous kernel, and in each phase at its start,
// once its input rows are ready and at its end (before the barrier).
//
// Floor at Moshi's config (D = 1024, Hd = 2816, H = 16 x 64, L = 6, card = 2048): 158,359,552 bytes of weights a
// step (kernels/depth_step.py), 37.4 us at the H200's measured 4.23 TB/s copy bandwidth.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "programmatic_launch.cuh"
#include "skinny_gemv_kernel.cuh"
#include "warp_scan.cuh"

namespace moshi_fast {

constexpr int kDepthWarps = 8;
constexpr int kDepthThreads = kDepthWarps * 32;
// K elements of a chunk: one K-step (kGemvStepK) per warp.
constexpr int kDepthChunkK = kDepthWarps * kGemvStepK;
// The widest K served: a tile's chunks' activation pieces are held in registers (kDepthMaxChunks per warp).
constexpr int kDepthMaxChunks = 3;
constexpr int kDepthMaxK = kDepthMaxChunks * kDepthChunkK;
// The widest D served: the attention output of every row is kept in shared memory (16 KB at 8 rows).
constexpr int kDepthMaxDim = 1024;
// Chunks in flight per block (DepthStepArgs::stages, 2..kDepthMaxStages): the shared memory holds the most, 6 x
// 33 KB. Fewer leave less of the weight stream queued ahead of the phases' activation reads and barrier arrivals;
// on an H100 2, 3 and 6 took the same time (bench/RESULTS.md, twelfth session).
constexpr int kDepthMaxStages = 6;
constexpr int kDepthMinStages = 2;
constexpr int kDepthDefaultStages = 6;
// When a warp refills the slots it has consumed (DepthStepArgs::refills): right after each chunk; warp 0 only
// after its thread 0's grid-barrier arrivals (an arrival's release fence, a MEMBAR.ALL.GPU in the SASS, may wait for
// the warp's copies in flight: PTX leaves it open); or every warp once the phase's input rows are read, so that no
// refill is queued at DRAM ahead of those reads. On an H100 the three took 1109-1189 us for a frame's 8 steps, the
// input rows as long either way (bench/RESULTS.md, fourteenth session).
constexpr int kRefillAfterChunk = 0;
constexpr int kRefillAtArrivals = 1;
constexpr int kRefillAfterInputs = 2;
// Chunks a block streams over a step at most (its table of them is in shared memory): Moshi's step gives a block
// 44 at most on 132 SMs (31 at least).
constexpr int kDepthMaxBlockChunks = 64;
// A chunk row's pitch in shared memory, in elements: 64 bytes past the row's 2 KB, so that the 16-byte reads of one
// quarter warp (the 4 lanes of row g and the 4 of row g + 1) fall in distinct banks.
constexpr int kDepthRowPitch = kDepthChunkK + 32;
constexpr int kDepthSlotElements = kGemvTileRows * kDepthRowPitch;
constexpr int kDepthHeadDim = 64;
constexpr int kDepthMaxSteps = 16;
// Steps whose cached keys and values the attention requests at once: Moshi's 8 steps in one round trip.
constexpr int kAttendBatch = 8;
// Timeline entries of a block: its start, after the wait, then 3 a phase (see depth_step_trace_slots).
constexpr int kTraceHead = 2;
constexpr int kTracePerPhase = 3;

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
  __nv_bfloat16* hidden_scratch;          // [rows, hidden] contiguous
  unsigned long long* arrivals;           // [1]: the grid barrier's count, a multiple of the grid between launches
  long long* trace;                       // null, or [grid, depth_step_trace_slots(layers)]: global timer, ns
  int64_t x_stride, norm_stride, qkv_stride, out_stride, gate_up_stride, down_stride, logits_stride;
  float eps;
  int rows, dim, hidden, heads, steps, step, layers, card;
  int stages;                             // chunks in flight per block, kDepthMinStages..kDepthMaxStages
  int refills;                            // kRefillAfterChunk, kRefillAtArrivals or kRefillAfterInputs
};

// Timeline entries a block writes in a step of `layers` layers: 4 L + 1 product phases.
__host__ __device__ constexpr int depth_step_trace_slots(int layers) {
  return kTraceHead + kTracePerPhase * (4 * layers + 1);
}

namespace detail {

// Thread 0 of the block writes the global timer into its timeline's entry `slot` (nothing without a timeline).
__device__ __forceinline__ void trace_time(const DepthStepArgs& a, int slot) {
  if (a.trace != nullptr && threadIdx.x == 0) {
    long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    a.trace[static_cast<int64_t>(blockIdx.x) * depth_step_trace_slots(a.layers) + slot] = now;
  }
}

__device__ __forceinline__ int phase_trace_slot(int p, int event) { return kTraceHead + kTracePerPhase * p + event; }

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

__host__ __device__ __forceinline__ ProductPhase product_phase(const DepthStepArgs& a, int p) {
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

// Block `block`'s first tile of a phase whose tiles start at block `first_block`, of `blocks`.
__host__ __device__ __forceinline__ int first_tile(int block, int first_block, int blocks) {
  return (block - first_block + blocks) % blocks;
}

__device__ __forceinline__ int first_tile(int first_block) {
  return first_tile(static_cast<int>(blockIdx.x), first_block, static_cast<int>(gridDim.x));
}

// The block that owns tile 0 of the phase after `phase`, whose tile 0 went to `first_block`.
__host__ __device__ __forceinline__ int next_first_block(int first_block, const ProductPhase& phase, int blocks) {
  return (first_block + phase.tiles) % blocks;
}

__device__ __forceinline__ int next_first_block(int first_block, const ProductPhase& phase) {
  return next_first_block(first_block, phase, static_cast<int>(gridDim.x));
}

// Tiles block `block` owns in a phase of `tiles` tiles whose tile 0 went to `first_block`.
__host__ __device__ __forceinline__ int owned_tiles(int block, int first_block, int blocks, int tiles) {
  const int first = first_tile(block, first_block, blocks);
  return first < tiles ? (tiles - first + blocks - 1) / blocks : 0;
}

// Element offset in the embedding table of the row that row m adds at layer 0: token previous[m] of the table
// starting at row offset[0], rows of `dim`.
__device__ __forceinline__ int64_t embedding_row(const int64_t* offset, const int64_t* previous, int64_t dim, int m) {
  return (offset[0] + previous[m]) * dim;
}

// One chunk of a block's weight stream: 16 rows of a tile over kDepthChunkK elements of K at most. Row r of the
// A operand (0..15; gated, 0..7 are gate rows and 8..15 their up rows) starts at
// first_row + min(r', last_row) * k (+ up_offset for a gated up row), r' = r (r % 8 gated): rows past N repeat the
// last, whose results are not stored.
struct ChunkRecord {
  const __nv_bfloat16* first_row;  // the tile's row 0 at the chunk's first K element
  int64_t up_offset;               // elements from a gate row to its up row; 0 ungated
  int k;                           // the weight's row length (elements)
  int valid_k;                     // elements of K in the chunk
  int last_row;                    // the last row of the tile (gated: of its gate half) inside N
  int gated;
};

// The records of this block's chunks in a phase (its `owned` tiles from `tile`, one a grid apart) into
// table[start...].
__device__ __forceinline__ void write_phase_records(const ProductPhase& phase, int tile, int owned, int start,
                                                    ChunkRecord* table) {
  const int blocks = static_cast<int>(gridDim.x);
  const int columns = phase.gated ? kGemvTileRows / 2 : kGemvTileRows;
  for (int i = 0; i < owned; ++i, tile += blocks) {
    for (int c = 0; c < phase.chunks; ++c) {
      ChunkRecord record;
      const int k0 = c * kDepthChunkK;
      record.first_row = phase.weight + static_cast<int64_t>(tile) * columns * phase.k + k0;
      record.up_offset = phase.gated ? static_cast<int64_t>(phase.n) * phase.k : 0;
      record.k = phase.k;
      record.valid_k = min(kDepthChunkK, phase.k - k0);
      record.last_row = min(columns - 1, phase.n - 1 - tile * columns);
      record.gated = phase.gated;
      table[start + i * phase.chunks + c] = record;
    }
  }
}

// The block's chunks over the whole step, in the consumer's order (phase by phase, its tiles in order, each tile's
// chunks in order), into `table`, by warp 0: a lane a phase, 32 phases a round, the phases' first blocks and the
// block's record offsets from warp scans. The sequence depends on the shapes alone; the launcher checks that it
// fits kDepthMaxBlockChunks (depth_step_max_block_chunks). Returns the count, in every lane of warp 0.
__device__ int build_chunk_table(const DepthStepArgs& a, ChunkRecord* table) {
  const int lane = threadIdx.x % 32;
  const int blocks = static_cast<int>(gridDim.x);
  const int phases = 4 * a.layers + 1;
  int first_block = 0;
  int count = 0;
  for (int round = 0; round < phases; round += 32) {
    const int p = round + lane;
    ProductPhase phase{};
    if (p < phases) phase = product_phase(a, p);
    const int tiles_through = warp_inclusive_sum(phase.tiles);
    const int phase_first_block = (first_block + (tiles_through - phase.tiles) % blocks) % blocks;
    const int owned =
        p < phases ? owned_tiles(static_cast<int>(blockIdx.x), phase_first_block, blocks, phase.tiles) : 0;
    const int chunks = owned * phase.chunks;
    const int chunks_through = warp_inclusive_sum(chunks);
    if (owned > 0) {
      write_phase_records(phase, first_tile(phase_first_block), owned, count + chunks_through - chunks, table);
    }
    first_block = (first_block + __shfl_sync(0xffffffffu, tiles_through, 31) % blocks) % blocks;
    count += __shfl_sync(0xffffffffu, chunks_through, 31);
  }
  return count;
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// The weight chunks travel as 16-byte cp.async copies from the threads. Bulk copies through the Tensor Memory
// Accelerator instead (one thread issuing a chunk's 16 rows, each slot completing on an mbarrier; 444b015) were no
// faster: on an H100 the 8 steps of a frame took 1480 us against the default sequence's 913 us, where these copies
// took 1402 against 909 on another H100, and a phase's input rows took as long to read (2.7-3.6 us with an RMSNorm,
// 1.6 us without, against 0.7 us in the head phase; bench/results/2026-12-06_H100_444b015_trace_depth_step_b1.json).
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

// Each warp copies, waits for and multiplies its own K-step of every chunk (16 rows x kGemvStepK elements), so a
// chunk needs no block barrier: a lane's wait for its copies and a warp barrier make the slot's part visible to the
// warp, and a second warp barrier lets it refill the part once every lane has read it. (With a block-wide ring,
// two block barriers a chunk and the refill's copies and bookkeeping by four warps stood between every chunk's
// products and the next, on the critical path of every phase.) Lane l copies 16-byte piece l % 16 of the K-step in
// rows 2 j + l / 16, j = 0..7: each half warp reads one row's 256 contiguous bytes.
struct WeightPipeline {
  __nv_bfloat16* slots;
  const ChunkRecord* table;
  int count;     // chunks of the block over the step
  int issued;    // the next chunk to copy
  int slot;      // the consumer's next slot
  int stages;
  int refills;  // DepthStepArgs::refills
  // Refills held (at most stages - 1, in slot order from held_slot) until flush_held, see kRefillAtArrivals and
  // kRefillAfterInputs.
  bool holds;
  int held;
  int held_slot;

  __device__ __forceinline__ void issue(__nv_bfloat16* slot_base) {
    if (issued < count) {
      const ChunkRecord record = table[issued];
      const int lane = threadIdx.x % 32;
      const int column = (threadIdx.x / 32) * kGemvStepK + 8 * (lane % 16);
      if (column < record.valid_k) {
        const int half = lane / 16;
#pragma unroll
        for (int j = 0; j < kGemvTileRows / 2; ++j) {
          const int r = 2 * j + half;
          const int within = record.gated ? r % 8 : r;
          const __nv_bfloat16* row = record.first_row + min(within, record.last_row) * record.k +
                                     (record.gated && r >= 8 ? record.up_offset : 0);
          copy_async_16(slot_base + r * kDepthRowPitch + column, row + column);
        }
      }
    }
    ++issued;
    commit_copies();
  }

  __device__ __forceinline__ void start(const DepthStepArgs& a, __nv_bfloat16* shared_slots,
                                        const ChunkRecord* chunk_table, int chunk_count) {
    slots = shared_slots;
    table = chunk_table;
    count = chunk_count;
    issued = 0;
    slot = 0;
    stages = a.stages;
    refills = a.refills;
    holds = a.refills == kRefillAfterInputs || (a.refills == kRefillAtArrivals && threadIdx.x < 32);
    held = 0;
    held_slot = 0;
    for (int s = 0; s < stages; ++s) issue(slots + s * kDepthSlotElements);
  }

  // The next chunk's slot, once the warp's copies into it have landed: all but the lane's newest groups past it
  // (stages - 1, less the refills held).
  __device__ __forceinline__ const __nv_bfloat16* acquire() {
    static_assert(kDepthMinStages == 2 && kDepthMaxStages == 6, "a wait for each pipeline depth");
    switch (stages - 1 - held) {
      case 0: wait_copies<0>(); break;
      case 1: wait_copies<1>(); break;
      case 2: wait_copies<2>(); break;
      case 3: wait_copies<3>(); break;
      case 4: wait_copies<4>(); break;
      default: wait_copies<5>(); break;
    }
    __syncwarp();
    return slots + slot * kDepthSlotElements;
  }

  __device__ __forceinline__ void flush_held() {
    for (int j = 0; j < held; ++j) {
      const int s = held_slot + j < stages ? held_slot + j : held_slot + j - stages;
      issue(slots + s * kDepthSlotElements);
    }
    held = 0;
  }

  // After every lane of the warp is done with the acquired slot: refill its part with the chunk `stages` ahead
  // (or hold the refill, see holds).
  __device__ __forceinline__ void release() {
    __syncwarp();
    if (holds && held + 1 < stages) {
      if (held == 0) held_slot = slot;
      ++held;
    } else {
      flush_held();
      issue(slots + slot * kDepthSlotElements);
    }
    slot = slot + 1 == stages ? 0 : slot + 1;
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

// Where a product's input rows come from. The rows are read straight from the kernel's arguments at each load: NVVM
// (CUDA 13.0) miscompiled the struct of pointers this used to be, copied from the arguments and selected per phase,
// into loads of the argument block itself at the struct's offsets (garbage pointers, an illegal address).
enum ActivationSource { kFromX, kFromEmbeddedX, kFromAttention, kFromHidden };

// The product's input row m into the thread's pieces: 8 elements at column c * kDepthChunkK + first_column + 32 u
// for chunk c and load u, zero past K; from x (plus, for kFromEmbeddedX at layer 0, row m's embedding, rounded), the
// FFN scratch, or the attention output in shared memory. One instance a source, so that every piece's load is issued
// before any is used: with the source chosen per piece, the compiled loads (and the embedding row's two loads) came
// one after another, each waiting for the last (SASS for sm_90, nvcc 13.0).
template <ActivationSource kSource>
__device__ __forceinline__ void load_input_rows(const DepthStepArgs& a, const __nv_bfloat16* attention, int m,
                                                int first_column, int k, int chunks,
                                                uint4 (&pieces)[kDepthMaxChunks][kGemvLoadsPerRow]) {
  const __nv_bfloat16* row = kSource == kFromAttention ? attention + m * a.dim
                             : kSource == kFromHidden  ? a.hidden_scratch + static_cast<int64_t>(m) * a.hidden
                                                       : a.x + m * a.x_stride;
  const __nv_bfloat16* embedding =
      kSource == kFromEmbeddedX ? a.embed_table + embedding_row(a.embed_row_offset, a.previous, a.dim, m) : nullptr;
#pragma unroll
  for (int c = 0; c < kDepthMaxChunks; ++c) {
#pragma unroll
    for (int u = 0; u < kGemvLoadsPerRow; ++u) {
      const int column = c * kDepthChunkK + first_column + 32 * u;
      uint4 piece = make_uint4(0, 0, 0, 0);
      if (c < chunks && column < k) {
        piece = kSource == kFromAttention ? *reinterpret_cast<const uint4*>(row + column)
                                          : load_activation(row + column);
      }
      pieces[c][u] = piece;
    }
  }
  if (kSource == kFromEmbeddedX) {
    uint4 embedded[kDepthMaxChunks][kGemvLoadsPerRow];
#pragma unroll
    for (int c = 0; c < kDepthMaxChunks; ++c) {
#pragma unroll
      for (int u = 0; u < kGemvLoadsPerRow; ++u) {
        const int column = c * kDepthChunkK + first_column + 32 * u;
        embedded[c][u] = c < chunks && column < k ? __ldg(reinterpret_cast<const uint4*>(embedding + column))
                                                  : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int c = 0; c < kDepthMaxChunks; ++c) {
#pragma unroll
      for (int u = 0; u < kGemvLoadsPerRow; ++u) {
        const int column = c * kDepthChunkK + first_column + 32 * u;
        if (c < chunks && column < k) pieces[c][u] = add_rounded(pieces[c][u], embedded[c][u]);
      }
    }
  }
}

__device__ __forceinline__ float sum_of_squares(uint4 piece) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&piece);
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(pairs[j]);
    sum += f.x * f.x + f.y * f.y;
  }
  return sum;
}

// Shared memory besides the slots. A tile's partials alternate between two buffers: the next tile's products may
// be stored while this tile's epilogue still reads them (a chunk has no block barrier; the next tile's barrier
// after its stores orders the one after).
struct DepthShared {
  float4 partials[2][kDepthWarps][32];
  ChunkRecord chunks[kDepthMaxBlockChunks];
  int chunk_count;
  float square_sums[kDepthWarps][kGemvGroupRows];
  __align__(16) __nv_bfloat16 attention[kGemvGroupRows * kDepthMaxDim];
};

// The attention of layer `layer` for every (row, head) into out [rows, dim] (shared memory), rounded: 8 threads a
// (row, head), 8 of its 64 dimensions each, 32 (row, head) pairs at a time; the query from the qkv scratch, the keys
// and values of steps 0..step from the caches (the qkv phase wrote this step's), an online fp32 softmax.
__device__ void attend_into_shared(const DepthStepArgs& a, int layer, __nv_bfloat16* out) {
  const int d = 8 * (threadIdx.x % 8);
  const int pairs = a.rows * a.heads;
  const float scale = rsqrtf(static_cast<float>(kDepthHeadDim));
  // Every thread runs every round (the shuffles take whole warps); threads past the last pair store nothing.
  for (int first = 0; first < pairs; first += kDepthThreads / 8) {
    const int item = first + static_cast<int>(threadIdx.x) / 8;
    const bool valid = item < pairs;
    const int m = valid ? item / a.heads : 0;
    const int head = valid ? item % a.heads : 0;
    float q[8];
    const uint4 q_piece = load_activation(a.qkv_scratch + static_cast<int64_t>(m) * 3 * a.dim + head * kDepthHeadDim + d);
    const __nv_bfloat162* q_pairs = reinterpret_cast<const __nv_bfloat162*>(&q_piece);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(q_pairs[i]);
      q[2 * i] = f.x, q[2 * i + 1] = f.y;
    }
    const int64_t base = (((static_cast<int64_t>(layer) * a.rows + m) * a.heads + head) * a.steps) * kDepthHeadDim + d;
    float best = -INFINITY;
    float total = 0.f;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    // The keys and values of kAttendBatch steps are requested together (a round trip a batch, not a step), then
    // folded into the online softmax one step at a time, in step order.
    for (int first_step = 0; first_step <= a.step; first_step += kAttendBatch) {
      uint4 keys[kAttendBatch], values[kAttendBatch];
#pragma unroll
      for (int b = 0; b < kAttendBatch; ++b) {
        const bool cached = first_step + b <= a.step;
        const int64_t offset = base + (first_step + b) * kDepthHeadDim;
        keys[b] = cached ? load_activation(a.k_cache + offset) : make_uint4(0, 0, 0, 0);
        values[b] = cached ? load_activation(a.v_cache + offset) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int b = 0; b < kAttendBatch; ++b) {
        if (first_step + b > a.step) break;
        const __nv_bfloat162* key_pairs = reinterpret_cast<const __nv_bfloat162*>(&keys[b]);
        const __nv_bfloat162* value_pairs = reinterpret_cast<const __nv_bfloat162*>(&values[b]);
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 f = __bfloat1622float2(key_pairs[i]);
          dot += q[2 * i] * f.x + q[2 * i + 1] * f.y;
        }
#pragma unroll
        for (int offset = 1; offset < 8; offset *= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        const float score = dot * scale;
        const float new_best = fmaxf(best, score);
        const float correction = __expf(best - new_best);
        const float weight = __expf(score - new_best);
        total = total * correction + weight;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 f = __bfloat1622float2(value_pairs[i]);
          acc[2 * i] = acc[2 * i] * correction + weight * f.x;
          acc[2 * i + 1] = acc[2 * i + 1] * correction + weight * f.y;
        }
        best = new_best;
      }
    }
    if (valid) {
      uint4 result;
      __nv_bfloat162* result_pairs = reinterpret_cast<__nv_bfloat162*>(&result);
#pragma unroll
      for (int i = 0; i < 4; ++i) result_pairs[i] = __floats2bfloat162_rn(acc[2 * i] / total, acc[2 * i + 1] / total);
      *reinterpret_cast<uint4*>(out + m * a.dim + head * kDepthHeadDim + d) = result;
    }
  }
}

// One product phase of the block: every tile it owns, chunk by chunk from the pipeline, then the epilogue.
// norm_weight: RMSNorm the source first (null: no norm). Returns the block owning the next phase's tile 0.
__device__ int product_phase_run(const DepthStepArgs& a, int p, int first_block, WeightPipeline& pipeline,
                                  ActivationSource source, const __nv_bfloat16* norm_weight,
                                  DepthShared& shared) {
  const ProductPhase phase = product_phase(a, p);
  trace_time(a, phase_trace_slot(p, 0));
  int tile = first_tile(first_block);
  if (tile >= phase.tiles) {
    // No input rows to read here: refills held for after them go now.
    if (pipeline.refills == kRefillAfterInputs) pipeline.flush_held();
    trace_time(a, phase_trace_slot(p, 1));
    trace_time(a, phase_trace_slot(p, 2));
    return next_first_block(first_block, phase);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int group = lane / 4;
  const int lane_k = 8 * (lane % 4);
  const int x_row = min(group, a.rows - 1);

  // Thread e finishes row m = e / columns, column tile_column + e % columns of each tile (one element at most: a
  // tile has kGemvGroupRows x 16 elements).
  static_assert(kGemvGroupRows * kGemvTileRows <= kDepthThreads, "a thread finishes one element of a tile");
  const int columns = phase.gated ? kGemvTileRows / 2 : kGemvTileRows;
  const int m = static_cast<int>(threadIdx.x) / columns;
  const int column_in_tile = static_cast<int>(threadIdx.x) % columns;
  const bool residual_phase = phase.kind == kOut || phase.kind == kDown;
  // The residual of the element this thread finishes at `column`, requested before the products, and for the first
  // tile before the phase's inputs (the attention, the FFN activations): its round trip overlaps theirs. Only this
  // block writes these columns of x during the phase. At layer 0's out phase the residual is x plus the
  // embedding, rounded, which the epilogue's store makes x.
  const auto residual_at = [&](int column) {
    float residual = 0.f;
    if (residual_phase && m < a.rows && column < phase.n) {
      residual = __bfloat162float(__ldcg(a.x + m * a.x_stride + column));
      if (phase.kind == kOut && p == kOut) {
        const int64_t row = embedding_row(a.embed_row_offset, a.previous, a.dim, m);
        residual = __bfloat162float(__float2bfloat16_rn(residual + __bfloat162float(a.embed_table[row + column])));
      }
    }
    return residual;
  };
  const int first_owned = tile;
  float residual = residual_at(tile * columns + column_in_tile);

  if (phase.kind == kOut) {
    attend_into_shared(a, p / 4, shared.attention);
    __syncthreads();
  }
  // The warp's B-operand pieces for each chunk (K-step chunk * kDepthWarps + warp); zero past K. Together the
  // block's warps hold every element of the rows (each row's pieces in the 4 lanes of one group), so the RMSNorm's
  // sums of squares come from the pieces themselves: one read of the source.
  uint4 x_pieces[kDepthMaxChunks][kGemvLoadsPerRow];
  // The norm weight's pieces of the first chunk (all of K at the model's D <= kDepthChunkK) are requested with x,
  // not after the sums of squares: one round trip fewer before the products.
  uint4 first_norm_pieces[kGemvLoadsPerRow];
  float square_sum = 0.f;
#pragma unroll
  for (int u = 0; u < kGemvLoadsPerRow; ++u) {
    const int column = warp * kGemvStepK + 32 * u + lane_k;
    first_norm_pieces[u] = norm_weight != nullptr && column < phase.k
                               ? __ldg(reinterpret_cast<const uint4*>(norm_weight + column))
                               : make_uint4(0, 0, 0, 0);
  }
  const int first_column = warp * kGemvStepK + lane_k;
  switch (source) {
    case kFromX:
      load_input_rows<kFromX>(a, shared.attention, x_row, first_column, phase.k, phase.chunks, x_pieces);
      break;
    case kFromEmbeddedX:
      load_input_rows<kFromEmbeddedX>(a, shared.attention, x_row, first_column, phase.k, phase.chunks, x_pieces);
      break;
    case kFromAttention:
      load_input_rows<kFromAttention>(a, shared.attention, x_row, first_column, phase.k, phase.chunks, x_pieces);
      break;
    default:
      load_input_rows<kFromHidden>(a, shared.attention, x_row, first_column, phase.k, phase.chunks, x_pieces);
      break;
  }
  if (norm_weight != nullptr) {
#pragma unroll
    for (int c = 0; c < kDepthMaxChunks; ++c) {
#pragma unroll
      for (int u = 0; u < kGemvLoadsPerRow; ++u) square_sum += sum_of_squares(x_pieces[c][u]);
    }
    square_sum += __shfl_xor_sync(0xffffffffu, square_sum, 1);
    square_sum += __shfl_xor_sync(0xffffffffu, square_sum, 2);
    if (lane % 4 == 0) shared.square_sums[warp][group] = square_sum;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < kDepthWarps; ++w) total += shared.square_sums[w][group];
    const float scale = rsqrtf(a.eps + total / static_cast<float>(phase.k));
#pragma unroll
    for (int c = 0; c < kDepthMaxChunks; ++c) {
#pragma unroll
      for (int u = 0; u < kGemvLoadsPerRow; ++u) {
        const int column = c * kDepthChunkK + warp * kGemvStepK + 32 * u + lane_k;
        if (c < phase.chunks && column < phase.k) {
          const uint4 norm_piece =
              c == 0 ? first_norm_pieces[u] : __ldg(reinterpret_cast<const uint4*>(norm_weight + column));
          x_pieces[c][u] = normalize_piece(x_pieces[c][u], norm_piece, scale);
        }
      }
    }
  }

  trace_time(a, phase_trace_slot(p, 1));
  if (pipeline.refills == kRefillAfterInputs) pipeline.flush_held();

  int parity = 0;
  for (; tile < phase.tiles; tile += static_cast<int>(gridDim.x)) {
    const int column = tile * columns + column_in_tile;
    const bool finishes = m < a.rows && column < phase.n;
    if (tile != first_owned) residual = residual_at(column);
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
      pipeline.release();
    }
    const float4(*partials)[32] = shared.partials[parity];
    shared.partials[parity][warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    parity ^= 1;
    __syncthreads();

    if (finishes) {
      const float2 sums =
          tile_element_sums(partials, kDepthWarps, m, column_in_tile, phase.gated);
      const float sum = sums.x;
      const float up = sums.y;
      switch (phase.kind) {
        case kQkv: {
          // Queries go to the scratch, keys and values to the caches, where the out phase reads them.
          const __nv_bfloat16 value = __float2bfloat16_rn(sum);
          if (column < a.dim) {
            a.qkv_scratch[static_cast<int64_t>(m) * 3 * a.dim + column] = value;
          } else {
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
        case kDown:
          a.x[m * a.x_stride + column] = __float2bfloat16_rn(sum + residual);
          break;
        case kGateUp:
          a.hidden_scratch[static_cast<int64_t>(m) * a.hidden + column] =
              __float2bfloat16_rn(sum / (1.f + __expf(-sum)) * up);
          break;
        default:
          a.logits[m * a.logits_stride + column] = __float2bfloat16_rn(sum);
          break;
      }
    }
  }
  trace_time(a, phase_trace_slot(p, 2));
  return next_first_block(first_block, phase);
}

// Every block waits until all have arrived, their writes released to the whole GPU (the protocol is in the file's
// doc). Graph-safe: the count's value is never baked in. Thread 0's state.
struct GridBarrier {
  unsigned long long* arrivals;
  unsigned long long target;

  // After the wait for the previous kernel, whose launches of this kernel have all left the count at a multiple of
  // the grid; blocks of this launch may have arrived already, at most gridDim.x - 1 of them.
  __device__ __forceinline__ void start(unsigned long long* count) {
    arrivals = count;
    if (threadIdx.x == 0) {
      unsigned long long now;
      asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(now) : "l"(count) : "memory");
      target = now - now % gridDim.x;
    }
  }

  // Warp 0 issues the refills it held for kRefillAtArrivals once its thread 0 has arrived, while it polls.
  __device__ __forceinline__ void sync(WeightPipeline& pipeline) {
    __syncthreads();
    if (threadIdx.x < 32) {
      if (threadIdx.x == 0) {
        target += gridDim.x;
        // The release orders the block's writes (made visible to thread 0 by the block barrier above) before the
        // arrival; the acquiring poll orders the other blocks' writes before everything after the barrier.
        asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(arrivals) : "memory");
      }
      __syncwarp();
      if (pipeline.refills == kRefillAtArrivals) pipeline.flush_held();
      if (threadIdx.x == 0) {
        unsigned long long now;
        do {
          asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(now) : "l"(arrivals) : "memory");
        } while (now < target);
      }
    }
    __syncthreads();
  }
};

__global__ void __launch_bounds__(kDepthThreads, 1) depth_step_bf16_kernel(DepthStepArgs a) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  __nv_bfloat16* slots = reinterpret_cast<__nv_bfloat16*>(shared_bytes);
  DepthShared& shared =
      *reinterpret_cast<DepthShared*>(shared_bytes + kDepthMaxStages * kDepthSlotElements * sizeof(__nv_bfloat16));

  // The weights are constant during a step: their first chunks stream in while the previous kernel finishes.
  trace_time(a, 0);
  if (threadIdx.x < 32) {
    const int count = build_chunk_table(a, shared.chunks);
    if (threadIdx.x == 0) shared.chunk_count = count;
  }
  __syncthreads();
  WeightPipeline pipeline;
  pipeline.start(a, slots, shared.chunks, shared.chunk_count);
  await_previous_kernel();
  trace_time(a, 1);
  GridBarrier barrier;
  barrier.start(a.arrivals);

  int first_block = 0;
  for (int layer = 0; layer < a.layers; ++layer) {
    for (int kind = kQkv; kind <= kDown; ++kind) {
      const ActivationSource source = kind == kQkv ? (layer == 0 ? kFromEmbeddedX : kFromX)
                                      : kind == kOut ? kFromAttention
                                      : kind == kGateUp ? kFromX
                                                        : kFromHidden;
      const __nv_bfloat16* norm = kind == kQkv ? a.norm1 : kind == kGateUp ? a.norm2 : nullptr;
      first_block = product_phase_run(a, 4 * layer + kind, first_block, pipeline, source,
                                      norm != nullptr ? norm + layer * a.norm_stride : nullptr, shared);
      barrier.sync(pipeline);
    }
  }
  product_phase_run(a, 4 * a.layers, first_block, pipeline, kFromX, nullptr, shared);
  wait_copies<0>();
}

}  // namespace detail

// The most chunks any block of a `blocks`-block launch streams over a step of these shapes (serially, as the
// kernel's table builder does per phase): the launch needs it to be at most kDepthMaxBlockChunks.
inline int depth_step_max_block_chunks(const DepthStepArgs& a, int blocks) {
  int most = 0;
  for (int block = 0; block < blocks; ++block) {
    int first_block = 0;
    int chunks = 0;
    for (int p = 0; p <= 4 * a.layers; ++p) {
      const detail::ProductPhase phase = detail::product_phase(a, p);
      chunks += detail::owned_tiles(block, first_block, blocks, phase.tiles) * phase.chunks;
      first_block = detail::next_first_block(first_block, phase, blocks);
    }
    most = chunks > most ? chunks : most;
  }
  return most;
}

constexpr size_t kDepthSharedBytes =
    kDepthMaxStages * kDepthSlotElements * sizeof(__nv_bfloat16) + sizeof(detail::DepthShared);
static_assert(kDepthSharedBytes <= 227 * 1024, "the slots and the rest fit the 227 KB an sm_90 block may have");

inline size_t depth_step_shared_bytes() { return kDepthSharedBytes; }

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
