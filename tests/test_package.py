"""The package as users meet it: what `import peagle_ext` costs, and the documented module paths."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_building_a_mask_imports_neither_the_draft_model_nor_safetensors():
    result = run_python(
        "import sys, torch, peagle_ext\n"
        "a, d = peagle_ext.generate_cod_sample_indices(64, torch.ones(64))\n"
        "peagle_ext.build_block_mask(a, d, torch.tensor([64]), 64)\n"
        "loaded = [m for m in ('peagle_ext.draft', 'peagle_ext.cli', 'safetensors') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "print(peagle_ext.LlamaEagle3DraftModel.__module__)\n"  # served on first use
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "peagle_ext.draft.llama"


def test_documented_module_paths_are_the_modules_themselves():
    result = run_python(
        "import sys, peagle_ext.peagle_draft, peagle_ext.draft_llama, peagle_ext.training, peagle_ext.checkpoint\n"
        "from peagle_ext import draft\n"
        "for old, new in [('peagle_draft', 'peagle_draft'), ('draft_llama', 'llama'), ('training', 'training'),\n"
        "                 ('checkpoint', 'checkpoint')]:\n"
        "    assert sys.modules['peagle_ext.' + old] is sys.modules['peagle_ext.draft.' + new], old\n"
        "    assert getattr(peagle_ext, old) is getattr(draft, new), old\n"
        "from peagle_ext.training import peagle_training_step, PeagleStepOutput\n"
        "from peagle_ext.draft_llama import Eagle3DraftConfig, LlamaEagle3DraftModel\n"
        "assert peagle_ext.Eagle3DraftConfig is Eagle3DraftConfig\n"
    )
    assert result.returncode == 0, result.stderr


def test_the_draft_model_imports_no_training_code():
    """Imports go one way: training -> model, never back (the model's forward needs the flat inputs only)."""
    result = run_python(
        "import sys, peagle_ext.draft.llama\n"
        "assert 'peagle_ext.draft.training' not in sys.modules, 'the model imported the training code'\n"
    )
    assert result.returncode == 0, result.stderr
