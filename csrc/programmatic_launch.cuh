// Programmatic dependent launch (Hopper and later), shared by the extension's kernels: the device-side wait and
// the host-side launch with the attribute.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace moshi_fast {

// Launched with programmatic dependent launch (cudaLaunchAttributeProgrammaticStreamSerialization), a block may
// start while the previous kernel on the stream still runs. Wait until that kernel has finished and its writes are
// visible, then let the next kernel's blocks start (they hold their own wait). Without such a launch the previous
// kernel has finished already and both are no-ops.
__device__ __forceinline__ void await_previous_kernel() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// kernel<<<grid, block, 0, stream>>>(args...), as a programmatic dependent launch when `programmatic` (the caller
// checks that the device supports it). No allocation, no synchronisation: graph-capturable.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, bool programmatic,
                          Args&&... args) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace moshi_fast
