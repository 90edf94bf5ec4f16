// Token sampling for decode: Kyutai's temperature + top-k exponential race with moshi_fast's counter-based noise,
// one block per slot row, every intermediate in registers and shared memory. Device code and a launcher on raw
// pointers and a stream, free of torch (the torch op, with its argument checks, is sample_tokens.cu).
//
// The spec is moshi_fast.reference.sampling.sample; kernels/sample_tokens.py (the Triton kernel, its docstring
// the semantics in full) draws the same tokens. In short, for a row of V logits, temperature T and top_k k:
//   - greedy (T <= 0, or k = 1): the first vocabulary id holding the maximum;
//   - otherwise the k candidates are the keys above the k-th largest one, then the keys equal to it in vocabulary
//     order until there are k; a candidate's rank orders (logit descending, id ascending); it races
//     expf(logit / T - max / T) / E(rank), E = -logf(uniform(hash(seed, counter, draw, rank))), every division
//     correctly rounded, and the highest race wins (NaN above everything, the lowest rank on ties, a race of -inf
//     from the -0.0 noise of the top uniform below every other).
// exp and log are libdevice's __nv_expf and __nv_logf, called by name: the functions of the Triton kernel
// (libdevice.exp / log), which the extension's --use_fast_math would otherwise swap for ex2.approx / lg2.approx
// under the names expf and logf; divisions are __fdiv_rn, correctly rounded under any flags. Like Triton's
// libdevice calls they flush denormals (the build's -ftz, as Triton's libdevice), which only moves races far
// below the winner's.
//
// Shapes: logits [B, V] bf16 or fp32, any strides, V < 2^16 (text 32000, audio 2048); temperature [B] fp32;
// top_k, seed, counter [B] int64; out [B] int64. max_top_k <= kSampleMaxCandidates (text 25, audio 250).
//
// Why it is faster than the Triton kernel: the same bisection for the k-th key, but each pass is one warp
// reduction instruction (redux.sync) per warp and one barrier, the keys a thread holds sit in registers in
// vocabulary order (so the compaction's prefix sum is a warp scan plus one barrier), and the candidate list, their
// ranks and the race stay in shared memory. At the audio row (V = 2048, k = 250, 256 threads of 8 keys) the bulk
// is ~16 bisection passes of ~100 cycles and the rank count (250 shared-memory compares a candidate); with
// SampleTokensArgs::radix_select a radix select of two 8-bit passes replaces the bisection (radix_threshold) and
// the rank count reads 16 bytes of candidates at a time. The text row
// (bf16, k <= 32) may run sample_tokens_small_k_kernel instead (SampleTokensArgs::warp_kernel; on an H100 16.3 us
// against 20.0 at B = 1, both with 16-byte loads): the same tokens, selected per warp with no block-wide reduction
// (see there).
//
// Floor: the logits (B V x 2 or 4 bytes) plus 40 bytes a slot, a few hundredths of a microsecond; the kernel is
// latency-bound (a chain of block-wide reductions), one block per slot, so flat in B up to the SM count.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "programmatic_launch.cuh"
#include "warp_scan.cuh"

// libdevice's correctly specified exp and log (see above).
extern "C" __device__ float __nv_expf(float);
extern "C" __device__ float __nv_logf(float);

