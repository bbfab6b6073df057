// Tests of csrc/rule/tile_rule.h and the CPU kernel's helpers (csrc/cpu/cpu_lists.h) on their own
// (no torch): unit checks of each function, then a randomized comparison of tile states built from the header against
// the element-level rule evaluated pair by pair (the specification, docs/rule.md).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/cpu_lists.h"
#include "rule_reference.h"

using namespace peagle;
using reference::brute_states;

static int failures = 0;
#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                                   \
    }                                                                               \
  } while (0)

// Tile states through the header as the CPU kernel uses it: sort keys, search bounds, runs, marks,
// then the full-tile test on the blocks' cells.
static std::vector<uint8_t> header_states(const std::vector<int64_t>& anchor, const std::vector<int64_t>& depth,
                                          const std::vector<int64_t>& doc, int64_t window, int64_t qb, int64_t kvb) {
  const int64_t n = static_cast<int64_t>(anchor.size());
  const int64_t nq = num_blocks(n, qb), nkv = num_blocks(n, kvb);
  std::vector<ElementKeys> keys;
  for (int64_t i = 0; i < n; ++i)
    keys.push_back(element_keys(anchor[i], depth[i], doc.data(), static_cast<int64_t>(doc.size()), window));
  // Both lists over all n elements, unlisted ones last.
  std::vector<int64_t> order[2];
  std::vector<int64_t> sorted[2];
  for (int list = 0; list < 2; ++list) {
    auto key = [&](int64_t i) { return list == 0 ? keys[i].context_key : keys[i].rollout_key; };
    for (int64_t i = 0; i < n; ++i) order[list].push_back(i);
    std::stable_sort(order[list].begin(), order[list].end(), [&](int64_t a, int64_t b) { return key(a) < key(b); });
    for (int64_t i : order[list]) sorted[list].push_back(key(i));
  }
  std::vector<int64_t> tile_of_rank, run_of_rank, tile_of_run;
  for (int list = 0; list < 2; ++list)
    for (int64_t i : order[list]) tile_of_rank.push_back(i / kvb);
  for (size_t r = 0; r < tile_of_rank.size(); ++r) {
    if (r == 0 || tile_of_rank[r] != tile_of_rank[r - 1]) tile_of_run.push_back(tile_of_rank[r]);
    run_of_rank.push_back(static_cast<int64_t>(tile_of_run.size()) - 1);
  }
  std::vector<uint32_t> column_cells(nkv * kColumnCells, 0), contribution(kColumnCells);
  for (int64_t k = 0; k < n; ++k) {
    key_cells(element_info(anchor[k], depth[k], doc.data(), static_cast<int64_t>(doc.size()), window),
              contribution.data());
    for (int c = 0; c < kColumnCells; ++c)
      column_cells[(k / kvb) * kColumnCells + c] =
          std::max(column_cells[(k / kvb) * kColumnCells + c], contribution[c]);
  }
  std::vector<uint8_t> states(nq * nkv, 0);
  for (int64_t row = 0; row < nq; ++row) {
    uint32_t row_cells[kRowCells] = {}, query[kRowCells];
    for (int64_t q = row * qb; q < std::min(n, (row + 1) * qb); ++q) {
      const ElementKeys& k = keys[q];
      const auto& c = sorted[0];
      const auto& o = sorted[1];
      const int64_t cs = std::lower_bound(c.begin(), c.end(), k.context_lo) - c.begin();
      const int64_t ce = std::upper_bound(c.begin(), c.end(), k.context_hi) - c.begin();
      const int64_t rs = n + (std::lower_bound(o.begin(), o.end(), k.rollout_lo) - o.begin());
      const int64_t re = n + (std::upper_bound(o.begin(), o.end(), k.rollout_hi) - o.begin());
      mark_interval(cs, ce, run_of_rank.data(), tile_of_run.data(), &states[row * nkv]);
      mark_interval(rs, re, run_of_rank.data(), tile_of_run.data(), &states[row * nkv]);
      query_cells(element_info(anchor[q], depth[q], doc.data(), static_cast<int64_t>(doc.size()), window), query);
      for (int cell = 0; cell < kRowCells; ++cell) row_cells[cell] = std::max(row_cells[cell], query[cell]);
    }
    const RowSummary summary = row_summary(row_cells, (row + 1) * qb <= n);
    for (int64_t t = 0; t < nkv; ++t)
      states[row * nkv + t] = classify_tile(states[row * nkv + t] != 0, summary,
                                            column_summary(&column_cells[t * kColumnCells], (t + 1) * kvb <= n));
  }
  return states;
}

