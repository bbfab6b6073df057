// The CUDA implementation of the block-index op: the pipeline of csrc/gpu_pipeline/ launched on
// the current stream. One memset and four kernels, sizes that depend only on N, P and the block
// sizes, no host-device synchronization: capturable in a CUDA graph.
//
// This file is the CUDA library (peagle_ext_cuda) on its own: it links the CUDA runtime, so a
// CPU-only torch, which has none, still loads the CPU library (peagle_ext_C) and its schemas.
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>

#include "../gpu_pipeline/block_index_pipeline.h"
#include "../gpu_pipeline/interval_pipeline.h"

namespace peagle {
namespace {

extern __shared__ __align__(16) uint8_t dynamic_shared_memory[];

// Every phase of `kernel` for batch row blockIdx.y in every thread of the block, a barrier after
// each (kernels.h).
template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreads) run_phases(const Kernel kernel) {
  __shared__ typename Kernel::Shared shared;
  const Kernel row_kernel = pipeline::at_row(kernel, blockIdx.y);
  const pipeline::Thread thread{blockIdx.x, threadIdx.x, blockDim.x, gridDim.x};
  const int phases = row_kernel.num_phases();
  for (int p = 0; p < phases; ++p) {
    row_kernel.phase(p, shared, dynamic_shared_memory, thread);
    __syncthreads();
  }
}

void check_cuda(cudaError_t status, const char* what) {
  STD_TORCH_CHECK(status == cudaSuccess, "build_block_index: ", what, " failed: ", cudaGetErrorString(status));
}

struct CudaLauncher {
  cudaStream_t stream;
  template <class Kernel>
  void launch(const Kernel& kernel, int64_t grid, size_t dynamic_shared_bytes) {
    const dim3 blocks(static_cast<unsigned>(grid), static_cast<unsigned>(kernel.s.num_rows));
    run_phases<Kernel><<<blocks, Kernel::kThreads, dynamic_shared_bytes, stream>>>(kernel);
    check_cuda(cudaGetLastError(), "a kernel launch");
  }
  void zero(uint8_t* data, size_t bytes) { check_cuda(cudaMemsetAsync(data, 0, bytes, stream), "cudaMemsetAsync"); }
  void poison(void*, size_t) {}  // on the GPU uninitialized memory is garbage already
};

cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream) == AOTI_TORCH_SUCCESS,
                  "build_block_index: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

BlockIndexTensors build_block_index_cuda(const Tensor& anchor_pos, const Tensor& depth, const Tensor& doc_of_position,
                                         std::optional<int64_t> sliding_window, int64_t q_block_size,
                                         int64_t kv_block_size, std::optional<Tensor> kv_anchor_pos,
                                         std::optional<Tensor> kv_depth) {
  const torch::stable::accelerator::DeviceGuard guard(anchor_pos.get_device_index());
  const OpInputs in = check_inputs(anchor_pos, depth, doc_of_position, sliding_window, q_block_size, kv_block_size,
                                   kv_anchor_pos, kv_depth);
  CudaLauncher launcher{current_stream(anchor_pos.get_device_index())};
  return build_block_index_pipeline(launcher, in);
}

BlockIndexTensors build_interval_block_index_cuda(const Tensor& starts, const Tensor& ends, int64_t kv_len,
                                                  int64_t q_block_size, int64_t kv_block_size) {
  const torch::stable::accelerator::DeviceGuard guard(starts.get_device_index());
  const IntervalInputs in = check_interval_inputs(starts, ends, kv_len, q_block_size, kv_block_size);
  CudaLauncher launcher{current_stream(starts.get_device_index())};
  return build_interval_pipeline(launcher, in);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(peagle_ext, CUDA, m) {
  m.impl("build_block_index", TORCH_BOX(&build_block_index_cuda));
  m.impl("build_interval_block_index", TORCH_BOX(&build_interval_block_index_cuda));
}

}  // namespace peagle