namespace moshi_fast {

// The largest max_top_k served: the candidate list lives in shared memory.
constexpr int kSampleMaxCandidates = 1024;
// Vocabulary ids and counts are packed into 16-bit fields.
constexpr int kSampleMaxVocab = 1 << 16;
// Bisection passes that split at the float midpoint of the interval before the key midpoint (as the Triton kernel).
constexpr int kSampleFloatPasses = 16;

struct SampleTokensArgs {
  const void* logits;          // [batch, vocab], bf16 (logits_bf16) or fp32
  int64_t stride_logits_b;     // in elements
  int64_t stride_logits_v;
  const float* temperature;    // [batch], stride stride_temperature
  const int64_t* top_k;        // [batch]
  const int64_t* seed;         // [batch]
  const int64_t* counter;      // [batch]
  int64_t* out;                // [batch]
  int64_t stride_temperature;
  int64_t stride_top_k;
  int64_t stride_seed;
  int64_t stride_counter;
  int64_t stride_out;
  int batch;
  int vocab;                   // 1 .. kSampleMaxVocab - 1
  int top_k_cap;               // min(max_top_k, vocab), 1 .. kSampleMaxCandidates
  int draw;                    // 0 text, 1 + k audio codebook k
  bool logits_bf16;
  bool vector_loads;           // asked for, rows contiguous and 16-byte aligned: a thread's keys load as 16-byte
                               // pieces
  bool warp_kernel;            // sample_tokens_small_k_kernel where it applies
  bool radix_select;           // sample_tokens_kernel finds the k-th key by radix select, not bisection
};

namespace sampling_detail {

// int32 key of fp32 bits whose signed order is the floats' order; -0.0 keys as +0.0. bf16 values keep their 16
// significant bits (shift 16), which halves the bisection's key range.
template <int kShift>
__device__ __forceinline__ int float_key(float x) {
  const int bits = x == 0.f ? 0 : __float_as_int(x);
  return (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> kShift;
}

// A float with this key (a logit's own value for a logit's key): the shifted-out bits were ones for negative
// floats and zeros for positive ones, and the order map is its own inverse.
template <int kShift>
__device__ __forceinline__ float key_float(int key) {
  const int key32 = kShift == 0 ? key : static_cast<int>((static_cast<unsigned>(key) << kShift) |
                                                         ((key >> 31) & ((1u << kShift) - 1)));
  return __int_as_float(key32 ^ ((key32 >> 31) & 0x7FFFFFFF));
}

// Wellons' lowbias32, products mod 2^32.
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

__device__ __forceinline__ uint32_t combine(uint32_t h, uint32_t value) { return mix32((h ^ value) + 0x9E3779B9u); }

// Candidate entries ordered as ranks are, (key descending, id ascending) as an unsigned integer: 16-bit keys and
// the id fit 32 bits, 32-bit keys need 64.
template <int kShift>
struct Entry {
  using Type = uint64_t;
  __device__ static Type pack(int key, int id) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(key) ^ 0x80000000u) << 32) | static_cast<uint32_t>(0xFFFF - id);
  }
  __device__ static int key(Type e) { return static_cast<int>(static_cast<uint32_t>(e >> 32) ^ 0x80000000u); }
  __device__ static int id(Type e) { return 0xFFFF - static_cast<int>(e & 0xFFFF); }
};

template <>
struct Entry<16> {
  using Type = uint32_t;
  __device__ static Type pack(int key, int id) {
    return (static_cast<uint32_t>(key + 0x8000) << 16) | static_cast<uint32_t>(0xFFFF - id);
  }
  __device__ static int key(Type e) { return static_cast<int>(e >> 16) - 0x8000; }
  __device__ static int id(Type e) { return 0xFFFF - static_cast<int>(e & 0xFFFF); }
};

enum class Reduction { kSum, kMax, kMin };

template <Reduction kOp>
__device__ __forceinline__ int reduce_pair(int a, int b) {
  if constexpr (kOp == Reduction::kSum) return a + b;
  if constexpr (kOp == Reduction::kMax) return max(a, b);
  return min(a, b);
}

// Block-wide reduction of one int32 a thread (a redux.sync per warp). `slots` holds a value per warp; the result
// is read by every thread after one barrier. Callers alternate between two slot arrays, so a reduction never
// overwrites slots that a slower thread may still be reading from the previous one (it passed the barrier between
// them).
template <int kWarps, Reduction kOp>
__device__ __forceinline__ int block_reduce(int value, int* slots) {
  if constexpr (kOp == Reduction::kSum) value = __reduce_add_sync(0xFFFFFFFFu, value);
  if constexpr (kOp == Reduction::kMax) value = __reduce_max_sync(0xFFFFFFFFu, value);
  if constexpr (kOp == Reduction::kMin) value = __reduce_min_sync(0xFFFFFFFFu, value);
  if ((threadIdx.x & 31) == 0) slots[threadIdx.x >> 5] = value;
  __syncthreads();
  int result = slots[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) result = reduce_pair<kOp>(result, slots[w]);
  return result;
}

// The largest value over the warp's lanes, in every lane.
__device__ __forceinline__ int64_t warp_max64(int64_t value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value = max(value, __shfl_xor_sync(0xFFFFFFFFu, value, offset));
  return value;
}

template <int kWarps>
__device__ __forceinline__ int64_t block_max64(int64_t value, int64_t* slots) {
  value = warp_max64(value);
  if ((threadIdx.x & 31) == 0) slots[threadIdx.x >> 5] = value;
  __syncthreads();
  int64_t best = slots[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) best = max(best, slots[w]);
  return best;
}

