"""Backends: one call signature, ``engine(**arrays) -> dict[str, np.ndarray]``, for every way to run a graph.

A backend turns a graph of the manifest into an ``Engine``. Inputs are cast to the dtypes the manifest
records for the graph (never hard-coded here) and checked by name; outputs come back as numpy arrays keyed
by the manifest's output names. The pipeline's loop is written once against this signature.

- ``onnxruntime``: one InferenceSession per graph. Providers are tried in the order TensorRT EP, CUDA EP,
  CPU among ``ort.get_available_providers()``, dropping the first one whose session cannot be created.
  The exporter's optimised graph (``*.opt.onnx``) is used only when the provider that actually runs it
  is the one it was optimised for (its fused nodes are provider specific), else the plain ``.onnx``. On the
  CPU provider a folder without a valid optimised graph (the package's copy ships none) gets one made at
  first use and kept in the user cache directory, ``<cache>/ort-optimized`` (``DALLE2_RT_ORT_CACHE=0``: off).
  ``InferenceSession.run`` is thread-safe, so one engine serves concurrent pipeline calls.
  Threads: by default each session has its own intra-op pool whose idle workers do not spin (spinning
  workers of the graph that just ran take the cores the next graph needs). ``shared_pool=True`` (the CLI's
  choice) makes every session use one process-wide pool (``make_shared_thread_pool``), faster still, but
  ONNX Runtime then refuses any session in the process that wants its own pool, so a library must not do
  it behind its host's back: it is opt-in. Once the process has global pools (ours or anyone's), sessions
  use them. Measured for one image on 2 cores (bench/RESULTS.md, "ORT threads", at 5/10/3 and 25/25/7
  steps; shapes-v1's defaults were 5/5/3): spinning own pools 233 / 441 ms, non-spinning own pools
  170 / 398 ms, shared pool 142 / 335 ms.
- ``tensorrt``: native ``.plan`` engines through the TensorRT 10 Python API and cuda-python. The plan for
  this GPU and TensorRT version is chosen by ``trt_keys``; an execution context is not re-entrant, so
  each engine serialises its calls with a lock.
- ``triton``: each graph call an inference request to a Triton Inference Server (``url=`` http://, grpc://,
  or ``bls`` inside a Triton Python-backend model); ``triton.py``.
- ``torch``: the reference. Rebuilds the PyTorch modules from the source checkpoints recorded in the
  manifest (``sources``) and runs the same loop on them; imports torch lazily and needs the train extra.

One module each (``onnxruntime.py``, ``tensorrt.py``, ``torch.py``, ``triton.py``) over ``base.py`` (``Engine``,
``BackendOptions``, ``Backend``); every backend is built as ``Backend(manifest, BackendOptions(...))`` and
refuses, by name, an option it does not use. ``open_backend`` finds a backend by name in ``BACKENDS`` and
imports its module only then. Nothing here imports onnxruntime, tensorrt or torch at module import time.
"""
from __future__ import annotations

import importlib

from ..errors import InputError
from ..manifest import Manifest
from .base import NO_OPTIONS, Backend, BackendOptions, Engine
from .onnxruntime import (
    CACHE_KEEP_DAYS,
    ORT_PROVIDER_ORDER,
    PER_SESSION_REFUSED,
    OnnxRuntimeBackend,
    OrtEngine,
    make_shared_thread_pool,
)
from .tensorrt import TRT_NEEDS, TensorRTBackend, TrtEngine
from .torch import TorchBackend, TorchEngine

# name -> (module, class); a module is imported when its backend is opened
BACKENDS = {"onnxruntime": (".onnxruntime", "OnnxRuntimeBackend"), "tensorrt": (".tensorrt", "TensorRTBackend"),
            "torch": (".torch", "TorchBackend"), "triton": (".triton", "TritonBackend")}

__all__ = ["BACKENDS", "CACHE_KEEP_DAYS", "ORT_PROVIDER_ORDER", "PER_SESSION_REFUSED", "TRT_NEEDS", "Backend",
           "BackendOptions", "Engine", "OnnxRuntimeBackend", "OrtEngine", "TensorRTBackend", "TorchBackend",
           "TorchEngine", "TrtEngine", "make_shared_thread_pool", "open_backend"]


def open_backend(name: str, manifest: Manifest, options: BackendOptions = NO_OPTIONS) -> Backend:
    """The backend called ``name`` (one of ``BACKENDS``) over ``manifest``, opened with ``options``."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module, __name__), cls)(manifest, options)
