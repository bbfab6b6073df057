// The op's schema and what the CPU and CUDA implementations share.
#include "block_index.h"

#include <torch/library.h>

#include <string>

namespace peagle {

void check_inputs(const at::Tensor& anchor_pos, const at::Tensor& depth, const at::Tensor& doc_of_position,
                  std::optional<int64_t> sliding_window, int64_t q_block_size, int64_t kv_block_size) {
  TORCH_CHECK(anchor_pos.dim() == 1 && depth.dim() == 1 && doc_of_position.dim() == 1,
              "build_block_index: anchor_pos, depth and doc_of_position must be 1-D");
  TORCH_CHECK(anchor_pos.scalar_type() == at::kLong && depth.scalar_type() == at::kLong &&
                  doc_of_position.scalar_type() == at::kLong,
              "build_block_index: anchor_pos, depth and doc_of_position must be int64");
  TORCH_CHECK(anchor_pos.numel() == depth.numel(), "build_block_index: anchor_pos and depth differ in length");
  TORCH_CHECK(anchor_pos.numel() > 0, "build_block_index: N must be positive");
  TORCH_CHECK(doc_of_position.numel() > 0, "build_block_index: doc_of_position must not be empty");
  TORCH_CHECK(doc_of_position.numel() <= kFieldMax, "build_block_index: more than 2^31 - 1 positions");
  TORCH_CHECK(anchor_pos.numel() <= kFieldMax, "build_block_index: more than 2^31 - 1 elements");
  TORCH_CHECK(q_block_size > 0 && kv_block_size > 0, "build_block_index: block sizes must be positive");
  // ceil_div(N, size) overflows for sizes near 2^63 (and gives no blocks at all).
  TORCH_CHECK(q_block_size <= kFieldMax && kv_block_size <= kFieldMax,
              "build_block_index: block sizes must be <= 2^31 - 1");
  TORCH_CHECK(!sliding_window.has_value() || *sliding_window >= 1, "build_block_index: sliding_window must be >= 1");
  TORCH_CHECK(anchor_pos.device() == depth.device() && anchor_pos.device() == doc_of_position.device(),
              "build_block_index: all tensors must be on one device");
}

BlockIndexTensors allocate_outputs(int64_t num_q_blocks, int64_t num_kv_blocks, const at::TensorOptions& options) {
  const auto ints = options.dtype(at::kInt);
  return {at::empty({1, 1, num_q_blocks}, ints),  at::empty({1, 1, num_q_blocks, num_kv_blocks}, ints),
          at::empty({1, 1, num_q_blocks}, ints),  at::empty({1, 1, num_q_blocks, num_kv_blocks}, ints),
          at::empty({1, 1, num_kv_blocks}, ints), at::empty({1, 1, num_kv_blocks, num_q_blocks}, ints),
          at::empty({1, 1, num_kv_blocks}, ints), at::empty({1, 1, num_kv_blocks, num_q_blocks}, ints)};
}

ListOutputs list_outputs(BlockIndexTensors& out) {
  auto& [kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx] = out;
  return ListOutputs{{kv_num.data_ptr<int32_t>(), full_kv_num.data_ptr<int32_t>(), q_num.data_ptr<int32_t>(),
                      full_q_num.data_ptr<int32_t>()},
                     {kv_idx.data_ptr<int32_t>(), full_kv_idx.data_ptr<int32_t>(), q_idx.data_ptr<int32_t>(),
                      full_q_idx.data_ptr<int32_t>()}};
}

// build_block_index: the CPU kernel on CPU tensors, the CUDA pipeline on CUDA tensors.
// build_block_index_emulated: the CUDA pipeline's code run on CPU tensors by a sequential launcher
// (a test aid, cpu/block_index_emulated.cpp), in the order that schedule_seed draws
// (sequential_launcher.h). Same arguments, same results.
TORCH_LIBRARY(peagle_ext, m) {
  const std::string arguments =
      "Tensor anchor_pos, Tensor depth, Tensor doc_of_position, int? sliding_window, int q_block_size, "
      "int kv_block_size";
  const std::string outputs = " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";
  m.def(("build_block_index(" + arguments + ")" + outputs).c_str());
  m.def(("build_block_index_emulated(" + arguments + ", int schedule_seed=0)" + outputs).c_str());
}

}  // namespace peagle
