// The CUDA pipeline's four kernels, as barrier-separated phases of __host__ __device__ code.
//
// A kernel is a struct holding its arguments, with `Shared` (its static shared memory, plain
// data), `kThreads` (threads per block), `num_phases()` and `phase(p, shared, dynamic_shared,
// thread)`. The CUDA launcher runs `for p: phase(p, ...); __syncthreads();` in every block; the
// sequential launcher runs, block after block, each phase for every thread in turn. The rules
// that make both give the same result are in primitives.h. Every kernel runs over a grid of
// (its blocks) x (the batch's rows); a block of grid row r runs at_row(kernel, r), which sees row
// r's buffers alone, so the rows never meet.
//
// The pipeline (pipeline.h launches it; docs/cuda-pipeline.md describes it):
//   0. memset    the counters are zeroed.
//   1. count     per key: its bucket (a depth-0 key by its position, a deeper key by its anchor:
//                2P buckets) and its slot in it (atomicAdd); per kv-block the cells of the
//                full-tile test; per document the first position. The last block to finish
//                turns the bucket counts into bucket starts (a scan), so ranks follow buckets.
//   2. scatter   per listed key: rank_key[rank] = (its kv-block, its filter value).
//   3. rows      per q-block: each query's context and rollout rank intervals, merged within the
//                q-block (sorted: one max-scan; otherwise a block-wide merge sort, then the same
//                scan over the sorted order: O(n log n) for n queries), walked by all threads of the
//                block in one flat loop marking kv-blocks, then each tile classified and the
//                q-block's two kv-lists written (create_block_mask's layout).
//   4. columns   per kv-block: its two q-lists from the tile states.
#pragma once

#include "primitives.h"