static void unit_checks() {
  const std::vector<int64_t> doc = {0, 0, 0, -1};
  // Padding anchor or out-of-range input: no keys, empty intervals.
  for (int64_t anchor : {int64_t{3}, int64_t{-1}, int64_t{4}}) {
    const ElementKeys k = element_keys(anchor, 0, doc.data(), 4, 0);
    CHECK(!k.real && k.context_key == kNotListed && k.rollout_key == kNotListed);
    CHECK(k.context_lo > k.context_hi && k.rollout_lo > k.rollout_hi);
  }
  // Depth 0 lists in context, deeper in rollout; depth 0 has an empty rollout interval.
  const ElementKeys d0 = element_keys(2, 0, doc.data(), 4, 0);
  CHECK(d0.real && d0.context_key == pack(0, 2) && d0.rollout_key == kNotListed && d0.rollout_hi < d0.rollout_lo);
  CHECK(d0.context_lo == pack(0, 0) && d0.context_hi == pack(0, 2));
  const ElementKeys d2 = element_keys(1, 2, doc.data(), 4, 0);
  CHECK(d2.context_key == kNotListed && d2.rollout_key == pack(1, 2));
  CHECK(d2.rollout_lo == pack(1, 1) && d2.rollout_hi == pack(1, 2));
  // Window: lower bound a + d - W, widened to keep q's own depth-0 element.
  CHECK(element_keys(2, 0, doc.data(), 4, 1).context_lo == pack(0, 2));
  CHECK(element_keys(2, 3, doc.data(), 4, 2).context_lo == pack(0, 2));    // a + d - W = 3 > a - 1
  CHECK(element_keys(2, 0, doc.data(), 4, 100).context_lo == pack(0, 0));  // clamped at 0
  // Packing clamps, so no field spills into its neighbour.
  CHECK(pack(1, kFieldMax + 5) == pack(1, kFieldMax) && pack(0, -3) == 0);
  // Element info: padding and out-of-range input are not real; the window's first position.
  CHECK(!element_info(3, 0, doc.data(), 4, 0).real && element_info(3, 0, doc.data(), 4, 0).doc == -1);
  CHECK(!element_info(1, -1, doc.data(), 4, 0).real);
  CHECK(element_info(2, 3, doc.data(), 4, 2).context_first == 2 &&
        element_info(2, 0, doc.data(), 4, 0).context_first == 0);
  // Cells keep maxima and minima as maxima; 0 is "nothing seen".
  CHECK(max_of(std::max(max_cell(3), max_cell(7))) == 7 && min_of(std::max(min_cell(3), min_cell(7))) == 3);
  CHECK(max_cell(0) != 0 && min_cell(kFieldMax) != 0);
  // Full tiles: one document, keys inside every query's context, deeper keys on the queries' one anchor.
  uint32_t row_cells[kRowCells] = {}, column_cells[kColumnCells] = {}, cells[kColumnCells];
  auto add_query = [&](int64_t a, int64_t d) {
    query_cells(element_info(a, d, doc.data(), 4, 0), cells);
    for (int c = 0; c < kRowCells; ++c) row_cells[c] = std::max(row_cells[c], cells[c]);
  };
  auto add_key = [&](int64_t a, int64_t d) {
    key_cells(element_info(a, d, doc.data(), 4, 0), cells);
    for (int c = 0; c < kColumnCells; ++c) column_cells[c] = std::max(column_cells[c], cells[c]);
  };
  add_query(2, 1);
  add_query(2, 3);
  add_key(0, 0);
  add_key(2, 1);
  CHECK(tile_is_full(row_summary(row_cells, true), column_summary(column_cells, true)));
  CHECK(!tile_is_full(row_summary(row_cells, false), column_summary(column_cells, true)));  // tail row
  CHECK(!tile_is_full(row_summary(row_cells, true), column_summary(column_cells, false)));  // tail column
  CHECK(classify_tile(false, row_summary(row_cells, true), column_summary(column_cells, true)) == kEmpty);
  add_key(2, 2);  // deeper than the shallowest query (depth 1)
  CHECK(classify_tile(true, row_summary(row_cells, true), column_summary(column_cells, true)) == kPartial);
  add_query(1, 3);  // a second anchor: no deeper key is seen by both
  CHECK(!tile_is_full(row_summary(row_cells, true), column_summary(column_cells, true)));
  // List positions: listed entries first, then the rest, each ascending.
  CHECK(list_position(true, 5, 2, 3) == 2 && list_position(false, 5, 2, 3) == 6);
  // Runs: ranks 0..5 in tiles 0,0,1,1,0,2 are runs 0,0,1,1,2,3.
  const int64_t run_of_rank[] = {0, 0, 1, 1, 2, 3}, tile_of_run[] = {0, 1, 0, 2};
  uint8_t marks[3] = {0, 0, 0};
  mark_interval(2, 4, run_of_rank, tile_of_run, marks);
  CHECK(marks[0] == 0 && marks[1] == 1 && marks[2] == 0);
  mark_interval(3, 3, run_of_rank, tile_of_run, marks);  // empty interval marks nothing
  CHECK(marks[0] == 0 && marks[2] == 0);
  // Ordered lists: wanted indices ascending, then the rest ascending.
  const uint8_t states[] = {kFull, kPartial, kEmpty, kPartial, kFull, kFull};  // 2 rows x 3 cols
  int32_t idx[3], idx_all[4][6], nums[4][3];
  CHECK(write_ordered(states, 1, 3, kPartial, idx) == 1 && idx[0] == 1 && idx[1] == 0 && idx[2] == 2);
  CHECK(write_ordered(states, 3, 2, kFull, idx) == 1 && idx[0] == 0 && idx[1] == 1);  // column 0
  const ListOutputs out{{nums[0], nums[1], nums[2], nums[3]}, {idx_all[0], idx_all[1], idx_all[2], idx_all[3]}};
  for (int64_t line = 0; line < 2 * (2 + 3); ++line) write_list_line(states, 2, 3, line, out);
  CHECK(nums[0][0] == 1 && nums[0][1] == 1 && nums[1][1] == 2);                     // partial and full per row
  CHECK(nums[2][0] == 1 && nums[2][2] == 0 && nums[3][2] == 1 && nums[3][0] == 1);  // per column
  CHECK(idx_all[1][3] == 1 && idx_all[1][4] == 2);                                  // row 1's full blocks
}

