// The block-index op through the CUDA pipeline, for torch tensors on any device: the allocations
// are ATen calls, which run on CPU and CUDA tensors alike, and the memset and the kernels go
// through `launcher` (the CUDA stream, or the sequential CPU launcher of the emulated op).
#pragma once

#include <tuple>

#include "../block_index.h"
#include "pipeline.h"

namespace peagle {

template <class Launcher>
BlockIndexTensors build_block_index_pipeline(Launcher& launcher, const at::Tensor& anchor_pos_in,
                                             const at::Tensor& depth_in, const at::Tensor& doc_of_position_in,
                                             std::optional<int64_t> sliding_window, int64_t q_block_size,
                                             int64_t kv_block_size) {
  check_inputs(anchor_pos_in, depth_in, doc_of_position_in, sliding_window, q_block_size, kv_block_size);
  const at::Tensor anchor_pos = anchor_pos_in.contiguous(), depth = depth_in.contiguous();
  const at::Tensor doc_of_position = doc_of_position_in.contiguous();
  const int64_t n = anchor_pos.numel();
  const pipeline::Sizes sizes{n,
                              doc_of_position.numel(),
                              sliding_window.value_or(0),
                              q_block_size,
                              kv_block_size,
                              ceil_div(n, q_block_size),
                              ceil_div(n, kv_block_size)};
  const pipeline::Layout layout = pipeline::plan(sizes);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(layout.total_bytes)}, anchor_pos.options().dtype(at::kByte));
  BlockIndexTensors out = allocate_outputs(sizes.num_q_blocks, sizes.num_kv_blocks, anchor_pos.options());
  uint8_t* base = workspace.data_ptr<uint8_t>();
  launcher.poison(base, layout.total_bytes);
  std::apply([&](auto&... output) { (launcher.poison(output.data_ptr(), output.nbytes()), ...); }, out);
  const pipeline::Buffers buffers = pipeline::bind(layout, base, anchor_pos.data_ptr<int64_t>(),
                                                   depth.data_ptr<int64_t>(), doc_of_position.data_ptr<int64_t>(),
                                                   list_outputs(out));
  pipeline::launch_pipeline(launcher, base, buffers, sizes, layout);
  return out;  // the workspace goes back to the allocator, on this stream, after the kernels
}

}  // namespace peagle
