"""CMakeLists.txt builds the same csrc/ into the op library, and its ctest suite passes.

Builds the CPU library with torch's CMake prefix and Ninja and runs ctest: the tile-rule and
CUDA-pipeline C++ tests (the pipeline's kernels run by the sequential launcher) and the op library
checked against the python backend. The CUDA kernel is compiled once
per CI run already (by `pip install .`), so here CMake only configures the CUDA build and the
test checks that it compiles the CUDA sources that csrc/build_settings.cmake lists.
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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cmake_4() -> str | None:
    cmake = shutil.which("cmake")
    if cmake is None:
        return None
    version = re.search(r"(\d+)\.", subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout)
    return cmake if version and int(version.group(1)) >= 4 else None


def cmake_tools() -> tuple[str, str]:
    cmake = cmake_4()
    if cmake is None:
        pytest.skip("needs cmake >= 4 (pip install -r requirements/test.txt has it)")
    if shutil.which("ninja") is None:
        pytest.skip("needs ninja")
    return cmake, shutil.which("ctest", path=os.path.dirname(cmake)) or "ctest"  # the ctest of that cmake


def run_step(step: list[str]) -> str:
    result = subprocess.run(step, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(step)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def cuda_toolkit_options() -> list[str]:
    """What torch's CMake config needs to find CUDA (a CUDA build of torch asks for it even when
    only CPU code is built); [] when torch or this machine has no CUDA toolkit."""
    cuda_home = find_cuda_home() if torch.version.cuda else None
    nvrtc = find_nvrtc(cuda_home) if cuda_home else None
    if not (cuda_home and nvrtc):
        return []
    return [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc",
            f"-DCUDA_nvrtc_LIBRARY={nvrtc}"]


def configure_command(cmake: str, build_dir, *options: str) -> list[str]:
    return [cmake, "-S", ROOT, "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}", *cuda_toolkit_options(), *options]


@pytest.mark.skipif(os.environ.get("PEAGLE_EXT_SKIP_CMAKE") == "1", reason="PEAGLE_EXT_SKIP_CMAKE=1")
def test_cmake_cpu_build_and_ctest(tmp_path):
    cmake, ctest = cmake_tools()
    run_step(configure_command(cmake, tmp_path, "-DPEAGLE_WITH_CUDA=OFF"))
    run_step([cmake, "--build", str(tmp_path), "-j", str(os.cpu_count() or 1)])
    out = run_step([ctest, "--test-dir", str(tmp_path), "--output-on-failure"])
    assert "100% tests passed out of 3" in out, out


@pytest.mark.skipif(os.environ.get("PEAGLE_EXT_SKIP_CMAKE") == "1", reason="PEAGLE_EXT_SKIP_CMAKE=1")
def test_cmake_configures_the_cuda_build_from_the_shared_source_list(tmp_path):
    cmake, _ = cmake_tools()
    if not cuda_toolkit_options():
        pytest.skip("needs a CUDA toolkit, libnvrtc and a CUDA build of torch")
    run_step(configure_command(cmake, tmp_path, "-DTORCH_CUDA_ARCH_LIST=9.0"))
    build_rules = (tmp_path / "build.ninja").read_text()
    settings = open(os.path.join(ROOT, "csrc", "build_settings.cmake")).read()
    cuda_sources = re.search(r"set\(PEAGLE_CUDA_SOURCES ([^)]*)\)", settings).group(1).split()
    for source in cuda_sources:
        assert f"{source}.o" in build_rules, f"CMake does not compile {source}"
    assert "sm_90" in build_rules
