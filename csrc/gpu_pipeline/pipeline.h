// The CUDA pipeline's host side, free of torch: where each buffer lies in one workspace, and the
// launch sequence. `Launcher` (launch(kernel, grid, dynamic shared bytes) over grid x num_rows
// blocks, zero(bytes), poison(bytes)) is the CUDA launcher (cuda/block_index_cuda.cu) or the sequential
// one (sequential_launcher.h); block_index_pipeline.h wraps this for torch tensors.
#pragma once

#include <cstddef>

#include "kernels.h"

namespace peagle {
namespace pipeline {

// Marks of a q-block live in shared memory up to this many kv-blocks (N = 4M at KV_BLOCK_SIZE
// 128), else in its row of the states, so the row kernel stays under the 48 KB of shared memory
// a launch gets without opting in.
constexpr int64_t kMaxSharedMarks = 32 * 1024;
static_assert(sizeof(RowKernel::Shared) + kMaxSharedMarks <= 48 * 1024,
              "the row kernel's shared memory must fit a launch that does not opt in to more");

// Byte offsets in the workspace: each buffer holds its per-row size for every row of the batch
// (row_buffers in kernels.h finds a row's part). The first `zeroed_bytes` are zeroed by the
// pipeline's memset.
struct Layout {
  size_t buckets, doc_first, column_cells, blocks_done, zeroed_bytes;
  size_t slot, rank_key, context_start, context_end, rollout_start, rollout_end, walk_start, walk_rollout, query_doc,
      query_depth, walk_offset, order, states, total_bytes;
  bool marks_in_shared;
};

inline Layout plan(const Sizes& s) {
  Layout l{};
  size_t at = 0;
  const size_t rows = static_cast<size_t>(s.num_rows);
  auto take = [&](size_t count, size_t element_bytes) {  // count elements per row
    const size_t offset = at;
    at += (rows * count * element_bytes + 15) / 16 * 16;  // 16-byte aligned, like cudaMalloc'd memory
    return offset;
  };
  const size_t queries = static_cast<size_t>(s.num_queries), keys = static_cast<size_t>(s.num_keys);
  const size_t positions = static_cast<size_t>(s.num_positions);
  l.buckets = take(2 * positions + 1, sizeof(int32_t));
  l.doc_first = take(positions, sizeof(uint32_t));
  l.column_cells = take(static_cast<size_t>(s.num_kv_blocks) * kColumnCells, sizeof(uint32_t));
  l.blocks_done = take(1, sizeof(int32_t));
  l.zeroed_bytes = at;
  l.slot = take(keys, sizeof(int32_t));
  l.rank_key = take(keys, sizeof(int64_t));
  l.context_start = take(queries, sizeof(int32_t));
  l.context_end = take(queries, sizeof(int32_t));
  l.rollout_start = take(queries, sizeof(int32_t));
  l.rollout_end = take(queries, sizeof(int32_t));
  l.walk_start = take(queries, sizeof(int32_t));
  l.walk_rollout = take(queries, sizeof(int32_t));
  l.query_doc = take(queries, sizeof(int32_t));
  l.query_depth = take(queries, sizeof(int32_t));
  l.walk_offset = take(queries, sizeof(int64_t));
  l.order = take(4 * queries, sizeof(int32_t));
  l.states = take(static_cast<size_t>(s.num_q_blocks * s.num_kv_blocks), 1);
  l.total_bytes = at;
  l.marks_in_shared = s.num_kv_blocks <= kMaxSharedMarks;
  return l;
}

// Row 0's buffers; the inputs and `lists` are those of row 0 too, each row following the last.
inline Buffers bind(const Layout& l, uint8_t* workspace, const int64_t* anchor, const int64_t* depth,
                    const int64_t* key_anchor, const int64_t* key_depth, const int64_t* doc_of_position,
                    const ListOutputs& lists) {
  auto at = [&](size_t offset) { return workspace + offset; };
  Buffers b;
  b.anchor = anchor;
  b.depth = depth;
  b.key_anchor = key_anchor;
  b.key_depth = key_depth;
  b.doc_of_position = doc_of_position;
  b.buckets = reinterpret_cast<int32_t*>(at(l.buckets));
  b.doc_first = reinterpret_cast<uint32_t*>(at(l.doc_first));
  b.column_cells = reinterpret_cast<uint32_t*>(at(l.column_cells));
  b.blocks_done = reinterpret_cast<int32_t*>(at(l.blocks_done));
  b.slot = reinterpret_cast<int32_t*>(at(l.slot));
  b.rank_key = reinterpret_cast<int64_t*>(at(l.rank_key));
  b.context_start = reinterpret_cast<int32_t*>(at(l.context_start));
  b.context_end = reinterpret_cast<int32_t*>(at(l.context_end));
  b.rollout_start = reinterpret_cast<int32_t*>(at(l.rollout_start));
  b.rollout_end = reinterpret_cast<int32_t*>(at(l.rollout_end));
  b.walk_start = reinterpret_cast<int32_t*>(at(l.walk_start));
  b.walk_rollout = reinterpret_cast<int32_t*>(at(l.walk_rollout));
  b.query_doc = reinterpret_cast<int32_t*>(at(l.query_doc));
  b.query_depth = reinterpret_cast<int32_t*>(at(l.query_depth));
  b.walk_offset = reinterpret_cast<int64_t*>(at(l.walk_offset));
  b.order = reinterpret_cast<int32_t*>(at(l.order));
  b.states = at(l.states);
  b.lists = lists;
  return b;
}

// The pipeline: a memset of the workspace's counters, then the four kernels, in order, each over
// every row of the batch at once (the launcher's second grid dimension).
template <class Launcher>
void launch_pipeline(Launcher& launcher, uint8_t* workspace, const Buffers& b, const Sizes& s, const Layout& l) {
  launcher.zero(workspace, l.zeroed_bytes);
  const int64_t count_items = s.num_keys > s.num_positions ? s.num_keys : s.num_positions;
  launcher.launch(CountKernel{b, s}, num_blocks(count_items, CountKernel::kThreads), 0);
  launcher.launch(ScatterKernel{b, s}, num_blocks(s.num_keys, ScatterKernel::kThreads), 0);
  launcher.launch(RowKernel{b, s, l.marks_in_shared}, s.num_q_blocks,
                  l.marks_in_shared ? static_cast<size_t>(s.num_kv_blocks) : 0);
  launcher.launch(ColumnKernel{b, s}, s.num_kv_blocks, 0);
}

}  // namespace pipeline
}  // namespace peagle
