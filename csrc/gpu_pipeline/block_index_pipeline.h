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
BlockIndexTensors build_block_index_pipeline(Launcher& launcher, const Tensor& anchor_pos, const Tensor& depth,
                                             const Tensor& doc_of_position, std::optional<int64_t> sliding_window,
                                             int64_t q_block_size, int64_t kv_block_size) {
  const OpInputs in = check_inputs(anchor_pos, depth, doc_of_position, sliding_window, q_block_size, kv_block_size);
  const pipeline::Sizes sizes{in.n,           in.num_positions, in.window,       in.q_block_size,
                              in.kv_block_size, in.num_q_blocks,  in.num_kv_blocks};
  const pipeline::Layout layout = pipeline::plan(sizes);
  Tensor workspace = empty_bytes(static_cast<int64_t>(layout.total_bytes), in.anchor_pos);
  BlockIndexTensors out = allocate_outputs(in, in.anchor_pos);
  uint8_t* base = workspace.mutable_data_ptr<uint8_t>();
  launcher.poison(base, layout.total_bytes);
  std::apply([&](auto&... output) {
    (launcher.poison(output.mutable_data_ptr(), static_cast<size_t>(output.numel()) * output.element_size()), ...);
  }, out);
  const pipeline::Buffers buffers =
      pipeline::bind(layout, base, in.anchor_pos.const_data_ptr<int64_t>(), in.depth.const_data_ptr<int64_t>(),
                     in.doc_of_position.const_data_ptr<int64_t>(), list_outputs(out));
  pipeline::launch_pipeline(launcher, base, buffers, sizes, layout);
  return out;  // the workspace goes back to the allocator, on this stream, after the kernels
}

}  // namespace peagle
