// The importable top-level module `peagle_ext_C` (pip builds only). It holds no Python functions:
// loading the shared library runs the TORCH_LIBRARY registrations, and the op is reached as
// torch.ops.peagle_ext.*. It is a top-level module, not peagle_ext._C, so that importing
// peagle_ext from a source checkout (which holds no compiled library) still finds the installed one.
#include <Python.h>

extern "C" PyObject* PyInit_peagle_ext_C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "peagle_ext_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
