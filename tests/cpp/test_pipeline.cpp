// The CUDA pipeline's kernels (csrc/gpu_pipeline/), run by the sequential launcher on host buffers,
// against the element-level rule pair by pair (no torch): tile states and all eight BlockMask
// lists in create_block_mask's layout, over random arrays (any order, duplicates, padding,
// documents out of position order, windows, odd block sizes) and COD-like layouts, each case under
// a block and thread order of its own (sequential_launcher.h).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/cpu_lists.h"
#include "gpu_pipeline/pipeline.h"
#include "gpu_pipeline/sequential_launcher.h"
#include "rule_reference.h"

using namespace peagle;

static int failures = 0;

// One row: queries (anchor, depth) against keys (key_anchor, key_depth; empty: the queries themselves).
struct Case {
  std::vector<int64_t> anchor, depth, doc, key_anchor, key_depth;
  int64_t window, qb, kvb;
  const std::vector<int64_t>& keys_anchor() const { return key_anchor.empty() ? anchor : key_anchor; }
  const std::vector<int64_t>& keys_depth() const { return key_anchor.empty() ? depth : key_depth; }
};

// Runs the pipeline once over a batch of rows (one size for all: the same element and position
// counts, window and block sizes); returns false (and says why) when any row differs from the
// reference.
static bool check(const std::vector<Case>& rows, int index) {
  const Case& c = rows[0];
  const int64_t b = static_cast<int64_t>(rows.size());
  const int64_t n_q = static_cast<int64_t>(c.anchor.size()), n_k = static_cast<int64_t>(c.keys_anchor().size());
  const int64_t positions = static_cast<int64_t>(c.doc.size());
  const int64_t nq = num_blocks(n_q, c.qb), nkv = num_blocks(n_k, c.kvb), tiles = nq * nkv;
  const pipeline::Sizes sizes{b, n_q, n_k, positions, c.window, c.qb, c.kvb, nq, nkv};
  const pipeline::Layout layout = pipeline::plan(sizes);
  std::vector<int64_t> anchor, depth, key_anchor, key_depth, doc;  // the rows one after another
  for (const Case& row : rows) {
    anchor.insert(anchor.end(), row.anchor.begin(), row.anchor.end());
    depth.insert(depth.end(), row.depth.begin(), row.depth.end());
    key_anchor.insert(key_anchor.end(), row.keys_anchor().begin(), row.keys_anchor().end());
    key_depth.insert(key_depth.end(), row.keys_depth().begin(), row.keys_depth().end());
    doc.insert(doc.end(), row.doc.begin(), row.doc.end());
  }
  std::vector<uint8_t> workspace(layout.total_bytes, 0xEE);  // garbage: the pipeline zeroes what it counts in
  std::vector<int32_t> num[4] = {std::vector<int32_t>(b * nq), std::vector<int32_t>(b * nq),
                                 std::vector<int32_t>(b * nkv), std::vector<int32_t>(b * nkv)};
  std::vector<int32_t> idx[4] = {std::vector<int32_t>(b * tiles), std::vector<int32_t>(b * tiles),
                                 std::vector<int32_t>(b * tiles), std::vector<int32_t>(b * tiles)};
  const ListOutputs lists{{num[0].data(), num[1].data(), num[2].data(), num[3].data()},
                          {idx[0].data(), idx[1].data(), idx[2].data(), idx[3].data()}};
  const pipeline::Buffers buffers = pipeline::bind(layout, workspace.data(), anchor.data(), depth.data(),
                                                   key_anchor.data(), key_depth.data(), doc.data(), lists);
  pipeline::SequentialLauncher launcher;
  launcher.schedule_seed = static_cast<uint64_t>(index);  // case 0 in index order, the others shuffled
  pipeline::launch_pipeline(launcher, workspace.data(), buffers, sizes, layout);

  bool ok = launcher.launches == 4;
  for (int64_t r = 0; r < b; ++r) {
    const Case& row = rows[r];
    const std::vector<uint8_t> expected = reference::brute_states(row.anchor, row.depth, row.keys_anchor(),
                                                                  row.keys_depth(), row.doc, c.window, c.qb, c.kvb);
    const uint8_t* got = pipeline::row_buffers(buffers, sizes, r).states;
    const bool states_equal = std::vector<uint8_t>(got, got + tiles) == expected;
    // The lists, as write_list_line lays them out from the expected states.
    std::vector<int32_t> want_num[4] = {std::vector<int32_t>(nq), std::vector<int32_t>(nq), std::vector<int32_t>(nkv),
                                        std::vector<int32_t>(nkv)};
    std::vector<int32_t> want_idx[4] = {std::vector<int32_t>(tiles), std::vector<int32_t>(tiles),
                                        std::vector<int32_t>(tiles), std::vector<int32_t>(tiles)};
    const ListOutputs want{{want_num[0].data(), want_num[1].data(), want_num[2].data(), want_num[3].data()},
                           {want_idx[0].data(), want_idx[1].data(), want_idx[2].data(), want_idx[3].data()}};
    for (int64_t line = 0; line < 2 * (nq + nkv); ++line) write_list_line(expected.data(), nq, nkv, line, want);
    bool lists_equal = true;
    for (int list = 0; list < 4; ++list) {
      const int64_t per_row = list < 2 ? nq : nkv;
      lists_equal = lists_equal &&
                    std::equal(want_num[list].begin(), want_num[list].end(), num[list].begin() + r * per_row) &&
                    std::equal(want_idx[list].begin(), want_idx[list].end(), idx[list].begin() + r * tiles);
    }
    if (!states_equal || !lists_equal) {
      std::fprintf(stderr,
                   "case %d row %ld of %ld: pipeline differs from the rule (queries=%ld, keys=%ld, "
                   "positions=%ld, qb=%ld, kvb=%ld, window=%ld, states %s)\n",
                   index, r, b, n_q, n_k, positions, c.qb, c.kvb, c.window, states_equal ? "equal" : "differ");
      ok = false;
    }
  }
  if (!ok) ++failures;
  return ok;
}