namespace peagle {
namespace pipeline {

// Sizes of one build, per row of the batch; window <= 0 means none.
struct Sizes {
  int64_t num_rows, num_queries, num_keys, num_positions, window, q_block_size, kv_block_size, num_q_blocks,
      num_kv_blocks;
};

// Every buffer of one row of a build: device pointers on the GPU, host pointers on the CPU. Queries
// and keys may be one element set (the same pointers) or two; [Q] and [KV] below are their sizes.
struct Buffers {
  // The op's inputs, int64.
  const int64_t* anchor;  // [Q] the queries'
  const int64_t* depth;
  const int64_t* key_anchor;  // [KV] the keys'
  const int64_t* key_depth;
  const int64_t* doc_of_position;
  // Zeroed before the count kernel.
  int32_t* buckets;        // [2P + 1]: keys per bucket, then (after the count kernel) each bucket's first rank
  uint32_t* doc_first;     // [P]: for a document id d < P, P - (its first position); 0: not seen
  uint32_t* column_cells;  // [nKV, kColumnCells]: the kv-blocks' full-tile cells
  int32_t* blocks_done;    // [1]: count kernel blocks that have finished counting
  // Written before they are read.
  int32_t* slot;           // [KV]: a listed key's index within its bucket
  int64_t* rank_key;       // [KV] by rank: (kv-block << 32) | (document of a depth-0 key, depth of a deeper key)
  int32_t* context_start;  // [Q] per query: its rank intervals, half-open
  int32_t* context_end;
  int32_t* rollout_start;
  int32_t* rollout_end;
  int32_t* walk_start;    // [Q]: where its context walk starts after merging (context_end: nothing to walk)
  int32_t* walk_rollout;  // [Q]: ranks of its chain it walks (0: another query of its q-block walks them)
  int32_t* query_doc;     // [Q]: its document (-1: padding), the context walk's filter
  int32_t* query_depth;   // [Q]: its depth, the rollout walk's filter
  int64_t* walk_offset;   // [Q]: where its walk starts in its q-block's flat walk
  int32_t* order;         // [4Q]: a q-block's queries sorted by context and by chain (two halves, each twice: a merge
                          // sort's source and destination), as indices within the q-block, at the q-block's place
  uint8_t* states;        // [nQ, nKV]: tile states
  ListOutputs lists;      // the eight output tensors
};

PEAGLE_HD ElementInfo query_info(const Buffers& b, const Sizes& s, int64_t q) {
  return element_info(b.anchor[q], b.depth[q], b.doc_of_position, s.num_positions, s.window);
}

PEAGLE_HD ElementInfo key_info(const Buffers& b, const Sizes& s, int64_t k) {
  return element_info(b.key_anchor[k], b.key_depth[k], b.doc_of_position, s.num_positions, s.window);
}

// Row `row`'s buffers, from row 0's: each buffer holds the rows one after another.
PEAGLE_HD Buffers row_buffers(Buffers b, const Sizes& s, int64_t row) {
  const int64_t tiles = s.num_q_blocks * s.num_kv_blocks;
  b.anchor += row * s.num_queries;
  b.depth += row * s.num_queries;
  b.key_anchor += row * s.num_keys;
  b.key_depth += row * s.num_keys;
  b.doc_of_position += row * s.num_positions;
  b.buckets += row * (2 * s.num_positions + 1);
  b.doc_first += row * s.num_positions;
  b.column_cells += row * s.num_kv_blocks * kColumnCells;
  b.blocks_done += row;
  b.slot += row * s.num_keys;
  b.rank_key += row * s.num_keys;
  const int64_t queries = row * s.num_queries;
  b.context_start += queries;
  b.context_end += queries;
  b.rollout_start += queries;
  b.rollout_end += queries;
  b.walk_start += queries;
  b.walk_rollout += queries;
  b.query_doc += queries;
  b.query_depth += queries;
  b.walk_offset += queries;
  b.order += 4 * queries;
  b.states += row * tiles;
  for (int list = 0; list < 4; ++list) {
    b.lists.num[list] += row * (list < 2 ? s.num_q_blocks : s.num_kv_blocks);
    b.lists.idx[list] += row * tiles;
  }
  return b;
}

// A kernel's arguments for row `row` of the batch: what each block of grid row `row` runs.
template <class Kernel>
PEAGLE_HD Kernel at_row(const Kernel& kernel, int64_t row) {
  Kernel k = kernel;
  k.b = row_buffers(kernel.b, kernel.s, row);
  return k;
}

// A listed (real) element's bucket: depth-0 keys by position, deeper keys by anchor after them.
PEAGLE_HD int64_t bucket_of(const ElementInfo& e, int64_t num_positions) {
  return e.depth == 0 ? e.anchor : num_positions + e.anchor;
}

constexpr int64_t kLow32 = 0xffffffffLL;

// 1. count (grid: max(KV, P) / kThreads blocks; thread i is key i and position i).
struct CountKernel {
  static constexpr int kThreads = 256;
  static constexpr int kRounds = scan_rounds(kThreads);
  enum : int { kInit, kCount, kFlush, kTicket, kChunkSums, kRoundsBegin, kWrite = kRoundsBegin + kRounds, kPhases };
  struct Shared {
    uint32_t cells[(kThreads + 1) * kColumnCells];  // the kv-blocks this block's elements lie in
    Lanes<1, false> sums[2 * kThreads];
    int32_t is_last;
  };
  Buffers b;
  Sizes s;

  PEAGLE_HD int num_phases() const { return kPhases; }

  // The kv-blocks of this block's keys: [first, first + count).
  PEAGLE_HD void columns(const Thread& t, int64_t* first, int64_t* count) const {
    const int64_t begin = t.block * t.block_dim, end = min_value(s.num_keys, begin + t.block_dim);
    *first = begin < end ? begin / s.kv_block_size : 0;
    *count = begin < end ? (end - 1) / s.kv_block_size - *first + 1 : 0;
  }

