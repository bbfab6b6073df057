// The P-EAGLE tile rule, once, for the CPU kernel and the CUDA pipeline alike.
//
// Query q (anchor a_q, depth d_q, document doc_q) sees exactly two sets of keys (docs/rule.md):
//   context: depth-0 keys of doc_q with anchor in [first_q, a_q], first_q = 0 without a window W,
//            else max(0, min(a_q + d_q - W, a_q - 1) + 1): the window's bound, widened so that q's
//            own depth-0 element (seen through the rollout clause, d_k = 0 <= d_q) stays inside;
//   rollout: depth >= 1 keys with anchor a_q and depth <= d_q.
// Both are runs of sorted key lists: depth-0 keys sorted by (document, anchor) and deeper keys
// grouped by anchor. A tile (q-block, kv-block) is non-empty when a query of the q-block sees a
// key of the kv-block, found by walking those runs. Whether a tile is full needs no lists: every
// key of the kv-block must be seen by every query of the q-block, which reduces to comparing a
// few extremes of the two blocks (tile_is_full).
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

PEAGLE_HD int64_t min_value(int64_t a, int64_t b) { return a < b ? a : b; }
PEAGLE_HD int64_t max_value(int64_t a, int64_t b) { return a > b ? a : b; }
// Blocks of `size` covering `count` items: ceil(count / size), for positive sizes.
PEAGLE_HD int64_t num_blocks(int64_t count, int64_t size) { return (count + size - 1) / size; }

PEAGLE_HD int64_t clamp_field(int64_t v) { return v < 0 ? 0 : (v > kFieldMax ? kFieldMax : v); }
PEAGLE_HD int64_t pack(int64_t high, int64_t low) { return (clamp_field(high) << kFieldBits) | clamp_field(low); }
PEAGLE_HD int64_t low_field(int64_t key) { return key & kFieldMax; }

// What the rule needs to know about one element, as a query and as a key.
struct ElementInfo {
  bool real;              // anchor and depth in range and the anchor in a document (not padding)
  int64_t doc;            // its document as the sort keys hold it (clamped), -1 when not real
  int64_t anchor;         // meaningful only when real
  int64_t depth;          // clamped like the sort keys' fields
  int64_t context_first;  // first_q above: the lowest anchor of the depth-0 keys it sees
};

// window <= 0 means no sliding window.
PEAGLE_HD ElementInfo element_info(int64_t anchor, int64_t depth, const int64_t* doc_of_position, int64_t num_positions,
                                   int64_t window) {
  ElementInfo e;
  const bool in_range = anchor >= 0 && anchor < num_positions && depth >= 0;
  const int64_t doc = in_range ? doc_of_position[anchor] : -1;
  e.real = doc >= 0;
  e.doc = e.real ? clamp_field(doc) : -1;
  e.anchor = anchor;
  e.depth = clamp_field(depth);
  int64_t lowest_excluded = -1;
  if (e.real && window > 0)
    lowest_excluded = anchor + depth - window < anchor - 1 ? anchor + depth - window : anchor - 1;
  e.context_first = lowest_excluded + 1 > 0 ? lowest_excluded + 1 : 0;
  return e;
}

// The full-tile test needs extremes over a q-block's queries and over a kv-block's keys. They
// are gathered as maxima of uint32 cells, 0 meaning "nothing seen", so that contributions combine
// in any order (atomicMax on the GPU): a maximum of v is kept as v + 1, a minimum of v as 2^31 - v
// (every value lies in [0, 2^31)).
enum RowCell {
  kRowRealMin,
  kRowDocMin,
  kRowDocMax,
  kRowAnchorMin,
  kRowAnchorMax,
  kRowFirstMax,
  kRowDepthMin,
  kRowCells
};
enum ColumnCell {
  kColumnRealMin,
  kColumnContextDocMin,
  kColumnContextDocMax,
  kColumnContextAnchorMin,
  kColumnContextAnchorMax,
  kColumnRolloutAnchorMin,
  kColumnRolloutAnchorMax,
  kColumnRolloutDepthMax,
  kColumnCells
};

