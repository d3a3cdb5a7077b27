"""The ``tensorrt`` backend: native ``.plan`` engines through the TensorRT 10 Python API and cuda-python."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, EngineFolderError
from ..manifest import GraphSpec, Manifest
from .base import NO_OPTIONS, Backend, BackendOptions, Engine

TRT_NEEDS = "TensorRT backend needs tensorrt and a CUDA GPU"


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


class TensorRTBackend(Backend):
    name = "tensorrt"
    takes = frozenset({"device_id"})

    def __init__(self, manifest: Manifest, options: BackendOptions = NO_OPTIONS):
        super().__init__(manifest, options)
        device_id = options.device_id or 0
        self.trt, self.cudart = _import_trt()
        count = self.cudart.cudaGetDeviceCount()
        if int(count[0]) != 0 or count[1] <= device_id:
            raise BackendUnavailableError(f"{TRT_NEEDS} (no CUDA device {device_id} visible)")
        self.manifest, self.device_id = manifest, device_id
        from .. import trt_keys  # written with the exporter: engine key of this GPU + TensorRT, and its check

        self.trt_keys = trt_keys

    def engine(self, graph: str) -> TrtEngine:
        spec = self.manifest.graphs[graph]
        plan = self.trt_keys.select_plan(spec.trt, device_id=self.device_id, graph=graph)  # clear error on mismatch
        return TrtEngine(spec, plan, self.trt, self.cudart, self.device_id)

    def describe(self) -> str:
        return f"tensorrt {self.trt.__version__}"