// Exclusive prefix sum over the block in thread order, of one value a thread (two 16-bit counts packed: unsigned,
// so that a count past 2^15 in the high half stays a count).
template <int kWarps>
__device__ __forceinline__ uint32_t block_exclusive_scan(uint32_t value, uint32_t* slots) {
  const int lane = threadIdx.x & 31;
  const uint32_t inclusive = warp_inclusive_sum(value);
  if (lane == 31) slots[threadIdx.x >> 5] = inclusive;
  __syncthreads();
  uint32_t before = inclusive - value;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) before += w < warp ? slots[w] : 0u;
  return before;
}

// A logit in fp32: torch's extension build forbids bf16's implicit conversions (__CUDA_NO_BFLOAT16_CONVERSIONS__).
__device__ __forceinline__ float logit_to_float(float logit) { return logit; }
__device__ __forceinline__ float logit_to_float(__nv_bfloat16 logit) { return __bfloat162float(logit); }

// The noise hash's prefix for a row: its seed, counter and the draw.
__device__ __forceinline__ uint32_t row_hash_prefix(const SampleTokensArgs& args, int row) {
  const uint64_t seed = static_cast<uint64_t>(args.seed[row * args.stride_seed]);
  return combine(combine(mix32((static_cast<uint32_t>(seed) ^ static_cast<uint32_t>(seed >> 32)) + 0x9E3779B9u),
                         static_cast<uint32_t>(args.counter[row * args.stride_counter])),
                 static_cast<uint32_t>(args.draw));
}

// A candidate's race, packed to order as the winner is picked: race, then the lower rank, with the id in the low
// 16 bits. max_scaled: the row's largest logit / temperature, correctly rounded (the reference's logits / T and
// softmax's x - max(x); max(x) = max(logits) / T since rounding is monotonic).
template <int kShift>
__device__ __forceinline__ int64_t packed_race(uint32_t hash_prefix, int key, int id, int rank, float temperature,
                                               float max_scaled) {
  const uint32_t bits = combine(hash_prefix, static_cast<uint32_t>(rank));
  const float uniform = (static_cast<float>(bits >> 8) + 0.5f) * (1.f / (1 << 24));
  // Negation, not 0 - x: the top uniform rounds to 1.0, its noise is -0.0 and that race is -inf, as in the
  // reference.
  const float noise = -__nv_logf(uniform);
  const float weight = __nv_expf(__fdiv_rn(key_float<kShift>(key), temperature) - max_scaled);
  const float race = __fdiv_rn(weight, noise);
  // Non-negative races order by their bits, NaN above +inf (torch.argmax picks NaN); -inf below them.
  const int race_key = race < 0.f ? -1 : (__float_as_int(race) & 0x7FFFFFFF);
  return static_cast<int64_t>(static_cast<uint64_t>(static_cast<int64_t>(race_key)) << 32) |
         (static_cast<int64_t>(0xFFFF - rank) << 16) | id;
}

