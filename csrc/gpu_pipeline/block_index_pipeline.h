// The block-index op through the CUDA pipeline, for torch tensors on any device: the allocations
// go through the stable ABI's allocator calls, which serve CPU and CUDA tensors alike, and the
// memset and the kernels go through `launcher` (the CUDA stream, or the sequential CPU launcher of
// the emulated op).
#pragma once

#include <tuple>

#include "../block_index.h"
#include "pipeline.h"

namespace peagle {

template <class Launcher>
BlockIndexTensors build_block_index_pipeline(Launcher& launcher, const OpInputs& in) {
  const pipeline::Sizes sizes{in.num_rows,     in.num_queries,   in.num_keys,     in.num_positions, in.window,
                              in.q_block_size, in.kv_block_size, in.num_q_blocks, in.num_kv_blocks};
  const pipeline::Layout layout = pipeline::plan(sizes);
  Tensor workspace = empty_bytes(static_cast<int64_t>(layout.total_bytes), in.anchor_pos);
  BlockIndexTensors out = allocate_outputs(in);
  uint8_t* base = workspace.mutable_data_ptr<uint8_t>();
  launcher.poison(base, layout.total_bytes);
  std::apply(
      [&](auto&... output) {
        (launcher.poison(output.mutable_data_ptr(), static_cast<size_t>(output.numel()) * output.element_size()), ...);
      },
      out);
  const pipeline::Buffers buffers =
      pipeline::bind(layout, base, in.anchor_pos.const_data_ptr<int64_t>(), in.depth.const_data_ptr<int64_t>(),
                     in.kv_anchor_pos.const_data_ptr<int64_t>(), in.kv_depth.const_data_ptr<int64_t>(),
                     in.doc_of_position.const_data_ptr<int64_t>(), list_outputs(out, in));
  pipeline::launch_pipeline(launcher, base, buffers, sizes, layout);
  return out;  // the workspace goes back to the allocator, on this stream, after the kernels
}

}  // namespace peagle
