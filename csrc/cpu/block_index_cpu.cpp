// CPU implementation of the block-index op: plain loops over the tile rule, parallel over rows.
//
// The sorted key lists are built by counting sorts over positions, which also give rank tables
// that answer most of a query's bounds by lookup: O(N + P) for the COD layout, with comparison
// sorts and searches only where the input needs them (documents out of position order, chains
// out of depth order, a window reaching past its document's first position). Exact either way.
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../block_index.h"
#include "cpu_lists.h"

namespace peagle {
namespace {

// The op's per-element inputs, read through the tile rule.
struct Elements {
  const int64_t* anchor;
  const int64_t* depth;
  const int64_t* doc_of_position;
  int64_t n, num_positions, window;
  ElementInfo info(int64_t i) const {
    return element_info(anchor[i], depth[i], doc_of_position, num_positions, window);
  }
  // The document as the sort keys hold it (pack clamps the field); -1 for padding.
  int64_t doc_field(int64_t position) const {
    const int64_t doc = doc_of_position[position];
    return doc < 0 ? -1 : clamp_field(doc);
  }
};

// One sorted key list: its keys ascending and the element behind each rank.
struct SortedList {
  std::vector<int64_t> keys, elements;
};

// Depth-0 keys sorted by (document, anchor), placed by counting per position, with rank tables
// over positions that answer a query's context bounds by lookup:
//   rank_before[p]: ranks of keys below (doc[p], p); doc_begin[p]: ranks of keys below (doc[p], 0).
struct ContextList {
  SortedList list;
  std::vector<int64_t> count_at, rank_before, doc_begin;
};

ContextList build_context_list(const std::vector<int64_t>& key_of_element, const Elements& el) {
  const int64_t positions = el.num_positions;
  ContextList c{
      {}, std::vector<int64_t>(positions, 0), std::vector<int64_t>(positions, 0), std::vector<int64_t>(positions, 0)};
  for (int64_t i = 0; i < el.n; ++i)
    if (key_of_element[i] != kNotListed) ++c.count_at[el.anchor[i]];
  // Real positions in (document, position) order: position order when documents are packed.
  std::vector<int64_t> order;
  for (int64_t p = 0; p < positions; ++p)
    if (el.doc_of_position[p] >= 0) order.push_back(p);
  auto by_doc = [&](int64_t a, int64_t b) { return el.doc_field(a) < el.doc_field(b); };
  if (!std::is_sorted(order.begin(), order.end(), by_doc)) std::stable_sort(order.begin(), order.end(), by_doc);
  int64_t rank = 0, begin = 0, previous_doc = -1;
  for (int64_t p : order) {
    if (el.doc_field(p) != previous_doc) {
      begin = rank;
      previous_doc = el.doc_field(p);
    }
    c.rank_before[p] = rank;
    c.doc_begin[p] = begin;
    rank += c.count_at[p];
  }
  c.list.keys.resize(rank);
  c.list.elements.resize(rank);
  std::vector<int64_t> next = c.rank_before;  // stable: elements of one anchor in element order
  for (int64_t i = 0; i < el.n; ++i) {
    if (key_of_element[i] == kNotListed) continue;
    const int64_t r = next[el.anchor[i]]++;
    c.list.keys[r] = key_of_element[i];
    c.list.elements[r] = i;
  }
  return c;
}

// Deeper keys sorted by (anchor, depth): a counting sort by anchor, then each anchor's chain by
// depth (already in order for the depth-major COD layout). bucket_begin[a]: first rank of anchor a.
struct RolloutList {
  SortedList list;
  std::vector<int64_t> bucket_begin;
};

RolloutList build_rollout_list(const std::vector<int64_t>& key_of_element, const Elements& el) {
  RolloutList r{{}, std::vector<int64_t>(el.num_positions + 1, 0)};
  for (int64_t i = 0; i < el.n; ++i)
    if (key_of_element[i] != kNotListed) ++r.bucket_begin[el.anchor[i] + 1];
  for (int64_t p = 0; p < el.num_positions; ++p) r.bucket_begin[p + 1] += r.bucket_begin[p];
  const int64_t size = r.bucket_begin.back();
  r.list.keys.resize(size);
  r.list.elements.resize(size);
  std::vector<int64_t> next(r.bucket_begin.begin(), r.bucket_begin.end() - 1);
  for (int64_t i = 0; i < el.n; ++i)
    if (key_of_element[i] != kNotListed) r.list.elements[next[el.anchor[i]]++] = i;
  auto by_key = [&](int64_t a, int64_t b) { return key_of_element[a] < key_of_element[b]; };
  if (!std::is_sorted(r.list.elements.begin(), r.list.elements.end(), by_key)) {
    for (int64_t p = 0; p < el.num_positions; ++p) {
      auto first = r.list.elements.begin() + r.bucket_begin[p];
      std::stable_sort(first, r.list.elements.begin() + r.bucket_begin[p + 1], by_key);
    }
  }
  for (int64_t k = 0; k < size; ++k) r.list.keys[k] = key_of_element[r.list.elements[k]];
  return r;
}

// Per element, its context and rollout rank intervals (rollout ranks follow the context ranks),
// and per q-block the full-tile test's cells ([nQ, kRowCells]).
struct Intervals {
  std::vector<int64_t> context_start, context_end, rollout_start, rollout_end;
  std::vector<uint32_t> row_cells;
};

// The bounds are element_keys' search keys, answered through the lists' tables: each equals the
// lower_bound / upper_bound of that key in the sorted list. element_keys is recomputed here rather
// than stored from the first pass: a few arithmetic ops are cheaper than N structs of memory.
// Runs over whole q-blocks, so each q-block's cells are gathered on the way.
Intervals find_intervals(const Elements& el, const ContextList& context, const RolloutList& rollout,
                         int64_t q_block_size, int64_t num_q_blocks) {
  const int64_t n = el.n;
  const int64_t offset = static_cast<int64_t>(context.list.keys.size());
  const std::vector<int64_t>& context_keys = context.list.keys;
  const std::vector<int64_t>& rollout_keys = rollout.list.keys;
  Intervals iv{std::vector<int64_t>(n), std::vector<int64_t>(n), std::vector<int64_t>(n), std::vector<int64_t>(n),
               std::vector<uint32_t>(num_q_blocks * kRowCells)};
  const int64_t rows_per_task = std::max<int64_t>(1, 8192 / q_block_size);
  torch::stable::parallel_for(0, num_q_blocks, rows_per_task, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      QueryExtremes extremes;
      for (int64_t i = row * q_block_size; i < std::min(n, (row + 1) * q_block_size); ++i) {
        const ElementInfo info = el.info(i);
        extremes.add(info);
        const ElementKeys k = element_keys(info);
        if (!k.real) {  // padding sees nothing
          iv.context_start[i] = iv.context_end[i] = 0;
          iv.rollout_start[i] = iv.rollout_end[i] = offset;
          continue;
        }
        const int64_t a = el.anchor[i];
        // upper_bound(context_hi = (doc_q, a)): every key of doc_q at or before a.
        iv.context_end[i] = context.rank_before[a] + context.count_at[a];
        // lower_bound(context_lo = (doc_q, x)): by table where position x is in doc_q, else search.
        const int64_t x = low_field(k.context_lo);
        if (x == 0) {
          iv.context_start[i] = context.doc_begin[a];
        } else if (el.doc_field(x) == el.doc_field(a)) {
          iv.context_start[i] = context.rank_before[x];
        } else {
          iv.context_start[i] = std::lower_bound(context_keys.begin() + context.doc_begin[a],
                                                 context_keys.begin() + iv.context_end[i], k.context_lo) -
                                context_keys.begin();
        }
        // Rollout: anchor a's chain holds every deeper key with anchor a; keep depths <= d_q.
        const int64_t chain_begin = rollout.bucket_begin[a], chain_end = rollout.bucket_begin[a + 1];
        iv.rollout_start[i] = offset + chain_begin;
        iv.rollout_end[i] = offset + (std::upper_bound(rollout_keys.begin() + chain_begin,
                                                       rollout_keys.begin() + chain_end, k.rollout_hi) -
                                      rollout_keys.begin());
      }
      extremes.write_cells(&iv.row_cells[row * kRowCells]);
    }
  });
  return iv;
}

