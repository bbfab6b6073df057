"""Build peagle_ext: the CPU library always, the CUDA library too when a CUDA toolkit and a CUDA
build of torch are present (GPU or not; not with PEAGLE_EXT_NO_CUDA=1), pure Python with
PEAGLE_EXT_NO_NATIVE=1. TORCH_CUDA_ARCH_LIST picks the CUDA architectures (default in
csrc/build_settings.cmake, used when no GPU is visible); MAX_JOBS the parallel compile jobs
(default: every core).

Both libraries are written against the LibTorch stable ABI and CPython's limited API: built once,
against any torch >= 2.10, they load into every torch from 2.10 on and every Python from 3.10 on
(one abi3 wheel). They are top-level modules (as flash-attn ships ``flash_attn_2_cuda``), so
``import peagle_ext`` from a source checkout still finds them: ``peagle_ext_C`` (every op schema,
the CPU kernel, the emulated CUDA pipeline; it links no CUDA library, so it loads beside a
CPU-only torch too) and ``peagle_ext_cuda`` (the CUDA kernel)."""

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


def native_extensions() -> list:
    settings = build_settings()
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

    stable = [f"-D{define}" for define in settings["PEAGLE_STABLE_ABI_DEFINES"]]
    # Hidden by default: the libraries export their module init alone (the registrations run from
    # static initializers), so the two never resolve each other's copies of shared code.
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden"] + stable
    cpu_sources = settings["PEAGLE_SOURCES"] + ["csrc/python_module.cpp"]  # the module init: pip builds only
    if not cuda_home:
        if not want_cuda:
            why = "PEAGLE_EXT_NO_CUDA=1"
        elif not torch.version.cuda:
            why = "torch is a CPU build"
        else:
            why = "no CUDA toolkit (nvcc + libcudart) found"
        print(f"peagle_ext: building CPU kernels only ({why})", file=sys.stderr)
        return [cpp_extension.CppExtension("peagle_ext_C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                                           py_limited_api=True)]
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "visible GPU"
    arch_tag = archs.replace(" ", ",").replace(";", ",").replace(".", "").replace("+PTX", "")
    print(f"peagle_ext: building CPU and CUDA kernels (CUDA_HOME={cuda_home}, archs {archs})", file=sys.stderr)
    # The CPU library records the CUDA library's architectures for build_info; the CUDA library
    # needs USE_CUDA to see the stable C shim's CUDA calls (the current stream).
    archs_define = [f'-DPEAGLE_CUDA_ARCHS="{arch_tag}"']
    cuda_flags = ["-DUSE_CUDA"] + stable
    return [
        cpp_extension.CppExtension("peagle_ext_C", cpu_sources, extra_compile_args={"cxx": cxx_flags + archs_define},
                                   py_limited_api=True),
        cpp_extension.CUDAExtension(
            "peagle_ext_cuda",
            settings["PEAGLE_CUDA_SOURCES"] + ["csrc/cuda/python_module_cuda.cpp"],
            extra_compile_args={
                "cxx": cxx_flags + ["-DUSE_CUDA"],
                "nvcc": ["-O3", "-std=c++20", "-Xcompiler=-fvisibility=hidden"] + cuda_flags,
            },
            py_limited_api=True,
        ),
    ]


if NATIVE:
    extensions = native_extensions()
    from torch.utils.cpp_extension import BuildExtension

    class BuildLibraries(BuildExtension):
        """Drops compiled modules of ours in the build folder that this build does not make (an
        older build's peagle_ext_C.cpython-*.so, say), which a wheel would otherwise ship beside the
        new ones and Python would prefer."""

        def run(self):
            wanted = {os.path.basename(self.get_ext_filename(ext.name)) for ext in self.extensions}
            if os.path.isdir(self.build_lib):
                for name in os.listdir(self.build_lib):
                    if name.startswith(("peagle_ext_C.", "peagle_ext_cuda.")) and name not in wanted:
                        os.remove(os.path.join(self.build_lib, name))
            super().run()

    # One abi3 wheel for every CPython >= 3.10, as the libraries use only the limited API.
    setup(ext_modules=extensions, cmdclass={"build_ext": BuildLibraries},
          options={"bdist_wheel": {"py_limited_api": "cp310"}})
else:
    print("peagle_ext: PEAGLE_EXT_NO_NATIVE=1, installing the pure-Python package", file=sys.stderr)
    setup()
