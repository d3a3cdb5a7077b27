"""Which engine folder opens when a caller names none: one lookup order for the library, the CLI and the service.

1. the folder given: ``Pipeline.load(folder)``, ``dalle2-rt --engines DIR`` (the caller's; never looked up)
2. ``$DALLE2_RT_ENGINES``: used as given; a folder that is not there is an error, never skipped
3. ``engines/shapes-v2`` of the clone this package runs from (``make engines`` exports it from
   ``checkpoints/``, with ONNX Runtime's optimised copies), when it has been built
4. the package's own copy, ``dalle2_rt/engines/shapes-v2``: what ``pip install`` puts in site-packages
   (``make package-engines`` makes it from 3; its weights are stored in float16, ``export/package.py``)

A clone is recognised by the ``setup.py`` beside the package; an installed package has none, so step 3 never
picks a stray ``site-packages/engines``.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ENGINES = "shapes-v2"  # the default model's name: its folder in a clone and in the package
ENV = "DALLE2_RT_ENGINES"
MANIFEST = "manifest.json"
PACKAGE = Path(__file__).resolve().parents[1]  # the dalle2_rt folder


def package_engines() -> Path:
    """The engine folder the package carries (present in the wheel and in a clone)."""
    return PACKAGE / "engines" / DEFAULT_ENGINES


def clone_engines() -> Path | None:
    """``engines/shapes-v2`` of the repository this package was imported from; None outside a clone."""
    root = PACKAGE.parent
    return root / "engines" / DEFAULT_ENGINES if (root / "setup.py").is_file() else None


def lookup() -> list[tuple[str, Path]]:
    """(where, folder) in the order the default is looked up, steps 2 to 4 (those that apply here)."""
    steps = []
    if os.environ.get(ENV):
        steps.append((f"${ENV}", Path(os.environ[ENV]).expanduser()))
    if clone_engines() is not None:
        steps.append(("the clone (make engines)", clone_engines()))
    steps.append(("the package", package_engines()))
    return steps


def default_engines() -> Path:
    """The folder a pipeline opens when none is named: ``$DALLE2_RT_ENGINES`` if set (whether or not it
    exists), else the first of the clone's and the package's folders with a manifest; else the package's
    path, which ``Pipeline.load`` then reports as missing (``missing_message``)."""
    steps = lookup()
    if steps[0][0] == f"${ENV}":
        return steps[0][1]
    return next((folder for _, folder in steps if (folder / MANIFEST).is_file()), package_engines())


def source_of(folder: str | os.PathLike) -> str:
    """Which step of the lookup gives ``folder`` (for ``dalle2-rt info``), or "given" for any other one."""
    folder = Path(folder).expanduser().resolve()
    for where, candidate in lookup():
        if candidate.resolve() == folder:
            return where
    return "given (--engines / Pipeline.load)"


def missing_message(folder: Path) -> str:
    """One line for a default folder that is not there: what a pip user and a clone user can do."""
    if os.environ.get(ENV) and Path(os.environ[ENV]).expanduser() == Path(folder):
        return (f"${ENV} names {folder}, which is not an engine folder (no {MANIFEST}); point it at one, "
                f"or unset it to use the default model")
    tried = ", ".join(str(f) for _, f in lookup())
    return (f"the default engines are missing (looked in {tried}). Installed with pip: reinstall "
            f"(pip install --force-reinstall dalle2-rt), the wheel carries them. In a clone: run `make engines` "
            f"(exports checkpoints/, needs the train extra) or `make package-engines`. Or pass --engines DIR / "
            f"set {ENV}")
