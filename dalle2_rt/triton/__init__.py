"""Triton Inference Server pieces that run inside (or start) a server; torch-free.

- ``graph_model.py``: a Python-backend model that runs one ONNX graph with onnxruntime: the stand-in for
  Triton's own ``onnxruntime_onnx`` backend where the server has only the Python backend (pytriton's
  bundled ``tritonserver``, which is how the tests run a real server on a CPU machine).
- ``orchestrator_model.py``: the Python-backend model that runs the diffusion loop. It is the runtime's
  own ``Pipeline`` on the ``triton`` backend (``dalle2_rt/runtime/backends/triton.py``) whose engine call is
  a BLS request to the graph models, not a second copy of the loop.
- ``server.py``: starts a ``tritonserver`` binary on loopback (free ports, bounded waits, shutdown), and
  ``python -m dalle2_rt.triton.server REPO --demo PROMPT`` generates one image through it.

The model repository itself is written by ``python -m export.triton ENGINES --out REPO`` (``export/triton.py``),
which copies the two model files above into it, with this package and the runtime vendored beside them.
"""
