"""``backends.TrtEngine`` against a fake TensorRT 10 + cuda-python (no GPU needed).

The fakes implement the names the real APIs use: ``trt.Runtime(logger).deserialize_cuda_engine``,
``ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype /
create_execution_context``, ``IExecutionContext.set_input_shape / set_tensor_address / get_tensor_shape /
execute_async_v3(stream_handle)``, ``trt.nptype``, and cuda-python's runtime calls returning ``(err, *values)``.
Device memory is a dict of byte arrays; the stream is a queue that only runs on ``cudaStreamSynchronize``,
so an engine that read its outputs before synchronising would return whatever ``np.empty`` held. The fake
"kernel" computes pred = 2·x_t + t (per row) in the engine's own dtypes from the bytes at the addresses it
was given.
"""
from __future__ import annotations

import ctypes
import enum
from pathlib import Path

import numpy as np
import pytest

from dalle2_rt.runtime.backends import TrtEngine
from dalle2_rt.runtime.errors import BackendUnavailableError, EngineFolderError
from dalle2_rt.runtime.manifest import GraphSpec, TensorSpec


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class FakeCudart:
    """cuda-python's runtime module: device memory by pointer, one ordered stream run at synchronise."""

    class cudaMemcpyKind(enum.Enum):  # noqa: N801 - cuda-python's name
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self):
        self.memory: dict[int, bytearray] = {}
        self.next_ptr, self.freed, self.queue, self.devices_set = 0x1000, [], [], []

    def cudaSetDevice(self, device):  # noqa: N802
        self.devices_set.append(device)
        return (0,)

    def cudaStreamCreate(self):  # noqa: N802
        return 0, "stream-7"

    def cudaMalloc(self, size):  # noqa: N802
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + size + 0x1000
        self.memory[ptr] = bytearray(size)
        return 0, ptr

    def cudaFree(self, ptr):  # noqa: N802
        del self.memory[ptr]
        self.freed.append(ptr)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):  # noqa: N802
        assert stream == "stream-7"
        if kind is self.cudaMemcpyKind.cudaMemcpyHostToDevice:  # pageable host memory: staged at the call
            assert count <= len(self.memory[dst])
            self.memory[dst][:count] = ctypes.string_at(src, count)
        else:
            assert count <= len(self.memory[src])
            self.queue.append(lambda: ctypes.memmove(dst, bytes(self.memory[src][:count]), count))
        return (0,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        assert stream == "stream-7"
        while self.queue:
            self.queue.pop(0)()
        return (0,)

    def read(self, ptr, dtype, shape) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(bytes(self.memory[ptr][:n]), dtype).reshape(shape)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.executions, self.fail = engine, {}, {}, [], False

    def set_input_shape(self, name, shape):
        assert self.engine.get_tensor_mode(name) is TensorIOMode.INPUT
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        assert self.engine.get_tensor_mode(name) is TensorIOMode.OUTPUT
        return self.shapes["x_t"]  # pred has x_t's shape (only known once the inputs' shapes are set)

    def execute_async_v3(self, stream_handle):
        cudart = self.engine.cudart
        self.executions.append({"stream": stream_handle, "shapes": dict(self.shapes),
                                "addresses": dict(self.addresses)})

        def kernel():
            dt = {n: np.dtype(t.value) for n, t in self.engine.dtypes.items()}
            x = cudart.read(self.addresses["x_t"], dt["x_t"], self.shapes["x_t"]).astype(np.float32)
            t = cudart.read(self.addresses["t"], dt["t"], self.shapes["t"]).astype(np.float32)
            pred = (2 * x + t[:, None]).astype(dt["pred"])
            cudart.memory[self.addresses["pred"]][:pred.nbytes] = pred.tobytes()

        cudart.queue.append(kernel)
        return not self.fail


class FakeEngine:
    def __init__(self, cudart, dtypes: dict):
        self.cudart, self.dtypes = cudart, dtypes
        self.modes = {"x_t": TensorIOMode.INPUT, "t": TensorIOMode.INPUT, "pred": TensorIOMode.OUTPUT}
        self.contexts = []

    @property
    def num_io_tensors(self):
        return len(self.dtypes)

    def get_tensor_name(self, i):
        return list(self.dtypes)[i]

    def get_tensor_mode(self, name):
        return self.modes[name]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeTrt:
    """The ``tensorrt`` module: what TrtEngine touches."""

    __version__ = "10.0.fake"
    DataType, TensorIOMode = DataType, TensorIOMode

    class Logger:
        ERROR = "error"

        def __init__(self, level):
            self.level = level

    def __init__(self, engine: FakeEngine | None):
        trt = self
        self.engine, self.plans = engine, []

        class Runtime:
            def __init__(self, logger):
                assert logger.level == "error"

            def deserialize_cuda_engine(self, data):
                trt.plans.append(data)
                return trt.engine

        self.Runtime = Runtime

    @staticmethod
    def nptype(dtype):
        return np.dtype(dtype.value).type


def spec() -> GraphSpec:
    """The manifest's view of the graph: float32 everywhere (the plan may differ, see ``rig``)."""
    f32 = np.dtype(np.float32)
    return GraphSpec(name="denoiser", file=Path("denoiser.onnx"),
                     inputs=(TensorSpec("x_t", f32, ("batch", 4)), TensorSpec("t", f32, ("batch",))),
                     outputs=(TensorSpec("pred", f32, ("batch", 4)),), max_batch=8)


@pytest.fixture
def rig(tmp_path):
    """(engine under test, fake cudart, fake ICudaEngine): a plan whose x_t and pred are fp16, t fp32."""
    plan = tmp_path / "denoiser.plan"
    plan.write_bytes(b"serialized plan bytes")
    cudart = FakeCudart()
    fake = FakeEngine(cudart, {"x_t": DataType.HALF, "t": DataType.FLOAT, "pred": DataType.HALF})
    trt = FakeTrt(fake)
    engine = TrtEngine(spec(), plan, trt, cudart, device_id=1)
    assert trt.plans == [b"serialized plan bytes"] and engine.description == "tensorrt 10.0.fake denoiser.plan"
    return engine, cudart, fake


def test_run_binds_shapes_and_addresses_and_returns_the_kernels_output(rig):
    engine, cudart, fake = rig
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 4
    t = np.array([0.0, 10.0, 500.0], np.float32)
    out = engine(x_t=x, t=t)
    (ctx,) = fake.contexts
    (run,) = ctx.executions
    assert run["stream"] == "stream-7"  # the stream made at load, the one the copies went to
    assert run["shapes"] == {"x_t": (3, 4), "t": (3,)}
    assert set(run["addresses"]) == {"x_t", "t", "pred"} and len(set(run["addresses"].values())) == 3
    assert all(ptr in cudart.memory for ptr in run["addresses"].values())
    # the inputs reached device memory in the engine's dtypes (x_t fp16, t fp32), not the manifest's
    np.testing.assert_array_equal(cudart.read(run["addresses"]["x_t"], np.float16, (3, 4)), x.astype(np.float16))
    np.testing.assert_array_equal(cudart.read(run["addresses"]["t"], np.float32, (3,)), t)
    assert set(out) == {"pred"} and out["pred"].dtype == np.float32 and out["pred"].shape == (3, 4)
    want = (2 * x.astype(np.float16).astype(np.float32) + t[:, None]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out["pred"], want)
    assert cudart.devices_set == [1, 1] and cudart.queue == []  # set at load and per call; stream drained


def test_buffers_are_reused_and_grown_on_demand(rig):
    engine, cudart, fake = rig
    engine(x_t=np.ones((4, 4), np.float32), t=np.zeros(4, np.float32))
    first = dict(fake.contexts[0].executions[-1]["addresses"])
    small = engine(x_t=np.full((2, 4), 3.0, np.float32), t=np.ones(2, np.float32))
    assert fake.contexts[0].executions[-1]["addresses"] == first and cudart.freed == []  # fits: same memory
    np.testing.assert_array_equal(small["pred"], np.full((2, 4), 7.0, np.float32))
    big = engine(x_t=np.ones((100, 4), np.float32), t=np.full(100, 2.0, np.float32))  # 800 B of fp16 > 256 B
    grown = fake.contexts[0].executions[-1]["addresses"]
    assert sorted(cudart.freed) == sorted(first.values()) and not set(grown.values()) & set(first.values())
    assert [len(cudart.memory[grown[n]]) for n in ("x_t", "t", "pred")] == [800, 400, 800]
    np.testing.assert_array_equal(big["pred"], np.full((100, 4), 4.0, np.float32))


def test_a_failed_execution_raises(rig):
    engine, _, fake = rig
    fake.contexts[0].fail = True
    with pytest.raises(RuntimeError, match="TensorRT execution of 'denoiser' failed"):
        engine(x_t=np.ones((1, 4), np.float32), t=np.zeros(1, np.float32))


def test_an_engine_with_other_tensors_than_the_manifest_is_refused(tmp_path):
    plan = tmp_path / "p.plan"
    plan.write_bytes(b"x")
    cudart = FakeCudart()
    fake = FakeEngine(cudart, {"x_t": DataType.FLOAT, "timestep": DataType.FLOAT, "pred": DataType.FLOAT})
    with pytest.raises(EngineFolderError, match=r"engine tensors \['pred', 'timestep', 'x_t'\] differ"):
        TrtEngine(spec(), plan, FakeTrt(fake), cudart, device_id=0)
    with pytest.raises(BackendUnavailableError, match="could not deserialise"):
        TrtEngine(spec(), plan, FakeTrt(None), cudart, device_id=0)


def test_cuda_errors_name_the_call(rig):
    engine, cudart, _ = rig
    cudart.cudaMalloc = lambda size: (2, None)  # cudaErrorMemoryAllocation
    with pytest.raises(BackendUnavailableError, match=r"cudaMalloc failed \(2\)"):
        engine(x_t=np.ones((100, 4), np.float32), t=np.zeros(100, np.float32))  # larger: needs new buffers