// The keys of the row's entries first .. first + kKeys - 1 (INT_MIN past the vocabulary). With vector_loads, a
// thread whose entries are all inside the row reads them as 16-byte pieces: one entry a load made the text row's
// 32 loads a thread touch 32 sectors each (a warp's threads 64 bytes apart).
template <typename Logit, int kShift, int kKeys>
__device__ __forceinline__ void load_keys(const SampleTokensArgs& args, const Logit* logits, int first,
                                          int (&keys)[kKeys]) {
  constexpr int kPerPiece = 16 / static_cast<int>(sizeof(Logit));
  static_assert(kKeys % kPerPiece == 0, "a thread's keys are whole 16-byte pieces");
  if (args.vector_loads && first + kKeys <= args.vocab) {
#pragma unroll
    for (int p = 0; p < kKeys / kPerPiece; ++p) {
      const uint4 piece = *reinterpret_cast<const uint4*>(logits + first + p * kPerPiece);
      const Logit* values = reinterpret_cast<const Logit*>(&piece);
#pragma unroll
      for (int j = 0; j < kPerPiece; ++j) keys[p * kPerPiece + j] = float_key<kShift>(logit_to_float(values[j]));
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    const int id = first + j;
    // Padding sits below every real key (-inf's included), so no threshold counts it.
    keys[j] = id < args.vocab ? float_key<kShift>(logit_to_float(logits[id * args.stride_logits_v])) : INT_MIN;
  }
}

// Radix select of the k-th largest key, 8 bits a pass from the top: 2 passes for bf16 keys (16 significant bits),
// 4 for fp32. A pass counts the row's keys that share the bits chosen so far in a shared-memory histogram of their
// next 8 bits, and one block-wide scan of the histogram (thread t takes bin 255 - t, so its inclusive prefix counts
// the keys in its bin and above) finds the bin holding the k-th key: three barriers a pass, against one a pass for
// the 16 to 30 passes of the bisection. At the audio row (V = 2048, k = 250) on an H100 the kernel took 4.95 us
// with it against 6.01 with the bisection (bench/RESULTS.md, nineteenth session).
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

struct RadixShared {
  int histograms[2][kRadixBins];  // alternate passes; a pass's reader zeroes its bins for the pass after next
  uint32_t scan_slots[32];
  int chosen[2];                  // the pass's bin, and the keys in bins above it
};

// Zeroes both histograms: before the first pass, with a barrier between (the caller's first reduction).
template <int kThreads>
__device__ __forceinline__ void radix_clear(RadixShared& shared) {
  for (int i = threadIdx.x; i < 2 * kRadixBins; i += kThreads) shared.histograms[i / kRadixBins][i % kRadixBins] = 0;
}

// The k-th largest key of the row (1 <= k <= the valid keys) and the count of keys above it. keys as load_keys
// reads them; an entry past the vocabulary is no key (padding).
template <int kShift, int kThreads, int kKeys>
__device__ __forceinline__ void radix_threshold(const int (&keys)[kKeys], int first, int vocab, int k,
                                                RadixShared& shared, int& threshold, int& above) {
  constexpr int kWidth = 32 - kShift;
  constexpr int kPasses = kWidth / kRadixBits;
  constexpr int kWarps = kThreads / 32;
  static_assert(kThreads >= kRadixBins && kWarps <= 32, "a thread a bin, a scan slot a warp");
  // A key as an unsigned integer in the same order (two's complement biased by half the range).
  const auto biased = [&](int j) { return static_cast<uint32_t>(keys[j]) + (1u << (kWidth - 1)); };
  uint32_t prefix = 0;
  int remaining = k;
  above = 0;
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int shift = kWidth - kRadixBits * (pass + 1);
    int* histogram = shared.histograms[pass & 1];
#pragma unroll
    for (int j = 0; j < kKeys; ++j) {
      const bool counted = first + j < vocab && (pass == 0 || (biased(j) >> (shift + kRadixBits)) == prefix);
      if (counted) atomicAdd(&histogram[(biased(j) >> shift) & (kRadixBins - 1)], 1);
    }
    __syncthreads();
    const int bin = kRadixBins - 1 - static_cast<int>(threadIdx.x);
    int count = 0;
    if (bin >= 0) {
      count = histogram[bin];
      histogram[bin] = 0;
    }
    const int before = static_cast<int>(block_exclusive_scan<kWarps>(static_cast<uint32_t>(count),
                                                                     shared.scan_slots));
    if (bin >= 0 && before < remaining && remaining <= before + count) {
      shared.chosen[0] = bin;
      shared.chosen[1] = before;
    }
    __syncthreads();
    prefix = (prefix << kRadixBits) | static_cast<uint32_t>(shared.chosen[0]);
    above += shared.chosen[1];
    remaining -= shared.chosen[1];
  }
  threshold = static_cast<int>(prefix - (1u << (kWidth - 1)));
}

// rank = the candidates above entry, read 16 bytes at a time: the list is padded with zero entries (below every
// real one) to a whole number of 16-byte pieces.
template <typename Type>
__device__ __forceinline__ int rank_by_pieces(const Type* candidates, int count, Type entry) {
  int rank = 0;
  if constexpr (sizeof(Type) == 4) {
    for (int j = 0; j < count; j += 4) {
      const uint4 piece = *reinterpret_cast<const uint4*>(candidates + j);
      rank += (piece.x > entry) + (piece.y > entry) + (piece.z > entry) + (piece.w > entry);
    }
  } else {
    for (int j = 0; j < count; j += 2) {
      const ulonglong2 piece = *reinterpret_cast<const ulonglong2*>(candidates + j);
      rank += (piece.x > entry) + (piece.y > entry);
    }
  }
  return rank;
}

