"""CMakeLists.txt builds the same csrc/ into the op library, and its ctest suite passes.

Configures with torch's CMake prefix (and the CUDA toolkit when one is present, for sm_90 only
to keep the build short), builds with Ninja, runs ctest: the tile-rule C++ test and the op
library checked against the python backend.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch.utils

from peagle_ext._cuda_home import find_cuda_home, find_nvrtc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cmake_4() -> str | None:
    cmake = shutil.which("cmake")
    if cmake is None:
        return None
    version = re.search(r"(\d+)\.", subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout)
    return cmake if version and int(version.group(1)) >= 4 else None


@pytest.mark.skipif(os.environ.get("PEAGLE_EXT_SKIP_CMAKE") == "1", reason="PEAGLE_EXT_SKIP_CMAKE=1")
def test_cmake_build_and_ctest(tmp_path):
    cmake = cmake_4()
    if cmake is None:
        pytest.skip("needs cmake >= 4 (pip install 'cmake>=4'; the 'test' extra has it)")
    if shutil.which("ninja") is None:
        pytest.skip("needs ninja")
    configure = [cmake, "-S", ROOT, "-B", str(tmp_path), "-G", "Ninja",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}"]
    cuda_home = find_cuda_home() if torch.version.cuda else None
    nvrtc = find_nvrtc(cuda_home) if cuda_home else None
    if cuda_home and nvrtc:
        configure += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc",
                      f"-DCUDA_nvrtc_LIBRARY={nvrtc}", "-DTORCH_CUDA_ARCH_LIST=9.0"]
    else:
        configure += ["-DPEAGLE_WITH_CUDA=OFF"]
    jobs = str(os.cpu_count() or 1)
    ctest = shutil.which("ctest", path=os.path.dirname(cmake)) or "ctest"  # the ctest of that cmake
    for step in (configure, [cmake, "--build", str(tmp_path), "-j", jobs],
                 [ctest, "--test-dir", str(tmp_path), "--output-on-failure"]):
        result = subprocess.run(step, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(step)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert "100% tests passed" in result.stdout, result.stdout
    if cuda_home and nvrtc:
        assert (tmp_path / "CMakeFiles" / "peagle_ext_ops.dir" / "csrc" / "block_index_cuda.cu.o").exists()
