"""Loading the compiled extension, and what it can run here.

A missing or broken extension never breaks ``import peagle_ext``: the python backend serves and
:func:`native_status` says why the native ones are unavailable.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _load() -> tuple[str | None, str | None]:
    """(build_info, error): build_info like "cpu;cuda:80,90" when the library loaded."""
    try:
        # ops loads the compiled library (registering torch.ops.peagle_ext.*) and its fake kernels.
        from . import ops  # noqa: F401
    except ImportError as error:  # not compiled, or compiled against another torch
        return None, f"compiled extension not importable ({error})"

    return torch.ops.peagle_ext.build_info(), None


def compiled_kernels() -> list[str]:
    """Kernels compiled into the installed extension: subset of ["cpu", "cuda"]."""
    info, _ = _load()
    if info is None:
        return []
    return [part.split(":")[0] for part in info.split(";")]


def cuda_archs() -> str | None:
    """CUDA architectures the CUDA kernels were built for, e.g. "80,90"."""
    info, _ = _load()
    for part in (info or "").split(";"):
        if part.startswith("cuda:"):
            return part[len("cuda:"):]
    return None


def native_status() -> dict[str, str | None]:
    """For each native backend: None when it can run here, else the reason it cannot."""
    info, error = _load()
    status: dict[str, str | None] = {}
    for backend in ("cpu", "cuda"):
        if error is not None:
            status[backend] = error
        elif backend not in compiled_kernels():
            status[backend] = f"the extension was built without {backend.upper()} kernels"
        elif backend == "cuda" and not torch.cuda.is_available():
            status[backend] = "no CUDA device is available"
        else:
            status[backend] = None
    return status
