"""Backends as a package: one options object, each backend refusing by name an option it does not use, no
import cycle, and Pipeline.load with no branch on a backend's name."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dalle2_rt.runtime.backends import BACKENDS, BackendOptions, OnnxRuntimeBackend, open_backend
from dalle2_rt.runtime.errors import InputError
from dalle2_rt.runtime.manifest import load_manifest
from dalle2_rt.runtime.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("private_hash_cache")


@pytest.mark.parametrize("backend,options,words", [
    ("onnxruntime", BackendOptions(url="http://localhost:8000"), "the onnxruntime backend takes no url option"),
    ("triton", BackendOptions(url="http://localhost:8000", threads=2), "the triton backend takes no threads option"),
    ("tensorrt", BackendOptions(providers=["CPUExecutionProvider"]), "the tensorrt backend takes no providers"),
    ("torch", BackendOptions(device_id=1), "the torch backend takes no device_id option"),
])
def test_an_option_the_backend_does_not_use_is_refused_by_name(tiny_engines, backend, options, words):
    """Before any package of the backend is needed (tensorrt, torch and tritonclient may be absent)."""
    with pytest.raises(InputError, match=words):
        open_backend(backend, load_manifest(tiny_engines), options)


def test_pipeline_load_passes_one_options_object_and_refuses_misplaced_options(tiny_engines):
    with pytest.raises(InputError, match="the onnxruntime backend takes no url option"):
        Pipeline.load(tiny_engines, url="http://localhost:8000")
    pipe = Pipeline.load(tiny_engines, threads=1, shared_threads=False)
    assert isinstance(pipe.backend, OnnxRuntimeBackend) and pipe.backend.options.threads == 1
    with pytest.raises(InputError, match="unknown backend 'jax'"):
        open_backend("jax", pipe.manifest)


def test_backend_modules_import_on_their_own_without_a_cycle():
    """Each backend module imports base (never the package's other backends); the package imports the triton
    module only when that backend is opened."""
    code = ("import sys; import dalle2_rt.runtime.backends.triton; "
            "assert 'dalle2_rt.runtime.backends.tensorrt' in sys.modules; "  # the package __init__ ran first
            "import dalle2_rt.runtime.backends.base as b; "
            "assert not any(m.startswith('dalle2_rt.runtime.backends.') for m in b.__dict__.get('__all__', ())); "
            "import importlib; m = importlib.reload(b)")
    subprocess.run([sys.executable, "-c", code], check=True)
    fresh = subprocess.run([sys.executable, "-c", "import sys, dalle2_rt.runtime.backends; "
                            "print('dalle2_rt.runtime.backends.triton' in sys.modules)"],
                           check=True, capture_output=True, text=True)
    assert fresh.stdout.strip() == "False"
    assert list(BACKENDS) == ["onnxruntime", "tensorrt", "torch", "triton"]
