// What the CPU and CUDA implementations of the block-index op share: the input checks, the outputs.
#include "block_index.h"

namespace peagle {

namespace {
using torch::headeronly::ScalarType;

constexpr int64_t kMaxRows = 65535;  // a CUDA grid's second dimension, which holds the rows
}  // namespace

OpInputs check_inputs(const Tensor& anchor_pos, const Tensor& depth, const Tensor& doc_of_position,
                      std::optional<int64_t> sliding_window, int64_t q_block_size, int64_t kv_block_size,
                      const std::optional<Tensor>& kv_anchor_pos, const std::optional<Tensor>& kv_depth) {
  STD_TORCH_CHECK(kv_anchor_pos.has_value() == kv_depth.has_value(),
                  "build_block_index: kv_anchor_pos and kv_depth go together");
  const Tensor& key_anchor = kv_anchor_pos.has_value() ? *kv_anchor_pos : anchor_pos;
  const Tensor& key_depth = kv_depth.has_value() ? *kv_depth : depth;
  const int64_t dims = anchor_pos.dim();
  STD_TORCH_CHECK(dims == 1 || dims == 2, "build_block_index: anchor_pos must be 1-D [N] or 2-D [B, N]");
  for (const Tensor* t : {&anchor_pos, &depth, &key_anchor, &key_depth, &doc_of_position}) {
    STD_TORCH_CHECK(t->dim() == dims, "build_block_index: every tensor must have anchor_pos's number of dims");
    STD_TORCH_CHECK(t->scalar_type() == ScalarType::Long, "build_block_index: every tensor must be int64");
    STD_TORCH_CHECK(t->device() == anchor_pos.device(), "build_block_index: all tensors must be on one device");
    STD_TORCH_CHECK(dims == 1 || t->size(0) == anchor_pos.size(0),
                    "build_block_index: every tensor must have anchor_pos's number of rows");
  }
  const int64_t rows = dims == 2 ? anchor_pos.size(0) : 1;
  const int64_t num_queries = anchor_pos.size(dims - 1), num_keys = key_anchor.size(dims - 1);
  const int64_t num_positions = doc_of_position.size(dims - 1);
  STD_TORCH_CHECK(depth.size(dims - 1) == num_queries, "build_block_index: anchor_pos and depth differ in length");
  STD_TORCH_CHECK(key_depth.size(dims - 1) == num_keys,
                  "build_block_index: kv_anchor_pos and kv_depth differ in length");
  STD_TORCH_CHECK(rows >= 1 && rows <= kMaxRows, "build_block_index: the batch must have 1 to 65535 rows");
  STD_TORCH_CHECK(num_queries > 0 && num_keys > 0, "build_block_index: N must be positive");
  STD_TORCH_CHECK(num_positions > 0, "build_block_index: doc_of_position must not be empty");
  STD_TORCH_CHECK(num_positions <= kFieldMax, "build_block_index: more than 2^31 - 1 positions");
  STD_TORCH_CHECK(num_queries <= kFieldMax && num_keys <= kFieldMax, "build_block_index: more than 2^31 - 1 elements");
  STD_TORCH_CHECK(q_block_size > 0 && kv_block_size > 0, "build_block_index: block sizes must be positive");
  // num_blocks(N, size) overflows for sizes near 2^63 (and gives no blocks at all).
  STD_TORCH_CHECK(q_block_size <= kFieldMax && kv_block_size <= kFieldMax,
                  "build_block_index: block sizes must be <= 2^31 - 1");
  STD_TORCH_CHECK(!sliding_window.has_value() || *sliding_window >= 1,
                  "build_block_index: sliding_window must be >= 1");
  const int64_t num_q_blocks = num_blocks(num_queries, q_block_size),
                num_kv_blocks = num_blocks(num_keys, kv_block_size);
  int64_t tiles = 0;
  STD_TORCH_CHECK(
      !__builtin_mul_overflow(num_q_blocks, num_kv_blocks, &tiles) && !__builtin_mul_overflow(tiles, rows, &tiles),
      "build_block_index: more tiles than an int64 counts");
  const Tensor queries_anchor = torch::stable::contiguous(anchor_pos), queries_depth = torch::stable::contiguous(depth);
  return OpInputs{queries_anchor,
                  queries_depth,
                  kv_anchor_pos.has_value() ? torch::stable::contiguous(key_anchor) : queries_anchor,
                  kv_depth.has_value() ? torch::stable::contiguous(key_depth) : queries_depth,
                  torch::stable::contiguous(doc_of_position),
                  rows,
                  num_queries,
                  num_keys,
                  num_positions,
                  sliding_window.value_or(0),
                  q_block_size,
                  kv_block_size,
                  num_q_blocks,
                  num_kv_blocks};
}

BlockIndexTensors allocate_block_index(const Tensor& like, int64_t num_rows, int64_t num_q_blocks,
                                       int64_t num_kv_blocks) {
  auto ints = [&](std::initializer_list<int64_t> shape) {
    return torch::stable::new_empty(like, shape, ScalarType::Int);
  };
  const int64_t b = num_rows, rows = num_q_blocks, columns = num_kv_blocks;
  return {ints({b, 1, rows}),    ints({b, 1, rows, columns}), ints({b, 1, rows}),    ints({b, 1, rows, columns}),
          ints({b, 1, columns}), ints({b, 1, columns, rows}), ints({b, 1, columns}), ints({b, 1, columns, rows})};
}

ListOutputs block_index_row(BlockIndexTensors& out, int64_t num_q_blocks, int64_t num_kv_blocks, int64_t row) {
  auto& [kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx] = out;
  const int64_t rows = num_q_blocks, columns = num_kv_blocks, tiles = rows * columns;
  return ListOutputs{
      {kv_num.mutable_data_ptr<int32_t>() + row * rows, full_kv_num.mutable_data_ptr<int32_t>() + row * rows,
       q_num.mutable_data_ptr<int32_t>() + row * columns, full_q_num.mutable_data_ptr<int32_t>() + row * columns},
      {kv_idx.mutable_data_ptr<int32_t>() + row * tiles, full_kv_idx.mutable_data_ptr<int32_t>() + row * tiles,
       q_idx.mutable_data_ptr<int32_t>() + row * tiles, full_q_idx.mutable_data_ptr<int32_t>() + row * tiles}};
}

BlockIndexTensors allocate_outputs(const OpInputs& in) {
  return allocate_block_index(in.anchor_pos, in.num_rows, in.num_q_blocks, in.num_kv_blocks);
}

ListOutputs list_outputs(BlockIndexTensors& out, const OpInputs& in, int64_t row) {
  return block_index_row(out, in.num_q_blocks, in.num_kv_blocks, row);
}

Tensor empty_bytes(int64_t bytes, const Tensor& like) {
  return torch::stable::new_empty(like, {bytes}, ScalarType::Byte);
}

}  // namespace peagle