// One block per row; thread t holds the row's entries t * kKeys .. t * kKeys + kKeys - 1 (vocabulary order along
// the block, which the compaction's scan relies on). kRadix: the k-th key by radix select (radix_threshold) and the
// ranks counted 16 bytes of candidates at a time, else by bisection and an entry at a time; the same candidates,
// ranks and token.
template <typename Logit, int kThreads, int kKeys, bool kRadix>
__global__ void __launch_bounds__(kThreads) sample_tokens_kernel(const SampleTokensArgs args) {
  constexpr int kShift = sizeof(Logit) == 2 ? 16 : 0;
  constexpr int kWarps = kThreads / 32;
  using E = Entry<kShift>;
  __shared__ int reduce_slots[2][kWarps];
  __shared__ int64_t best_slots[kWarps];
  __shared__ __align__(16) typename E::Type candidates[kSampleMaxCandidates];
  __shared__ RadixShared radix;

  if constexpr (kRadix) radix_clear<kThreads>(radix);
  await_previous_kernel();
  const int row = blockIdx.x;
  const Logit* logits = static_cast<const Logit*>(args.logits) + row * args.stride_logits_b;
  const int first = threadIdx.x * kKeys;
  int keys[kKeys];
  load_keys<Logit, kShift>(args, logits, first, keys);
  int local_max = INT_MIN;
  int local_min = INT_MAX;
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    local_max = max(local_max, keys[j]);
    if (first + j < args.vocab) local_min = min(local_min, keys[j]);
  }
  const int max_key = block_reduce<kWarps, Reduction::kMax>(local_max, reduce_slots[0]);
  // The reductions alternate between the two slot arrays: see block_reduce.
  const float temperature = args.temperature[row * args.stride_temperature];
  const int64_t requested = args.top_k[row * args.stride_top_k];
  const int top_k = static_cast<int>(min(max(requested, int64_t{1}), static_cast<int64_t>(args.top_k_cap)));

  if (temperature <= 0.f || top_k == 1) {
    int local_first = kSampleMaxVocab;
#pragma unroll
    for (int j = 0; j < kKeys; ++j)
      if (keys[j] == max_key) local_first = min(local_first, first + j);
    const int token = block_reduce<kWarps, Reduction::kMin>(local_first, reduce_slots[1]);
    if (threadIdx.x == 0) args.out[row * args.stride_out] = token;
    return;
  }

  // The candidates. Radix select: every key above the k-th key (threshold), then keys equal to it in vocabulary order
  // until there are k. Bisection: every key >= hi, then the first (k - count(key >= hi)) keys in [lo, hi) in
  // vocabulary order, where count(key >= lo) >= k > count(key >= hi).
  int threshold = 0;
  int lo32 = 0;
  int hi32 = 0;
  int count_above;
  int free_slots = 0;
  if constexpr (kRadix) {
    radix_threshold<kShift, kThreads>(keys, first, args.vocab, top_k, radix, threshold, count_above);
  } else {
    // The bisection stops when count(key >= lo) == k, or at hi = lo + 1 (the k-th key is tied). int64: key
    // distances span up to 2^32.
    int64_t lo = block_reduce<kWarps, Reduction::kMin>(local_min, reduce_slots[1]);
    int64_t hi = static_cast<int64_t>(max_key) + 1;
    float lo_value = key_float<kShift>(static_cast<int>(lo));
    float hi_value = key_float<kShift>(static_cast<int>(hi));
    int count_lo = args.vocab;
    int count_hi = 0;
    for (int pass = 0; count_lo != top_k && hi - lo > 1; ++pass, free_slots ^= 1) {
      const float float_mid = lo_value * 0.5f + hi_value * 0.5f;
      const int64_t float_mid_key = float_key<kShift>(float_mid);
      const bool use_float = pass < kSampleFloatPasses && float_mid_key > lo && float_mid_key < hi;
      const int64_t mid = use_float ? float_mid_key : lo + (hi - lo) / 2;
      const float mid_value = use_float ? float_mid : key_float<kShift>(static_cast<int>(mid));
      const int mid32 = static_cast<int>(mid);
      int local = 0;
#pragma unroll
      for (int j = 0; j < kKeys; ++j) local += keys[j] >= mid32;
      const int count = block_reduce<kWarps, Reduction::kSum>(local, reduce_slots[free_slots]);
      if (count >= top_k) {
        lo = mid;
        lo_value = mid_value;
        count_lo = count;
      } else {
        hi = mid;
        hi_value = mid_value;
        count_hi = count;
      }
    }
    lo32 = static_cast<int>(lo);
    hi32 = static_cast<int>(hi);
    count_above = count_hi;
  }

  // Compaction into the shared list. Both running counts come out of one scan, packed in 16-bit halves (V < 2^16).
  const int quota = top_k - count_above;
  const auto is_above = [&](int j) {
    if constexpr (kRadix) return keys[j] > threshold;
    return keys[j] >= hi32;
  };
  const auto is_between = [&](int j) {
    if constexpr (kRadix) return keys[j] == threshold && first + j < args.vocab;
    return keys[j] < hi32 && keys[j] >= lo32;
  };
  uint32_t flags = 0;
