"""The ``triton`` backend: every graph call is an inference request to a model on a Triton Inference Server.

    pipe = Pipeline.load(engines, backend="triton", url="http://gpu-box:8000")     # or grpc://gpu-box:8001
    dalle2-rt "a red circle" --backend triton --url grpc://gpu-box:8001

The loop (tokenizer, schedules, samplers, guidance, seeds) stays in this process, exactly as with the other
backends: only ``engine(**arrays) -> dict`` changes, so the same seed gives the same images as the local
backend up to the float rounding of whatever runs the graphs on the server. The server's models are the ones
``python -m export.triton ENGINES --out REPO`` writes, one per graph and named after it.

Transports (chosen by ``url``):
- ``http://host:port`` (or ``host:port``): ``tritonclient.http``; ``grpc://host:port``: ``tritonclient.grpc``.
  Each thread gets its own client (the HTTP client is not safe to share between threads), so one
  ``Pipeline`` still serves concurrent calls. On ``engine(graph)`` the model must be ready and its
  config must declare the manifest's inputs and outputs with the same dtypes; a model written by
  ``export.triton`` also records the manifest's sha256, and a model written from another engine folder
  is refused (``EngineFolderError``) rather than fed arrays it was not made for.
- ``bls``: inside a Triton Python-backend model, each call is a BLS request
  (``triton_python_backend_utils.InferenceRequest(...).exec()``) to the graph model, its outputs asked
  for in CPU memory. This is how the orchestrator model (``dalle2_rt/triton/orchestrator_model.py``) runs
  the runtime's own loop inside the server.

Wire shapes. Triton's config gives per-row ``dims`` when ``max_batch_size > 0``, and a tensor with no axis
but the batch is declared ``dims: [1]`` with ``reshape: { shape: [] }`` (the documented way), so it
travels as (B, 1) and the graph sees (B,). ``config_dims`` states that rule once; the repository writer
and this backend both use it.

A thin client needs only the folder's ``manifest.json`` and ``tokenizer.json`` (``Pipeline.load(...,
verify=False)`` reads nothing else; the tokenizer's own sha256 is still checked, and the server's models
are matched to this manifest by its sha256). ``export.triton`` puts a copy of both in the repository.
"""
from __future__ import annotations

import threading

import numpy as np

from ..errors import BackendUnavailableError, EngineFolderError, InputError
from ..manifest import GraphSpec, Manifest
from .base import NO_OPTIONS, Backend, BackendOptions, Engine

BATCH_AXIS = "batch"
MANIFEST_SHA_PARAMETER = "dalle2_rt.manifest_sha256"  # config parameter written by export/triton.py
INT8_PARAMETER = "dalle2_rt.int8_variant"  # set by export.triton --int8: the model serves this int8 variant
TRITON_DTYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
                 "uint8": "UINT8", "uint64": "UINT64", "bool": "BOOL"}  # numpy dtype name -> Triton datatype
TRITONCLIENT_NEEDS = "the triton backend needs tritonclient (pip install 'dalle2-rt[triton]')"


def is_batched(spec: GraphSpec) -> bool:
    """Whether the graph's Triton model batches: a batch profile and every tensor's first axis the batch."""
    tensors = (*spec.inputs, *spec.outputs)
    return spec.max_batch is not None and all(t.shape and t.shape[0] == BATCH_AXIS for t in tensors)


def config_dims(shape: tuple, batched: bool) -> tuple[list[int], list[int] | None]:
    """(dims, reshape) of one tensor in a Triton model config: without the batch axis when ``batched``,
    dynamic axes as -1; a tensor that is only the batch axis becomes dims [1] with reshape [] (None: no
    reshape)."""
    rest = list(shape[1:]) if batched else list(shape)
    dims = [d if isinstance(d, int) else -1 for d in rest]
    if batched and not dims:
        return [1], []
    return dims, None


class TritonEngine(Engine):
    """One graph served as the Triton model ``model``; calls go through ``transport``."""

    def __init__(self, spec: GraphSpec, transport, model: str):
        super().__init__(spec, f"triton {transport.where} {model}")
        self.transport, self.model = transport, model
        batched = is_batched(spec)
        # tensors sent as (B, 1) and returned as such, per the reshape rule of config_dims
        self._flat = {t.name for t in (*spec.inputs, *spec.outputs) if config_dims(t.shape, batched)[1] == []}
        self._outputs = [t.name for t in spec.outputs]

    def _run(self, feeds):
        wire = {k: (v.reshape(len(v), 1) if k in self._flat else v) for k, v in feeds.items()}
        outs = self.transport.infer(self.model, wire, self._outputs)
        return {k: (v.reshape(len(v)) if k in self._flat else v) for k, v in outs.items()}


