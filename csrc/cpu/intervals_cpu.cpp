// CPU implementation of the interval op (build_interval_block_index): per q-block in parallel,
// each query's intervals merged (rule/interval_rule.h) and counted into two difference rows over
// the kv-blocks, whose prefix sums classify the row's tiles; then the four lists. O(Q M log M +
// nQ x nKV) time, one byte per tile and two counters per kv-block per thread of extra memory.
#include <torch/csrc/stable/library.h>

#include <vector>

#include "../intervals_op.h"
#include "../rule/interval_rule.h"
#include "cpu_lists.h"

namespace peagle {
namespace {

void classify_interval_row(const IntervalInputs& in, int64_t row, int64_t q_block, std::vector<int32_t>& touching,
                           std::vector<int32_t>& covering, std::vector<int64_t>& start, std::vector<int64_t>& end,
                           uint8_t* states) {
  const int64_t columns = in.num_kv_blocks, m = in.num_intervals;
  std::fill(touching.begin(), touching.end(), 0);
  std::fill(covering.begin(), covering.end(), 0);
  const int64_t first = q_block * in.q_block_size, last = min_value(in.num_queries, first + in.q_block_size);
  const int64_t* row_starts = in.starts.const_data_ptr<int64_t>() + row * in.num_queries * m;
  const int64_t* row_ends = in.ends.const_data_ptr<int64_t>() + row * in.num_queries * m;
  for (int64_t q = first; q < last; ++q) {
    std::copy(row_starts + q * m, row_starts + (q + 1) * m, start.begin());
    std::copy(row_ends + q * m, row_ends + (q + 1) * m, end.begin());
    const int64_t merged = merge_intervals(start.data(), end.data(), m, in.kv_len);
    for (int64_t i = 0; i < merged; ++i) {
      const IntervalBlocks blocks = interval_blocks(start[i], end[i], in.kv_block_size);
      ++touching[blocks.touch_lo];
      --touching[blocks.touch_hi];
      if (blocks.cover_hi > blocks.cover_lo) {
        ++covering[blocks.cover_lo];
        --covering[blocks.cover_hi];
      }
    }
  }
  int64_t touch = 0, cover = 0;
  for (int64_t column = 0; column < columns; ++column) {
    touch += touching[column];
    cover += covering[column];
    states[q_block * columns + column] = interval_tile_state(touch, cover, in.q_block_size);
  }
}

BlockIndexTensors build_interval_block_index_cpu(const Tensor& starts, const Tensor& ends, int64_t kv_len,
                                                 int64_t q_block_size, int64_t kv_block_size) {
  const IntervalInputs in = check_interval_inputs(starts, ends, kv_len, q_block_size, kv_block_size);
  BlockIndexTensors out = allocate_interval_outputs(in);
  std::vector<uint8_t> states(in.num_q_blocks * in.num_kv_blocks);
  for (int64_t row = 0; row < in.num_rows; ++row) {
    torch::stable::parallel_for(0, in.num_q_blocks, 1, [&](int64_t begin, int64_t end_block) {
      std::vector<int32_t> touching(in.num_kv_blocks + 1), covering(in.num_kv_blocks + 1);
      std::vector<int64_t> start(in.num_intervals), end(in.num_intervals);
      for (int64_t q_block = begin; q_block < end_block; ++q_block)
        classify_interval_row(in, row, q_block, touching, covering, start, end, states.data());
    });
    const ListOutputs lists = interval_list_outputs(out, in, row);
    torch::stable::parallel_for(0, 2 * (in.num_q_blocks + in.num_kv_blocks), 64, [&](int64_t begin, int64_t end) {
      for (int64_t line = begin; line < end; ++line)
        write_list_line(states.data(), in.num_q_blocks, in.num_kv_blocks, line, lists);
    });
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(peagle_ext, CPU, m) {
  m.impl("build_interval_block_index", TORCH_BOX(&build_interval_block_index_cpu));
}

}  // namespace peagle