  PEAGLE_HD void phase(int p, Shared& sh, uint8_t*, const Thread& t) const {
    int64_t first_column, num_columns;
    columns(t, &first_column, &num_columns);
    const int64_t num_buckets = 2 * s.num_positions;
    if (p == kInit) {
      for (int64_t k = t.index; k < num_columns * kColumnCells; k += t.block_dim) sh.cells[k] = 0;
    } else if (p == kCount) {
      const int64_t i = t.block * t.block_dim + t.index;
      if (i < s.num_keys) {
        const ElementInfo e = key_info(b, s, i);
        if (e.real) b.slot[i] = atomic_add(&b.buckets[bucket_of(e, s.num_positions)], 1);
        uint32_t contribution[kColumnCells];
        key_cells(e, contribution);
        uint32_t* cells = sh.cells + (i / s.kv_block_size - first_column) * kColumnCells;
        for (int c = 0; c < kColumnCells; ++c)
          if (contribution[c] != 0) atomic_max(&cells[c], contribution[c]);
      }
      if (i < s.num_positions) {
        // A document's first position starts a run of it: only run starts compete, so one long
        // document is not P atomics on one address.
        const int64_t doc = b.doc_of_position[i];
        const bool run_start = i == 0 || b.doc_of_position[i - 1] != doc;
        if (run_start && doc >= 0 && doc < s.num_positions)
          atomic_max(&b.doc_first[doc], static_cast<uint32_t>(s.num_positions - i));
      }
    } else if (p == kFlush) {
      uint32_t* global = b.column_cells + first_column * kColumnCells;
      for (int64_t k = t.index; k < num_columns * kColumnCells; k += t.block_dim)
        if (sh.cells[k] != 0) atomic_max(&global[k], sh.cells[k]);
      fence();  // this block's counts and cells, before its ticket
    } else if (p == kTicket) {
      if (t.index == 0) sh.is_last = atomic_add(b.blocks_done, 1) == t.grid_dim - 1;
    } else if (sh.is_last) {  // the last block: bucket counts -> bucket starts
      int64_t first, last;
      chunk_of(0, num_buckets, t, &first, &last);
      if (p == kChunkSums) {
        fence();
        int64_t sum = 0;
        for (int64_t k = first; k < last; ++k) sum += load_coherent(&b.buckets[k]);
        sh.sums[t.index].v[0] = sum;
      } else if (p < kWrite) {
        scan_round(sh.sums, t.block_dim, p - kRoundsBegin, t.index);
      } else {
        const Lanes<1, false>* result = scan_result(sh.sums, t.block_dim);
        int64_t start = exclusive(result, t.index, 0).v[0];
        for (int64_t k = first; k < last; ++k) {
          const int32_t count = load_coherent(&b.buckets[k]);
          b.buckets[k] = static_cast<int32_t>(start);
          start += count;
        }
        if (t.index == t.block_dim - 1) b.buckets[num_buckets] = static_cast<int32_t>(result[t.index].v[0]);
      }
    }
  }
};

// 2. scatter (grid: KV / kThreads blocks).
struct ScatterKernel {
  static constexpr int kThreads = 256;
  struct Shared {
    int32_t unused;
  };
  Buffers b;
  Sizes s;

  PEAGLE_HD int num_phases() const { return 1; }

