# The one place for what gets compiled: CMakeLists.txt includes this file and setup.py reads it
# (only `set(NAME value ...)` lines, paths relative to the repository root).
# The CPU library (peagle_ext_C): every op schema, the CPU kernel, the emulated CUDA pipeline.
set(PEAGLE_SOURCES csrc/registration.cpp csrc/block_index.cpp csrc/cpu/block_index_cpu.cpp csrc/cpu/block_index_emulated.cpp
    csrc/intervals_op.cpp csrc/cpu/intervals_cpu.cpp csrc/cpu/intervals_emulated.cpp)
# The CUDA library (peagle_ext_cuda): the CUDA kernels alone, loaded after the CPU library.
set(PEAGLE_CUDA_SOURCES csrc/block_index.cpp csrc/intervals_op.cpp csrc/cuda/block_index_cuda.cu)
# Used when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: A100 and H100/H200.
set(PEAGLE_DEFAULT_CUDA_ARCHS "8.0;9.0")
# The LibTorch stable ABI: built against any torch >= 2.10, the libraries load into every torch
# from 2.10 on; TORCH_STABLE_ONLY makes any header outside the stable surface a compile error.
set(PEAGLE_STABLE_ABI_DEFINES TORCH_TARGET_VERSION=0x020a000000000000 TORCH_STABLE_ONLY)
