"""One build for every torch: the compiled libraries use only the LibTorch stable ABI, the CUDA
library's absence is reported where users look, and backend="auto" says when it falls back."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings

import pytest
import torch

import peagle_ext
from peagle_ext import _native
from peagle_ext import block_mask as block_mask_module


def compiled_libraries() -> list[str]:
    path = _native.library_path()
    if path is None:
        pytest.skip(f"the compiled kernels did not load: {_native.native_status()['cpu']}")
    folder = os.path.dirname(path)
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.startswith(("peagle_ext_C.", "peagle_ext_cuda.")) and name.endswith(".so")]


def test_compiled_libraries_use_only_the_stable_abi_and_the_limited_python_api():
    """Every torch symbol they import is a C shim function: none of libtorch's C++ (c10::, at::,
    torch::), whose mangled names change from release to release, and nothing of CPython beyond
    its limited API (abi3 modules)."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs nm (binutils)")
    libraries = compiled_libraries()
    assert any(os.path.basename(lib).startswith("peagle_ext_C.abi3") for lib in libraries), libraries
    for library in libraries:
        assert ".abi3." in os.path.basename(library), f"{library} is not a limited-API (abi3) module"
        undefined = subprocess.run([nm, "-D", "--undefined-only", library], capture_output=True, text=True,
                                   check=True).stdout.split()
        cxx_torch = [s for s in undefined if s.startswith(("_ZN3c10", "_ZNK3c10", "_ZN2at", "_ZNK2at", "_ZN5torch",
                                                             "_ZNK5torch"))]
        assert not cxx_torch, f"{library} imports libtorch C++ symbols: {cxx_torch[:5]}"
        assert any(s.startswith(("aoti_torch_", "torch_")) for s in undefined), f"{library}: no stable C shim calls"


def test_cuda_library_status_says_why_it_is_missing():
    """Where the CUDA kernels were built but cannot load (a CPU-only torch has no CUDA runtime),
    the CPU kernel still runs and the cuda backend names the reason."""
    if "cuda" not in _native.compiled_kernels():
        pytest.skip("this build has no CUDA kernels")
    status = _native.native_status()
    assert status["cpu"] is None
    if torch.version.cuda is None:
        assert status["cuda"].startswith("the CUDA kernels' library did not load"), status["cuda"]
    elif not torch.cuda.is_available():
        assert status["cuda"] == "no CUDA device is available"
    else:
        assert status["cuda"] is None


@pytest.fixture
def cpu_kernel_missing(monkeypatch):
    """native_status as it reads where the compiled library did not load."""
    reason = "compiled extension not importable (test)"
    status = dict.fromkeys(("cpu", "cuda", "cuda_emulated"), reason)
    monkeypatch.setattr(_native, "native_status", lambda: status)
    monkeypatch.setattr(block_mask_module, "_fallbacks_warned", set())
    monkeypatch.delenv("PEAGLE_EXT_REQUIRE_NATIVE", raising=False)
    return reason


def small_mask(**kwargs):
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(64, torch.ones(64))
    return peagle_ext.build_block_mask(anchor_pos, depth, torch.tensor([64]), 64, **kwargs)


def test_auto_falling_back_to_python_warns_once_saying_why_and_how_to_rebuild(cpu_kernel_missing):
    with pytest.warns(RuntimeWarning) as caught:
        small_mask()
    message = str(caught[0].message)
    assert cpu_kernel_missing in message and "python backend" in message and "pip install" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_mask()  # once is enough
        small_mask(backend="python")  # asked for: no warning


def test_require_native_turns_the_fallback_into_an_error(cpu_kernel_missing, monkeypatch):
    monkeypatch.setenv("PEAGLE_EXT_REQUIRE_NATIVE", "1")
    with pytest.raises(RuntimeError, match="PEAGLE_EXT_REQUIRE_NATIVE=1"):
        small_mask()


def test_info_names_the_reason_and_the_rebuild(cpu_kernel_missing, capsys):
    from peagle_ext.cli import info

    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert f"cpu: unavailable: {cpu_kernel_missing}" in out
    assert "pip install --no-build-isolation" in out
