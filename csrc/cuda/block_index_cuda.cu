// The CUDA implementation of the block-index op: the pipeline of csrc/gpu_pipeline/ launched on
// the current stream. One memset and four kernels, sizes that depend only on N, P and the block
// sizes, no host-device synchronization: capturable in a CUDA graph.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gpu_pipeline/block_index_pipeline.h"

namespace peagle {
namespace {

extern __shared__ __align__(16) uint8_t dynamic_shared_memory[];

// Every phase of `kernel` in every thread of the block, a barrier after each (kernels.h).
template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreads) run_phases(const Kernel kernel) {
  __shared__ typename Kernel::Shared shared;
  const pipeline::Thread thread{blockIdx.x, threadIdx.x, blockDim.x, gridDim.x};
  const int phases = kernel.num_phases();
  for (int p = 0; p < phases; ++p) {
    kernel.phase(p, shared, dynamic_shared_memory, thread);
    __syncthreads();
  }
}

struct CudaLauncher {
  cudaStream_t stream;
  template <class Kernel>
  void launch(const Kernel& kernel, int64_t grid, size_t dynamic_shared_bytes) {
    run_phases<Kernel><<<static_cast<unsigned>(grid), Kernel::kThreads, dynamic_shared_bytes, stream>>>(kernel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void zero(uint8_t* data, size_t bytes) { C10_CUDA_CHECK(cudaMemsetAsync(data, 0, bytes, stream)); }
  void poison(void*, size_t) {}  // on the GPU uninitialized memory is garbage already
};

BlockIndexTensors build_block_index_cuda(const at::Tensor& anchor_pos, const at::Tensor& depth,
                                         const at::Tensor& doc_of_position, std::optional<int64_t> sliding_window,
                                         int64_t q_block_size, int64_t kv_block_size) {
  const c10::cuda::CUDAGuard guard(anchor_pos.device());
  CudaLauncher launcher{c10::cuda::getCurrentCUDAStream()};
  return build_block_index_pipeline(launcher, anchor_pos, depth, doc_of_position, sliding_window, q_block_size,
                                    kv_block_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(peagle_ext, CUDA, m) { m.impl("build_block_index", &build_block_index_cuda); }

}  // namespace peagle
