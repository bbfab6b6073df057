// What the CPU and CUDA implementations of the block-index op share: the input checks, the outputs.
#include "block_index.h"

namespace peagle {

namespace {
using torch::headeronly::ScalarType;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

OpInputs check_inputs(const Tensor& anchor_pos, const Tensor& depth, const Tensor& doc_of_position,
                      std::optional<int64_t> sliding_window, int64_t q_block_size, int64_t kv_block_size) {
  STD_TORCH_CHECK(anchor_pos.dim() == 1 && depth.dim() == 1 && doc_of_position.dim() == 1,
                  "build_block_index: anchor_pos, depth and doc_of_position must be 1-D");
  STD_TORCH_CHECK(anchor_pos.scalar_type() == ScalarType::Long && depth.scalar_type() == ScalarType::Long &&
                      doc_of_position.scalar_type() == ScalarType::Long,
                  "build_block_index: anchor_pos, depth and doc_of_position must be int64");
  STD_TORCH_CHECK(anchor_pos.numel() == depth.numel(), "build_block_index: anchor_pos and depth differ in length");
  STD_TORCH_CHECK(anchor_pos.numel() > 0, "build_block_index: N must be positive");
  STD_TORCH_CHECK(doc_of_position.numel() > 0, "build_block_index: doc_of_position must not be empty");
  STD_TORCH_CHECK(doc_of_position.numel() <= kFieldMax, "build_block_index: more than 2^31 - 1 positions");
  STD_TORCH_CHECK(anchor_pos.numel() <= kFieldMax, "build_block_index: more than 2^31 - 1 elements");
  STD_TORCH_CHECK(q_block_size > 0 && kv_block_size > 0, "build_block_index: block sizes must be positive");
  // ceil_div(N, size) overflows for sizes near 2^63 (and gives no blocks at all).
  STD_TORCH_CHECK(q_block_size <= kFieldMax && kv_block_size <= kFieldMax,
                  "build_block_index: block sizes must be <= 2^31 - 1");
  STD_TORCH_CHECK(!sliding_window.has_value() || *sliding_window >= 1,
                  "build_block_index: sliding_window must be >= 1");
  STD_TORCH_CHECK(anchor_pos.device() == depth.device() && anchor_pos.device() == doc_of_position.device(),
                  "build_block_index: all tensors must be on one device");
  const int64_t n = anchor_pos.numel();
  return OpInputs{torch::stable::contiguous(anchor_pos),
                  torch::stable::contiguous(depth),
                  torch::stable::contiguous(doc_of_position),
                  n,
                  doc_of_position.numel(),
                  sliding_window.value_or(0),
                  q_block_size,
                  kv_block_size,
                  ceil_div(n, q_block_size),
                  ceil_div(n, kv_block_size)};
}

BlockIndexTensors allocate_outputs(const OpInputs& in, const Tensor& like) {
  auto ints = [&](std::initializer_list<int64_t> shape) {
    return torch::stable::new_empty(like, shape, ScalarType::Int);
  };
  const int64_t rows = in.num_q_blocks, columns = in.num_kv_blocks;
  return {ints({1, 1, rows}),    ints({1, 1, rows, columns}),    ints({1, 1, rows}),    ints({1, 1, rows, columns}),
          ints({1, 1, columns}), ints({1, 1, columns, rows}), ints({1, 1, columns}), ints({1, 1, columns, rows})};
}

ListOutputs list_outputs(BlockIndexTensors& out) {
  auto& [kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx] = out;
  return ListOutputs{{kv_num.mutable_data_ptr<int32_t>(), full_kv_num.mutable_data_ptr<int32_t>(),
                      q_num.mutable_data_ptr<int32_t>(), full_q_num.mutable_data_ptr<int32_t>()},
                     {kv_idx.mutable_data_ptr<int32_t>(), full_kv_idx.mutable_data_ptr<int32_t>(),
                      q_idx.mutable_data_ptr<int32_t>(), full_q_idx.mutable_data_ptr<int32_t>()}};
}

Tensor empty_bytes(int64_t bytes, const Tensor& like) {
  return torch::stable::new_empty(like, {bytes}, ScalarType::Byte);
}

}  // namespace peagle
