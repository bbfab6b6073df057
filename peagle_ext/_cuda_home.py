"""Where the CUDA toolkit is. Standard library only: setup.py loads this file before torch's
build helpers are imported, and the CMake test uses it to configure the same toolkit."""

from __future__ import annotations

import glob
import os
import shutil


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: one holding bin/nvcc and libcudart.

    torch's own detection follows `which nvcc`, and a wrapper script at /usr/local/bin/nvcc then
    yields /usr/local, where linking fails (-lcudart not found); so check each candidate.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in filter(None, candidates):
        has_nvcc = os.path.isfile(os.path.join(root, "bin", "nvcc"))
        has_cudart = any(
            os.path.exists(os.path.join(root, lib, "libcudart.so"))
            for lib in ("lib64", "lib", "targets/x86_64-linux/lib")
        )
        if has_nvcc and has_cudart:
            return os.path.realpath(root)
    return None


def find_nvrtc(cuda_home: str) -> str | None:
    """libnvrtc, which torch's CMake config insists on: the toolkit's, else the pip wheel's."""
    found = glob.glob(os.path.join(cuda_home, "lib*", "libnvrtc.so*"))
    try:
        import nvidia  # the nvidia-cuda-nvrtc wheel (installed with CUDA builds of torch)

        for root in nvidia.__path__:
            found += glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*"))
    except ImportError:
        pass
    found = [path for path in found if "builtins" not in path and ".alt." not in path]
    return sorted(found)[0] if found else None
