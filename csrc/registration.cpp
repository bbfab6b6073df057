// The library's op schemas, all of them, and build_info. The kernels register their
// implementations beside their code: cpu/block_index_cpu.cpp and cpu/block_index_emulated.cpp
// here, cuda/block_index_cuda.cu in the CUDA library (peagle_ext_cuda), which loads only where a
// CUDA runtime is present.
//
// build_block_index: the CPU kernel on CPU tensors, the CUDA pipeline on CUDA tensors. Queries
// (anchor_pos, depth) against keys (kv_anchor_pos, kv_depth; the queries themselves when absent),
// one row ([N] inputs, outputs [1, 1, ...]) or a batch of rows ([B, N] inputs, outputs [B, 1, ...]),
// each row with its own doc_of_position ([P] or [B, P]).
// build_block_index_emulated: the CUDA pipeline's code run on CPU tensors by a sequential launcher
// (a test aid), in the order that schedule_seed draws (gpu_pipeline/sequential_launcher.h).
// build_interval_block_index: the interval engine (query q sees k iff starts[q, m] <= k < ends[q, m]
// for some m), starts/ends int64 [B, Q, M], outputs [B, 1, ...]; the CPU kernel in
// cpu/intervals_cpu.cpp, the CUDA one in cuda/intervals_cuda.cu. Its _emulated twin runs the CUDA
// kernel's code on CPU tensors (cpu/intervals_emulated.cpp).
// build_info: the kernels this install was built with, e.g. "cpu" or "cpu;cuda:80,90" (the CUDA
// ones live in the CUDA library, which may still fail to load: Python reports that apart).
#include <torch/csrc/stable/library.h>

#include <string>

namespace peagle {
namespace {

std::string build_info() {
#ifdef PEAGLE_CUDA_ARCHS
  return "cpu;cuda:" PEAGLE_CUDA_ARCHS;
#else
  return "cpu";
#endif
}

}  // namespace

STABLE_TORCH_LIBRARY(peagle_ext, m) {
  m.def(
      "build_block_index(Tensor anchor_pos, Tensor depth, Tensor doc_of_position, int? sliding_window, "
      "int q_block_size, int kv_block_size, Tensor? kv_anchor_pos=None, Tensor? kv_depth=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "build_block_index_emulated(Tensor anchor_pos, Tensor depth, Tensor doc_of_position, int? sliding_window, "
      "int q_block_size, int kv_block_size, Tensor? kv_anchor_pos=None, Tensor? kv_depth=None, "
      "int schedule_seed=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "build_interval_block_index(Tensor starts, Tensor ends, int kv_len, int q_block_size, int kv_block_size) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "build_interval_block_index_emulated(Tensor starts, Tensor ends, int kv_len, int q_block_size, "
      "int kv_block_size, int schedule_seed=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("build_info() -> str");
}

STABLE_TORCH_LIBRARY_IMPL(peagle_ext, CompositeExplicitAutograd, m) { m.impl("build_info", TORCH_BOX(&build_info)); }

}  // namespace peagle
