// The CUDA pipeline run on CPU tensors by the sequential launcher: the op
// peagle_ext::build_block_index_emulated, a test aid (backend="cuda_emulated"), so that the code
// the GPU runs (csrc/gpu_pipeline/) is exercised by the CPU test suite. Built in every build,
// with or without CUDA.
#include <torch/csrc/stable/library.h>

#include "../gpu_pipeline/block_index_pipeline.h"
#include "../gpu_pipeline/sequential_launcher.h"

namespace peagle {
namespace {

BlockIndexTensors build_block_index_emulated(const Tensor& anchor_pos, const Tensor& depth,
                                             const Tensor& doc_of_position, std::optional<int64_t> sliding_window,
                                             int64_t q_block_size, int64_t kv_block_size,
                                             std::optional<Tensor> kv_anchor_pos, std::optional<Tensor> kv_depth,
                                             int64_t schedule_seed) {
  pipeline::SequentialLauncher launcher;
  launcher.schedule_seed = static_cast<uint64_t>(schedule_seed);
  return build_block_index_pipeline(launcher, check_inputs(anchor_pos, depth, doc_of_position, sliding_window,
                                                           q_block_size, kv_block_size, kv_anchor_pos, kv_depth));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(peagle_ext, CPU, m) {
  m.impl("build_block_index_emulated", TORCH_BOX(&build_block_index_emulated));
}

}  // namespace peagle
