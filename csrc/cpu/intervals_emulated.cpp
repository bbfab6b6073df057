// The interval kernels run on CPU tensors by the sequential launcher: the op
// peagle_ext::build_interval_block_index_emulated, a test aid (backend="cuda_emulated"), so the
// CPU test suite exercises the code the GPU runs (gpu_pipeline/interval_kernels.h).
#include <torch/csrc/stable/library.h>

#include "../gpu_pipeline/interval_pipeline.h"
#include "../gpu_pipeline/sequential_launcher.h"

namespace peagle {
namespace {

BlockIndexTensors build_interval_block_index_emulated(const Tensor& starts, const Tensor& ends, int64_t kv_len,
                                                      int64_t q_block_size, int64_t kv_block_size,
                                                      int64_t schedule_seed) {
  pipeline::SequentialLauncher launcher;
  launcher.schedule_seed = static_cast<uint64_t>(schedule_seed);
  return build_interval_pipeline(launcher, check_interval_inputs(starts, ends, kv_len, q_block_size, kv_block_size));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(peagle_ext, CPU, m) {
  m.impl("build_interval_block_index_emulated", TORCH_BOX(&build_interval_block_index_emulated));
}

}  // namespace peagle
