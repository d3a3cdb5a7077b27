"""What an install of dalle2-rt puts on a user's path, and the import structure that lets it be that small.

Only ``dalle2_rt`` is installed: the exporter and the benchmarks run from a clone (``python -m export.all``,
``python -m bench``), so that no top-level ``export`` or ``bench`` of ours shadows a user's own. The expected
values come from that design, and what is checked is what setuptools builds from setup.py, not its text.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel pip builds from a copy of the repository's sources (export/ and bench/ included, so that
    leaving them out is what is tested); built outside the repository, which it would litter with build/."""
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("dalle2_rt", "export", "bench"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(src / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [path] = (src / "dist").glob("*.whl")
    return zipfile.ZipFile(path)


def test_only_dalle2_rt_is_installed(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"dalle2_rt"}
    assert "dalle2_rt/runtime/manifest.schema.json" in wheel.namelist()  # the manifest's contract ships with it


def test_the_wheel_carries_the_default_engine_folder_in_under_40_mb(wheel):
    """pip install + dalle2-rt needs no export: every file of the package's engine folder is in the wheel
    (its manifest lists them), and the wheel stays small (float16-stored weights, no optimised copies)."""
    import json

    from dalle2_rt.runtime.locate import DEFAULT_ENGINES

    folder = f"dalle2_rt/engines/{DEFAULT_ENGINES}"
    manifest = json.loads(wheel.read(f"{folder}/manifest.json"))
    shipped = {n[len(folder) + 1:] for n in wheel.namelist() if n.startswith(folder + "/")}
    assert shipped == {"manifest.json", *manifest["files"]}
    assert not any(name.endswith(".opt.onnx") for name in shipped)
    assert Path(wheel.filename).stat().st_size < 40e6


def test_console_scripts_resolve_inside_the_package(wheel):
    """Every console script points into dalle2_rt, the one package installed."""
    [entry_points] = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    targets = [line.split("=", 1)[1].strip() for line in text.splitlines() if "=" in line]
    assert targets and all(t.split(".")[0].split(":")[0] == "dalle2_rt" for t in targets), targets


def _imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file, wherever it sits (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_package_imports_neither_export_nor_bench():
    """An installed dalle2_rt has no export/ or bench/ beside it: not one of its modules may import them."""
    offenders = {str(p.relative_to(REPO)): sorted(_imports(p) & {"export", "bench"})
                 for p in sorted((REPO / "dalle2_rt").rglob("*.py")) if _imports(p) & {"export", "bench"}}
    assert offenders == {}


def _export_graph() -> dict[str, set[str]]:
    """export module -> the export modules it imports (relative or absolute, any depth in the file)."""
    graph = {}
    for path in sorted((REPO / "export").glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
                elif node.level == 0 and node.module and node.module.split(".")[0] == "export":
                    parts = node.module.split(".")
                    deps.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("export."))
        graph[path.stem] = deps - {path.stem}
    return graph


def test_export_modules_import_no_cycle():
    """The two families feed one driver; neither imports the other's entry point back (no all <-> diffusers)."""
    graph = _export_graph()
    assert "all" not in graph["diffusers_unclip"] and "all" not in graph["driver"]
    assert "driver" in graph["all"] and "driver" in graph["diffusers_unclip"]
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, dep])}")
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("module", ["export.all", "bench"])
def test_clone_entry_points_run_from_the_repository_root(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
