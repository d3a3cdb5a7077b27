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
  or ``bls`` inside a Triton Python-backend model); ``triton_backend.py``.
- ``torch``: the reference. Rebuilds the PyTorch modules from the source checkpoints recorded in the
  manifest (``sources``) and runs the same loop on them; imports torch lazily and needs the train extra.

Nothing here imports onnxruntime, tensorrt or torch at module import time.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np

from .errors import BackendUnavailableError, EngineFolderError, InputError
from .manifest import GraphSpec, Manifest, graph_io_problems, sha256_file, user_cache_dir

BACKENDS = ("onnxruntime", "tensorrt", "torch", "triton")
ORT_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
TRT_NEEDS = "TensorRT backend needs tensorrt and a CUDA GPU"


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


# --------------------------------------------------------------------------------------------------------
# ONNX Runtime


class OrtEngine(Engine):
    def __init__(self, spec: GraphSpec, session, file: Path):
        super().__init__(spec, f"onnxruntime[{','.join(session.get_providers())}] {file.name}")
        self.session, self.file, self.providers = session, file, session.get_providers()
        problems = graph_io_problems(spec, session.get_inputs(), session.get_outputs())  # names, dtypes, shapes
        if problems:
            raise EngineFolderError(f"{file}: {'; '.join(problems)} (graphs.{spec.name} of the manifest)")
        self._output_names = [t.name for t in spec.outputs]

    def _run(self, feeds):
        return dict(zip(self._output_names, self.session.run(self._output_names, feeds)))


_POOL_LOCK = threading.Lock()
_SHARED_POOL: dict = {}  # "threads": its size (0 = ORT's default) once this process has global pools
PER_SESSION_REFUSED = "use_per_session_threads must be false"  # ORT's error once global pools exist
CACHE_KEEP_DAYS = 30  # optimised copies in the user cache unused this long are removed when one is made