// Ranks grouped into runs of consecutive ranks whose keys share a kv-block.
struct Runs {
  std::vector<int64_t> run_of_rank, tile_of_run;
};

Runs find_runs(const SortedList& context, const SortedList& rollout, int64_t kv_block_size, int64_t n) {
  // Each element's kv-block, counted out rather than divided (64-bit division is slow).
  std::vector<int64_t> tile_of_element(n);
  for (int64_t i = 0, tile = 0, left = kv_block_size; i < n; ++i, --left) {
    if (left == 0) {
      ++tile;
      left = kv_block_size;
    }
    tile_of_element[i] = tile;
  }
  Runs r;
  r.run_of_rank.resize(context.elements.size() + rollout.elements.size());
  int64_t rank = 0, run = -1, run_tile = -1;
  for (const SortedList* list : {&context, &rollout}) {
    for (int64_t element : list->elements) {
      const int64_t tile = tile_of_element[element];
      if (tile != run_tile) {
        r.tile_of_run.push_back(tile);
        run_tile = tile;
        ++run;
      }
      r.run_of_rank[rank++] = run;
    }
  }
  return r;
}

// Mark the kv-blocks held by the intervals [starts[q], ends[q]) of queries q_begin..q_end-1.
// Overlapping intervals are merged first so each run is walked once per row rather than once
// per query: on the fly when they come sorted by start (the COD layout), else after a sort.
void mark_row(const std::vector<int64_t>& starts, const std::vector<int64_t>& ends, int64_t q_begin, int64_t q_end,
              const Runs& runs, std::vector<std::pair<int64_t, int64_t>>& scratch, uint8_t* marks) {
  auto mark = [&](int64_t start, int64_t end) {
    mark_interval(start, end, runs.run_of_rank.data(), runs.tile_of_run.data(), marks);
  };
  int64_t start = 0, end = 0;  // the merged interval so far
  int64_t q = q_begin;
  for (; q < q_end; ++q) {
    if (ends[q] <= starts[q]) continue;
    if (starts[q] < start) break;  // out of order: finish with a sort
    if (starts[q] > end) {
      mark(start, end);
      start = starts[q];
    }
    end = std::max(end, ends[q]);
  }
  mark(start, end);
  if (q == q_end) return;
  scratch.clear();
  for (; q < q_end; ++q)
    if (ends[q] > starts[q]) scratch.emplace_back(starts[q], ends[q]);
  std::sort(scratch.begin(), scratch.end());
  for (size_t i = 0; i < scratch.size();) {
    start = scratch[i].first;
    end = scratch[i].second;
    for (++i; i < scratch.size() && scratch[i].first <= end; ++i) end = std::max(end, scratch[i].second);
    mark(start, end);
  }
}