constexpr int64_t kCellBase = int64_t{1} << kFieldBits;
PEAGLE_HD uint32_t max_cell(int64_t v) { return static_cast<uint32_t>(v + 1); }
PEAGLE_HD uint32_t min_cell(int64_t v) { return static_cast<uint32_t>(kCellBase - v); }
PEAGLE_HD int64_t max_of(uint32_t cell) { return static_cast<int64_t>(cell) - 1; }
PEAGLE_HD int64_t min_of(uint32_t cell) { return kCellBase - static_cast<int64_t>(cell); }

// A block's extremes as plain values, added element by element and written as cells once. Minima
// start at kCellBase and maxima at -1, which the cells encode as 0 ("nothing seen"). A block
// holding any padding element is never full, so only the real-min cell counts padding elements.
struct QueryExtremes {  // over a q-block's queries
  int64_t real_min = kCellBase, doc_min = kCellBase, doc_max = -1, anchor_min = kCellBase, anchor_max = -1,
          first_max = -1, depth_min = kCellBase;
  PEAGLE_HD void add(const ElementInfo& e) {
    real_min = min_value(real_min, e.real ? 1 : 0);
    if (!e.real) return;
    doc_min = min_value(doc_min, e.doc);
    doc_max = max_value(doc_max, e.doc);
    anchor_min = min_value(anchor_min, e.anchor);
    anchor_max = max_value(anchor_max, e.anchor);
    first_max = max_value(first_max, e.context_first);
    depth_min = min_value(depth_min, e.depth);
  }
  PEAGLE_HD void write_cells(uint32_t* cells) const {
    cells[kRowRealMin] = min_cell(real_min);
    cells[kRowDocMin] = min_cell(doc_min);
    cells[kRowDocMax] = max_cell(doc_max);
    cells[kRowAnchorMin] = min_cell(anchor_min);
    cells[kRowAnchorMax] = max_cell(anchor_max);
    cells[kRowFirstMax] = max_cell(first_max);
    cells[kRowDepthMin] = min_cell(depth_min);
  }
};

struct KeyExtremes {  // over a kv-block's keys: depth-0 (context) and deeper (rollout) keys apart
  int64_t real_min = kCellBase, context_doc_min = kCellBase, context_doc_max = -1, context_anchor_min = kCellBase,
          context_anchor_max = -1, rollout_anchor_min = kCellBase, rollout_anchor_max = -1, rollout_depth_max = -1;
  PEAGLE_HD void add(const ElementInfo& e) {
    real_min = min_value(real_min, e.real ? 1 : 0);
    if (!e.real) return;
    if (e.depth == 0) {
      context_doc_min = min_value(context_doc_min, e.doc);
      context_doc_max = max_value(context_doc_max, e.doc);
      context_anchor_min = min_value(context_anchor_min, e.anchor);
      context_anchor_max = max_value(context_anchor_max, e.anchor);
    } else {
      rollout_anchor_min = min_value(rollout_anchor_min, e.anchor);
      rollout_anchor_max = max_value(rollout_anchor_max, e.anchor);
      rollout_depth_max = max_value(rollout_depth_max, e.depth);
    }
  }
  PEAGLE_HD void write_cells(uint32_t* cells) const {
    cells[kColumnRealMin] = min_cell(real_min);
    cells[kColumnContextDocMin] = min_cell(context_doc_min);
    cells[kColumnContextDocMax] = max_cell(context_doc_max);
    cells[kColumnContextAnchorMin] = min_cell(context_anchor_min);
    cells[kColumnContextAnchorMax] = max_cell(context_anchor_max);
    cells[kColumnRolloutAnchorMin] = min_cell(rollout_anchor_min);
    cells[kColumnRolloutAnchorMax] = max_cell(rollout_anchor_max);
    cells[kColumnRolloutDepthMax] = max_cell(rollout_depth_max);
  }
};

// What one element contributes to its q-block's cells (as a query) and to its kv-block's cells
// (as a key); 0 means nothing.
PEAGLE_HD void query_cells(const ElementInfo& e, uint32_t* cells) {
  QueryExtremes extremes;
  extremes.add(e);
  extremes.write_cells(cells);
}

