// An importable top-level module holding no Python functions: loading the shared library runs its
// stable-ABI registrations, and the ops are reached as torch.ops.peagle_ext.*. Compiled once per
// library under its name (peagle_ext_C: the CPU kernels and every schema; peagle_ext_cuda, through
// cuda/python_module_cuda.cpp: the CUDA kernels). CPython's limited API only (Py_LIMITED_API), so one abi3
// binary serves every Python from 3.10 on. Top-level modules, not peagle_ext._C, so that importing
// peagle_ext from a source checkout (which holds no compiled library) still finds the installed one.
#include <Python.h>

#ifndef PEAGLE_MODULE
#define PEAGLE_MODULE peagle_ext_C
#endif

#define PEAGLE_CONCAT(a, b) a##b
#define PEAGLE_INIT(name) PEAGLE_CONCAT(PyInit_, name)
#define PEAGLE_STRING(name) #name
#define PEAGLE_NAME(name) PEAGLE_STRING(name)

PyMODINIT_FUNC PEAGLE_INIT(PEAGLE_MODULE)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, PEAGLE_NAME(PEAGLE_MODULE), nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
