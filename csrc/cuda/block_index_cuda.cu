// CUDA kernels of the block-index op. Everything runs on the current stream with sizes that
// depend only on N and the block sizes: no host-device synchronization, capturable in a graph.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../block_index.h"

namespace peagle {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t work) { return (work + kThreads - 1) / kThreads; }

// Element i's keys into row-major keys [6, n] (the ElementKeys fields in order) and real [n].
__device__ void write_element_keys(int64_t i, int64_t n, const int64_t* anchor, const int64_t* depth,
                                  const int64_t* doc_of_position, int64_t num_positions, int64_t window,
                                  int64_t* keys, bool* real) {
  const ElementKeys k = element_keys(anchor[i], depth[i], doc_of_position, num_positions, window);
  keys[i] = k.context_key;
  keys[n + i] = k.rollout_key;
  keys[2 * n + i] = k.context_lo;
  keys[3 * n + i] = k.context_hi;
  keys[4 * n + i] = k.rollout_lo;
  keys[5 * n + i] = k.rollout_hi;
  real[i] = k.real;
}

__global__ void element_keys_kernel(const int64_t* anchor, const int64_t* depth, const int64_t* doc,
                                    int64_t num_positions, int64_t window, int64_t n, int64_t* keys, bool* real) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) write_element_keys(i, n, anchor, depth, doc, num_positions, window, keys, real);
}

// One block per q-block row. Each thread walks the intervals of some of the row's queries and
// marks kv-blocks (concurrent writes all store 1); after a barrier the threads classify the row.
__global__ void classify_rows_kernel(const int64_t* context_start, const int64_t* context_end,
                                     const int64_t* rollout_start, const int64_t* rollout_end, int64_t n,
                                     int64_t q_block_size, const int64_t* run_of_rank, const int64_t* tile_of_run,
                                     const int64_t* row_bounds, const bool* row_real, const int64_t* column_extent,
                                     const bool* column_complete, int64_t num_kv_blocks, uint8_t* states) {
  const int64_t row = blockIdx.x;
  uint8_t* marks = states + row * num_kv_blocks;
  const int64_t q_begin = row * q_block_size;
  const int64_t q_end = min(n, q_begin + q_block_size);
  for (int64_t q = q_begin + threadIdx.x; q < q_end; q += blockDim.x) {
    mark_interval(context_start[q], context_end[q], run_of_rank, tile_of_run, marks);
    mark_interval(rollout_start[q], rollout_end[q], run_of_rank, tile_of_run, marks);
  }
  __syncthreads();
  const int64_t* rb = row_bounds + 4 * row;
  const RowBounds bounds{rb[0], rb[1], rb[2], rb[3], row_real[row]};
  for (int64_t tile = threadIdx.x; tile < num_kv_blocks; tile += blockDim.x) {
    const int64_t* ce = column_extent + 4 * tile;
    const ColumnExtent extent{ce[0], ce[1], ce[2], ce[3], column_complete[tile]};
    marks[tile] = classify_tile(marks[tile] != 0, bounds, extent);
  }
}

__global__ void ordered_lists_kernel(const uint8_t* states, int64_t num_rows, int64_t num_cols, ListOutputs lists) {
  const int64_t line = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (line < 2 * (num_rows + num_cols)) write_list_line(states, num_rows, num_cols, line, lists);
}

// Reduce `values` [N] per block of `block_size` consecutive entries, padding the tail with `pad`.
at::Tensor per_block(const at::Tensor& values, int64_t block_size, int64_t num_blocks, int64_t pad, bool take_max) {
  const int64_t padded = num_blocks * block_size;
  at::Tensor filled = at::constant_pad_nd(values, {0, padded - values.numel()}, pad).view({num_blocks, block_size});
  return take_max ? std::get<0>(filled.max(1)) : std::get<0>(filled.min(1));
}

