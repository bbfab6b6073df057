// CPU implementation of the block-index op: plain loops over the tile rule, parallel over rows.
//
// The COD layout is sorted in ways the loops exploit without assuming: a key list already in
// order skips its sort, a counting sort by anchor usually finishes it, and searches start from
// the previous element's answer, so sorted queries cost O(1) each. Any other input takes the
// general path (a comparison sort, longer searches) and gives the same exact answer.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "block_index.h"

namespace peagle {
namespace {

// One sorted key list: its keys ascending and the element behind each rank.
struct SortedList {
  std::vector<int64_t> keys;
  std::vector<int64_t> elements;
};

// The listed elements (key != kNotListed) sorted by key, stable in element order.
SortedList sort_list(const std::vector<int64_t>& key_of_element, const int64_t* anchor, int64_t num_positions) {
  SortedList list;
  for (int64_t i = 0; i < static_cast<int64_t>(key_of_element.size()); ++i)
    if (key_of_element[i] != kNotListed) list.elements.push_back(i);
  auto key_of = [&](int64_t element) { return key_of_element[element]; };
  auto by_key = [&](int64_t a, int64_t b) { return key_of(a) < key_of(b); };
  if (!std::is_sorted(list.elements.begin(), list.elements.end(), by_key)) {
    // Both keys order by anchor first or (context, documents packed in order) follow it, so a
    // stable counting sort by anchor usually leaves the list sorted; check, and sort if not.
    std::vector<int64_t> start(num_positions + 1, 0);
    for (int64_t e : list.elements) ++start[anchor[e] + 1];
    for (int64_t p = 0; p < num_positions; ++p) start[p + 1] += start[p];
    std::vector<int64_t> by_anchor(list.elements.size());
    for (int64_t e : list.elements) by_anchor[start[anchor[e]]++] = e;
    list.elements = std::move(by_anchor);
    if (!std::is_sorted(list.elements.begin(), list.elements.end(), by_key))
      std::stable_sort(list.elements.begin(), list.elements.end(), by_key);
  }
  list.keys.resize(list.elements.size());
  for (size_t r = 0; r < list.elements.size(); ++r) list.keys[r] = key_of(list.elements[r]);
  return list;
}

// lower_bound (upper_bound when kUpper) of value in keys, searched outward from hint: O(log d)
// for an answer d ranks away, so queries in sorted order cost O(1) each.
template <bool kUpper>
int64_t search_from(const std::vector<int64_t>& keys, int64_t value, int64_t hint) {
  const int64_t size = static_cast<int64_t>(keys.size());
  auto before = [&](int64_t i) { return kUpper ? keys[i] <= value : keys[i] < value; };
  hint = std::clamp<int64_t>(hint, 0, size);
  int64_t lo, hi;  // the answer lies in [lo, hi]
  if (hint < size && before(hint)) {
    lo = hint + 1;
    int64_t step = 1;
    while (lo + step - 1 < size && before(lo + step - 1)) {
      lo += step;
      step *= 2;
    }
    hi = std::min(size, lo + step - 1);
  } else {
    hi = hint;
    int64_t step = 1;
    while (hi - step >= 0 && !before(hi - step)) {
      hi -= step;
      step *= 2;
    }
    lo = std::max<int64_t>(0, hi - step + 1);
  }
  auto is_before = [&](int64_t i) { return before(i); };
  int64_t count = hi - lo;
  while (count > 0) {  // partition point of `before` in [lo, hi)
    const int64_t half = count / 2;
    if (is_before(lo + half)) {
      lo += half + 1;
      count -= half + 1;
    } else {
      count = half;
    }
  }
  return lo;
}

// The op's per-element inputs, read through the tile rule.
struct Elements {
  const int64_t* anchor;
  const int64_t* depth;
  const int64_t* doc_of_position;
  int64_t n, num_positions, window;
  ElementKeys keys(int64_t i) const { return element_keys(anchor[i], depth[i], doc_of_position, num_positions, window); }
};

// Per element, its context and rollout rank intervals (rollout ranks follow the context ranks).
struct Intervals {
  std::vector<int64_t> context_start, context_end, rollout_start, rollout_end;
};

// The search bounds come from element_keys again: recomputing them is cheaper than storing them.
Intervals find_intervals(const Elements& el, const SortedList& context, const SortedList& rollout) {
  const int64_t n = el.n;
  const int64_t offset = static_cast<int64_t>(context.keys.size());
  Intervals iv{std::vector<int64_t>(n), std::vector<int64_t>(n), std::vector<int64_t>(n), std::vector<int64_t>(n)};
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    int64_t hints[4] = {0, 0, 0, 0};
    for (int64_t i = begin; i < end; ++i) {
      const ElementKeys k = el.keys(i);
      iv.context_start[i] = hints[0] = search_from<false>(context.keys, k.context_lo, hints[0]);
      iv.context_end[i] = hints[1] = search_from<true>(context.keys, k.context_hi, hints[1]);
      hints[2] = search_from<false>(rollout.keys, k.rollout_lo, hints[2]);
      hints[3] = search_from<true>(rollout.keys, k.rollout_hi, hints[3]);
      iv.rollout_start[i] = offset + hints[2];
      iv.rollout_end[i] = offset + hints[3];
    }
  });
  return iv;
}

