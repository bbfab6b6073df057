// The P-EAGLE tile rule, once, for the CPU loop and the CUDA kernel alike.
//
// Query q (anchor a_q, depth d_q, document doc_q) sees exactly two sets of keys, each a
// contiguous run of a sorted key list (shared/DESIGN.md §1):
//   context: depth-0 keys of doc_q with anchor in (lo_q, a_q], lo_q = -1 without a window W,
//            else min(a_q + d_q - W, a_q - 1),
//            contiguous when depth-0 keys are sorted by (document, anchor);
//   rollout: depth >= 1 keys with anchor a_q and depth <= d_q,
//            contiguous when those keys are sorted by (anchor, depth).
// The two sorted lists are laid end to end in one "rank" space, so each query holds two rank
// intervals. A tile (q-block, kv-block) is non-empty when an interval of one of its queries holds
// a rank whose key lies in the kv-block; it is full when every key of the kv-block lies in every
// query's intervals, which reduces to comparing rank extremes.
//
// Everything here is plain arithmetic on values the caller passes in; no allocation, no I/O.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PEAGLE_HD __host__ __device__ __forceinline__
#else
#define PEAGLE_HD inline
#endif

namespace peagle {

// Sort keys pack two non-negative 31-bit fields into one int64. Inputs are validated in Python to
// fit; here they are clamped so that unvalidated input can give a wrong mask but never an
// out-of-bounds read.
constexpr int kFieldBits = 31;
constexpr int64_t kFieldMax = (int64_t{1} << kFieldBits) - 1;
// The key of an element that is not in a list: sorts after every real key.
constexpr int64_t kNotListed = INT64_MAX;

enum TileState : uint8_t { kEmpty = 0, kPartial = 1, kFull = 2 };

PEAGLE_HD int64_t clamp_field(int64_t v) { return v < 0 ? 0 : (v > kFieldMax ? kFieldMax : v); }
PEAGLE_HD int64_t pack(int64_t high, int64_t low) { return (clamp_field(high) << kFieldBits) | clamp_field(low); }
PEAGLE_HD int64_t low_field(int64_t key) { return key & kFieldMax; }

// Everything the builder needs to know about one element, as sort keys and search bounds.
// A query's context interval is [lower_bound(context_lo), upper_bound(context_hi)) in the sorted
// context keys; its rollout interval likewise in the sorted rollout keys. A padding element has
// no keys and empty intervals.
struct ElementKeys {
  int64_t context_key;  // (doc, anchor) for a real depth-0 element, else kNotListed
  int64_t rollout_key;  // (anchor, depth) for a real deeper element, else kNotListed
  int64_t context_lo, context_hi;
  int64_t rollout_lo, rollout_hi;
  bool real;  // anchor in a document (not padding, not out of range)
};

// window <= 0 means no sliding window.
PEAGLE_HD ElementKeys element_keys(int64_t anchor, int64_t depth, const int64_t* doc_of_position,
                                   int64_t num_positions, int64_t window) {
  ElementKeys k;
  const bool in_range = anchor >= 0 && anchor < num_positions && depth >= 0;
  const int64_t doc = in_range ? doc_of_position[anchor] : -1;
  k.real = doc >= 0;
  if (!k.real) {
    k.context_key = k.rollout_key = kNotListed;
    k.context_lo = k.rollout_lo = kNotListed;  // lower_bound lands past every real key...
    k.context_hi = k.rollout_hi = -1;          // ...and upper_bound at 0: an empty interval.
    return k;
  }
  k.context_key = depth == 0 ? pack(doc, anchor) : kNotListed;
  k.rollout_key = depth > 0 ? pack(anchor, depth) : kNotListed;
  // Widen the window's exclusive bound to a_q - 1 so q's own depth-0 element (seen through the
  // rollout clause, d_k = 0 <= d_q) stays inside the context interval.
  int64_t lowest_excluded = -1;
  if (window > 0) lowest_excluded = anchor + depth - window < anchor - 1 ? anchor + depth - window : anchor - 1;
  k.context_lo = pack(doc, lowest_excluded + 1);
  k.context_hi = pack(doc, anchor);
  k.rollout_lo = pack(anchor, 1);
  k.rollout_hi = depth > 0 ? pack(anchor, depth) : pack(anchor, 0);  // depth 0: hi < lo, empty
  return k;
}

// Mark the kv-blocks of the ranks in [start, end): walk run by run, a run being consecutive
// ranks whose keys share a kv-block.
PEAGLE_HD void mark_interval(int64_t start, int64_t end, const int64_t* run_of_rank, const int64_t* tile_of_run,
                             uint8_t* row_marks) {
  if (end <= start) return;
  const int64_t last_run = run_of_rank[end - 1];
  for (int64_t run = run_of_rank[start]; run <= last_run; ++run) row_marks[tile_of_run[run]] = 1;
}

// The tightest interval bounds over the queries of one q-block. A key set is inside every query's
// interval exactly when it starts at or after the latest start and ends before the earliest end.
struct RowBounds {
  int64_t context_start_max, context_end_min;
  int64_t rollout_start_max, rollout_end_min;
  bool all_real;  // the q-block holds Q_BLOCK_SIZE real queries (so it is no tail block)
};

// The rank extremes of the keys of one kv-block in each list (high < low when it has none there).
struct ColumnExtent {
  int64_t context_low, context_high;
  int64_t rollout_low, rollout_high;
  bool complete;  // the kv-block holds KV_BLOCK_SIZE listed keys (so it is no tail block)
};

PEAGLE_HD bool covered(int64_t start_max, int64_t end_min, int64_t low, int64_t high) {
  return high < low || (start_max <= low && high < end_min);
}

PEAGLE_HD uint8_t classify_tile(bool nonempty, const RowBounds& row, const ColumnExtent& column) {
  if (!nonempty) return kEmpty;
  const bool full = row.all_real && column.complete &&
                    covered(row.context_start_max, row.context_end_min, column.context_low, column.context_high) &&
                    covered(row.rollout_start_max, row.rollout_end_min, column.rollout_low, column.rollout_high);
  return full ? kFull : kPartial;
}

// One BlockMask list from a line of tile states (a row, or a column when stride is the row
// length): the indices whose state is `wanted` ascending, then the others ascending, which is
// create_block_mask's layout. Returns the count.
PEAGLE_HD int32_t write_ordered(const uint8_t* states, int64_t stride, int64_t length, uint8_t wanted,
                                int32_t* indices) {
  // One pass: wanted indices from the front, the others from the back (descending), then the
  // back part is reversed into ascending order.
  int32_t count = 0;
  int64_t back = length;
  for (int64_t i = 0; i < length; ++i) {
    if (states[i * stride] == wanted) {
      indices[count++] = static_cast<int32_t>(i);
    } else {
      indices[--back] = static_cast<int32_t>(i);
    }
  }
  for (int64_t lo = count, hi = length - 1; lo < hi; ++lo, --hi) {
    const int32_t swap = indices[lo];
    indices[lo] = indices[hi];
    indices[hi] = swap;
  }
  return count;
}

// The four BlockMask lists of a [rows, cols] state grid, as 2 * (rows + cols) lines: row lists
// (partial, full) then column lists (partial, full). Output tensors in BlockMask order.
struct ListOutputs {
  int32_t* num[4];  // kv_num_blocks, full_kv_num_blocks, q_num_blocks, full_q_num_blocks
  int32_t* idx[4];  // kv_indices, full_kv_indices, q_indices, full_q_indices
};

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
