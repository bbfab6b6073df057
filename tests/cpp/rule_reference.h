// The element-level rule and the tile states it gives, pair by pair: the reference the C++ tests
// compare the tile header and the CUDA pipeline with (no torch needed).
#pragma once

#include <cstdint>
#include <vector>

#include "rule/tile_rule.h"

namespace reference {

using peagle::kEmpty;
using peagle::kFull;
using peagle::kPartial;

// The rule, element by element.
inline bool visible(int64_t aq, int64_t dq, int64_t ak, int64_t dk, const std::vector<int64_t>& doc, int64_t window) {
  const int64_t doc_q = doc[aq];
  if (doc_q == -1 || doc_q != doc[ak]) return false;
  bool context = dk == 0 && ak <= aq;
  if (window > 0) context = context && ak > aq + dq - window;
  return context || (ak == aq && dk <= dq);
}

// Tile states of queries (q_anchor, q_depth) against keys (k_anchor, k_depth) from the rule, pair by
// pair, with create_block_mask's padding (tail tiles never full).
inline std::vector<uint8_t> brute_states(const std::vector<int64_t>& q_anchor, const std::vector<int64_t>& q_depth,
                                         const std::vector<int64_t>& k_anchor, const std::vector<int64_t>& k_depth,
                                         const std::vector<int64_t>& doc, int64_t window, int64_t qb, int64_t kvb) {
  const int64_t n_q = static_cast<int64_t>(q_anchor.size()), n_k = static_cast<int64_t>(k_anchor.size());
  const int64_t nq = peagle::num_blocks(n_q, qb), nkv = peagle::num_blocks(n_k, kvb);
  std::vector<int64_t> count(nq * nkv, 0);
  for (int64_t q = 0; q < n_q; ++q)
    for (int64_t k = 0; k < n_k; ++k)
      count[(q / qb) * nkv + k / kvb] += visible(q_anchor[q], q_depth[q], k_anchor[k], k_depth[k], doc, window);
  std::vector<uint8_t> states(nq * nkv);
  for (size_t t = 0; t < states.size(); ++t)
    states[t] = count[t] == 0 ? kEmpty : (count[t] == qb * kvb ? kFull : kPartial);
  return states;
}

// One element set against itself.
inline std::vector<uint8_t> brute_states(const std::vector<int64_t>& anchor, const std::vector<int64_t>& depth,
                                         const std::vector<int64_t>& doc, int64_t window, int64_t qb, int64_t kvb) {
  return brute_states(anchor, depth, anchor, depth, doc, window, qb, kvb);
}

}  // namespace reference
