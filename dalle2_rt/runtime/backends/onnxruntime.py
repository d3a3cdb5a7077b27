"""The ``onnxruntime`` backend: one InferenceSession per graph (the package overview: ``backends/__init__.py``)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

from ..cpu import int8_dot_product
from ..errors import BackendUnavailableError, EngineFolderError
from ..manifest import GraphSpec, Manifest, graph_io_problems, user_cache_dir
from .base import NO_OPTIONS, Backend, BackendOptions, Engine

ORT_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


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


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    takes = frozenset({"threads", "device_id", "providers", "int8"})

    def __init__(self, manifest: Manifest, options: BackendOptions = NO_OPTIONS):
        super().__init__(manifest, options)
        providers, threads, device_id = options.providers, options.threads, options.device_id or 0
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError("the onnxruntime backend needs the onnxruntime package") from None
        self.ort, self.manifest, self.threads, self.device_id = ort, manifest, threads, device_id
        # the folder's int8 variants on the CPU: asked for, or by default where the CPU has int8 dot products
        self.int8 = options.int8 is True or (options.int8 is None and int8_dot_product() is not None)
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
        self._int8: set[str] = set()  # graphs running their int8 variant (for metadata: their pixels differ)
        self.shared_pool = False  # True: sessions use the process-wide pool (asked for, or forced by ORT)
        if options.shared_pool or "threads" in _SHARED_POOL:
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
        """The int8 variant on the CPU where the folder has one (and it was not refused); else the optimised
        graph when it was made for ``provider`` (and this ORT, where recorded); else the plain graph."""
        if self.int8 and spec.int8_file is not None and provider == "CPUExecutionProvider":
            return spec.int8_file
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
            if file == spec.int8_file:
                self._int8.add(spec.name)
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
        int8 = f", int8 {' '.join(self.int8_running)}" if self._int8 else ""
        return f"onnxruntime {self.version} [{', '.join(sorted(self._used) or self.providers)}{pool}{int8}]"


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
