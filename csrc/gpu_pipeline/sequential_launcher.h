// Runs the CUDA pipeline's kernels on the CPU, one thread at a time, each phase of a block for
// every thread before its next phase, which is what the GPU's barriers guarantee (primitives.h).
// Shared memory starts as garbage in every block, as on the GPU, and so do the workspace and the
// outputs (poison), so a kernel that reads memory before writing it fails here too. A test aid:
// it is exact, not fast.
//
// The GPU promises no order among the blocks of a launch or among the threads of a phase, and its
// atomics hand out slots in whatever order they arrive. With a non-zero `schedule_seed` the
// launcher draws an order of its own: up to kResidentBlocks blocks are in flight at once and the
// next phase to run is that of a block picked at random among them, its threads in a shuffled
// order. A kernel whose result depends on an order (a thread reading what another thread writes in
// the same phase, a block reading another's output without the ticket) then gives a result that
// changes with the seed. Seed 0 runs blocks and threads in index order.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "kernels.h"

namespace peagle {
namespace pipeline {

struct SequentialLauncher {
  static constexpr size_t kResidentBlocks = 4;

  // Runs grid x kernel.s.num_rows blocks: block index b is block b % grid of row b / grid.
  template <class Kernel>
  void launch(const Kernel& kernel, int64_t grid, size_t dynamic_shared_bytes) {
    using Shared = typename Kernel::Shared;
    struct Resident {  // a block in flight: its row's kernel, its shared memory and the next phase it runs
      Kernel row_kernel;
      int64_t block;
      int phase;
      std::unique_ptr<Shared> shared;
      std::vector<uint8_t> dynamic_shared;
    };
    std::mt19937_64 random(schedule_seed + static_cast<uint64_t>(launches));
    std::vector<int64_t> blocks(static_cast<size_t>(grid * kernel.s.num_rows)), threads(Kernel::kThreads);
    std::iota(blocks.begin(), blocks.end(), int64_t{0});
    std::iota(threads.begin(), threads.end(), int64_t{0});
    const bool shuffled = schedule_seed != 0;
    if (shuffled) std::shuffle(blocks.begin(), blocks.end(), random);
    const size_t resident_limit = shuffled ? kResidentBlocks : 1;
    std::vector<Resident> resident;
    size_t next_block = 0;
    while (next_block < blocks.size() || !resident.empty()) {
      while (resident.size() < resident_limit && next_block < blocks.size()) {
        const int64_t block = blocks[next_block++];
        Resident r{at_row(kernel, block / grid), block % grid, 0, std::make_unique<Shared>(),
                   std::vector<uint8_t>(dynamic_shared_bytes, uint8_t{0xA5})};
        std::memset(static_cast<void*>(r.shared.get()), 0xA5, sizeof(Shared));
        resident.push_back(std::move(r));
      }
      const size_t pick = shuffled ? static_cast<size_t>(random() % resident.size()) : 0;
      Resident& r = resident[pick];
      if (shuffled) std::shuffle(threads.begin(), threads.end(), random);
      for (const int64_t thread : threads)
        r.row_kernel.phase(r.phase, *r.shared, r.dynamic_shared.data(),
                           Thread{r.block, thread, Kernel::kThreads, grid});
      if (++r.phase == kernel.num_phases()) resident.erase(resident.begin() + static_cast<std::ptrdiff_t>(pick));
    }
    ++launches;
  }
  void zero(uint8_t* data, size_t bytes) { std::memset(data, 0, bytes); }
  // Memory the pipeline is given uninitialized (its workspace, the outputs) holds garbage, as the
  // GPU's caching allocator hands back an earlier build's bytes: a read before the pipeline writes
  // it, or an output entry it never writes, then shows in the result instead of passing unseen.
  void poison(void* data, size_t bytes) { std::memset(data, 0xEE, bytes); }
  uint64_t schedule_seed = 0;
  int launches = 0;  // kernels launched
};

}  // namespace pipeline
}  // namespace peagle