// Ranks grouped into runs of consecutive ranks whose keys share a kv-block, with each kv-block's
// rank extremes and whether it holds KV_BLOCK_SIZE listed keys.
struct Columns {
  std::vector<int64_t> run_of_rank, tile_of_run;
  std::vector<ColumnExtent> extent;
};

Columns describe_columns(const SortedList& context, const SortedList& rollout, int64_t kv_block_size,
                         int64_t num_kv_blocks) {
  Columns c;
  const int64_t num_context = static_cast<int64_t>(context.elements.size());
  const int64_t num_ranks = num_context + static_cast<int64_t>(rollout.elements.size());
  c.run_of_rank.resize(num_ranks);
  c.extent.assign(num_kv_blocks, ColumnExtent{kNotListed, -1, kNotListed, -1, false});
  std::vector<int64_t> listed(num_kv_blocks, 0);
  for (int64_t r = 0; r < num_ranks; ++r) {
    const bool in_context = r < num_context;
    const int64_t tile = (in_context ? context.elements[r] : rollout.elements[r - num_context]) / kv_block_size;
    if (c.tile_of_run.empty() || c.tile_of_run.back() != tile) c.tile_of_run.push_back(tile);
    c.run_of_rank[r] = static_cast<int64_t>(c.tile_of_run.size()) - 1;
    ColumnExtent& e = c.extent[tile];
    int64_t& low = in_context ? e.context_low : e.rollout_low;
    int64_t& high = in_context ? e.context_high : e.rollout_high;
    low = std::min(low, r);
    high = std::max(high, r);
    ++listed[tile];
  }
  for (int64_t t = 0; t < num_kv_blocks; ++t) c.extent[t].complete = listed[t] == kv_block_size;
  return c;
}

// Tile states [nQ, nKV]: each row merges its queries' intervals, marks the kv-blocks they hold,
// then classifies every tile of the row.
at::Tensor classify_rows(const std::vector<uint8_t>& real, const Intervals& iv, const Columns& columns,
                         int64_t q_block_size, int64_t num_q_blocks, int64_t num_kv_blocks) {
  at::Tensor states = at::empty({num_q_blocks, num_kv_blocks}, at::TensorOptions().dtype(at::kByte));
  uint8_t* out = states.data_ptr<uint8_t>();
  const int64_t n = static_cast<int64_t>(real.size());
  at::parallel_for(0, num_q_blocks, 1, [&](int64_t row_begin, int64_t row_end) {
    std::vector<std::pair<int64_t, int64_t>> intervals;
    for (int64_t row = row_begin; row < row_end; ++row) {
      uint8_t* marks = out + row * num_kv_blocks;
      std::fill(marks, marks + num_kv_blocks, uint8_t{0});
      const int64_t q_begin = row * q_block_size, q_end = std::min(n, q_begin + q_block_size);
      RowBounds bounds{0, kNotListed, 0, kNotListed, q_end - q_begin == q_block_size};
      for (int64_t q = q_begin; q < q_end; ++q) {
        bounds.all_real = bounds.all_real && real[q];
        bounds.context_start_max = std::max(bounds.context_start_max, iv.context_start[q]);
        bounds.context_end_min = std::min(bounds.context_end_min, iv.context_end[q]);
        bounds.rollout_start_max = std::max(bounds.rollout_start_max, iv.rollout_start[q]);
        bounds.rollout_end_min = std::min(bounds.rollout_end_min, iv.rollout_end[q]);
      }
      // Each list's intervals are merged first, so each run is walked once per row rather than
      // once per query. In the COD layout they arrive sorted and the sort is skipped.
      for (const auto& [starts, ends] : {std::pair{&iv.context_start, &iv.context_end},
                                         std::pair{&iv.rollout_start, &iv.rollout_end}}) {
        intervals.clear();
        for (int64_t q = q_begin; q < q_end; ++q)
          if ((*ends)[q] > (*starts)[q]) intervals.emplace_back((*starts)[q], (*ends)[q]);
        if (!std::is_sorted(intervals.begin(), intervals.end())) std::sort(intervals.begin(), intervals.end());
        for (size_t i = 0; i < intervals.size();) {
          const int64_t start = intervals[i].first;
          int64_t end = intervals[i].second;
          for (++i; i < intervals.size() && intervals[i].first <= end; ++i) end = std::max(end, intervals[i].second);
          mark_interval(start, end, columns.run_of_rank.data(), columns.tile_of_run.data(), marks);
        }
      }
      for (int64_t tile = 0; tile < num_kv_blocks; ++tile)
        marks[tile] = classify_tile(marks[tile] != 0, bounds, columns.extent[tile]);
    }
  });
  return states;
}

