// The interval rule, once, for the CPU kernel and the CUDA kernel alike.
//
// Query q sees key k exactly when starts[q, m] <= k < ends[q, m] for some m (docs/masks.md). Per
// query the intervals are clamped to [0, KV), sorted by start and merged into disjoint intervals
// that do not touch. A merged interval [s, e) touches the kv-blocks [s / KVB, ceil(e / KVB)) and
// covers whole the kv-blocks [ceil(s / KVB), e / KVB) (a tail kv-block is never covered whole, as
// its padding keys are seen by none). Counting per tile the queries of its q-block that touch and
// that cover its kv-block gives its state: full when all Q_BLOCK_SIZE queries cover it (so a tail
// q-block is never full), partial when some query touches it, else empty.
//
// Plain arithmetic on caller-owned memory: no allocation, no torch.
#pragma once

#include <cstdint>

#include "tile_rule.h"

namespace peagle {

// Sift-down of a max-heap on start, carrying end along (for interval_heap_sort).
PEAGLE_HD void interval_sift_down(int64_t* start, int64_t* end, int64_t root, int64_t count) {
  while (2 * root + 1 < count) {
    int64_t child = 2 * root + 1;
    if (child + 1 < count && start[child + 1] > start[child]) ++child;
    if (start[root] >= start[child]) return;
    const int64_t s = start[root], e = end[root];
    start[root] = start[child];
    end[root] = end[child];
    start[child] = s;
    end[child] = e;
    root = child;
  }
}

// Sort intervals by start in place: heap sort, O(M log M) with no recursion or extra memory, so
// that one query's sort costs the same on a GPU thread as on the CPU whatever M is.
PEAGLE_HD void interval_heap_sort(int64_t* start, int64_t* end, int64_t count) {
  for (int64_t root = count / 2 - 1; root >= 0; --root) interval_sift_down(start, end, root, count);
  for (int64_t last = count - 1; last > 0; --last) {
    const int64_t s = start[0], e = end[0];
    start[0] = start[last];
    end[0] = end[last];
    start[last] = s;
    end[last] = e;
    interval_sift_down(start, end, 0, last);
  }
}

// One query's intervals in place: clamped to [0, kv_len], empty ones dropped, sorted by start,
// merged (overlapping or touching ones into one). Returns how many merged intervals lead the arrays.
PEAGLE_HD int64_t merge_intervals(int64_t* start, int64_t* end, int64_t count, int64_t kv_len) {
  int64_t kept = 0;
  for (int64_t m = 0; m < count; ++m) {
    const int64_t s = min_value(max_value(start[m], 0), kv_len), e = min_value(max_value(end[m], 0), kv_len);
    if (e <= s) continue;
    start[kept] = s;
    end[kept] = e;
    ++kept;
  }
  interval_heap_sort(start, end, kept);
  int64_t merged = 0;
  for (int64_t m = 0; m < kept; ++m) {
    if (merged > 0 && start[m] <= end[merged - 1]) {
      end[merged - 1] = max_value(end[merged - 1], end[m]);
    } else {
      start[merged] = start[m];
      end[merged] = end[m];
      ++merged;
    }
  }
  return merged;
}

// The kv-blocks a merged interval [s, e) touches, [touch_lo, touch_hi), and covers whole,
// [cover_lo, cover_hi) (empty when cover_hi <= cover_lo).
struct IntervalBlocks {
  int64_t touch_lo, touch_hi, cover_lo, cover_hi;
};

PEAGLE_HD IntervalBlocks interval_blocks(int64_t s, int64_t e, int64_t kv_block_size) {
  return IntervalBlocks{s / kv_block_size, num_blocks(e, kv_block_size), num_blocks(s, kv_block_size),
                        e / kv_block_size};
}

// A tile's state from the number of its q-block's queries that touch and that cover its kv-block.
PEAGLE_HD uint8_t interval_tile_state(int64_t touching, int64_t covering, int64_t q_block_size) {
  if (covering == q_block_size) return kFull;
  return touching > 0 ? kPartial : kEmpty;
}

}  // namespace peagle