// Depth-major COD-like layout over one or more packed documents (what trainers produce).
static Case cod_case(std::mt19937_64& rng) {
  Case c;
  const int64_t positions = 1 + rng() % 300, depths = 1 + rng() % 8;
  const int64_t docs = 1 + rng() % 4;
  int64_t doc = 0;
  for (int64_t p = 0; p < positions; ++p) {
    if (doc < docs - 1 && rng() % (positions / docs + 1) == 0) ++doc;
    c.doc.push_back(rng() % 20 == 0 ? -1 : doc);
  }
  std::vector<int64_t> anchors(positions);
  for (int64_t p = 0; p < positions; ++p) anchors[p] = p;
  for (int64_t d = 0; d < depths && !anchors.empty(); ++d) {
    for (int64_t a : anchors) {
      c.anchor.push_back(a);
      c.depth.push_back(d);
    }
    std::vector<int64_t> kept;
    for (int64_t a : anchors)
      if (a + d + 1 < positions && rng() % 10 < 7) kept.push_back(a);
    anchors = kept;
  }
  c.window = rng() % 3 == 0 ? 1 + rng() % 64 : 0;
  const int64_t sizes[] = {1, 2, 3, 5, 16, 32, 64, 128};
  c.qb = sizes[rng() % 8];
  c.kvb = sizes[rng() % 8];
  return c;
}

// Any arrays: duplicates, deep chains on few anchors, documents in any order, padding.
static Case arbitrary_case(std::mt19937_64& rng) {
  Case c;
  const int64_t positions = 1 + rng() % 12, n = 1 + rng() % 60;
  const int64_t max_depth = rng() % 5, docs = 1 + rng() % 3;
  for (int64_t p = 0; p < positions; ++p) c.doc.push_back(static_cast<int64_t>(rng() % (docs + 1)) - 1);
  const int64_t anchor_range = 1 + rng() % positions;
  for (int64_t i = 0; i < n; ++i) {
    c.anchor.push_back(rng() % anchor_range);
    c.depth.push_back(rng() % (max_depth + 1));
  }
  c.window = rng() % 3 == 0 ? 0 : 1 + rng() % 8;
  c.qb = 1 + rng() % 6;
  c.kvb = 1 + rng() % 6;
  return c;
}

// Keys apart from the queries: any arrays of their own size over the same positions.
static void random_keys(Case& c, std::mt19937_64& rng) {
  const int64_t positions = static_cast<int64_t>(c.doc.size()), n = 1 + rng() % 60;
  c.key_anchor.clear();
  c.key_depth.clear();
  for (int64_t i = 0; i < n; ++i) {
    c.key_anchor.push_back(rng() % positions);
    c.key_depth.push_back(rng() % 5);
  }
}

// A segment: the queries a contiguous slice of the elements, the keys all of them.
static Case segment_of(Case c, std::mt19937_64& rng) {
  const size_t n = c.anchor.size(), begin = rng() % n, end = begin + 1 + rng() % (n - begin);
  c.key_anchor = c.anchor;
  c.key_depth = c.depth;
  c.anchor.assign(c.key_anchor.begin() + begin, c.key_anchor.begin() + end);
  c.depth.assign(c.key_depth.begin() + begin, c.key_depth.begin() + end);
  return c;
}

// A batch: rows of the first row's sizes, each with its own elements and documents.
static std::vector<Case> batch_of(const Case& first, std::mt19937_64& rng) {
  std::vector<Case> rows{first};
  const int64_t positions = static_cast<int64_t>(first.doc.size()), extra = 1 + rng() % 3;
  for (int64_t r = 0; r < extra; ++r) {
    Case row = first;
    for (auto& d : row.doc) d = static_cast<int64_t>(rng() % 3) - 1;
    for (auto* anchors : {&row.anchor, &row.key_anchor})
      for (auto& a : *anchors) a = rng() % positions;
    for (auto* depths : {&row.depth, &row.key_depth})
      for (auto& d : *depths) d = rng() % 4;
    rows.push_back(row);
  }
  return rows;
}

int main() {
  std::mt19937_64 rng(2024);
  int cases = 0;
  for (int trial = 0; trial < 2000; ++trial, ++cases) check({arbitrary_case(rng)}, cases);
  for (int trial = 0; trial < 150; ++trial, ++cases) check({cod_case(rng)}, cases);
  for (int trial = 0; trial < 500; ++trial, ++cases) {
    Case c = arbitrary_case(rng);
    random_keys(c, rng);
    check({c}, cases);
  }
  for (int trial = 0; trial < 150; ++trial, ++cases) check({segment_of(cod_case(rng), rng)}, cases);
  for (int trial = 0; trial < 300; ++trial, ++cases) {
    Case c = arbitrary_case(rng);
    if (trial % 2) random_keys(c, rng);
    check(batch_of(c, rng), cases);
  }
  std::printf(
      "pipeline: %d random cases against the element-level rule (single sets, keys apart, segments, "
      "batches), %d failure(s)\n",
      cases, failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
