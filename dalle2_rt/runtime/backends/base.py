"""What every backend shares: ``Engine`` (the ``engine(**arrays) -> dict`` call, inputs cast to the manifest's
dtypes and checked by name), ``BackendOptions`` (the one options object) and ``Backend`` (the base that
refuses an option it does not use, by name, instead of swallowing it)."""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..errors import InputError
from ..manifest import GraphSpec, Manifest


@dataclass(frozen=True)
class BackendOptions:
    """How to open a backend; None = not given (the backend's default). A backend names the options it uses
    (``Backend.takes``); giving one it does not use is an ``InputError``."""

    threads: int | None = None  # CPU threads per graph
    device_id: int | None = None  # the GPU (default 0)
    providers: tuple[str, ...] | None = None  # onnxruntime execution providers to try, in order
    # the process is the caller's own, so its thread pools may be process-wide (a permission: a backend
    # without CPU thread pools has nothing to share and ignores it; onnxruntime uses one global pool)
    shared_pool: bool = False
    url: str | None = None  # the Triton server: http://HOST:8000, grpc://HOST:8001, or bls
    timeout: float | None = None  # seconds per request to a server
    # run a graph's int8 variant on the CPU where the folder has one (None: where the CPU has int8 dot products,
    # runtime/cpu.py)
    int8: bool | None = None

    def given(self) -> list[str]:
        """The options a backend must use to honour them. Not ``shared_pool`` (a permission) nor ``int8=False``
        (fp32 only: what a backend without int8 does anyway)."""
        return [f.name for f in fields(self) if f.name != "shared_pool" and getattr(self, f.name) is not None
                and not (f.name == "int8" and self.int8 is False)]


NO_OPTIONS = BackendOptions()


class Backend:
    """A way to run the manifest's graphs: ``engine(graph) -> Engine``, ``describe() -> str``."""

    name = ""
    takes: frozenset[str] = frozenset()  # the BackendOptions fields this backend uses
    _int8: set[str] | frozenset[str] = frozenset()  # graphs running their int8 variant (a backend that has them)

    def __init__(self, manifest: Manifest, options: BackendOptions):
        unused = [name for name in options.given() if name not in self.takes]
        if unused:
            raise InputError(f"the {self.name} backend takes no {', '.join(unused)} option "
                             f"(it takes: {', '.join(sorted(self.takes)) or 'none'})")
        self.manifest, self.options = manifest, options

    def engine(self, graph: str) -> Engine:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    @property
    def int8_running(self) -> list[str]:
        """The graphs whose int8 variant this backend runs (their pixels differ from the fp32 graphs')."""
        return sorted(self._int8)


class Engine:
    """A graph ready to run: ``engine(**arrays) -> {output name: array}``."""

    def __init__(self, spec: GraphSpec, description: str):
        self.spec = spec
        self.name = spec.name
        self.description = description  # e.g. "onnxruntime[CPUExecutionProvider] decoder.opt.onnx"
        self.max_batch = spec.max_batch

    def _feeds(self, arrays: dict) -> dict[str, np.ndarray]:
        names = [t.name for t in self.spec.inputs]
        missing = [n for n in names if n not in arrays]
        extra = [n for n in arrays if n not in names]
        if missing or extra:
            raise InputError(f"graph {self.name!r} takes inputs {names}; missing {missing}, unexpected {extra}")
        return {t.name: np.ascontiguousarray(arrays[t.name], dtype=t.dtype) for t in self.spec.inputs}

    def __call__(self, **arrays) -> dict[str, np.ndarray]:
        outs = self._run(self._feeds(arrays))
        return {t.name: np.asarray(outs[t.name]) for t in self.spec.outputs}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError
