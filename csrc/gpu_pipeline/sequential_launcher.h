// Runs the CUDA pipeline's kernels on the CPU, one thread at a time: for each block, each phase
// for every thread in turn, which is what the GPU's barriers guarantee (primitives.h). Shared
// memory starts as garbage in every block, as on the GPU, so a kernel that reads it before
// writing it fails here too. A test aid: it is exact, not fast.
#pragma once

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels.h"

namespace peagle {
namespace pipeline {

struct SequentialLauncher {
  template <class Kernel>
  void launch(const Kernel& kernel, int64_t grid, size_t dynamic_shared_bytes) {
    using Shared = typename Kernel::Shared;
    const std::unique_ptr<Shared> shared(new Shared);
    std::vector<uint8_t> dynamic_shared(dynamic_shared_bytes);
    const int phases = kernel.num_phases();
    for (int64_t block = 0; block < grid; ++block) {
      std::memset(static_cast<void*>(shared.get()), 0xA5, sizeof(Shared));
      std::fill(dynamic_shared.begin(), dynamic_shared.end(), uint8_t{0xA5});
      for (int p = 0; p < phases; ++p)
        for (int64_t thread = 0; thread < Kernel::kThreads; ++thread)
          kernel.phase(p, *shared, dynamic_shared.data(), Thread{block, thread, Kernel::kThreads, grid});
    }
    ++launches;
  }
  void zero(uint8_t* data, size_t bytes) { std::memset(data, 0, bytes); }
  int launches = 0;  // kernels launched
};

}  // namespace pipeline
}  // namespace peagle
