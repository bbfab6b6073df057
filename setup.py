"""Build peagle_ext: a CUDAExtension when a CUDA toolkit and a CUDA build of torch are present
(GPU or not), a CppExtension otherwise (or with PEAGLE_EXT_NO_CUDA=1), pure Python with
PEAGLE_EXT_NO_NATIVE=1. TORCH_CUDA_ARCH_LIST picks the CUDA architectures (default 8.0;9.0
when no GPU is visible); MAX_JOBS the parallel compile jobs (default: every core)."""

import os
import importlib.util
import sys

from setuptools import setup

NATIVE = os.environ.get("PEAGLE_EXT_NO_NATIVE", "0") != "1"
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100, H100/H200
HERE = os.path.dirname(os.path.abspath(__file__))


def load_find_cuda_home():
    """peagle_ext/_cuda_home.py by path: importing the package itself would need it built."""
    spec = importlib.util.spec_from_file_location("_cuda_home", os.path.join(HERE, "peagle_ext", "_cuda_home.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_home


def native_extensions():
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
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    from torch.utils import cpp_extension

    sources = ["csrc/block_index.cpp", "csrc/block_index_cpu.cpp", "csrc/python_module.cpp"]
    cxx_flags = ["-O3", "-std=c++20"]
    if cuda_home:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "visible GPU"
        arch_tag = archs.replace(" ", ",").replace(";", ",").replace(".", "").replace("+PTX", "")
        define = ["-DPEAGLE_WITH_CUDA", f'-DPEAGLE_CUDA_ARCHS="{arch_tag}"']
        print(f"peagle_ext: building CPU and CUDA kernels (CUDA_HOME={cuda_home}, archs {archs})", file=sys.stderr)
        extension = cpp_extension.CUDAExtension(
            "peagle_ext._C",
            sources + ["csrc/block_index_cuda.cu"],
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
        extension = cpp_extension.CppExtension("peagle_ext._C", sources, extra_compile_args={"cxx": cxx_flags})
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
