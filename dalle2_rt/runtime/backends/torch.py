"""The ``torch`` backend, the reference: the PyTorch modules rebuilt from the manifest's ``sources`` checkpoints
(``runtime/torch_reference.py``, imported lazily with torch; needs the train extra)."""
from __future__ import annotations

import threading

from ..errors import BackendUnavailableError, EngineFolderError
from ..manifest import GraphSpec, Manifest, sha256_file
from .base import NO_OPTIONS, Backend, BackendOptions, Engine


class TorchEngine(Engine):
    def __init__(self, spec: GraphSpec, module, torch, description: str):
        super().__init__(spec, description)
        self.module, self.torch = module, torch

    def _run(self, feeds):
        torch = self.torch
        with torch.inference_mode():
            out = self.module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        outs = out if isinstance(out, tuple | list) else (out,)
        return {t.name: o.float().numpy().astype(t.dtype, copy=False) for t, o in zip(self.spec.outputs, outs)}


class TorchBackend(Backend):
    """Reference backend: the PyTorch modules rebuilt from the manifest's ``sources`` checkpoints."""

    name = "torch"
    takes = frozenset({"threads"})

    def __init__(self, manifest: Manifest, options: BackendOptions = NO_OPTIONS):
        super().__init__(manifest, options)
        threads = options.threads
        try:
            import torch

            from .. import torch_reference
        except ImportError as e:
            raise BackendUnavailableError(f"the torch backend needs the train extra "
                                          f"(pip install 'dalle2-rt[train]'): {e}") from None
        if threads:
            torch.set_num_threads(int(threads))
        self.torch, self.manifest, self._ref = torch, manifest, torch_reference
        self._lock = threading.Lock()
        self._sources: dict[str, object] = {}  # source name -> loaded checkpoint (CLIP is shared by 2 graphs)

    def engine(self, graph: str) -> TorchEngine:
        spec = self.manifest.graphs[graph]
        source = self._ref.source_name(graph, spec.raw, self.manifest.sources)
        with self._lock:
            if source not in self._sources:
                folder = self._ref.resolve_source(self.manifest, source)
                expected = self.manifest.sources[source].get("sha256")
                weights = folder / "model.safetensors"
                if expected and sha256_file(weights) != expected:
                    raise EngineFolderError(f"{weights}: sha256 does not match the manifest's sources.{source}")
                self._sources[source] = self._ref.load_source(folder)
        module = self._ref.graph_module(graph, self._sources[source])
        return TorchEngine(spec, module, self.torch, f"torch {self.torch.__version__} {source}")

    def describe(self) -> str:
        return f"torch {self.torch.__version__} (reference)"
