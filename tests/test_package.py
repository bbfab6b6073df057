"""The package as users meet it: what `import peagle_ext` costs, and the documented module paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_documented_module_paths_serve_the_modules_names():
    """``peagle_ext.{checkpoint,training,draft_llama}`` re-export the names of the modules under
    ``peagle_ext.draft`` (one module each, at one path)."""
    result = run_python(
        "import sys, peagle_ext.checkpoint, peagle_ext.training, peagle_ext.draft_llama\n"
        "from peagle_ext.draft import checkpoint, llama, training\n"
        "for alias, module in [(peagle_ext.checkpoint, checkpoint), (peagle_ext.training, training),\n"
        "                      (peagle_ext.draft_llama, llama)]:\n"
        "    assert alias is not module\n"
        "    names = [n for n in vars(alias) if not n.startswith('_')]\n"
        "    assert names and all(getattr(alias, n) is getattr(module, n) for n in names), alias\n"
        "assert set(training.__all__) <= set(vars(peagle_ext.training))\n"
        "assert peagle_ext.Eagle3DraftConfig is llama.Eagle3DraftConfig\n"
    )
    assert result.returncode == 0, result.stderr


def test_the_draft_model_imports_no_training_code():
    """Imports go one way: training -> model, never back (the model's forward needs the flat inputs only)."""
    result = run_python(
        "import sys, peagle_ext.draft.llama\n"
        "assert 'peagle_ext.draft.training' not in sys.modules, 'the model imported the training code'\n"
    )
    assert result.returncode == 0, result.stderr


def _package_imports() -> dict[str, set[str]]:
    """{module: the peagle_ext modules it imports}, read from the source of every module of the package
    (imports inside functions included: a lazy import closes a cycle as well)."""
    import ast

    root = Path(ROOT) / "peagle_ext"
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        names[".".join(parts[:-1] if is_package else parts)] = (path, is_package)

    graph = {}
    for module, (path, is_package) in names.items():
        package = module if is_package else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name.split(".")[0] == "peagle_ext")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = ".".join([base, node.module]) if node.module else base
                elif node.module and node.module.split(".")[0] == "peagle_ext":
                    base = node.module
                else:
                    continue
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    edges.add(candidate if candidate in names else base)
        graph[module] = {edge for edge in edges if edge in names and edge != module}
    return graph


def test_the_package_has_no_import_cycle():
    graph = _package_imports()
    assert "peagle_ext.cli.demo" in graph and "peagle_ext.draft.llama" in graph["peagle_ext.draft.training"]
    done, path = set(), []

    def visit(module):
        if module in path:
            cycle = path[path.index(module):] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
