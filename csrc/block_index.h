// The block-index op: its outputs and the checks shared by the CPU and CUDA implementations.
//
// Every translation unit of the library is written against the LibTorch stable ABI
// (torch/csrc/stable, torch/headeronly) and compiled with TORCH_TARGET_VERSION = 2.10 and
// TORCH_STABLE_ONLY, so one binary loads into every torch from 2.10 on and the compiler refuses
// any header outside that surface.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <optional>
#include <tuple>

#include "rule/tile_rule.h"

namespace peagle {

using torch::stable::Tensor;

// The eight BlockMask tensors, in BlockMask's order: kv_num_blocks, kv_indices, full_kv_num_blocks,
// full_kv_indices, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices. int32, [B, 1, ...].
using BlockIndexTensors = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The op's inputs, contiguous, with the sizes every implementation derives from them. A batch is
// B rows, each its own mask: anchor_pos/depth [B, Q], kv_anchor_pos/kv_depth [B, KV] (the query
// tensors themselves when no keys apart are given), doc_of_position [B, P]; 1-D inputs are one
// row. Row r of each lies at data + r * (its row length).
struct OpInputs {
  Tensor anchor_pos, depth, kv_anchor_pos, kv_depth, doc_of_position;
  int64_t num_rows, num_queries, num_keys, num_positions;
  int64_t window;  // <= 0: no sliding window
  int64_t q_block_size, kv_block_size, num_q_blocks, num_kv_blocks;
};

// The kernels' own preconditions (Python validates values first; these guard against direct op
// calls): shapes, dtypes, devices, and sizes whose products the kernels form without overflow.
OpInputs check_inputs(const Tensor& anchor_pos, const Tensor& depth, const Tensor& doc_of_position,
                      std::optional<int64_t> sliding_window, int64_t q_block_size, int64_t kv_block_size,
                      const std::optional<Tensor>& kv_anchor_pos, const std::optional<Tensor>& kv_depth);

// The eight outputs [B, 1, ...] of a B-row block index, uninitialized, on `like`'s device (every
// builder's outputs: the P-EAGLE ops' and the interval ops').
BlockIndexTensors allocate_block_index(const Tensor& like, int64_t num_rows, int64_t num_q_blocks,
                                       int64_t num_kv_blocks);

// Raw pointers to row `row` of those outputs, in the order write_list_line expects.
ListOutputs block_index_row(BlockIndexTensors& out, int64_t num_q_blocks, int64_t num_kv_blocks, int64_t row);

// The same for the P-EAGLE op's inputs.
BlockIndexTensors allocate_outputs(const OpInputs& in);
ListOutputs list_outputs(BlockIndexTensors& out, const OpInputs& in, int64_t row = 0);

// An uninitialized byte buffer on `like`'s device (the CUDA caching allocator's on a GPU).
Tensor empty_bytes(int64_t bytes, const Tensor& like);

}  // namespace peagle