class ClientTransport:
    """tritonclient over HTTP or gRPC, one client per thread."""

    def __init__(self, url: str, timeout: float = 300.0):
        scheme, sep, address = url.partition("://")
        if not sep:
            scheme, address = "http", url
        if scheme not in ("http", "grpc") or not address:
            raise InputError(f"triton url {url!r}: use http://HOST:PORT or grpc://HOST:PORT")
        try:
            if scheme == "grpc":
                import tritonclient.grpc as module
            else:
                import tritonclient.http as module
            from tritonclient.utils import InferenceServerException
        except ImportError as e:
            raise BackendUnavailableError(f"{TRITONCLIENT_NEEDS}: {e}") from None
        self.module, self.scheme, self.address, self.timeout = module, scheme, address.rstrip("/"), timeout
        self.where = f"{scheme}://{self.address}"
        self.server_error = InferenceServerException
        self._local = threading.local()

    def client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            if self.scheme == "grpc":
                c = self.module.InferenceServerClient(self.address)
            else:
                c = self.module.InferenceServerClient(self.address, connection_timeout=self.timeout,
                                                      network_timeout=self.timeout)
            self._local.client = c
        return c

    def _fail(self, what: str, e: Exception) -> BackendUnavailableError:
        message = e.message() if isinstance(e, self.server_error) else f"{type(e).__name__}: {e}"
        return BackendUnavailableError(f"Triton at {self.where}: {what}: {' '.join(str(message).split())}")

    def server_version(self) -> str:
        try:
            if not self.client().is_server_live():
                raise BackendUnavailableError(f"Triton at {self.where} is not live")
            meta = self.client().get_server_metadata()
        except BackendUnavailableError:
            raise
        except Exception as e:  # noqa: BLE001 - refused connection, DNS, timeout, ...: one message
            raise self._fail("cannot reach the server", e) from None
        return (meta["version"] if isinstance(meta, dict) else meta.version) or "?"

    def model_config(self, model: str) -> dict:
        """The model's config as JSON (model_config.proto field names), after checking it is ready."""
        try:
            if not self.client().is_model_ready(model):
                raise BackendUnavailableError(f"Triton at {self.where} has no ready model {model!r} (was the "
                                              "repository written by python -m export.triton from this folder?)")
            if self.scheme == "grpc":
                return self.client().get_model_config(model, as_json=True)["config"]
            return self.client().get_model_config(model)
        except BackendUnavailableError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._fail(f"model {model!r}", e) from None

    def infer(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        m = self.module
        inputs = []
        for name, array in feeds.items():
            tensor = m.InferInput(name, list(array.shape), TRITON_DTYPES[array.dtype.name])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            result = self.client().infer(model, inputs, outputs=[m.InferRequestedOutput(n) for n in outputs])
        except Exception as e:  # noqa: BLE001
            raise self._fail(f"inference on {model!r} failed", e) from None
        return {n: result.as_numpy(n) for n in outputs}


class BlsTransport:
    """Inside a Triton Python-backend model: each call is a BLS request, outputs asked for in CPU memory."""

    where = "bls"

    def __init__(self):
        try:
            import triton_python_backend_utils as pb_utils
        except ImportError:
            raise BackendUnavailableError("url='bls' works only inside a Triton Python-backend model "
                                          "(triton_python_backend_utils is not importable here)") from None
        self.pb = pb_utils

    def server_version(self) -> str:
        return "in-server"

    def infer(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        pb = self.pb
        request = pb.InferenceRequest(
            model_name=model, requested_output_names=outputs,
            inputs=[pb.Tensor(name, array) for name, array in feeds.items()],
            preferred_memory=pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0))
        response = request.exec()
        if response.has_error():
            raise BackendUnavailableError(f"Triton BLS request to {model!r} failed: {response.error().message()}")
        return {n: pb.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}


def config_parameter(config: dict, key: str) -> str | None:
    """The string value of a model config's parameter ``key`` (the config as Triton's JSON gives it), or None."""
    return (config.get("parameters", {}).get(key) or {}).get("string_value")


def config_problems(config: dict, spec: GraphSpec, manifest_sha256: str | None) -> list[str]:
    """What keeps a served model's config (JSON, model_config.proto names) from running ``spec``."""
    problems = []
    declared = {"input": spec.inputs, "output": spec.outputs}
    for key, tensors in declared.items():
        got = {t.get("name"): t.get("data_type", "").removeprefix("TYPE_") for t in config.get(key, [])}
        want = {t.name: TRITON_DTYPES.get(t.dtype.name, "?") for t in tensors}
        if got != want:
            problems.append(f"{key}s {sorted(got.items())} differ from the manifest's {sorted(want.items())}")
    recorded = config_parameter(config, MANIFEST_SHA_PARAMETER)
    if recorded and manifest_sha256 and recorded != manifest_sha256:
        problems.append(f"it was written from another manifest (sha256 {recorded[:12]}…, this folder's is "
                        f"{manifest_sha256[:12]}…)")
    return problems


class TritonBackend(Backend):
    name = "triton"
    takes = frozenset({"url", "timeout", "int8"})

    def __init__(self, manifest: Manifest, options: BackendOptions = NO_OPTIONS):
        super().__init__(manifest, options)
        self.int8 = options.int8 is not False  # False: refuse models that serve an int8 variant
        self._int8: set[str] = set()  # graphs whose Triton model serves its int8 variant (for metadata)
        url, timeout = options.url, 300.0 if options.timeout is None else options.timeout
        if not url:
            raise InputError("the triton backend needs the server's address: url='http://HOST:8000' or "
                             "'grpc://HOST:8001' (--url)")
        self.manifest, self.url = manifest, url
        self.transport = BlsTransport() if url == "bls" else ClientTransport(url, timeout)
        self.version = self.transport.server_version()

    def engine(self, graph: str) -> TritonEngine:
        spec = self.manifest.graphs[graph]
        if isinstance(self.transport, ClientTransport):
            config = self.transport.model_config(graph)
            problems = config_problems(config, spec, self.manifest.sha256)
            if problems:
                raise EngineFolderError(f"Triton model {graph!r} at {self.transport.where} does not match "
                                        f"{self.manifest.folder}: {'; '.join(problems)}")
            variant = config_parameter(config, INT8_PARAMETER)
            if variant and not self.int8:
                raise InputError(f"Triton model {graph!r} at {self.transport.where} serves the int8 variant "
                                 f"{variant}; fp32 only (--fp32) needs a repository written without --int8")
            if variant:
                self._int8.add(graph)
        return TritonEngine(spec, self.transport, graph)

    def describe(self) -> str:
        int8 = f" int8 {' '.join(self.int8_running)}" if self._int8 else ""
        return f"triton {self.version} {self.transport.where}{int8}"
