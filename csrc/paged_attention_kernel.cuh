// Decode attention of Helium over the paged KV cache, in CUDA: for one new token per slot, its RoPE, the write of
// its key and value into their page, and attention over the slot's live window, in one launch; bf16 activations and
// pools, head dim 128. Semantics, shapes and split workspace are kernels/paged_attention.py's (the spec is its
// paged_attention_ref). Device code and a launcher on raw pointers and a stream, free of torch (the torch op, with
// its argument checks, is paged_attention.cu).
//
// Shapes (S slots in the cache, the first B of them in this call; slot b is row b everywhere):
//   qkv [B, 3 H 128] (q | k | v, each (head, dim)); k_pool, v_pool [P, H, PAGE, 128] with any page, head and row
//   strides and a unit stride in the head dim; page_table [S, N] int32 (position p of slot b lives in page
//   page_table[b, (p / PAGE) % N], row p % PAGE); positions [S] int32 or int64; exec_mask [S] bool;
//   out [B, H 128] (rows of slots that do not run are left as they are).
//
// Why CUDA here: at one conversation the Triton kernel reads the window at 55-68% of the copy bandwidth (its
// tensor-core loop keeps one block of keys and values in flight a program, and its 255 registers fit two programs
// an SM). Here a warp reads 16 positions of keys and values a step with sixteen 16-byte loads a lane, straight into
// registers (as the CUDA GEMV streams its weights: no shared-memory staging), and 16 warps an SM keep 128 KB in
// flight.
//
// Work split: grid (splits, B H). Block (split, slot H + head) takes the same run of the window as the Triton
// kernel's program: chunk = cdiv(live, splits) rounded up to 16 positions, run `split` covering
// [first + split chunk, first + (split + 1) chunk); a short window spreads over fewer, full runs and blocks past it
// exit. The block reads its run's page-table entries into shared memory once. Its 4 warps take the run's groups of
// 16 positions round robin; lane (h = lane / 16, s = lane % 16) holds dims 8 s .. 8 s + 7 of the group's rows
// 2 i + h (i < 8), so each half-warp owns the even or the odd rows with an online-softmax state of its own (max,
// sum, and the lane's 8 weighted-value sums); a row's score is its 16 lanes' partial dot products summed by 4
// shuffles. The block then merges its 8 half-warp states in shared memory in a fixed order, a thread a dim. With
// more than one active run, each writes (weighted sums, max, sum) to the workspace in kernels/paged_attention.py's
// layout and the last to arrive for a (slot, head) merges them in run order and resets its counter to 0: the same
// results on every call (no float atomics), and the counters are zero between calls (graph-safe).
//
// The new token: the run that holds position q starts warp 0's first half-warp from the new key and value (weight
// 1) in registers and stores them into their row; no other block reads that row in this launch.
//
// Numerics, as the reference: RoPE in fp32 on the fp32 angle position * exp(i * step), its cos and sin evaluated in
// double (the build's fast math would otherwise give the approximate sin and cos, whose error grows with the angle,
// that is with the position) and the rotation's products kept apart (no FMA contraction), rounded to bf16; the
// query then scaled by 128^-0.5 log2(e), so the softmax runs on exp2; scores, softmax and weighted sums in fp32.
// The sums run in another order than the Triton kernel's, so the two agree to fp32 rounding, not bit for bit.
//
// Floor: the live keys and values, min(q + 1, context) x H x 128 x 2 x 2 bytes a slot (49 MB at Helium's full
// window of 3000), read once: 11.6 us at an H200's 4.23 TB/s copy bandwidth, 16.2 us at an H100's 3.03.
//
// Programmatic dependent launch: by default a block waits for the previous kernel before anything. With
// reads_before_wait it first reads the mask, position and page table, builds its RoPE table and requests its warps'
// first group of keys and values, then waits, then reads the query and the new key and value (the previous kernel's
// output): where the previous kernel is Helium's qkv product, which writes none of the former and lets this kernel
// start only after its own wait, the window's first reads overlap the product's tail. The same sums in the same
// order either way: the same bits.
//
// Status: 128 registers (121 before the reads before the wait), no spills (sm_90, nvcc 13.0). On an H100 its tests
// passed (reference outputs, graph replays, the bf16 language model over 200 frames), it took 22.4 us a layer against
// the Triton kernel's 24.0 at one slot and 134 against 149 us at eight, and it shortened the frame by 0.02-0.04 ms at
// one and eight (bench/RESULTS.md, sixteenth and seventeenth sessions): the default (ops.CUDA_PAGED_ATTENTION). The
// reads before the wait took another 0.08 ms off the B = 1 frame and 0.01 ms off B = 8 (same run): on by default
// (ops.PAGED_ATTENTION_READS_BEFORE_WAIT).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "programmatic_launch.cuh"