#pragma unroll
  for (int j = 0; j < kKeys; ++j) flags += is_above(j) ? 1u : (is_between(j) ? 0x10000u : 0u);
  const uint32_t before =
      block_exclusive_scan<kWarps>(flags, reinterpret_cast<uint32_t*>(reduce_slots[free_slots]));
  int above_before = static_cast<int>(before & 0xFFFF);
  int between_before = static_cast<int>(before >> 16);
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    const bool above = is_above(j);
    const bool between = is_between(j);
    if (above || (between && between_before < quota))
      candidates[above_before + min(between_before, quota)] = E::pack(keys[j], first + j);
    above_before += above;
    between_before += between;
  }
  if constexpr (kRadix) {
    // Zero entries up to the next whole 16-byte piece (no other thread writes past top_k).
    constexpr int kPerPiece = 16 / static_cast<int>(sizeof(typename E::Type));
    if (threadIdx.x < (kPerPiece - top_k % kPerPiece) % kPerPiece) candidates[top_k + threadIdx.x] = 0;
  }
  __syncthreads();

  // Rank, then race: one candidate a thread (k <= kSampleMaxCandidates; threads take k / kThreads each).
  const uint32_t hash_prefix = row_hash_prefix(args, row);
  const float max_scaled = __fdiv_rn(key_float<kShift>(max_key), temperature);
  int64_t best = INT64_MIN;
  for (int i = threadIdx.x; i < top_k; i += kThreads) {
    const typename E::Type entry = candidates[i];
    int rank = 0;
    if constexpr (kRadix) {
      rank = rank_by_pieces(candidates, top_k, entry);
    } else {
      for (int j = 0; j < top_k; ++j) rank += candidates[j] > entry;
    }
    const int64_t packed = packed_race<kShift>(hash_prefix, E::key(entry), E::id(entry), rank, temperature,
                                               max_scaled);
    best = max(best, packed);
  }
  best = block_max64<kWarps>(best, best_slots);
  if (threadIdx.x == 0) args.out[row * args.stride_out] = best & 0xFFFF;
}

// Text-sized rows with a small k (bf16, V in (kSmallKMinVocab, 32768], min(max_top_k, V) <= kSmallKMax): the same
// candidates, ranks, race and greedy token as sample_tokens_kernel, selected with warp reductions instead of
// block-wide ones. Packed entries (Entry<16>: rank order, all distinct) make the k-th largest entry a threshold that
// keeps exactly k, so each warp takes its 1024 entries' top k by bisecting on the packed value (one redux.sync a
// pass, no barrier), then warp 0 takes the row's top k from the warps' and races them: two block barriers in all.
// The block-wide kernel runs a bisection of ~20 block reductions over 32 warps at the text row (33 us on one SM
// under Nsight Compute, 26 us of the frame's chain on an H100: bench/RESULTS.md, seventh session).
constexpr int kSmallKMax = 32;
constexpr int kSmallKMinVocab = 8192;
constexpr int kSmallKThreads = 1024;
constexpr int kSmallKKeys = 32;

// The largest t with count(entries >= t) >= k over the warp's entries (kPer a lane; at least k of them): a
// bisection on the packed value, one redux.sync a pass. The entries being distinct (but for the padding 0), exactly
// k are >= t unless t is 0.
template <int kPer>
__device__ __forceinline__ uint32_t warp_threshold(const uint32_t (&entries)[kPer], int k) {
  uint32_t local_min = 0xFFFFFFFFu;
  uint32_t local_max = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    local_min = min(local_min, entries[j]);
    local_max = max(local_max, entries[j]);
  }
  // count(>= lo) >= k > count(>= hi); 64-bit bounds: hi may be 2^32.
  uint64_t lo = __reduce_min_sync(0xFFFFFFFFu, local_min);
  uint64_t hi = static_cast<uint64_t>(__reduce_max_sync(0xFFFFFFFFu, local_max)) + 1;
  while (hi - lo > 1) {
    const uint64_t mid = lo + (hi - lo) / 2;
    int local = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j) local += entries[j] >= static_cast<uint32_t>(mid);
    const int count = __reduce_add_sync(0xFFFFFFFFu, local);
    if (count >= k) {
      lo = mid;
      if (count == k) break;
    } else {
      hi = mid;
    }
  }
  return static_cast<uint32_t>(lo);
}

