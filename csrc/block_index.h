// The block-index op: its outputs and the checks shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "peagle_tile_rule.h"

namespace peagle {

// The eight BlockMask tensors, in BlockMask's order: kv_num_blocks, kv_indices, full_kv_num_blocks,
// full_kv_indices, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices. int32, [1, 1, ...].
using BlockIndexTensors =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The kernels' own preconditions (Python validates first; these guard against direct op calls).
void check_inputs(const at::Tensor& anchor_pos, const at::Tensor& depth, const at::Tensor& doc_of_position,
                  std::optional<int64_t> sliding_window, int64_t q_block_size, int64_t kv_block_size);

BlockIndexTensors allocate_outputs(int64_t num_q_blocks, int64_t num_kv_blocks, const at::TensorOptions& options);

// Raw pointers to the outputs, in the order write_list_line expects.
ListOutputs list_outputs(BlockIndexTensors& out);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace peagle
