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

#include "gpu_pipeline/pipeline.h"
#include "gpu_pipeline/sequential_launcher.h"
#include "rule_reference.h"

using namespace peagle;

static int failures = 0;

struct Case {
  std::vector<int64_t> anchor, depth, doc;
  int64_t window, qb, kvb;
};

// Runs the pipeline; returns false (and says why) when anything differs from the reference.
static bool check(const Case& c, int index) {
  const int64_t n = static_cast<int64_t>(c.anchor.size()), positions = static_cast<int64_t>(c.doc.size());
  const int64_t nq = (n + c.qb - 1) / c.qb, nkv = (n + c.kvb - 1) / c.kvb;
  const pipeline::Sizes sizes{n, positions, c.window, c.qb, c.kvb, nq, nkv};
  const pipeline::Layout layout = pipeline::plan(sizes);
  std::vector<uint8_t> workspace(layout.total_bytes, 0xEE);  // garbage: the pipeline zeroes what it counts in
  std::vector<int32_t> num[4] = {std::vector<int32_t>(nq), std::vector<int32_t>(nq), std::vector<int32_t>(nkv),
                                 std::vector<int32_t>(nkv)};
  std::vector<int32_t> idx[4] = {std::vector<int32_t>(nq * nkv), std::vector<int32_t>(nq * nkv),
                                 std::vector<int32_t>(nq * nkv), std::vector<int32_t>(nq * nkv)};
  const ListOutputs lists{{num[0].data(), num[1].data(), num[2].data(), num[3].data()},
                          {idx[0].data(), idx[1].data(), idx[2].data(), idx[3].data()}};
  const pipeline::Buffers buffers =
      pipeline::bind(layout, workspace.data(), c.anchor.data(), c.depth.data(), c.doc.data(), lists);
  pipeline::SequentialLauncher launcher;
  launcher.schedule_seed = static_cast<uint64_t>(index);  // case 0 in index order, the others shuffled
  pipeline::launch_pipeline(launcher, workspace.data(), buffers, sizes, layout);

  const std::vector<uint8_t> expected = reference::brute_states(c.anchor, c.depth, c.doc, c.window, c.qb, c.kvb);
  const std::vector<uint8_t> states(buffers.states, buffers.states + nq * nkv);
  bool ok = states == expected && launcher.launches == 4;
  // The lists, as write_list_line lays them out from the expected states.
  std::vector<int32_t> want_num[4] = {num[0], num[1], num[2], num[3]}, want_idx[4] = {idx[0], idx[1], idx[2], idx[3]};
  const ListOutputs want{{want_num[0].data(), want_num[1].data(), want_num[2].data(), want_num[3].data()},
                         {want_idx[0].data(), want_idx[1].data(), want_idx[2].data(), want_idx[3].data()}};
  for (int64_t line = 0; line < 2 * (nq + nkv); ++line) write_list_line(expected.data(), nq, nkv, line, want);
  for (int list = 0; list < 4; ++list) ok = ok && num[list] == want_num[list] && idx[list] == want_idx[list];
  if (!ok) {
    std::fprintf(stderr, "case %d: pipeline differs from the rule (n=%ld, positions=%ld, qb=%ld, kvb=%ld, window=%ld, "
                 "states %s)\n", index, n, positions, c.qb, c.kvb, c.window, states == expected ? "equal" : "differ");
    ++failures;
  }
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

int main() {
  std::mt19937_64 rng(2024);
  int cases = 0;
  for (int trial = 0; trial < 2000; ++trial, ++cases) check(arbitrary_case(rng), cases);
  for (int trial = 0; trial < 150; ++trial, ++cases) check(cod_case(rng), cases);
  std::printf("pipeline: %d random cases against the element-level rule, %d failure(s)\n", cases, failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
