"""``python -m peagle_ext info``: versions, the compiled kernels and where they were loaded from,
and the backends that run here."""

from __future__ import annotations

from . import parser_for


def main(argv: list[str]) -> int:
    parser_for("info").parse_args(argv)  # no options: anything given is an error
    import torch

    from .. import __file__ as package_file
    from .. import __version__, _native
    from ..block_mask import available_backends

    print(f"peagle_ext {__version__} from {package_file.removesuffix('/__init__.py')}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"CUDA available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    kernels = _native.compiled_kernels()
    print(f"compiled kernels: {', '.join(kernels) or 'none'}"
          + (f" (CUDA archs {_native.cuda_archs()})" if "cuda" in kernels else "")
          + (f" from {_native.library_path()}" if kernels else ""))
    for backend, reason in _native.native_status().items():
        print(f"  {backend}: {'runs here' if reason is None else 'unavailable: ' + reason}")
    print(f"available backends: {', '.join(available_backends())}")
    if _native.native_status()["cpu"] is not None:
        print(f"to build the compiled kernels here, {_native.REBUILD_HINT}")
    return 0