  PEAGLE_HD void phase(int, Shared&, uint8_t*, const Thread& t) const {
    const int64_t i = t.block * t.block_dim + t.index;
    if (i >= s.num_keys) return;
    const ElementInfo e = key_info(b, s, i);
    if (!e.real) return;
    const int64_t rank = b.buckets[bucket_of(e, s.num_positions)] + b.slot[i];
    const int64_t filter = e.depth == 0 ? e.doc : e.depth;
    b.rank_key[rank] = ((i / s.kv_block_size) << 32) | filter;
  }
};

// Counts of partial and full tiles among entries [first, last) of a line of tile states.
PEAGLE_HD Lanes<2, false> count_states(const uint8_t* line, int64_t stride, int64_t first, int64_t last) {
  Lanes<2, false> counts = Lanes<2, false>::filled(0);
  for (int64_t i = first; i < last; ++i) {
    counts.v[0] += line[i * stride] == kPartial;
    counts.v[1] += line[i * stride] == kFull;
  }
  return counts;
}

// Entries [first, last) of a line's partial and full lists (each `length` long), given the counts
// before `first` and over the whole line (list_position's layout).
PEAGLE_HD void write_lists(const uint8_t* line, int64_t stride, int64_t first, int64_t last, Lanes<2, false> before,
                           const Lanes<2, false>& total, int32_t* partial_indices, int32_t* full_indices) {
  for (int64_t i = first; i < last; ++i) {
    const uint8_t state = line[i * stride];
    partial_indices[list_position(state == kPartial, i, before.v[0], total.v[0])] = static_cast<int32_t>(i);
    full_indices[list_position(state == kFull, i, before.v[1], total.v[1])] = static_cast<int32_t>(i);
    before.v[0] += state == kPartial;
    before.v[1] += state == kFull;
  }
}

// 3. rows (grid: nQ blocks; dynamic shared memory: nKV bytes of marks when marks_in_shared, else
// the marks live in the q-block's row of `states`).
struct RowKernel {
  static constexpr int kThreads = 256;
  static constexpr int kRounds = scan_rounds(kThreads);
  enum : int {
    kInit,
    kQueries,
    kMaxRounds,
    kMerge = kMaxRounds + kRounds,
    kSortChunks,
    kSortRounds,
    kSortedMaxima = kSortRounds + kRounds,
    kSortedMaxRounds,
    kSortedMerge = kSortedMaxRounds + kRounds,
    kLengths,
    kLengthRounds,
    kOffsets = kLengthRounds + kRounds,
    kWalk,
    kClassify,
    kCountRounds,
    kWrite = kCountRounds + kRounds,
    kPhases
  };
  using Maxima = Lanes<3, true>;  // over a thread's queries: (doc, context start), (doc, context end), anchor
  using Sum = Lanes<1, false>;
  using Counts = Lanes<2, false>;
  struct Shared {
    uint32_t cells[kRowCells];
    int32_t context_unsorted, rollout_unsorted;
    int64_t walk_total;
    union {
      Maxima maxima[2 * kThreads];
      Sum lengths[2 * kThreads];
      Counts counts[2 * kThreads];
    } scan;
  };
  Buffers b;
  Sizes s;
  bool marks_in_shared;

  PEAGLE_HD int num_phases() const { return kPhases; }

  PEAGLE_HD void phase(int p, Shared& sh, uint8_t* dynamic_shared, const Thread& t) const {
    const int64_t row = t.block;
    const int64_t q_begin = row * s.q_block_size, q_end = min_value(s.num_queries, q_begin + s.q_block_size);
    uint8_t* marks = marks_in_shared ? dynamic_shared : b.states + row * s.num_kv_blocks;
    int64_t first, last;  // this thread's queries
    chunk_of(q_begin, q_end, t, &first, &last);
    if (p == kInit) {
      if (t.index == 0) {
        for (int c = 0; c < kRowCells; ++c) sh.cells[c] = 0;
        sh.context_unsorted = sh.rollout_unsorted = 0;
      }
      for (int64_t tile = t.index; tile < s.num_kv_blocks; tile += t.block_dim) marks[tile] = 0;
    } else if (p == kQueries) {
      sh.scan.maxima[t.index] = find_intervals(sh, first, last);
    } else if (p < kMerge) {
      scan_round(sh.scan.maxima, t.block_dim, p - kMaxRounds, t.index);
    } else if (p == kMerge) {
      merge_sorted(sh, first, last, exclusive(scan_result(sh.scan.maxima, t.block_dim), t.index, -1));
    } else if (p == kSortChunks) {
      if (sh.context_unsorted) sort_chunk(kContextOrder, first - q_begin, last - q_begin, q_begin);
      if (sh.rollout_unsorted) sort_chunk(kRolloutOrder, first - q_begin, last - q_begin, q_begin);
    } else if (p < kSortedMaxima) {
      const int round = p - kSortRounds;
      if (sh.context_unsorted) merge_round(kContextOrder, round, q_begin, q_end - q_begin, t);
      if (sh.rollout_unsorted) merge_round(kRolloutOrder, round, q_begin, q_end - q_begin, t);
    } else if (p == kSortedMaxima) {
      sh.scan.maxima[t.index] = sorted_maxima(sh, first - q_begin, last - q_begin, q_begin);
    } else if (p < kSortedMerge) {
      scan_round(sh.scan.maxima, t.block_dim, p - kSortedMaxRounds, t.index);
    } else if (p == kSortedMerge) {
      merge_in_order(sh, first - q_begin, last - q_begin, q_begin,
                     exclusive(scan_result(sh.scan.maxima, t.block_dim), t.index, -1));
    } else if (p == kLengths) {
      sh.scan.lengths[t.index] = walk_lengths(sh, first, last);
    } else if (p < kOffsets) {
      scan_round(sh.scan.lengths, t.block_dim, p - kLengthRounds, t.index);
    } else if (p == kOffsets) {
      const Sum* result = scan_result(sh.scan.lengths, t.block_dim);
      int64_t offset = exclusive(result, t.index, 0).v[0];
      for (int64_t q = first; q < last; ++q) {
        b.walk_offset[q] = offset;
        offset += context_walk(q) + b.walk_rollout[q];
      }
      if (t.index == t.block_dim - 1) sh.walk_total = result[t.index].v[0];
    } else if (p == kWalk) {
      walk(sh.walk_total, q_begin, q_end, t, marks);
    } else if (p == kClassify) {
      int64_t tile_first, tile_last;
      chunk_of(0, s.num_kv_blocks, t, &tile_first, &tile_last);
      const RowSummary summary = row_summary(sh.cells, q_end - q_begin == s.q_block_size);
      for (int64_t tile = tile_first; tile < tile_last; ++tile) {
        const bool whole = (tile + 1) * s.kv_block_size <= s.num_keys;
        const ColumnSummary column = column_summary(b.column_cells + tile * kColumnCells, whole);
        marks[tile] = classify_tile(marks[tile] != 0, summary, column);
      }
      sh.scan.counts[t.index] = count_states(marks, 1, tile_first, tile_last);
    } else if (p < kWrite) {
      scan_round(sh.scan.counts, t.block_dim, p - kCountRounds, t.index);
    } else {
      int64_t tile_first, tile_last;
      chunk_of(0, s.num_kv_blocks, t, &tile_first, &tile_last);
      const Counts* result = scan_result(sh.scan.counts, t.block_dim);
      const Counts total = result[t.block_dim - 1];
      const int64_t line = row * s.num_kv_blocks;
      write_lists(marks, 1, tile_first, tile_last, exclusive(result, t.index, 0), total, b.lists.idx[0] + line,
                  b.lists.idx[1] + line);
      if (marks_in_shared)
        for (int64_t tile = tile_first; tile < tile_last; ++tile) b.states[line + tile] = marks[tile];
      if (t.index == 0) {
        b.lists.num[0][row] = static_cast<int32_t>(total.v[0]);
        b.lists.num[1][row] = static_cast<int32_t>(total.v[1]);
      }
    }
  }