// Writes the entries >= threshold among entries[j] of every lane, in the order (j, lane), into out[0..k) (the first
// k of them: only the padding 0 can tie past k).
template <int kPer>
__device__ __forceinline__ void warp_compact_by_rounds(const uint32_t (&entries)[kPer], uint32_t threshold, int k,
                                                       uint32_t* out) {
  const int lane = threadIdx.x & 31;
  int place = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const bool selected = entries[j] >= threshold;
    const uint32_t mask = __ballot_sync(0xFFFFFFFFu, selected);
    const int mine = place + __popc(mask & ((1u << lane) - 1));
    if (selected && mine < k) out[mine] = entries[j];
    place += __popc(mask);
  }
}

// Survivors of the lane-maxima bound a warp keeps in shared memory at most: 4 a lane.
constexpr int kSurvivorRounds = 4;
constexpr int kSurvivorsMax = 32 * kSurvivorRounds;

// The warp's top k entries (1 <= k <= 32; kPer a lane, lane l's entries before lane l + 1's in vocabulary order),
// in vocabulary order, into out[0..k). The k-th largest of the 32 lanes' maxima, m, bounds the answer from below
// (k lanes hold an entry >= m), so only the entries >= m (usually a few dozen of the 1024) are bisected, from
// `survivors` (kSurvivorsMax entries of shared memory); with more of them (ties, padding) all the entries are.
// Padding entries (0, below every real one) fill the places after the real ones when the warp has fewer than k.
template <int kPer>
__device__ __forceinline__ void warp_top_k(const uint32_t (&entries)[kPer], int k, uint32_t* out,
                                           uint32_t* survivors) {
  const int lane = threadIdx.x & 31;
  uint32_t lane_max[1] = {0};
#pragma unroll
  for (int j = 0; j < kPer; ++j) lane_max[0] = max(lane_max[0], entries[j]);
  const uint32_t bound = warp_threshold(lane_max, k);
  int kept = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) kept += entries[j] >= bound;
  const int total = __reduce_add_sync(0xFFFFFFFFu, kept);
  if (total > kSurvivorsMax) {
    const uint32_t threshold = warp_threshold(entries, k);
    int selected = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j) selected += entries[j] >= threshold;
    int place = warp_inclusive_sum(selected) - selected;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (entries[j] >= threshold) {
        if (place < k) out[place] = entries[j];
        ++place;
      }
    }
    return;
  }
  int before = warp_inclusive_sum(kept) - kept;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    if (entries[j] >= bound) survivors[before++] = entries[j];
  }
  __syncwarp();
  uint32_t kept_entries[kSurvivorRounds];
#pragma unroll
  for (int r = 0; r < kSurvivorRounds; ++r) {
    kept_entries[r] = 32 * r + lane < total ? survivors[32 * r + lane] : 0u;
  }
  warp_compact_by_rounds(kept_entries, warp_threshold(kept_entries, k), k, out);
}