namespace moshi_fast {

constexpr int kPagedHeadDim = 128;
// Window positions a warp reads per step: 16-byte loads cover two rows a warp, eight of them 16 rows.
constexpr int kPagedGroupRows = 16;
constexpr int kPagedWarps = 4;
constexpr int kPagedThreads = kPagedWarps * 32;
// Page-table entries a block keeps in shared memory: its run spans at most chunk / PAGE + 2 pages.
constexpr int kPagedMaxRunPages = 512;
constexpr int kPagedMaxSplits = 256;

static_assert(kPagedThreads == kPagedHeadDim, "the block's merge gives each thread one dim");

struct PagedAttentionArgs {
  const __nv_bfloat16* qkv;    // [B, 3 H 128], rows 16-byte aligned
  __nv_bfloat16* k_pool;       // [P, H, PAGE, 128], rows 16-byte aligned
  __nv_bfloat16* v_pool;       // same layout as k_pool
  const int32_t* page_table;   // [S, N]
  const void* positions;       // [S] int32 or int64, contiguous
  const bool* exec_mask;       // [S], contiguous
  __nv_bfloat16* out;          // [B, H 128]
  float* partials;             // [B H splits 128] weighted sums, then [B H splits 2] (max, sum); unused unsplit
  int32_t* counters;           // [B H] arrivals, zero between calls; unused unsplit
  int64_t qkv_row_stride;      // elements
  int64_t out_row_stride;
  int64_t table_row_stride;
  int64_t pool_page_stride;
  int64_t pool_head_stride;
  int64_t pool_row_stride;
  int batch;
  int heads;
  int context;
  int page_shift;              // log2(PAGE)
  int pages_per_slot;          // N; N PAGE >= context
  int splits;                  // 1..kPagedMaxSplits, with paged_attention_run_pages(context, splits, PAGE) in range
  bool positions_int64;
  bool reads_before_wait;      // programmatic launch: the window's first reads before the wait (see the kernel)
  float rope_exponent_step;    // fp32(-ln(max_period) 2 / 128): pair i turns by position * exp(i * step)
  float query_scale;           // 128^-0.5 log2(e)
};

// Positions in a run when the window is `live` long: cdiv(live, splits) rounded up to whole groups.
__host__ __device__ inline int paged_attention_chunk(int live, int splits) {
  return ((live + splits - 1) / splits + kPagedGroupRows - 1) / kPagedGroupRows * kPagedGroupRows;
}

// Page-table entries a run may span at most (the window is at most `context` long).
inline int paged_attention_run_pages(int context, int splits, int page_shift) {
  return (paged_attention_chunk(context, splits) >> page_shift) + 2;
}

namespace paged_detail {

// Keys and values are read once: they bypass L1. Nothing in the launch writes the rows read (the one row written
// is the new token's, which no block reads), so the read-only path is safe.
__device__ __forceinline__ uint4 load_streaming(const __nv_bfloat16* address) {
  uint4 value;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(value.x), "=r"(value.y), "=r"(value.z), "=r"(value.w)
               : "l"(address));
  return value;
}

// The two bf16 halves of a 32-bit word as fp32 (exact).
__device__ __forceinline__ float low_bf16(uint32_t word) { return __uint_as_float(word << 16); }
__device__ __forceinline__ float high_bf16(uint32_t word) { return __uint_as_float(word & 0xffff0000u); }

__device__ __forceinline__ void unpack8(const uint4& bits, float (&x)[8]) {
  const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    x[2 * j] = low_bf16(words[j]);
    x[2 * j + 1] = high_bf16(words[j]);
  }
}