// The same pipeline as the CPU loops, with sorting, searching and reductions as ATen calls whose
// sizes depend only on N: ranks run over both lists at full length N each (unlisted elements sort
// last with key kNotListed, and no interval reaches them), so nothing is ever counted on the host.
BlockIndexTensors build_block_index_cuda(const at::Tensor& anchor_pos_in, const at::Tensor& depth_in,
                                         const at::Tensor& doc_of_position_in, std::optional<int64_t> sliding_window,
                                         int64_t q_block_size, int64_t kv_block_size) {
  check_inputs(anchor_pos_in, depth_in, doc_of_position_in, sliding_window, q_block_size, kv_block_size);
  const c10::cuda::CUDAGuard guard(anchor_pos_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor anchor_pos = anchor_pos_in.contiguous(), depth = depth_in.contiguous();
  const at::Tensor doc_of_position = doc_of_position_in.contiguous();
  const int64_t n = anchor_pos.numel();
  const int64_t num_q_blocks = ceil_div(n, q_block_size), num_kv_blocks = ceil_div(n, kv_block_size);
  const auto long_opts = anchor_pos.options();

  at::Tensor keys = at::empty({6, n}, long_opts);
  at::Tensor real = at::empty({n}, long_opts.dtype(at::kBool));
  element_keys_kernel<<<grid_for(n), kThreads, 0, stream>>>(
      anchor_pos.data_ptr<int64_t>(), depth.data_ptr<int64_t>(), doc_of_position.data_ptr<int64_t>(),
      doc_of_position.numel(), sliding_window.value_or(0), n, keys.data_ptr<int64_t>(), real.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto [context_keys, context_element] = at::sort(keys[0], /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto [rollout_keys, rollout_element] = at::sort(keys[1], /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor context_start = at::searchsorted(context_keys, keys[2]);
  const at::Tensor context_end = at::searchsorted(context_keys, keys[3], /*out_int32=*/false, /*right=*/true);
  const at::Tensor rollout_start = at::searchsorted(rollout_keys, keys[4]) + n;
  const at::Tensor rollout_end = at::searchsorted(rollout_keys, keys[5], /*out_int32=*/false, /*right=*/true) + n;

  const at::Tensor tile_of_rank = at::cat({context_element, rollout_element}).div(kv_block_size, "floor");
  const at::Tensor listed = at::cat({context_keys, rollout_keys}).ne(kNotListed);
  at::Tensor run_begins = at::ones({2 * n}, long_opts);
  run_begins.slice(0, 1).copy_(tile_of_rank.slice(0, 1).ne(tile_of_rank.slice(0, 0, -1)));
  const at::Tensor run_of_rank = run_begins.cumsum(0).sub_(1);
  const at::Tensor tile_of_run = at::zeros({2 * n}, long_opts).scatter_(0, run_of_rank, tile_of_rank);

  const int64_t big = 2 * n + 1;
  const at::Tensor row_bounds = at::stack({per_block(context_start, q_block_size, num_q_blocks, 0, true),
                                           per_block(context_end, q_block_size, num_q_blocks, big, false),
                                           per_block(rollout_start, q_block_size, num_q_blocks, 0, true),
                                           per_block(rollout_end, q_block_size, num_q_blocks, big, false)},
                                          1)
                                    .contiguous();
  const at::Tensor row_real = per_block(real.to(at::kLong), q_block_size, num_q_blocks, 0, false).to(at::kBool);

  const at::Tensor rank = at::arange(2 * n, long_opts);
  const at::Tensor is_context = rank.lt(n);
  auto extreme = [&](const at::Tensor& selected, int64_t neutral, const char* reduce) {
    at::Tensor values = at::where(selected, rank, at::scalar_tensor(neutral, long_opts));
    return at::full({num_kv_blocks}, neutral, long_opts).scatter_reduce(0, tile_of_rank, values, reduce);
  };
  const at::Tensor listed_context = listed.logical_and(is_context);
  const at::Tensor listed_rollout = listed.logical_and(is_context.logical_not());
  const at::Tensor column_extent = at::stack({extreme(listed_context, big, "amin"), extreme(listed_context, -1, "amax"),
                                              extreme(listed_rollout, big, "amin"), extreme(listed_rollout, -1, "amax")},
                                             1)
                                       .contiguous();
  const at::Tensor column_complete =
      at::zeros({num_kv_blocks}, long_opts).scatter_add(0, tile_of_rank, listed.to(at::kLong)).eq(kv_block_size);

  at::Tensor states = at::zeros({num_q_blocks, num_kv_blocks}, long_opts.dtype(at::kByte));
  classify_rows_kernel<<<num_q_blocks, kThreads, 0, stream>>>(
      context_start.data_ptr<int64_t>(), context_end.data_ptr<int64_t>(), rollout_start.data_ptr<int64_t>(),
      rollout_end.data_ptr<int64_t>(), n, q_block_size, run_of_rank.data_ptr<int64_t>(),
      tile_of_run.data_ptr<int64_t>(), row_bounds.data_ptr<int64_t>(), row_real.data_ptr<bool>(),
      column_extent.data_ptr<int64_t>(), column_complete.data_ptr<bool>(), num_kv_blocks, states.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  BlockIndexTensors out = allocate_outputs(num_q_blocks, num_kv_blocks, long_opts);
  const int64_t lines = 2 * (num_q_blocks + num_kv_blocks);
  ordered_lists_kernel<<<grid_for(lines), kThreads, 0, stream>>>(states.data_ptr<uint8_t>(), num_q_blocks,
                                                                  num_kv_blocks, list_outputs(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(peagle_ext, CUDA, m) { m.impl("build_block_index", &build_block_index_cuda); }

}  // namespace peagle
