// The interval op's inputs and outputs, shared by its CPU, emulated and CUDA implementations.
#pragma once

#include "block_index.h"

namespace peagle {

// starts/ends int64 [B, Q, M], contiguous; row r, query q, interval m at (r * Q + q) * M + m.
struct IntervalInputs {
  Tensor starts, ends;
  int64_t num_rows, num_queries, num_intervals, kv_len;
  int64_t q_block_size, kv_block_size, num_q_blocks, num_kv_blocks;
};

// The op's own preconditions (Python checks first; these guard against direct op calls).
IntervalInputs check_interval_inputs(const Tensor& starts, const Tensor& ends, int64_t kv_len, int64_t q_block_size,
                                     int64_t kv_block_size);

// The eight outputs [B, 1, ...], uninitialized, on the inputs' device.
BlockIndexTensors allocate_interval_outputs(const IntervalInputs& in);

// Raw pointers to row `row` of the outputs, in the order write_list_line expects.
ListOutputs interval_list_outputs(BlockIndexTensors& out, const IntervalInputs& in, int64_t row);

}  // namespace peagle
