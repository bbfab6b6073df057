# The one place for what gets compiled: CMakeLists.txt includes this file and setup.py reads it
# (only `set(NAME value ...)` lines, paths relative to the repository root).
set(PEAGLE_SOURCES csrc/block_index.cpp csrc/cpu/block_index_cpu.cpp csrc/cpu/block_index_emulated.cpp)
set(PEAGLE_CUDA_SOURCES csrc/cuda/block_index_cuda.cu)
# Used when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: A100 and H100/H200.
set(PEAGLE_DEFAULT_CUDA_ARCHS "8.0;9.0")
