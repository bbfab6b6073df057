// What only the CPU kernel uses beyond the rule (rule/tile_rule.h): each element's sort keys and
// search bounds, marking the kv-blocks of a run of ranks, and writing a list from a line of tile
// states. The CUDA pipeline has its own counterparts (gpu_pipeline/kernels.h).
#pragma once

#include <cstdint>

#include "../rule/tile_rule.h"

namespace peagle {

// The CPU kernel's sort keys and search bounds for one element. A query's context interval is
// [lower_bound(context_lo), upper_bound(context_hi)) in the sorted context keys; its rollout
// interval likewise in the sorted rollout keys. A padding element has no keys and empty intervals.
struct ElementKeys {
  int64_t context_key;  // (doc, anchor) for a real depth-0 element, else kNotListed
  int64_t rollout_key;  // (anchor, depth) for a real deeper element, else kNotListed
  int64_t context_lo, context_hi;
  int64_t rollout_lo, rollout_hi;
  bool real;
};

PEAGLE_HD ElementKeys element_keys(const ElementInfo& e) {
  ElementKeys k;
  k.real = e.real;
  if (!e.real) {
    k.context_key = k.rollout_key = kNotListed;
    k.context_lo = k.rollout_lo = kNotListed;  // lower_bound lands past every real key...
    k.context_hi = k.rollout_hi = -1;          // ...and upper_bound at 0: an empty interval.
    return k;
  }
  k.context_key = e.depth == 0 ? pack(e.doc, e.anchor) : kNotListed;
  k.rollout_key = e.depth > 0 ? pack(e.anchor, e.depth) : kNotListed;
  k.context_lo = pack(e.doc, e.context_first);
  k.context_hi = pack(e.doc, e.anchor);
  k.rollout_lo = pack(e.anchor, 1);
  k.rollout_hi = pack(e.anchor, e.depth);  // depth 0: hi < lo, empty
  return k;
}

PEAGLE_HD ElementKeys element_keys(int64_t anchor, int64_t depth, const int64_t* doc_of_position, int64_t num_positions,
                                   int64_t window) {
  return element_keys(element_info(anchor, depth, doc_of_position, num_positions, window));
}

// Mark the kv-blocks of the ranks in [start, end): walk run by run, a run being consecutive
// ranks whose keys share a kv-block.
PEAGLE_HD void mark_interval(int64_t start, int64_t end, const int64_t* run_of_rank, const int64_t* tile_of_run,
                             uint8_t* row_marks) {
  if (end <= start) return;
  const int64_t last_run = run_of_rank[end - 1];
  for (int64_t run = run_of_rank[start]; run <= last_run; ++run) row_marks[tile_of_run[run]] = 1;
}

// One BlockMask list from a line of tile states (a row, or a column when stride is the row
// length), laid out by list_position. Returns the count.
PEAGLE_HD int32_t write_ordered(const uint8_t* states, int64_t stride, int64_t length, uint8_t wanted,
                                int32_t* indices) {
  int64_t total = 0;
  for (int64_t i = 0; i < length; ++i) total += states[i * stride] == wanted;
  int64_t before = 0;
  for (int64_t i = 0; i < length; ++i) {
    const bool listed = states[i * stride] == wanted;
    indices[list_position(listed, i, before, total)] = static_cast<int32_t>(i);
    before += listed;
  }
  return static_cast<int32_t>(total);
}

// The four BlockMask lists of a [rows, cols] state grid, as 2 * (rows + cols) lines: row lists
// (partial, full) then column lists (partial, full).
PEAGLE_HD void write_list_line(const uint8_t* states, int64_t num_rows, int64_t num_cols, int64_t line,
                               const ListOutputs& out) {
  const bool is_row = line < 2 * num_rows;
  const int64_t local = is_row ? line : line - 2 * num_rows;
  const int64_t count = is_row ? num_rows : num_cols;
  const int list = (is_row ? 0 : 2) + static_cast<int>(local / count);
  const int64_t index = local % count;
  const uint8_t wanted = (list % 2 == 0) ? kPartial : kFull;
  const uint8_t* first = is_row ? states + index * num_cols : states + index;
  const int64_t stride = is_row ? 1 : num_cols;
  const int64_t length = is_row ? num_cols : num_rows;
  out.num[list][index] = write_ordered(first, stride, length, wanted, out.idx[list] + index * length);
}

}  // namespace peagle