  // Each query's two rank intervals (empty for padding; the rollout one for depth >= 1 only),
  // its row cells, and the maxima the merge's scan needs.
  PEAGLE_HD Maxima find_intervals(Shared& sh, int64_t first, int64_t last) const {
    const int64_t positions = s.num_positions;
    Maxima maxima = Maxima::filled(-1);
    for (int64_t q = first; q < last; ++q) {
      const ElementInfo e = query_info(b, s, q);
      uint32_t contribution[kRowCells];
      query_cells(e, contribution);
      for (int c = 0; c < kRowCells; ++c)
        if (contribution[c] != 0) atomic_max(&sh.cells[c], contribution[c]);
      int64_t cs = 0, ce = 0, rs = 0, re = 0;
      if (e.real) {
        // Clip the context to the document's first position: a run of the depth-0 list, which
        // is in position order, holds only this document from there on when documents come in
        // position order (the walk's document filter keeps it exact when they do not).
        int64_t context_first = e.context_first;
        if (e.doc < positions && b.doc_first[e.doc] != 0)
          context_first = max_value(context_first, positions - b.doc_first[e.doc]);
        cs = b.buckets[context_first];
        ce = b.buckets[e.anchor + 1];
        if (e.depth > 0) {
          rs = b.buckets[positions + e.anchor];
          re = b.buckets[positions + e.anchor + 1];
        }
      }
      b.context_start[q] = static_cast<int32_t>(cs);
      b.context_end[q] = static_cast<int32_t>(ce);
      b.rollout_start[q] = static_cast<int32_t>(rs);
      b.rollout_end[q] = static_cast<int32_t>(re);
      b.query_doc[q] = static_cast<int32_t>(e.doc);
      b.query_depth[q] = static_cast<int32_t>(e.depth);
      if (ce > cs) {
        maxima.v[0] = max_value(maxima.v[0], (e.doc << 32) | cs);
        maxima.v[1] = max_value(maxima.v[1], (e.doc << 32) | ce);
      }
      if (re > rs) maxima.v[2] = max_value(maxima.v[2], e.anchor);
    }
    return maxima;
  }

