// Warp-level prefix sums shared by the extension's kernels.
#pragma once

namespace moshi_fast {

// Inclusive prefix sum of one value a lane over the warp's lanes in lane order; every lane of the warp calls it.
template <typename T>
__device__ __forceinline__ T warp_inclusive_sum(T value) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const T other = __shfl_up_sync(0xFFFFFFFFu, value, offset);
    if (lane >= offset) value += other;
  }
  return value;
}

}  // namespace moshi_fast