template <int kThreads, int kKeys>
__global__ void __launch_bounds__(kThreads) sample_tokens_small_k_kernel(const SampleTokensArgs args) {
  constexpr int kWarps = kThreads / 32;
  static_assert(kWarps <= 32 && kKeys * 32 >= kSmallKMax, "warp 0 gathers one warp's list a lane");
  using E = Entry<16>;
  __shared__ uint32_t warp_lists[kWarps * kSmallKMax];
  __shared__ uint32_t row_list[kSmallKMax];
  __shared__ uint32_t survivors[kWarps][kSurvivorsMax];

  await_previous_kernel();
  const int row = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const __nv_bfloat16* logits = static_cast<const __nv_bfloat16*>(args.logits) + row * args.stride_logits_b;
  const int first = threadIdx.x * kKeys;
  int keys[kKeys];
  load_keys<__nv_bfloat16, 16>(args, logits, first, keys);
  uint32_t entries[kKeys];
#pragma unroll
  for (int j = 0; j < kKeys; ++j) entries[j] = first + j < args.vocab ? E::pack(keys[j], first + j) : 0u;
  const float temperature = args.temperature[row * args.stride_temperature];
  const int64_t requested = args.top_k[row * args.stride_top_k];
  const int top_k = static_cast<int>(min(max(requested, int64_t{1}), static_cast<int64_t>(args.top_k_cap)));

  if (temperature <= 0.f || top_k == 1) {
    // The largest entry: the maximum's first vocabulary id.
    uint32_t local = 0;
#pragma unroll
    for (int j = 0; j < kKeys; ++j) local = max(local, entries[j]);
    local = __reduce_max_sync(0xFFFFFFFFu, local);
    if (lane == 0) warp_lists[warp] = local;
    __syncthreads();
    if (warp == 0) {
      const uint32_t best = __reduce_max_sync(0xFFFFFFFFu, lane < kWarps ? warp_lists[lane] : 0u);
      if (lane == 0) args.out[row * args.stride_out] = E::id(best);
    }
    return;
  }

  warp_top_k(entries, top_k, warp_lists + warp * top_k, survivors[warp]);
  __syncthreads();
  if (warp != 0) return;
  uint32_t gathered[kSmallKMax];
#pragma unroll
  for (int j = 0; j < kSmallKMax; ++j) gathered[j] = lane < kWarps && j < top_k ? warp_lists[lane * top_k + j] : 0u;
  // Warp 0's survivors of its own list are consumed: the buffer is free again (a warp barrier ended their reads).
  warp_top_k(gathered, top_k, row_list, survivors[0]);
  __syncwarp();

  // Rank, then race, as sample_tokens_kernel: candidate `lane`.
  const uint32_t entry = lane < top_k ? row_list[lane] : 0u;
  const uint32_t top_entry = __reduce_max_sync(0xFFFFFFFFu, entry);
  const float max_scaled = __fdiv_rn(key_float<16>(E::key(top_entry)), temperature);
  int64_t best = INT64_MIN;
  if (lane < top_k) {
    int rank = 0;
    for (int j = 0; j < top_k; ++j) rank += row_list[j] > entry;
    best = packed_race<16>(row_hash_prefix(args, row), E::key(entry), E::id(entry), rank, temperature, max_scaled);
  }
  best = warp_max64(best);
  if (lane == 0) args.out[row * args.stride_out] = best & 0xFFFF;
}

template <typename Logit, int kThreads, int kKeys>
cudaError_t launch_instance(const SampleTokensArgs& args, cudaStream_t stream, bool programmatic) {
  if (args.radix_select) {
    return launch_kernel(sample_tokens_kernel<Logit, kThreads, kKeys, true>, dim3(args.batch), dim3(kThreads),
                         stream, programmatic, args);
  }
  return launch_kernel(sample_tokens_kernel<Logit, kThreads, kKeys, false>, dim3(args.batch), dim3(kThreads), stream,
                       programmatic, args);
}

template <typename Logit>
cudaError_t launch_for_vocab(const SampleTokensArgs& args, cudaStream_t stream, bool programmatic) {
  // Keys a thread holds in registers: up to 32 without spills (ptxas -v, sm_90); 64 at the largest vocabularies,
  // where 1024 threads have 64 registers each and some spill.
  if constexpr (sizeof(Logit) == 2) {
    if (args.warp_kernel && args.vocab > kSmallKMinVocab && args.vocab <= kSmallKThreads * kSmallKKeys &&
        args.top_k_cap <= kSmallKMax) {
      return launch_kernel(sample_tokens_small_k_kernel<kSmallKThreads, kSmallKKeys>, dim3(args.batch),
                           dim3(kSmallKThreads), stream, programmatic, args);
    }
  }
  if (args.vocab <= 2048) return launch_instance<Logit, 256, 8>(args, stream, programmatic);
  if (args.vocab <= 4096) return launch_instance<Logit, 256, 16>(args, stream, programmatic);
  if (args.vocab <= 8192) return launch_instance<Logit, 256, 32>(args, stream, programmatic);
  if (args.vocab <= 16384) return launch_instance<Logit, 512, 32>(args, stream, programmatic);
  if (args.vocab <= 32768) return launch_instance<Logit, 1024, 32>(args, stream, programmatic);
  return launch_instance<Logit, 1024, 64>(args, stream, programmatic);
}

}  // namespace sampling_detail

// Launches on `stream` (no allocation, no synchronisation: graph-capturable). programmatic: a programmatic
// dependent launch (Hopper and later); the kernel waits for the previous kernel before its first read.
inline cudaError_t launch_sample_tokens(const SampleTokensArgs& args, cudaStream_t stream, bool programmatic) {
  if (args.batch == 0) return cudaSuccess;
  if (args.logits_bf16) return sampling_detail::launch_for_vocab<__nv_bfloat16>(args, stream, programmatic);
  return sampling_detail::launch_for_vocab<float>(args, stream, programmatic);
}

}  // namespace moshi_fast
