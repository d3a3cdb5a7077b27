"""dalle2-rt: DALL-E 2 (unCLIP) inference over exported ONNX / TensorRT graphs.

    from dalle2_rt import Pipeline
    pipe = Pipeline.load()                         # the default folder (runtime/locate.py), onnxruntime
    images = pipe("a large red circle on the left", seed=0, num_images=2)   # list of PIL images

Importing the package is cheap and torch-free: ``Pipeline`` (and the names below) load on first use,
and onnxruntime only when a pipeline is opened on it.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Pipeline", "default_engines", "Dalle2RTError", "__version__"]

_LAZY = {
    "Pipeline": ("dalle2_rt.runtime.pipeline", "Pipeline"),
    "default_engines": ("dalle2_rt.runtime.pipeline", "default_engines"),
    "Dalle2RTError": ("dalle2_rt.runtime.errors", "Dalle2RTError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dalle2_rt' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
