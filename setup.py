"""Build peagle_ext: a CUDAExtension when a CUDA toolkit and a CUDA build of torch are present
(GPU or not), a CppExtension otherwise (or with PEAGLE_EXT_NO_CUDA=1), pure Python with
PEAGLE_EXT_NO_NATIVE=1. TORCH_CUDA_ARCH_LIST picks the CUDA architectures (default in
csrc/build_settings.cmake, used when no GPU is visible); MAX_JOBS the parallel compile jobs
(default: every core).

The compiled library is the top-level module ``peagle_ext_C`` (as flash-attn ships
``flash_attn_2_cuda``), so ``import peagle_ext`` from a source checkout still finds it."""

import importlib.util
import os
import re
import sys

from setuptools import setup

NATIVE = os.environ.get("PEAGLE_EXT_NO_NATIVE", "0") != "1"
HERE = os.path.dirname(os.path.abspath(__file__))


def build_settings() -> dict[str, list[str]]:
    """The `set(NAME value ...)` lines of csrc/build_settings.cmake, which CMakeLists.txt includes."""
    with open(os.path.join(HERE, "csrc", "build_settings.cmake")) as settings:
        return {name: values.replace('"', "").split() for name, values in
                re.findall(r"^set\((\w+)\s+([^)]*)\)", settings.read(), flags=re.M)}


def load_find_cuda_home():
    """peagle_ext/_cuda_home.py by path: importing the package itself would need it built."""
    spec = importlib.util.spec_from_file_location("_cuda_home", os.path.join(HERE, "peagle_ext", "_cuda_home.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_home


def native_extensions():
    settings = build_settings()
    if not NATIVE:
        print("peagle_ext: PEAGLE_EXT_NO_NATIVE=1, installing the pure-Python package", file=sys.stderr)
        return [], {}
    import torch

    want_cuda = os.environ.get("PEAGLE_EXT_NO_CUDA", "0") != "1"
    cuda_home = load_find_cuda_home()() if torch.version.cuda and want_cuda else None
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = " ".join(settings["PEAGLE_DEFAULT_CUDA_ARCHS"])
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    from torch.utils import cpp_extension

    sources = settings["PEAGLE_SOURCES"] + ["csrc/python_module.cpp"]  # the module init: pip builds only
    cxx_flags = ["-O3", "-std=c++20"]
    if cuda_home:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "visible GPU"
        arch_tag = archs.replace(" ", ",").replace(";", ",").replace(".", "").replace("+PTX", "")
        define = ["-DPEAGLE_WITH_CUDA", f'-DPEAGLE_CUDA_ARCHS="{arch_tag}"']
        print(f"peagle_ext: building CPU and CUDA kernels (CUDA_HOME={cuda_home}, archs {archs})", file=sys.stderr)
        extension = cpp_extension.CUDAExtension(
            "peagle_ext_C",
            sources + settings["PEAGLE_CUDA_SOURCES"],
            extra_compile_args={"cxx": cxx_flags + define, "nvcc": ["-O3", "-std=c++20"] + define},
        )
    else:
        if not want_cuda:
            why = "PEAGLE_EXT_NO_CUDA=1"
        elif not torch.version.cuda:
            why = "torch is a CPU build"
        else:
            why = "no CUDA toolkit (nvcc + libcudart) found"
        print(f"peagle_ext: building CPU kernels only ({why})", file=sys.stderr)
        extension = cpp_extension.CppExtension("peagle_ext_C", sources, extra_compile_args={"cxx": cxx_flags})
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
