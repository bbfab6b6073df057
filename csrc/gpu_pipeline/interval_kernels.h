// The interval engine on the GPU (build_interval_block_index on CUDA tensors), as barrier-separated
// phases of __host__ __device__ code like the P-EAGLE pipeline (kernels.h, primitives.h), so the
// sequential launcher runs the same code on the CPU (the op build_interval_block_index_emulated).
//
//   rows     (grid: nQ blocks) per q-block: zero its two difference rows; each thread merges its
//            queries' intervals (merge_intervals of rule/interval_rule.h, the CPU kernel's own) and
//            adds each merged interval's touched and covered kv-block ranges with atomics; a scan
//            of per-thread sums gives each thread the counts before its chunk of kv-blocks, from
//            which it classifies them (interval_tile_state); a scan of the partial and full
//            counts places the q-block's two kv-lists (create_block_mask's layout).
//   columns  (grid: nKV blocks) the q-lists from the tile states (ListColumnKernel of kernels.h).
//
// Every size depends on Q, M, KV_LEN and the block sizes only: no host synchronization.
#pragma once

#include "../rule/interval_rule.h"
#include "kernels.h"

namespace peagle {
namespace pipeline {

struct IntervalSizes {
  int64_t num_rows, num_queries, num_intervals, kv_len, q_block_size, kv_block_size, num_q_blocks, num_kv_blocks;
};

// One row's buffers; each holds the rows one after another (row_buffers).
struct IntervalBuffers {
  const int64_t* starts;  // [Q, M] the op's inputs
  const int64_t* ends;
  int64_t* merged_start;  // [Q, M] each query's intervals, merged in place
  int64_t* merged_end;
  int32_t* touching;  // [nQ, nKV + 1] difference rows: queries touching / covering each kv-block
  int32_t* covering;
  uint8_t* states;  // [nQ, nKV]
  ListOutputs lists;
};

PEAGLE_HD IntervalBuffers row_buffers(IntervalBuffers b, const IntervalSizes& s, int64_t row) {
  const int64_t bounds = row * s.num_queries * s.num_intervals, tiles = s.num_q_blocks * s.num_kv_blocks;
  b.starts += bounds;
  b.ends += bounds;
  b.merged_start += bounds;
  b.merged_end += bounds;
  b.touching += row * s.num_q_blocks * (s.num_kv_blocks + 1);
  b.covering += row * s.num_q_blocks * (s.num_kv_blocks + 1);
  b.states += row * tiles;
  for (int list = 0; list < 4; ++list) {
    b.lists.num[list] += row * (list < 2 ? s.num_q_blocks : s.num_kv_blocks);
    b.lists.idx[list] += row * tiles;
  }
  return b;
}

struct IntervalRowKernel {
  static constexpr int kThreads = 256;
  static constexpr int kRounds = scan_rounds(kThreads);
  enum : int {
    kInit,
    kMerge,
    kSums,
    kSumRounds,
    kClassify = kSumRounds + kRounds,
    kCountRounds,
    kWrite = kCountRounds + kRounds,
    kPhases
  };
  using Counts = Lanes<2, false>;
  struct Shared {
    Counts sums[2 * kThreads];    // (touching, covering) difference sums over each thread's kv-blocks
    Counts counts[2 * kThreads];  // (partial, full) tiles among each thread's kv-blocks
  };
  IntervalBuffers b;
  IntervalSizes s;

  PEAGLE_HD int num_phases() const { return kPhases; }

  PEAGLE_HD void phase(int p, Shared& sh, uint8_t*, const Thread& t) const {
    const int64_t row = t.block, columns = s.num_kv_blocks;
    int32_t* touching = b.touching + row * (columns + 1);
    int32_t* covering = b.covering + row * (columns + 1);
    uint8_t* states = b.states + row * columns;
    int64_t tile_first, tile_last;  // this thread's kv-blocks
    chunk_of(0, columns, t, &tile_first, &tile_last);
    if (p == kInit) {
      for (int64_t i = t.index; i <= columns; i += t.block_dim) touching[i] = covering[i] = 0;
    } else if (p == kMerge) {
      const int64_t q_begin = row * s.q_block_size, q_end = min_value(s.num_queries, q_begin + s.q_block_size);
      int64_t first, last;
      chunk_of(q_begin, q_end, t, &first, &last);
      for (int64_t q = first; q < last; ++q) add_query(q, touching, covering);
    } else if (p == kSums) {
      Counts sum = Counts::filled(0);
      for (int64_t tile = tile_first; tile < tile_last; ++tile) {
        sum.v[0] += touching[tile];
        sum.v[1] += covering[tile];
      }
      sh.sums[t.index] = sum;
    } else if (p < kClassify) {
      scan_round(sh.sums, t.block_dim, p - kSumRounds, t.index);
    } else if (p == kClassify) {
      Counts running = exclusive(scan_result(sh.sums, t.block_dim), t.index, 0);
      for (int64_t tile = tile_first; tile < tile_last; ++tile) {
        running.v[0] += touching[tile];
        running.v[1] += covering[tile];
        states[tile] = interval_tile_state(running.v[0], running.v[1], s.q_block_size);
      }
      sh.counts[t.index] = count_states(states, 1, tile_first, tile_last);
    } else if (p < kWrite) {
      scan_round(sh.counts, t.block_dim, p - kCountRounds, t.index);
    } else {
      const Counts* result = scan_result(sh.counts, t.block_dim);
      const Counts total = result[t.block_dim - 1];
      const int64_t line = row * columns;
      write_lists(states, 1, tile_first, tile_last, exclusive(result, t.index, 0), total, b.lists.idx[0] + line,
                  b.lists.idx[1] + line);
      if (t.index == 0) {
        b.lists.num[0][row] = static_cast<int32_t>(total.v[0]);
        b.lists.num[1][row] = static_cast<int32_t>(total.v[1]);
      }
    }
  }

  // Query q's intervals merged in its own scratch, their kv-block ranges added to the row.
  PEAGLE_HD void add_query(int64_t q, int32_t* touching, int32_t* covering) const {
    const int64_t m = s.num_intervals;
    int64_t* start = b.merged_start + q * m;
    int64_t* end = b.merged_end + q * m;
    for (int64_t i = 0; i < m; ++i) {
      start[i] = b.starts[q * m + i];
      end[i] = b.ends[q * m + i];
    }
    const int64_t merged = merge_intervals(start, end, m, s.kv_len);
    for (int64_t i = 0; i < merged; ++i) {
      const IntervalBlocks blocks = interval_blocks(start[i], end[i], s.kv_block_size);
      atomic_add(&touching[blocks.touch_lo], 1);
      atomic_add(&touching[blocks.touch_hi], -1);
      if (blocks.cover_hi > blocks.cover_lo) {
        atomic_add(&covering[blocks.cover_lo], 1);
        atomic_add(&covering[blocks.cover_hi], -1);
      }
    }
  }
};

using IntervalColumnKernel = ListColumnKernel<IntervalBuffers, IntervalSizes>;

}  // namespace pipeline
}  // namespace peagle
