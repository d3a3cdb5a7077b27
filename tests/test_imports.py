"""The import rule, read from the source (ARCHITECTURE.md, "Import rule"): ``dalle2_rt.runtime``,
``dalle2_rt.world`` and ``dalle2_rt.cli`` (and the package's ``__init__``) never import torch, onnx,
open_clip, ``dalle2_rt.models``, ``dalle2_rt.training`` or ``export``.

Every ``import`` / ``from … import`` statement of those files is resolved to an absolute module name
(relative imports included) wherever it stands, at module level or inside a function: a lazy import is
still an import the file makes. ``tests/test_no_torch.py`` checks what a real generation loads; this test
catches the imports that generation does not reach (an error path, another backend) and names the line.

The one exception is the torch reference backend, stated in ``ALLOWED`` with its reason.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKED = ["dalle2_rt/__init__.py", "dalle2_rt/cli.py", "dalle2_rt/runtime", "dalle2_rt/world"]
FORBIDDEN = ("torch", "onnx", "open_clip", "dalle2_rt.models", "dalle2_rt.training", "export",
             # the torch backend's own module: it imports torch, so reaching it is reaching torch
             "dalle2_rt.runtime.torch_reference")

# (file, forbidden module) -> (where the import may stand, why)
ALLOWED = {
    ("dalle2_rt/runtime/backends/torch.py", "torch"):
        ("lazy", "TorchBackend, the reference backend, opens torch only when a pipeline is loaded on it"),
    ("dalle2_rt/runtime/backends/torch.py", "dalle2_rt.runtime.torch_reference"):
        ("lazy", "TorchBackend loads its checkpoint rebuilder only when a pipeline is loaded on it"),
    ("dalle2_rt/runtime/torch_reference.py", "torch"):
        ("anywhere", "the torch backend's loader; only TorchBackend imports this file, lazily (rule above)"),
    ("dalle2_rt/runtime/torch_reference.py", "dalle2_rt.models"):
        ("anywhere", "it rebuilds the networks through dalle2_rt.models.registry (never dalle2_rt.training)"),
}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository
    line: int
    module: str  # absolute, e.g. "dalle2_rt.models.registry"
    lazy: bool  # inside a function body (runs only when called)


def module_name(path: Path) -> str:
    """dalle2_rt/runtime/backends.py -> dalle2_rt.runtime.backends; a package's __init__ -> the package."""
    parts = list(path.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, file: str) -> list[Import]:
    """Every import statement of a module's source, resolved to absolute module names.

    ``from pkg import name`` yields both ``pkg`` and ``pkg.name`` (the name may be a submodule:
    ``from dalle2_rt import training``). Relative imports resolve against the file's package.
    """
    tree = ast.parse(source, filename=file)
    package = module_name(Path(file)).split(".")
    if not file.endswith("__init__.py"):
        package = package[:-1]
    found = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend(Import(file, child.lineno, a.name, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[:len(package) - (child.level - 1)] if child.level > 1 else package
                    root = ".".join(base + ([child.module] if child.module else []))
                else:
                    root = child.module
                found.append(Import(file, child.lineno, root, lazy))
                found.extend(Import(file, child.lineno, f"{root}.{a.name}", lazy) for a in child.names if a.name != "*")
            visit(child, inner)

    visit(tree, False)
    return found


def forbidden(imp: Import) -> str | None:
    """The forbidden module ``imp`` reaches (None: allowed), after the allow-list."""
    for root in FORBIDDEN:
        if imp.module == root or imp.module.startswith(root + "."):
            where, _ = ALLOWED.get((imp.file, root), (None, None))
            if where == "anywhere" or (where == "lazy" and imp.lazy):
                return None
            return root
    return None


def violations(files: list[Path]) -> list[str]:
    out = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        for imp in imports(path.read_text(encoding="utf-8"), rel):
            root = forbidden(imp)
            if root:
                how = "lazily " if imp.lazy else ""
                out.append(f"{imp.file}:{imp.line}: imports {imp.module} {how}(the rule forbids {root})")
    return out


def checked_files() -> list[Path]:
    files = []
    for entry in CHECKED:
        path = REPO / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_runtime_world_and_cli_import_no_torch_onnx_models_training_or_export():
    files = checked_files()
    assert len(files) > 20 and REPO / "dalle2_rt/runtime/pipeline.py" in files
    problems = violations(files)
    assert not problems, "import rule broken:\n" + "\n".join(problems)


def test_every_allowed_import_is_still_made():
    """An allow-list entry that matches nothing is stale: remove it (the rule is then stricter)."""
    made = {(imp.file, root) for path in checked_files()
            for imp in imports(path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix())
            for root in FORBIDDEN if imp.module == root or imp.module.startswith(root + ".")}
    assert set(ALLOWED) <= made, set(ALLOWED) - made


SAMPLE = '''
import numpy as np
import onnxruntime
from . import samplers
from .. import training
from ..models.prior import DiffusionPrior
import onnx.helper


def load():
    import torch
    from export import all
    from .torch_reference import load_source
    return torch
'''


@pytest.mark.parametrize("file,flagged", [
    ("dalle2_rt/runtime/sample.py", [(5, "dalle2_rt.training"), (6, "dalle2_rt.models"), (7, "onnx"),
                                     (11, "torch"), (12, "export"), (13, "dalle2_rt.runtime.torch_reference")]),
    # the torch backend's lazy imports are allowed in backends/torch.py; module-level ones are not (one level
    # deeper, its ".." is dalle2_rt.runtime: "from .. import training" names no forbidden module there)
    ("dalle2_rt/runtime/backends/torch.py", [(7, "onnx"), (12, "export")]),
])
def test_the_checker_resolves_relative_and_lazy_imports(file, flagged):
    """The checker itself on a made-up module: relative imports resolved against the file's package, lazy
    ones found, onnxruntime and numpy not mistaken for onnx or anything else."""
    found = [(imp.line, forbidden(imp)) for imp in imports(SAMPLE, file) if forbidden(imp)]
    assert sorted(set(found)) == flagged
    names = {imp.module for imp in imports(SAMPLE, file)}
    here = file.rsplit("/", 1)[0].replace("/", ".")  # the file's package: "." and ".." resolve against it
    up = here.rsplit(".", 1)[0]
    assert {f"{here}.samplers", f"{up}.training", f"{up}.models.prior.DiffusionPrior"} <= names
    top = [imp for imp in imports("import torch\n", "dalle2_rt/runtime/backends/torch.py")]
    assert [forbidden(imp) for imp in top] == ["torch"]  # allowed lazily only