__device__ __forceinline__ uint32_t pack_bf16x2(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// RoPE of the lane's 8 elements (4 interleaved pairs, pair p = 4 s + j turning by rope[p] = (cos, sin)), rounded
// to bf16: re cos - im sin, re sin + im cos, each product rounded on its own as torch computes them.
__device__ __forceinline__ uint4 rotate8(const uint4& bits, const float2* rope, int first_pair) {
  float x[8];
  unpack8(bits, x);
  uint32_t words[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 turn = rope[first_pair + j];
    const float re = x[2 * j], im = x[2 * j + 1];
    words[j] = pack_bf16x2(__fsub_rn(__fmul_rn(re, turn.x), __fmul_rn(im, turn.y)),
                           __fadd_rn(__fmul_rn(re, turn.y), __fmul_rn(im, turn.x)));
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

__device__ __forceinline__ float dot8(const float (&query)[8], const uint4& key_bits) {
  float key[8];
  unpack8(key_bits, key);
  float sum = query[0] * key[0];
#pragma unroll
  for (int d = 1; d < 8; ++d) sum = fmaf(query[d], key[d], sum);
  return sum;
}

// The sum over the lane's half-warp (lanes 0-15 or 16-31), in every lane of it.
__device__ __forceinline__ float half_warp_sum(float value) {
#pragma unroll
  for (int offset = 1; offset < 16; offset *= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

__global__ void __launch_bounds__(kPagedThreads, 4) paged_attention_bf16_kernel(PagedAttentionArgs args) {
  __shared__ int32_t run_pages[kPagedMaxRunPages];
  __shared__ float2 rope[kPagedHeadDim / 2];
  __shared__ float half_weighted[2 * kPagedWarps][kPagedHeadDim];
  __shared__ float half_max[2 * kPagedWarps];
  __shared__ float half_sum[2 * kPagedWarps];
  __shared__ bool merges_splits;

  // reads_before_wait: everything up to the first group of keys and values is read before the wait. Safe where the
  // previous kernel (Helium's qkv product) writes none of it and lets this one start only after its own wait, so
  // that every kernel before it has finished: the mask, positions and page table are the frame's, and the rows
  // before the new token were written by earlier frames. The query and the new key and value are the previous
  // kernel's output: read after the wait. A block with nothing to do still waits before it leaves: the kernel must
  // not finish before the previous one, which the kernels after it rely on.
  if (!args.reads_before_wait) await_previous_kernel();
  const auto leave_early = [&] {
    if (args.reads_before_wait) await_previous_kernel();
  };
  const int split = blockIdx.x;
  const int pair = blockIdx.y;
  const int slot = pair / args.heads;
  const int head = pair % args.heads;
  const int lane = threadIdx.x % 32;
  const int sub = lane % 16;
  // The slot's flag and its position are requested together (one round trip), before any branch.
  const bool runs = args.exec_mask[slot];
  const int64_t position = args.positions_int64 ? static_cast<const int64_t*>(args.positions)[slot]
                                                : static_cast<const int32_t*>(args.positions)[slot];
  if (!runs) return leave_early();
  const int64_t first = position - args.context + 1 > 0 ? position - args.context + 1 : 0;
  const int live = static_cast<int>(position - first + 1);
  const int chunk = paged_attention_chunk(live, args.splits);
  const int active_splits = (live + chunk - 1) / chunk;
  if (split >= active_splits) return leave_early();
  const int64_t start = first + static_cast<int64_t>(split) * chunk;
  const bool holds_new = start + chunk > position;
  const int old_rows = static_cast<int>((start + chunk < position ? start + chunk : position) - start);

  const int warp = threadIdx.x / 32;
  const int half = lane / 16;
  const int page_mask = (1 << args.page_shift) - 1;
  const int32_t* table = args.page_table + slot * args.table_row_stride;
  const int64_t first_page = start >> args.page_shift;
  const int run_page_count =
      old_rows > 0 ? static_cast<int>(((start + old_rows - 1) >> args.page_shift) - first_page + 1) : 0;
  for (int i = threadIdx.x; i < run_page_count; i += kPagedThreads) {
    run_pages[i] = table[(first_page + i) % args.pages_per_slot];
  }
  if (threadIdx.x < kPagedHeadDim / 2) {
    const float frequency =
        static_cast<float>(exp(static_cast<double>(static_cast<float>(threadIdx.x) * args.rope_exponent_step)));
    const float angle = __fmul_rn(static_cast<float>(position), frequency);
    double sine, cosine;
    sincos(static_cast<double>(angle), &sine, &cosine);
    rope[threadIdx.x] = make_float2(static_cast<float>(cosine), static_cast<float>(sine));
  }
  __syncthreads();

  const int start_in_page = static_cast<int>(start & page_mask);
  const int64_t head_offset = head * args.pool_head_stride + 8 * sub;
  const int groups = (old_rows + kPagedGroupRows - 1) / kPagedGroupRows;
  // The lane's rows of a group are group * 16 + 2 i + half; those with 2 i >= rows_left(group) lie past the run (the
  // same for every lane of a half-warp, so the branches on it below are too).
  const auto rows_left = [&](int group) { return old_rows - group * kPagedGroupRows - half; };
  uint4 keys[8], values[8];
  const auto load_group = [&](int group) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int row = group * kPagedGroupRows + 2 * i + half;
      if (2 * i < rows_left(group)) {
        const int run_row = start_in_page + row;
        const int64_t offset = static_cast<int64_t>(run_pages[run_row >> args.page_shift]) * args.pool_page_stride +
                               head_offset + (run_row & page_mask) * args.pool_row_stride;
        keys[i] = load_streaming(args.k_pool + offset);
        values[i] = load_streaming(args.v_pool + offset);
      } else {
        keys[i] = values[i] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  if (warp < groups) load_group(warp);
  if (args.reads_before_wait) await_previous_kernel();

  const __nv_bfloat16* token = args.qkv + slot * args.qkv_row_stride + head * kPagedHeadDim + 8 * sub;
  float query[8];
  unpack8(rotate8(__ldg(reinterpret_cast<const uint4*>(token)), rope, 4 * sub), query);
#pragma unroll
  for (int d = 0; d < 8; ++d) query[d] *= args.query_scale;

  float row_max = -INFINITY;
  float row_sum = 0.f;
  float weighted[8];
#pragma unroll
  for (int d = 0; d < 8; ++d) weighted[d] = 0.f;
  if (holds_new && warp == 0) {
    const int heads_width = args.heads * kPagedHeadDim;
    const uint4 key_bits = rotate8(__ldg(reinterpret_cast<const uint4*>(token + heads_width)), rope, 4 * sub);
    const uint4 value_bits = __ldg(reinterpret_cast<const uint4*>(token + 2 * heads_width));
    const float score = half_warp_sum(dot8(query, key_bits));
    if (half == 0) {
      const int64_t page = table[(position >> args.page_shift) % args.pages_per_slot];
      const int64_t offset = page * args.pool_page_stride + head * args.pool_head_stride +
                             (position & page_mask) * args.pool_row_stride + 8 * sub;
      *reinterpret_cast<uint4*>(args.k_pool + offset) = key_bits;
      *reinterpret_cast<uint4*>(args.v_pool + offset) = value_bits;
      row_max = score;
      row_sum = 1.f;
      unpack8(value_bits, weighted);
    }
  }

  for (int group = warp; group < groups; group += kPagedWarps) {
    if (group != warp) load_group(group);
    const int group_rows_left = rows_left(group);
    float scores[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) scores[i] = half_warp_sum(dot8(query, keys[i]));
    float group_max = row_max;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (2 * i < group_rows_left) group_max = fmaxf(group_max, scores[i]);
    }
    if (group_max == -INFINITY) continue;
    const float rescale = exp2f(row_max - group_max);
    row_sum *= rescale;
#pragma unroll
    for (int d = 0; d < 8; ++d) weighted[d] *= rescale;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (2 * i >= group_rows_left) continue;
      const float weight = exp2f(scores[i] - group_max);
      row_sum += weight;
      float value[8];
      unpack8(values[i], value);
#pragma unroll
      for (int d = 0; d < 8; ++d) weighted[d] = fmaf(weight, value[d], weighted[d]);
    }
    row_max = group_max;
  }

  // The block's merge: half-warps in order, a thread a dim. An active run holds a key, so some max is finite.
  const int half_warp = 2 * warp + half;
#pragma unroll
  for (int d = 0; d < 8; ++d) half_weighted[half_warp][8 * sub + d] = weighted[d];
  if (sub == 0) {
    half_max[half_warp] = row_max;
    half_sum[half_warp] = row_sum;
  }
  __syncthreads();
  const int dim = threadIdx.x;
  float block_max = -INFINITY;
#pragma unroll
  for (int h = 0; h < 2 * kPagedWarps; ++h) block_max = fmaxf(block_max, half_max[h]);
  float block_sum = 0.f, block_weighted = 0.f;
#pragma unroll
  for (int h = 0; h < 2 * kPagedWarps; ++h) {
    const float scale = exp2f(half_max[h] - block_max);
    block_sum = fmaf(half_sum[h], scale, block_sum);
    block_weighted = fmaf(half_weighted[h][dim], scale, block_weighted);
  }
  __nv_bfloat16* out = args.out + slot * args.out_row_stride + head * kPagedHeadDim + dim;
  if (active_splits == 1) {
    *out = __float2bfloat16_rn(block_weighted / block_sum);
    return;
  }

  const int64_t pair_partials = static_cast<int64_t>(pair) * args.splits;
  float* stats = args.partials + static_cast<int64_t>(args.batch) * args.heads * args.splits * kPagedHeadDim;
  args.partials[(pair_partials + split) * kPagedHeadDim + dim] = block_weighted;
  if (dim == 0) {
    stats[2 * (pair_partials + split)] = block_max;
    stats[2 * (pair_partials + split) + 1] = block_sum;
  }
  // Every thread's partial stores are ordered before the block's one arrival; the merging block orders its reads
  // after it (L2 loads, past any stale L1 line).
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) merges_splits = atomicAdd(args.counters + pair, 1) == active_splits - 1;
  __syncthreads();
  if (!merges_splits) return;
  __threadfence();
  float total_max = -INFINITY;
  for (int s = 0; s < active_splits; ++s) total_max = fmaxf(total_max, __ldcg(stats + 2 * (pair_partials + s)));
  float total_sum = 0.f, total_weighted = 0.f;
  for (int s = 0; s < active_splits; ++s) {
    const float scale = exp2f(__ldcg(stats + 2 * (pair_partials + s)) - total_max);
    total_sum = fmaf(__ldcg(stats + 2 * (pair_partials + s) + 1), scale, total_sum);
    total_weighted = fmaf(__ldcg(args.partials + (pair_partials + s) * kPagedHeadDim + dim), scale, total_weighted);
  }
  *out = __float2bfloat16_rn(total_weighted / total_sum);
  if (dim == 0) args.counters[pair] = 0;
}

}  // namespace paged_detail

// Launches on `stream` (no allocation, no synchronisation: graph-capturable). programmatic: a programmatic dependent
// launch (Hopper and later), which the kernel's await_previous_kernel makes safe after any kernel.
inline cudaError_t launch_paged_attention_bf16(const PagedAttentionArgs& args, cudaStream_t stream, bool programmatic) {
  return launch_kernel(paged_detail::paged_attention_bf16_kernel,
                       dim3(static_cast<unsigned>(args.splits), static_cast<unsigned>(args.batch * args.heads)),
                       dim3(kPagedThreads), stream, programmatic, args);
}

}  // namespace moshi_fast