PEAGLE_HD void key_cells(const ElementInfo& e, uint32_t* cells) {
  KeyExtremes extremes;
  extremes.add(e);
  extremes.write_cells(cells);
}

// The q-block side of the full-tile test. `whole`: the block holds Q_BLOCK_SIZE queries (no tail).
struct RowSummary {
  bool all_real;
  int64_t doc_min, doc_max, anchor_min, anchor_max, first_max, depth_min;
};

PEAGLE_HD RowSummary row_summary(const uint32_t* cells, bool whole) {
  return RowSummary{whole && min_of(cells[kRowRealMin]) == 1,
                    min_of(cells[kRowDocMin]),
                    max_of(cells[kRowDocMax]),
                    min_of(cells[kRowAnchorMin]),
                    max_of(cells[kRowAnchorMax]),
                    max_of(cells[kRowFirstMax]),
                    min_of(cells[kRowDepthMin])};
}

// The kv-block side. `whole`: the block holds KV_BLOCK_SIZE keys (no tail).
struct ColumnSummary {
  bool complete, has_context, has_rollout;
  int64_t context_doc_min, context_doc_max, context_anchor_min, context_anchor_max;
  int64_t rollout_anchor_min, rollout_anchor_max, rollout_depth_max;
};

PEAGLE_HD ColumnSummary column_summary(const uint32_t* cells, bool whole) {
  return ColumnSummary{whole && min_of(cells[kColumnRealMin]) == 1, cells[kColumnContextAnchorMax] != 0,
                       cells[kColumnRolloutAnchorMax] != 0,         min_of(cells[kColumnContextDocMin]),
                       max_of(cells[kColumnContextDocMax]),         min_of(cells[kColumnContextAnchorMin]),
                       max_of(cells[kColumnContextAnchorMax]),      min_of(cells[kColumnRolloutAnchorMin]),
                       max_of(cells[kColumnRolloutAnchorMax]),      max_of(cells[kColumnRolloutDepthMax])};
}

// Every key of the kv-block seen by every query of the q-block (all real, no tail on either side):
// its depth-0 keys share the queries' one document and lie in [max first_q, min a_q]; its deeper
// keys all sit on the one anchor every query has, no deeper than the shallowest query.
PEAGLE_HD bool tile_is_full(const RowSummary& row, const ColumnSummary& column) {
  if (!row.all_real || !column.complete) return false;
  const bool context_seen =
      !column.has_context ||
      (row.doc_min == row.doc_max && column.context_doc_min == row.doc_min && column.context_doc_max == row.doc_min &&
       row.first_max <= column.context_anchor_min && column.context_anchor_max <= row.anchor_min);
  const bool rollout_seen =
      !column.has_rollout || (row.anchor_min == row.anchor_max && column.rollout_anchor_min == row.anchor_min &&
                              column.rollout_anchor_max == row.anchor_min && column.rollout_depth_max <= row.depth_min);
  return context_seen && rollout_seen;
}

PEAGLE_HD uint8_t classify_tile(bool nonempty, const RowSummary& row, const ColumnSummary& column) {
  if (!nonempty) return kEmpty;
  return tile_is_full(row, column) ? kFull : kPartial;
}

// Where entry i of a line goes in its BlockMask list, create_block_mask's layout: the entries in
// the list (`listed`) ascending, then the others ascending. listed_before: listed entries before i.
PEAGLE_HD int64_t list_position(bool listed, int64_t i, int64_t listed_before, int64_t listed_total) {
  return listed ? listed_before : listed_total + (i - listed_before);
}

// The output tensors' rows, in BlockMask order (one batch row's part of each).
struct ListOutputs {
  int32_t* num[4];  // kv_num_blocks, full_kv_num_blocks, q_num_blocks, full_q_num_blocks
  int32_t* idx[4];  // kv_indices, full_kv_indices, q_indices, full_q_indices
};

}  // namespace peagle
