// The importable module `peagle_ext._C`. It holds no Python functions: loading the shared library
// runs the TORCH_LIBRARY registrations, and the op is reached as torch.ops.peagle_ext.*.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
