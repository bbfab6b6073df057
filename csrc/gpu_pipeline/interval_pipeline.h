// The interval op through the interval kernels (interval_kernels.h), for torch tensors on any
// device: one workspace allocation, the outputs, two launches through `launcher` (the CUDA stream,
// or the sequential CPU launcher of the emulated op).
#pragma once

#include <tuple>

#include "../intervals_op.h"
#include "interval_kernels.h"

namespace peagle {

template <class Launcher>
BlockIndexTensors build_interval_pipeline(Launcher& launcher, const IntervalInputs& in) {
  const pipeline::IntervalSizes s{in.num_rows,     in.num_queries,   in.num_intervals, in.kv_len,
                                  in.q_block_size, in.kv_block_size, in.num_q_blocks,  in.num_kv_blocks};
  const int64_t bounds = in.num_rows * in.num_queries * in.num_intervals;
  const int64_t differences = in.num_rows * in.num_q_blocks * (in.num_kv_blocks + 1);
  const int64_t tiles = in.num_rows * in.num_q_blocks * in.num_kv_blocks;
  auto aligned = [](int64_t bytes) { return (bytes + 15) / 16 * 16; };
  const int64_t bounds_bytes = aligned(bounds * 8), difference_bytes = aligned(differences * 4);
  const int64_t total = 2 * bounds_bytes + 2 * difference_bytes + aligned(tiles);
  Tensor workspace = empty_bytes(total, in.starts);
  uint8_t* base = workspace.mutable_data_ptr<uint8_t>();
  BlockIndexTensors out = allocate_interval_outputs(in);
  launcher.poison(base, static_cast<size_t>(total));
  std::apply(
      [&](auto&... output) {
        (launcher.poison(output.mutable_data_ptr(), static_cast<size_t>(output.numel()) * output.element_size()), ...);
      },
      out);
  pipeline::IntervalBuffers b{in.starts.const_data_ptr<int64_t>(),
                              in.ends.const_data_ptr<int64_t>(),
                              reinterpret_cast<int64_t*>(base),
                              reinterpret_cast<int64_t*>(base + bounds_bytes),
                              reinterpret_cast<int32_t*>(base + 2 * bounds_bytes),
                              reinterpret_cast<int32_t*>(base + 2 * bounds_bytes + difference_bytes),
                              base + 2 * bounds_bytes + 2 * difference_bytes,
                              interval_list_outputs(out, in, 0)};
  launcher.launch(pipeline::IntervalRowKernel{b, s}, in.num_q_blocks, 0);
  launcher.launch(pipeline::IntervalColumnKernel{b, s}, in.num_kv_blocks, 0);
  return out;
}

}  // namespace peagle