// Tile states [nQ, nKV]: each row marks the kv-blocks its queries' intervals hold, then
// classifies every tile of the row.
std::vector<uint8_t> classify_rows(int64_t num_queries, int64_t num_keys, const Intervals& iv, const Runs& runs,
                                   const std::vector<uint32_t>& columns, int64_t q_block_size, int64_t kv_block_size,
                                   int64_t num_q_blocks, int64_t num_kv_blocks) {
  std::vector<uint8_t> states(static_cast<size_t>(num_q_blocks * num_kv_blocks));
  uint8_t* out = states.data();
  torch::stable::parallel_for(0, num_q_blocks, 1, [&](int64_t row_begin, int64_t row_end) {
    std::vector<std::pair<int64_t, int64_t>> scratch;
    for (int64_t row = row_begin; row < row_end; ++row) {
      uint8_t* marks = out + row * num_kv_blocks;
      std::fill(marks, marks + num_kv_blocks, uint8_t{0});
      const int64_t q_begin = row * q_block_size, q_end = std::min(num_queries, q_begin + q_block_size);
      const RowSummary summary = row_summary(&iv.row_cells[row * kRowCells], q_end - q_begin == q_block_size);
      mark_row(iv.context_start, iv.context_end, q_begin, q_end, runs, scratch, marks);
      mark_row(iv.rollout_start, iv.rollout_end, q_begin, q_end, runs, scratch, marks);
      for (int64_t tile = 0; tile < num_kv_blocks; ++tile) {
        const bool whole = (tile + 1) * kv_block_size <= num_keys;
        marks[tile] = classify_tile(marks[tile] != 0, summary, column_summary(&columns[tile * kColumnCells], whole));
      }
    }
  });
  return states;
}

