"""The separate venv that holds DALLE2-pytorch 1.15.6 for the side-by-side (never a project dependency).

    python -m bench.dalle2_venv          # create bench/.venv-dalle2 if it is missing or broken

torch and torchvision are named at the versions this machine already has (pip takes them from its local
wheel index / cache instead of downloading gigabytes); DALLE2-pytorch's other requirements come from the
package index.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".venv-dalle2"
PYTHON = VENV / "bin" / "python"
PACKAGES = ["dalle2-pytorch==1.15.6", "torch==2.14.1", "torchvision==0.29.1"]


def ready() -> bool:
    if not PYTHON.exists():
        return False
    probe = subprocess.run([str(PYTHON), "-c", "import dalle2_pytorch, torch"], capture_output=True)
    return probe.returncode == 0


def ensure(log=print) -> Path:
    """Path of the venv's python, creating the venv first when needed (minutes, once)."""
    if ready():
        return PYTHON
    base = getattr(sys, "_base_executable", None) or sys.executable
    log(f"creating {VENV} ({' '.join(PACKAGES)}) …")
    subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", *PACKAGES], check=True)
    if not ready():
        raise RuntimeError(f"{VENV}: dalle2_pytorch still does not import")
    return PYTHON


if __name__ == "__main__":
    print(ensure())