  // The merge when the q-block's intervals come sorted (the COD layout, except where a q-block
  // straddles two depths): context intervals by (document, start), so each one's new part starts
  // at the largest end before it in its document; rollout intervals by strictly increasing
  // anchor, so no two share a chain. `carry`: the maxima over the queries before this thread's.
  // Flags the q-block otherwise, for the merge sort (sort_chunk, merge_round, merge_in_order).
  PEAGLE_HD void merge_sorted(Shared& sh, int64_t first, int64_t last, Maxima carry) const {
    for (int64_t q = first; q < last; ++q) {
      const int64_t cs = b.context_start[q], ce = b.context_end[q], doc = b.query_doc[q];
      int64_t start = ce;
      if (ce > cs) {
        const int64_t ks = (doc << 32) | cs, ke = (doc << 32) | ce;
        if (carry.v[0] > ks) sh.context_unsorted = 1;
        start = carry.v[1] >= 0 && (carry.v[1] >> 32) == doc ? max_value(cs, carry.v[1] & kLow32) : cs;
        carry.v[0] = max_value(carry.v[0], ks);
        carry.v[1] = max_value(carry.v[1], ke);
      }
      b.walk_start[q] = static_cast<int32_t>(start);
      if (b.rollout_end[q] > b.rollout_start[q]) {
        if (carry.v[2] >= b.anchor[q]) sh.rollout_unsorted = 1;
        carry.v[2] = max_value(carry.v[2], b.anchor[q]);
      }
    }
  }

  // Ranks of the context run query q walks.
  PEAGLE_HD int64_t context_walk(int64_t q) const { return max_value(0, b.context_end[q] - b.walk_start[q]); }

  // Where the q-block's intervals do not come sorted, they are sorted: the queries with a context
  // interval by (document, start, query), those with a chain by (anchor, depth descending,
  // query), in a block-wide merge sort (each thread heap-sorts its chunk, then kRounds rounds
  // merge pairs of sorted runs, each thread writing its chunk of the output from a binary search
  // of the merge path): O(n log n) for n queries. Empty intervals sort last. Each order lives in
  // two halves of `order` (source and destination by turns); after kRounds (even) rounds the
  // result is back in the first.
  enum : int { kContextOrder = 0, kRolloutOrder = 2 };
  static_assert(kRounds % 2 == 0, "the merge sort's result must end in the first half of its order buffer");

  PEAGLE_HD int32_t* order_buffer(int which, int64_t q_begin) const {
    return b.order + which * s.num_queries + q_begin;
  }

  PEAGLE_HD int64_t sort_key(int which, int64_t q) const {
    if (which == kContextOrder)
      return b.context_end[q] > b.context_start[q] ? (int64_t{b.query_doc[q]} << 32) | b.context_start[q] : INT64_MAX;
    return b.rollout_end[q] > b.rollout_start[q] ? (b.anchor[q] << 32) | (kFieldMax - max_value(0, b.query_depth[q]))
                                                 : INT64_MAX;
  }

  // Strict order of queries (local indices) by key, then index.
  PEAGLE_HD bool before(int which, int64_t q_begin, int32_t x, int32_t y) const {
    const int64_t kx = sort_key(which, q_begin + x), ky = sort_key(which, q_begin + y);
    return kx < ky || (kx == ky && x < y);
  }