// One row of the batch: its keys' lists and cells, its queries' intervals, the tile states, the lists.
void build_row(const OpInputs& in, int64_t row, const ListOutputs& lists) {
  const int64_t num_q_blocks = in.num_q_blocks, num_kv_blocks = in.num_kv_blocks, kv_block_size = in.kv_block_size;
  const int64_t* doc_of_position = in.doc_of_position.const_data_ptr<int64_t>() + row * in.num_positions;
  const Elements queries{in.anchor_pos.const_data_ptr<int64_t>() + row * in.num_queries,
                         in.depth.const_data_ptr<int64_t>() + row * in.num_queries,
                         doc_of_position,
                         in.num_queries,
                         in.num_positions,
                         in.window};
  const Elements keys{in.kv_anchor_pos.const_data_ptr<int64_t>() + row * in.num_keys,
                      in.kv_depth.const_data_ptr<int64_t>() + row * in.num_keys,
                      doc_of_position,
                      in.num_keys,
                      in.num_positions,
                      in.window};

  // Each key's sort keys, and per kv-block the full-tile test's cells ([nKV, kColumnCells]).
  std::vector<int64_t> context_key(keys.n), rollout_key(keys.n);
  std::vector<uint32_t> column_cells(num_kv_blocks * kColumnCells);
  const int64_t columns_per_task = std::max<int64_t>(1, 4096 / kv_block_size);
  torch::stable::parallel_for(0, num_kv_blocks, columns_per_task, [&](int64_t column_begin, int64_t column_end) {
    for (int64_t column = column_begin; column < column_end; ++column) {
      KeyExtremes extremes;
      for (int64_t i = column * kv_block_size; i < std::min(keys.n, (column + 1) * kv_block_size); ++i) {
        const ElementInfo info = keys.info(i);
        extremes.add(info);
        const ElementKeys k = element_keys(info);
        context_key[i] = k.context_key;
        rollout_key[i] = k.rollout_key;
      }
      extremes.write_cells(&column_cells[column * kColumnCells]);
    }
  });
  const ContextList context = build_context_list(context_key, keys);
  const RolloutList rollout = build_rollout_list(rollout_key, keys);
  const Intervals intervals = find_intervals(queries, context, rollout, in.q_block_size, num_q_blocks);
  const Runs runs = find_runs(context.list, rollout.list, kv_block_size, keys.n);
  const std::vector<uint8_t> states = classify_rows(queries.n, keys.n, intervals, runs, column_cells, in.q_block_size,
                                                    kv_block_size, num_q_blocks, num_kv_blocks);
  torch::stable::parallel_for(0, 2 * (num_q_blocks + num_kv_blocks), 64, [&](int64_t begin, int64_t end) {
    for (int64_t line = begin; line < end; ++line)
      write_list_line(states.data(), num_q_blocks, num_kv_blocks, line, lists);
  });
}

BlockIndexTensors build_block_index_cpu(const Tensor& anchor_pos, const Tensor& depth, const Tensor& doc_of_position,
                                        std::optional<int64_t> sliding_window, int64_t q_block_size,
                                        int64_t kv_block_size, std::optional<Tensor> kv_anchor_pos,
                                        std::optional<Tensor> kv_depth) {
  const OpInputs in = check_inputs(anchor_pos, depth, doc_of_position, sliding_window, q_block_size, kv_block_size,
                                   kv_anchor_pos, kv_depth);
  BlockIndexTensors out = allocate_outputs(in);
  // Rows in parallel when there are enough of them to occupy every thread (each row's own loops
  // then run inline), else one row after another, each parallel over its blocks (a parallel_for
  // that runs inline marks its body as parallel, so the rows' loop must not be one then).
  if (in.num_rows >= static_cast<int64_t>(torch::stable::get_num_threads())) {
    torch::stable::parallel_for(0, in.num_rows, 1, [&](int64_t row_begin, int64_t row_end) {
      for (int64_t row = row_begin; row < row_end; ++row) build_row(in, row, list_outputs(out, in, row));
    });
  } else {
    for (int64_t row = 0; row < in.num_rows; ++row) build_row(in, row, list_outputs(out, in, row));
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(peagle_ext, CPU, m) { m.impl("build_block_index", TORCH_BOX(&build_block_index_cpu)); }

}  // namespace peagle