int main() {
  unit_checks();
  std::mt19937_64 rng(12345);
  int cases = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const int64_t positions = 1 + rng() % 12, n = 1 + rng() % 40;
    const int64_t max_depth = rng() % 5, docs = 1 + rng() % 3;
    std::vector<int64_t> doc(positions), anchor(n), depth(n);
    for (auto& d : doc) d = static_cast<int64_t>(rng() % (docs + 1)) - 1;
    const int64_t anchor_range = 1 + rng() % positions;
    for (int64_t i = 0; i < n; ++i) {
      anchor[i] = rng() % anchor_range;
      depth[i] = rng() % (max_depth + 1);
    }
    const int64_t window = rng() % 3 == 0 ? 0 : 1 + rng() % 8;
    const int64_t qb = 1 + rng() % 6, kvb = 1 + rng() % 6;
    if (header_states(anchor, depth, doc, window, qb, kvb) != brute_states(anchor, depth, doc, window, qb, kvb)) {
      std::fprintf(stderr, "mismatch in random case %d (n=%ld, qb=%ld, kvb=%ld, window=%ld)\n", trial, n, qb, kvb,
                   window);
      ++failures;
    }
    ++cases;
  }
  std::printf("tile rule: %d random cases against the element-level rule, %d failure(s)\n", cases, failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
