// The interval op's checks and outputs (intervals_op.h).
#include "intervals_op.h"

namespace peagle {

IntervalInputs check_interval_inputs(const Tensor& starts, const Tensor& ends, int64_t kv_len, int64_t q_block_size,
                                     int64_t kv_block_size) {
  using torch::headeronly::ScalarType;
  STD_TORCH_CHECK(starts.dim() == 3 && ends.dim() == 3, "build_interval_block_index: starts, ends must be [B, Q, M]");
  for (int64_t d = 0; d < 3; ++d)
    STD_TORCH_CHECK(starts.size(d) == ends.size(d), "build_interval_block_index: starts and ends differ in shape");
  STD_TORCH_CHECK(starts.scalar_type() == ScalarType::Long && ends.scalar_type() == ScalarType::Long,
                  "build_interval_block_index: starts and ends must be int64");
  STD_TORCH_CHECK(starts.device() == ends.device(), "build_interval_block_index: starts and ends on one device");
  const int64_t rows = starts.size(0), queries = starts.size(1), intervals = starts.size(2);
  STD_TORCH_CHECK(rows >= 1 && rows <= 65535, "build_interval_block_index: the batch must have 1 to 65535 rows");
  STD_TORCH_CHECK(queries >= 1 && queries <= kFieldMax, "build_interval_block_index: 1 to 2^31 - 1 queries");
  STD_TORCH_CHECK(intervals >= 1 && intervals <= kFieldMax, "build_interval_block_index: 1 to 2^31 - 1 intervals");
  STD_TORCH_CHECK(kv_len >= 1 && kv_len <= kFieldMax, "build_interval_block_index: kv_len must be in [1, 2^31 - 1]");
  STD_TORCH_CHECK(q_block_size >= 1 && q_block_size <= kFieldMax && kv_block_size >= 1 && kv_block_size <= kFieldMax,
                  "build_interval_block_index: block sizes must be in [1, 2^31 - 1]");
  const int64_t num_q_blocks = num_blocks(queries, q_block_size), num_kv_blocks = num_blocks(kv_len, kv_block_size);
  int64_t tiles = 0;
  STD_TORCH_CHECK(
      !__builtin_mul_overflow(num_q_blocks, num_kv_blocks + 1, &tiles) && !__builtin_mul_overflow(tiles, rows, &tiles),
      "build_interval_block_index: more tiles than an int64 counts");
  return IntervalInputs{torch::stable::contiguous(starts),
                        torch::stable::contiguous(ends),
                        rows,
                        queries,
                        intervals,
                        kv_len,
                        q_block_size,
                        kv_block_size,
                        num_q_blocks,
                        num_kv_blocks};
}

BlockIndexTensors allocate_interval_outputs(const IntervalInputs& in) {
  return allocate_block_index(in.starts, in.num_rows, in.num_q_blocks, in.num_kv_blocks);
}

ListOutputs interval_list_outputs(BlockIndexTensors& out, const IntervalInputs& in, int64_t row) {
  return block_index_row(out, in.num_q_blocks, in.num_kv_blocks, row);
}

}  // namespace peagle