def make_shared_thread_pool(ort, threads: int | None) -> int:
    """Make (once per process) ONNX Runtime's global intra-op pool with ``threads`` threads (None: ORT's
    default); returns the size of the process's pool (0: ORT's default, -1: made by other code, size unknown).
    A later call with another size gets the existing pool: it cannot be replaced."""
    with _POOL_LOCK:
        if "threads" not in _SHARED_POOL:
            try:
                ort.set_global_thread_pool_sizes(int(threads or 0), 1)
                _SHARED_POOL["threads"] = int(threads or 0)
            except Exception:  # noqa: BLE001 - "already created": made elsewhere in this process
                _SHARED_POOL["threads"] = -1
        return _SHARED_POOL["threads"]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, *, providers: list[str] | None = None, threads: int | None = None,
                 device_id: int = 0, shared_pool: bool = False):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError("the onnxruntime backend needs the onnxruntime package") from None
        self.ort, self.manifest, self.threads, self.device_id = ort, manifest, threads, device_id
        available = ort.get_available_providers()
        if providers is None:
            self.providers = [p for p in ORT_PROVIDER_ORDER if p in available]
        else:
            unknown = [p for p in providers if p not in available]
            if unknown:
                raise BackendUnavailableError(f"onnxruntime providers {unknown} are not available here "
                                              f"(available: {', '.join(available)})")
            self.providers = list(providers)
        if not self.providers:
            raise BackendUnavailableError(f"onnxruntime offers none of {ORT_PROVIDER_ORDER} (has {available})")
        self.version = ort.__version__
        self._used: set[str] = set()  # providers that actually run a graph (for metadata)
        self.shared_pool = False  # True: sessions use the process-wide pool (asked for, or forced by ORT)
        if shared_pool or "threads" in _SHARED_POOL:
            make_shared_thread_pool(ort, threads)
            self.shared_pool = True

    def _options(self):
        so = self.ort.SessionOptions()
        so.log_severity_level = 3  # errors only: provider fallback warnings are handled here
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No CPU arena and no memory-pattern planning: the arena keeps the largest batch's activations for the
        # life of the session (peak RSS of 8 images 603 -> 295 MB with both off, no slower; bench/RESULTS.md).
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        if self.shared_pool:
            so.use_per_session_threads = False
            return so
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
            so.inter_op_num_threads = 1
        return so

    def _provider_entry(self, provider: str, spec: GraphSpec):
        if provider == "CUDAExecutionProvider":
            return provider, {"device_id": self.device_id}
        if provider == "TensorrtExecutionProvider":
            opts = {"device_id": self.device_id, "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(user_cache_dir() / "ort-trt" / self.manifest.sha256[:16])}
            opts.update(_trt_ep_profile(spec))
            return provider, opts
        return provider

    def _file_for(self, spec: GraphSpec, provider: str) -> Path:
        """The optimised graph when it was made for ``provider`` (and this ORT, where recorded)."""
        made_for = spec.optimized_for
        if spec.optimized_file is None or made_for.get("provider") != provider:
            return spec.file
        if made_for.get("onnxruntime") not in (None, self.version):
            return spec.file
        return spec.optimized_file

    def engine(self, graph: str) -> OrtEngine:
        spec = self.manifest.graphs[graph]
        errors = []
        for start in range(len(self.providers)):
            chain = self.providers[start:]
            file = self._file_for(spec, chain[0])
            cached = self._cached_copy(spec, chain[0]) if file == spec.file else None
            try:
                if cached is not None:
                    session, file = self._cached_session(spec, chain, cached)
                else:
                    session = self._session(file, chain, spec)
                actual = session.get_providers()[0]
                if file != spec.file and actual != chain[0]:  # ORT fell back silently: opt graph is not for it
                    session = self._session(spec.file, session.get_providers(), spec)
                    file = spec.file
            except EngineFolderError:
                raise
            except Exception as e:  # noqa: BLE001 - any provider failure: try the next one
                errors.append(f"{chain[0]}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            self._used.add(session.get_providers()[0])
            return OrtEngine(spec, session, file)
        raise BackendUnavailableError(f"onnxruntime cannot load {spec.file.name}: {'; '.join(errors)}")

    def _cached_copy(self, spec: GraphSpec, provider: str) -> Path | None:
        """Where ONNX Runtime's optimised copy of ``spec``'s plain graph lives in the user cache directory, for
        a folder that ships none valid here (the package's copy ships none, to stay small); None: not cached
        (another provider, whose fused nodes differ, or ``DALLE2_RT_ORT_CACHE=0``). Named by the sha256 of
        the graph and of its weights files as the manifest records them, and by the ORT version."""
        if provider != "CPUExecutionProvider" or os.environ.get("DALLE2_RT_ORT_CACHE", "1") == "0":
            return None
        folder = self.manifest.folder
        digests = [self.manifest.files.get(spec.file.relative_to(folder).as_posix())]
        digests += [self.manifest.files.get(name) for name in spec.raw.get("external_data", [])]
        if not all(digests):
            return None
        key = hashlib.sha256("\n".join(digests).encode()).hexdigest()[:32]
        return user_cache_dir() / "ort-optimized" / f"{spec.name}-{key}-cpu-ort{self.version}.onnx"

    def _cached_session(self, spec: GraphSpec, chain: list[str], cached: Path):
        """(session, file) on the cached optimised copy, made first when missing: ORT optimises the plain graph
        at the exporter's level (``extended``: portable across CPUs) into ``cached``, written aside and renamed
        so that a reader never sees half a file. The first process then opens the copy like every later one
        (ORT's full level on top), which costs one more session but gives the same pixels in every process.
        A cache that cannot be written or read: the plain graph (a real failure raises again there). A copy's
        mtime is its last use (renewed daily); making a copy removes those unused for ``CACHE_KEEP_DAYS``."""
        if cached.is_file() and not cached.is_symlink():
            try:
                session = self._session(cached, chain, spec)
                with contextlib.suppress(OSError):
                    if time.time() - cached.stat().st_mtime > 86400:
                        os.utime(cached)
                return session, cached
            except Exception:  # noqa: BLE001 - a damaged copy: made again below
                with contextlib.suppress(OSError):
                    cached.unlink(missing_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            self._session(spec.file, chain, spec, save_to=tmp)  # writes the copy; the session is not kept
            os.replace(tmp, cached)
            _prune(cached.parent, time.time() - CACHE_KEEP_DAYS * 86400)
            return self._session(cached, chain, spec), cached
        except Exception:  # noqa: BLE001 - see the docstring
            with contextlib.suppress(OSError):  # e.g. the cache "folder" is a file: no tmp to remove
                tmp.unlink(missing_ok=True)
        return self._session(spec.file, chain, spec), spec.file

    def _session(self, file: Path, chain: list[str], spec: GraphSpec, save_to: Path | None = None):
        providers = [self._provider_entry(p, spec) for p in chain]

        def options():
            so = self._options()
            if save_to is not None:
                so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
                so.optimized_model_filepath = str(save_to)
            return so

        try:
            return self.ort.InferenceSession(str(file), sess_options=options(), providers=providers)
        except Exception as e:  # noqa: BLE001 - only the per-session-threads refusal is handled here
            if self.shared_pool or PER_SESSION_REFUSED not in str(e):
                raise
        self.shared_pool = True  # other code in this process made global pools: use them too
        return self.ort.InferenceSession(str(file), sess_options=options(), providers=providers)

    def describe(self) -> str:
        pool = ", shared thread pool" if self.shared_pool else ""
        return f"onnxruntime {self.version} [{', '.join(sorted(self._used) or self.providers)}{pool}]"


def _prune(folder: Path, before: float) -> None:
    """Remove the optimised copies in ``folder`` last used before ``before`` (an older version's, a rebuilt
    folder's), so that upgrades do not pile up copies of ~80 MB each."""
    for old in folder.glob("*.onnx"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < before:
                old.unlink()


def _trt_ep_profile(spec: GraphSpec) -> dict:
    """TensorRT EP optimisation profile from the manifest's batch range, so it builds one engine, not one per
    batch size; empty when an axis other than the batch is dynamic."""
    if spec.max_batch is None:
        return {}
    batch = (spec.raw.get("profile") or {}).get("batch") or {}
    shapes = {}
    for key in ("min", "opt", "max"):
        parts = []
        for t in spec.inputs:
            dims = [batch.get(key, spec.max_batch) if d == "batch" else d for d in t.shape]
            if not all(isinstance(d, int) for d in dims):
                return {}
            parts.append(f"{t.name}:{'x'.join(str(d) for d in dims)}")
        shapes[f"trt_profile_{key}_shapes"] = ",".join(parts)
    return shapes


# --------------------------------------------------------------------------------------------------------
# TensorRT (native engines)


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(f"{TRT_NEEDS} (the tensorrt package is not installed)") from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise BackendUnavailableError(f"{TRT_NEEDS} (cuda-python is not installed)") from None
    return trt, cudart


def _cuda_check(result, what: str):
    """cuda-python returns (err, *values); raise on err, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendUnavailableError(f"{TRT_NEEDS}: {what} failed ({err})")
    return values[0] if len(values) == 1 else values


class TrtEngine(Engine):
    """One deserialised plan, one execution context, device buffers grown on demand; calls serialised."""

    def __init__(self, spec: GraphSpec, plan: Path, trt, cudart, device_id: int):
        super().__init__(spec, f"tensorrt {trt.__version__} {plan.name}")
        self.trt, self.cudart, self.device_id = trt, cudart, device_id
        self._lock = threading.Lock()
        _cuda_check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        self._engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise BackendUnavailableError(f"{plan}: TensorRT could not deserialise the engine "
                                          "(built by another TensorRT version or for another GPU?)")
        self._context = self._engine.create_execution_context()
        self._stream = _cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, capacity in bytes)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        want = {t.name for t in spec.inputs} | {t.name for t in spec.outputs}
        if set(names) != want:
            raise EngineFolderError(f"{plan}: engine tensors {sorted(names)} differ from the manifest's {sorted(want)}")

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if cap < nbytes:
            if ptr:
                _cuda_check(self.cudart.cudaFree(ptr), "cudaFree")
            ptr = _cuda_check(self.cudart.cudaMalloc(max(nbytes, 256)), "cudaMalloc")
            self._buffers[name] = (ptr, max(nbytes, 256))
        return ptr

    def _run(self, feeds):
        trt, cudart = self.trt, self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            _cuda_check(cudart.cudaSetDevice(self.device_id), "cudaSetDevice")
            for name, array in feeds.items():
                want = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
                array = np.ascontiguousarray(array, dtype=want)
                ptr = self._buffer(name, array.nbytes)
                _cuda_check(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, self._stream),
                            "cudaMemcpyAsync")
                self._context.set_input_shape(name, array.shape)
                self._context.set_tensor_address(name, ptr)
            outs = {}
            for t in self.spec.outputs:
                shape = tuple(self._context.get_tensor_shape(t.name))
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(t.name)))
                outs[t.name] = np.empty(shape, dtype=dtype)
                self._context.set_tensor_address(t.name, self._buffer(t.name, outs[t.name].nbytes))
            if not self._context.execute_async_v3(self._stream):
                raise RuntimeError(f"TensorRT execution of {self.name!r} failed")
            for name, out in outs.items():
                _cuda_check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h,
                                                   self._stream), "cudaMemcpyAsync")
            _cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {t.name: outs[t.name].astype(t.dtype, copy=False) for t in self.spec.outputs}


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, manifest: Manifest, *, device_id: int = 0, **_ignored):
        self.trt, self.cudart = _import_trt()
        count = self.cudart.cudaGetDeviceCount()
        if int(count[0]) != 0 or count[1] <= device_id:
            raise BackendUnavailableError(f"{TRT_NEEDS} (no CUDA device {device_id} visible)")
        self.manifest, self.device_id = manifest, device_id
        from . import trt_keys  # written with the exporter: engine key of this GPU + TensorRT, and its check

        self.trt_keys = trt_keys

    def engine(self, graph: str) -> TrtEngine:
        spec = self.manifest.graphs[graph]
        plan = self.trt_keys.select_plan(spec.trt, device_id=self.device_id, graph=graph)  # clear error on mismatch
        return TrtEngine(spec, plan, self.trt, self.cudart, self.device_id)

    def describe(self) -> str:
        return f"tensorrt {self.trt.__version__}"


# --------------------------------------------------------------------------------------------------------
# PyTorch reference


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


class TorchBackend:
    """Reference backend: the PyTorch modules rebuilt from the manifest's ``sources`` checkpoints."""

    name = "torch"

    def __init__(self, manifest: Manifest, *, threads: int | None = None, **_ignored):
        try:
            import torch

            from . import torch_reference
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


def open_backend(name: str, manifest: Manifest, **options):
    """The backend called ``name`` (one of ``BACKENDS``) over ``manifest``."""
    if name == "triton":  # a Triton Inference Server's models (triton_backend.py), imported only when asked for
        from .triton_backend import TritonBackend

        return TritonBackend(manifest, **options)
    classes = {"onnxruntime": OnnxRuntimeBackend, "tensorrt": TensorRTBackend, "torch": TorchBackend}
    if name not in classes:
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return classes[name](manifest, **options)
