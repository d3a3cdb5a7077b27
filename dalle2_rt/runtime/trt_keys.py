"""Which TensorRT engine of an engine folder may run here: engine keys and the compatibility check.

A serialized TensorRT engine (``.plan``) runs only under the TensorRT version that built it and on a GPU of
the architecture it was built for, so an engine folder keeps one set of plans per (TensorRT version, compute
capability), under ``trt/<key>/<graph>.plan`` with ``key = "<major.minor.patch>-sm<cc>"`` (``10.7.0-sm90``).
Each graph entry of the manifest maps keys to plan paths (``graphs.<g>.trt``). The exporter names files with
``engine_key``; the runtime's TensorRT backend calls ``select_plan`` and refuses a mismatched folder with a
message that says what was built and how to build for this machine, instead of letting TensorRT fail to
deserialize (or worse, crash) on a foreign plan.

Pure Python: no torch, no TensorRT at import time (``current_key`` imports tensorrt and cuda-python lazily).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from .errors import BackendUnavailableError

ENGINE_DIR = "trt"
PLAN_SUFFIX = ".plan"
TIMING_CACHE = "timing.cache"
_KEY = re.compile(r"^(\d+\.\d+\.\d+)-sm(\d+)$")


class EngineMismatchError(BackendUnavailableError):
    """The folder has no TensorRT engine for this TensorRT version and GPU."""


def trt_version_key(version: str) -> str:
    """``major.minor.patch`` of a TensorRT version string ("10.7.0.post1", "10.7.0.23" -> "10.7.0").

    Builds of one patch release share the serialization format; a wheel's ``.postN`` is packaging only.
    """
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not m:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return f"{m.group(1)}.{m.group(2)}.{m.group(3) or 0}"


def cc_key(cc) -> str:
    """Compute capability as the ``sm`` digits: (8, 6) / "8.6" / "86" / 86 -> "86"."""
    if isinstance(cc, tuple | list) and len(cc) == 2:
        major, minor = int(cc[0]), int(cc[1])
    elif isinstance(cc, str) and "." in cc:
        major, minor = (int(p) for p in cc.split(".", 1))
    else:
        digits = str(int(cc))
        major, minor = int(digits[:-1] or 0), int(digits[-1])
    if major <= 0 or not 0 <= minor <= 9:
        raise ValueError(f"not a CUDA compute capability: {cc!r}")
    return f"{major}{minor}"


def engine_key(trt_version: str, cc) -> str:
    """The folder key of engines built by TensorRT ``trt_version`` for compute capability ``cc``."""
    return f"{trt_version_key(trt_version)}-sm{cc_key(cc)}"


def parse_key(key: str) -> tuple[str, str]:
    """(TensorRT version, sm digits) of a key; ValueError if it is not one."""
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"not an engine key: {key!r} (expected '<major.minor.patch>-sm<cc>')")
    return m.group(1), m.group(2)


def engine_dir(key: str) -> str:
    """Folder of one key's plans and timing cache, relative to the engine folder (posix)."""
    parse_key(key)
    return f"{ENGINE_DIR}/{key}"


def plan_path(key: str, graph: str) -> str:
    """Relative (posix) path of ``graph``'s plan for ``key``: ``trt/<key>/<graph>.plan``."""
    return f"{engine_dir(key)}/{graph}{PLAN_SUFFIX}"


def _plans(entry: Mapping) -> Mapping:
    """Accept a graph's manifest entry ({"trt": {key: path}, ...}) or its ``trt`` mapping itself."""
    if "trt" in entry and isinstance(entry["trt"], Mapping):
        return entry["trt"]
    return entry


def check_engine_compatible(entry: Mapping, trt_version: str, cc, *, graph: str = "graph"):
    """The plan (path as stored in ``entry``) for this TensorRT version and GPU, else EngineMismatchError.

    ``entry`` is a graph's manifest entry or its ``trt`` mapping {key: path}. A plan is compatible only
    under the same key: TensorRT refuses plans of another version, and a plan tuned for one architecture
    is not portable to another.
    """
    plans = _plans(entry)
    want = engine_key(trt_version, cc)
    if want in plans:
        return plans[want]
    built = sorted(plans)
    same_gpu = [k for k in built if k.endswith(f"-sm{cc_key(cc)}")]
    if not built:
        why = "no TensorRT engines were built for it"
    elif same_gpu:
        why = f"its engines were built for TensorRT {', '.join(k.split('-')[0] for k in same_gpu)} on this GPU model"
    else:
        why = f"it has engines for {', '.join(built)} only"
    raise EngineMismatchError(
        f"no TensorRT engine of {graph!r} for this machine ({want}: TensorRT {trt_version_key(trt_version)}, "
        f"sm{cc_key(cc)}); {why}. Build them here with `python -m export.all --trt --out <engine folder>` "
        "or use the onnxruntime backend")


def _trt_version() -> str:
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError("tensorrt is not installed") from None
    return tensorrt.__version__


def current_key(device_id: int = 0) -> str:
    """The key of this process's TensorRT and CUDA device ``device_id`` (needs tensorrt and cuda-python)."""
    return engine_key(_trt_version(), device_compute_capability(device_id))


def device_compute_capability(device_id: int = 0) -> tuple[int, int]:
    """(major, minor) of a CUDA device through cuda-python's runtime bindings."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise BackendUnavailableError("cuda-python is not installed (needed to identify the GPU)") from None
    values = []
    for attr in (cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor,
                 cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor):
        err, value = cudart.cudaDeviceGetAttribute(attr, device_id)
        if int(err) != 0:
            raise BackendUnavailableError(f"cannot query CUDA device {device_id} ({err})")
        values.append(int(value))
    return values[0], values[1]


def select_plan(entry: Mapping, *, device_id: int = 0, graph: str = "graph") -> Path:
    """The plan for this machine (TensorRT version + GPU ``device_id``) among ``entry``'s, as a Path."""
    return Path(check_engine_compatible(entry, _trt_version(), device_compute_capability(device_id), graph=graph))
