// What the CUDA pipeline's kernel bodies need beyond the tile rule: where a thread is, atomics,
// fences, and block-wide scans. Each is a __host__ __device__ function, so the same kernel bodies
// run under CUDA on the GPU and under the sequential launcher on the CPU (sequential_launcher.h).
//
// The kernels are written as barrier-separated phases (see kernels.h): within one phase a thread
// reads only what earlier phases wrote, plus what it writes itself; threads of one phase meet
// only through the atomics below or by storing the same value to the same place. Under those
// rules running the threads of a phase one after another, as the sequential launcher does, gives
// what the GPU gives.
#pragma once

#include <cstdint>

#include "../rule/tile_rule.h"

namespace peagle {
namespace pipeline {

// A thread's place in its launch: blockIdx.x, threadIdx.x, blockDim.x, gridDim.x on the GPU.
struct Thread {
  int64_t block, index, block_dim, grid_dim;
};

// The atomics and fences: the only code that differs between the GPU and the sequential CPU run,
// where one thread runs at a time and plain operations are exact.
PEAGLE_HD int32_t atomic_add(int32_t* address, int32_t value) {
#if defined(__CUDA_ARCH__)
  return atomicAdd(address, value);
#else
  const int32_t old = *address;
  *address = old + value;
  return old;
#endif
}

PEAGLE_HD void atomic_max(uint32_t* address, uint32_t value) {
#if defined(__CUDA_ARCH__)
  atomicMax(address, value);
#else
  if (value > *address) *address = value;
#endif
}

// Orders this thread's earlier global writes and atomics before its later ones, device-wide.
PEAGLE_HD void fence() {
#if defined(__CUDA_ARCH__)
  __threadfence();
#endif
}

// A load that bypasses the (non-coherent) L1 cache: for values other blocks wrote with atomics
// during the same kernel.
PEAGLE_HD int32_t load_coherent(const int32_t* address) {
#if defined(__CUDA_ARCH__)
  return __ldcg(address);
#else
  return *address;
#endif
}

// Thread t's contiguous share of the items [begin, end): [*first, *last).
PEAGLE_HD void chunk_of(int64_t begin, int64_t end, const Thread& t, int64_t* first, int64_t* last) {
  const int64_t size = (end - begin + t.block_dim - 1) / t.block_dim;
  *first = min_value(end, begin + t.index * size);
  *last = min_value(end, *first + size);
}

// A few int64 lanes combined lane by lane, by maximum or by sum.
template <int kLanes, bool kMax>
struct Lanes {
  int64_t v[kLanes];
  PEAGLE_HD static Lanes filled(int64_t value) {
    Lanes l;
    for (int i = 0; i < kLanes; ++i) l.v[i] = value;
    return l;
  }
  PEAGLE_HD static Lanes combine(const Lanes& a, const Lanes& b) {
    Lanes l;
    for (int i = 0; i < kLanes; ++i) l.v[i] = kMax ? max_value(a.v[i], b.v[i]) : a.v[i] + b.v[i];
    return l;
  }
};

// Inclusive scan of one value per thread over a block of `size` threads (Hillis-Steele): the
// values go into buffers[0 .. size), then round r (one phase each, r < scan_rounds(size)) reads
// half r % 2 of `buffers` [2 * size] and writes the other half; scan_result points at the result.
PEAGLE_HD constexpr int scan_rounds(int64_t size) {
  int rounds = 0;
  while ((int64_t{1} << rounds) < size) ++rounds;
  return rounds;
}

template <class Value>
PEAGLE_HD void scan_round(Value* buffers, int64_t size, int round, int64_t index) {
  const Value* from = buffers + (round % 2) * size;
  Value* to = buffers + ((round + 1) % 2) * size;
  const int64_t offset = int64_t{1} << round;
  to[index] = index >= offset ? Value::combine(from[index - offset], from[index]) : from[index];
}

template <class Value>
PEAGLE_HD const Value* scan_result(const Value* buffers, int64_t size) {
  return buffers + (scan_rounds(size) % 2) * size;
}

// What precedes thread `index` in an inclusive scan result: the exclusive prefix.
template <class Value>
PEAGLE_HD Value exclusive(const Value* result, int64_t index, int64_t identity) {
  return index > 0 ? result[index - 1] : Value::filled(identity);
}

}  // namespace pipeline
}  // namespace peagle