BlockIndexTensors build_block_index_cpu(const at::Tensor& anchor_pos_in, const at::Tensor& depth_in,
                                        const at::Tensor& doc_of_position_in, std::optional<int64_t> sliding_window,
                                        int64_t q_block_size, int64_t kv_block_size) {
  check_inputs(anchor_pos_in, depth_in, doc_of_position_in, sliding_window, q_block_size, kv_block_size);
  const at::Tensor anchor_pos = anchor_pos_in.contiguous(), depth = depth_in.contiguous();
  const at::Tensor doc_of_position = doc_of_position_in.contiguous();
  const int64_t n = anchor_pos.numel(), num_positions = doc_of_position.numel();
  const int64_t num_q_blocks = ceil_div(n, q_block_size), num_kv_blocks = ceil_div(n, kv_block_size);
  const Elements el{anchor_pos.data_ptr<int64_t>(), depth.data_ptr<int64_t>(), doc_of_position.data_ptr<int64_t>(),
                    n, num_positions, sliding_window.value_or(0)};

  std::vector<int64_t> context_key(n), rollout_key(n);
  std::vector<uint8_t> real(n);
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const ElementKeys k = el.keys(i);
      context_key[i] = k.context_key;
      rollout_key[i] = k.rollout_key;
      real[i] = k.real;
    }
  });
  const SortedList context = sort_list(context_key, el.anchor, num_positions);
  const SortedList rollout = sort_list(rollout_key, el.anchor, num_positions);
  const Intervals intervals = find_intervals(el, context, rollout);
  const Columns columns = describe_columns(context, rollout, kv_block_size, num_kv_blocks);
  const at::Tensor states = classify_rows(real, intervals, columns, q_block_size, num_q_blocks, num_kv_blocks);

  BlockIndexTensors out = allocate_outputs(num_q_blocks, num_kv_blocks, anchor_pos.options());
  const ListOutputs lists = list_outputs(out);
  const uint8_t* s = states.data_ptr<uint8_t>();
  at::parallel_for(0, 2 * (num_q_blocks + num_kv_blocks), 64, [&](int64_t begin, int64_t end) {
    for (int64_t line = begin; line < end; ++line) write_list_line(s, num_q_blocks, num_kv_blocks, line, lists);
  });
  return out;
}

std::string build_info() {
  std::string info = "cpu";
#ifdef PEAGLE_WITH_CUDA
  info += ";cuda:" PEAGLE_CUDA_ARCHS;
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY_IMPL(peagle_ext, CPU, m) { m.impl("build_block_index", &build_block_index_cpu); }

// Which kernels this library was built with, e.g. "cpu" or "cpu;cuda:80,90".
TORCH_LIBRARY_FRAGMENT(peagle_ext, m) { m.def("build_info() -> str", &build_info); }

}  // namespace peagle
