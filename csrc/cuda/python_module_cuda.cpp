// The CUDA library's importable module, peagle_ext_cuda (see python_module.cpp).
#define PEAGLE_MODULE peagle_ext_cuda
#include "../python_module.cpp"