  PEAGLE_HD void sort_chunk(int which, int64_t first, int64_t last, int64_t q_begin) const {
    int32_t* items = order_buffer(which, q_begin);
    for (int64_t i = first; i < last; ++i) items[i] = static_cast<int32_t>(i);
    const int64_t count = last - first;
    int32_t* chunk = items + first;
    auto sift_down = [&](int64_t root, int64_t size) {
      while (2 * root + 1 < size) {
        int64_t child = 2 * root + 1;
        if (child + 1 < size && before(which, q_begin, chunk[child], chunk[child + 1])) ++child;
        if (!before(which, q_begin, chunk[root], chunk[child])) return;
        const int32_t swap = chunk[root];
        chunk[root] = chunk[child];
        chunk[child] = swap;
        root = child;
      }
    };
    for (int64_t root = count / 2 - 1; root >= 0; --root) sift_down(root, count);
    for (int64_t end = count - 1; end > 0; --end) {
      const int32_t swap = chunk[0];
      chunk[0] = chunk[end];
      chunk[end] = swap;
      sift_down(0, end);
    }
  }

  // Round `round`: runs of 2^round chunks merged pairwise into runs of 2^(round + 1) chunks.
  PEAGLE_HD void merge_round(int which, int round, int64_t q_begin, int64_t n, const Thread& t) const {
    const int32_t* from = order_buffer(which + round % 2, q_begin);
    int32_t* to = order_buffer(which + (round + 1) % 2, q_begin);
    const int64_t chunk = (n + t.block_dim - 1) / t.block_dim, width = int64_t{1} << round;
    const int64_t out_first = min_value(n, t.index * chunk), out_last = min_value(n, out_first + chunk);
    if (out_first >= out_last) return;
    const int64_t pair_first = min_value(n, (t.index >> (round + 1) << (round + 1)) * chunk);
    const int64_t a_first = pair_first, a_last = min_value(n, a_first + width * chunk);
    const int64_t b_first = a_last, b_last = min_value(n, b_first + width * chunk);
    const int64_t na = a_last - a_first, nb = b_last - b_first, offset = out_first - pair_first;
    int64_t lo = max_value(0, offset - nb), hi = min_value(offset, na);  // items taken from A before out_first
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (before(which, q_begin, from[a_first + mid], from[b_first + offset - mid - 1]))
        lo = mid + 1;
      else
        hi = mid;
    }
    int64_t i = lo, j = offset - lo;
    for (int64_t out = out_first; out < out_last; ++out) {
      const bool take_a = j >= nb || (i < na && before(which, q_begin, from[a_first + i], from[b_first + j]));
      to[out] = take_a ? from[a_first + i++] : from[b_first + j++];
    }
  }

  // Over this thread's chunk of the context order: the maximum (document, end) of its intervals,
  // for the scan that gives each chunk what the sorted intervals before it reach.
  PEAGLE_HD Maxima sorted_maxima(const Shared& sh, int64_t first, int64_t last, int64_t q_begin) const {
    Maxima maxima = Maxima::filled(-1);
    if (!sh.context_unsorted) return maxima;
    const int32_t* sorted = order_buffer(kContextOrder, q_begin);
    for (int64_t i = first; i < last; ++i) {
      const int64_t q = q_begin + sorted[i];
      if (b.context_end[q] > b.context_start[q])
        maxima.v[0] = max_value(maxima.v[0], (int64_t{b.query_doc[q]} << 32) | b.context_end[q]);
    }
    return maxima;
  }

  // The merge over the sorted orders: a context interval's new part starts at the largest end of
  // its document's intervals before it; a chain is walked by the first query on it (the deepest).
  PEAGLE_HD void merge_in_order(const Shared& sh, int64_t first, int64_t last, int64_t q_begin, Maxima carry) const {
    if (sh.context_unsorted) {
      const int32_t* sorted = order_buffer(kContextOrder, q_begin);
      for (int64_t i = first; i < last; ++i) {
        const int64_t q = q_begin + sorted[i];
        const int64_t cs = b.context_start[q], ce = b.context_end[q], doc = b.query_doc[q];
        if (ce <= cs) continue;
        const bool same_doc = carry.v[0] >= 0 && (carry.v[0] >> 32) == doc;
        b.walk_start[q] = static_cast<int32_t>(same_doc ? max_value(cs, carry.v[0] & kLow32) : cs);
        carry.v[0] = max_value(carry.v[0], (doc << 32) | ce);
      }
    }
    if (sh.rollout_unsorted) {
      const int32_t* sorted = order_buffer(kRolloutOrder, q_begin);
      for (int64_t i = first; i < last; ++i) {
        const int64_t q = q_begin + sorted[i];
        const bool walks = i == 0 || b.anchor[q_begin + sorted[i - 1]] != b.anchor[q];
        b.walk_rollout[q] = walks ? max_value(0, b.rollout_end[q] - b.rollout_start[q]) : 0;
      }
    }
  }

  // What each query walks (walk_start and, for unsorted chains, walk_rollout set by the merges).
  // Returns the sum over this thread's queries.
  PEAGLE_HD Sum walk_lengths(const Shared& sh, int64_t first, int64_t last) const {
    Sum sum = Sum::filled(0);
    for (int64_t q = first; q < last; ++q) {
      const int64_t rollout = sh.rollout_unsorted ? b.walk_rollout[q] : b.rollout_end[q] - b.rollout_start[q];
      b.walk_rollout[q] = static_cast<int32_t>(rollout);
      sum.v[0] += context_walk(q) + rollout;
    }
    return sum;
  }

  // The q-block's flat walk, [0, total): query q's context run, then its chain, at walk_offset[q].
  // Thread t takes steps t, t + kThreads, ... (neighbouring threads read neighbouring ranks) and
  // marks the kv-block of every key that passes the walk's filter.
  PEAGLE_HD void walk(int64_t total, int64_t q_begin, int64_t q_end, const Thread& t, uint8_t* marks) const {
    int64_t q = q_begin - 1, offset = 0, next_offset = 0, context = 0;
    for (int64_t step = t.index; step < total; step += t.block_dim) {
      while (step >= next_offset) {  // the query whose walk holds this step (skipping empty ones)
        ++q;
        offset = b.walk_offset[q];
        next_offset = q + 1 < q_end ? b.walk_offset[q + 1] : total;
        context = context_walk(q);
      }
      const int64_t local = step - offset;
      if (local < context) {
        const int64_t key = b.rank_key[b.walk_start[q] + local];
        if ((key & kLow32) == b.query_doc[q]) marks[key >> 32] = 1;
      } else {
        const int64_t key = b.rank_key[b.rollout_start[q] + local - context];
        if ((key & kLow32) <= b.query_depth[q]) marks[key >> 32] = 1;
      }
    }
  }
};

// 4. columns (grid: nKV blocks): the q-lists of kv-block t.block from the tile states. Templated
// on the pipeline's buffers and sizes (it reads only states, lists and the block counts), so the
// interval pipeline (interval_kernels.h) writes its q-lists with it too.
template <class PipelineBuffers, class PipelineSizes>
struct ListColumnKernel {
  static constexpr int kThreads = 256;
  static constexpr int kRounds = scan_rounds(kThreads);
  enum : int { kCount, kRoundsBegin, kWrite = kRoundsBegin + kRounds, kPhases };
  using Counts = Lanes<2, false>;
  struct Shared {
    Counts counts[2 * kThreads];
  };
  PipelineBuffers b;
  PipelineSizes s;

  PEAGLE_HD int num_phases() const { return kPhases; }

  PEAGLE_HD void phase(int p, Shared& sh, uint8_t*, const Thread& t) const {
    const int64_t column = t.block;
    const uint8_t* line = b.states + column;
    int64_t first, last;
    chunk_of(0, s.num_q_blocks, t, &first, &last);
    if (p == kCount) {
      sh.counts[t.index] = count_states(line, s.num_kv_blocks, first, last);
    } else if (p < kWrite) {
      scan_round(sh.counts, t.block_dim, p - kRoundsBegin, t.index);
    } else {
      const Counts* result = scan_result(sh.counts, t.block_dim);
      const Counts total = result[t.block_dim - 1];
      const int64_t out = column * s.num_q_blocks;
      write_lists(line, s.num_kv_blocks, first, last, exclusive(result, t.index, 0), total, b.lists.idx[2] + out,
                  b.lists.idx[3] + out);
      if (t.index == 0) {
        b.lists.num[2][column] = static_cast<int32_t>(total.v[0]);
        b.lists.num[3][column] = static_cast<int32_t>(total.v[1]);
      }
    }
  }
};

using ColumnKernel = ListColumnKernel<Buffers, Sizes>;

}  // namespace pipeline
}  // namespace peagle
