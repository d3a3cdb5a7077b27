"""Reading an engine folder: ``manifest.json`` (schema ``dalle2-rt/engine-manifest`` v1) and its file hashes.

The schema is specified in ARCHITECTURE.md. ``load_manifest`` parses and validates what the runtime reads
(schema and version, graphs and their I/O, stages, tokenizer entry, file table) and resolves every relative
path inside the folder; it reads no model bytes. ``verify_files`` checks each file of the ``files`` table
against its sha256 and names the first one that is missing or differs.

Hash cache. Hashing every graph on every start costs a second per GB, so a verified digest is remembered
under the file's (device, inode, size, mtime_ns, ctime_ns) in a small JSON file (``DALLE2_RT_CACHE`` or
``$XDG_CACHE_HOME/dalle2-rt``, default ``~/.cache/dalle2-rt``). The cache guards against corruption, not
tampering. Any change of content through the filesystem moves mtime/ctime, except a rewrite that lands
in the same timestamp tick as the hash was taken (coarse-grained clocks); as git does for its index
("racy git"), a digest is only remembered for a file whose mtime and ctime are older than ``_RACY_SECONDS``
when it was hashed, so such a file is simply hashed again next time. ``DALLE2_RT_HASH_CACHE=0`` turns it off.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import EngineFolderError, HashMismatchError
from .schedules import alphas_cumprod_for
from .stages import TEXT_MASKS, stage_problems

SCHEMA = "dalle2-rt/engine-manifest"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("eps", "x0", "v")
BATCH_AXIS = "batch"  # the name of the dynamic batch axis in every graph's shapes and batch profile
_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype, shape (ints, or strings for dynamic axes)."""

    name: str
    dtype: np.dtype
    shape: tuple


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: Path  # the plain .onnx graph
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    optimized_file: Path | None = None  # ONNX Runtime's optimised graph, valid only for `optimized_for`
    optimized_for: dict = field(default_factory=dict)  # {"provider": ..., "onnxruntime": ...} as recorded
    max_batch: int | None = None  # profile.batch.max: the largest batch the graph (and its TRT engine) takes
    trt: dict = field(default_factory=dict)  # engine key -> Path of the .plan
    raw: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    folder: Path
    data: dict  # the parsed JSON, for anything not modelled here
    sha256: str  # of manifest.json's bytes: names this exact folder in PNG metadata
    graphs: dict[str, GraphSpec]
    files: dict[str, str]  # relative path -> sha256, every file but manifest.json

    @property
    def name(self) -> str:
        return str(self.data.get("name", self.folder.name))

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    @property
    def tokenizer(self) -> dict:
        return self.data["tokenizer"]

    @property
    def sources(self) -> dict:
        return self.data.get("sources", {})

    def path(self, relative: str) -> Path:
        return resolve_inside(self.folder, relative)


def resolve_inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refusing absolute paths and ``..`` (a manifest names files of its own folder)."""
    rel = PurePosixPath(str(relative))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise EngineFolderError(f"{folder / MANIFEST}: file path {relative!r} must be relative, inside the folder")
    return folder.joinpath(*rel.parts)


def _fail(folder: Path, what: str) -> EngineFolderError:
    return EngineFolderError(f"{folder / MANIFEST}: {what}")


def _tensors(folder: Path, graph: str, key: str, entries) -> tuple[TensorSpec, ...]:
    if not isinstance(entries, list) or not entries:
        raise _fail(folder, f"graphs.{graph}.{key} must be a non-empty list")
    out = []
    for e in entries:
        try:
            dtype = np.dtype(_DTYPES[e["dtype"]])
            out.append(TensorSpec(str(e["name"]), dtype, tuple(e.get("shape", ()))))
        except (KeyError, TypeError):
            raise _fail(folder, f"graphs.{graph}.{key}: bad entry {e!r} (need name and a known dtype)") from None
    return tuple(out)


def _graph(folder: Path, name: str, g: dict) -> GraphSpec:
    if not isinstance(g, dict) or "file" not in g:
        raise _fail(folder, f"graphs.{name} has no 'file'")
    opt_file = g.get("optimized_file")
    # Where the optimised graph is valid: "optimized_for" {"provider", "onnxruntime"}, or flat keys.
    opt_for = dict(g.get("optimized_for") or {})
    if isinstance(g.get("optimized_for"), str):
        opt_for = {"provider": g["optimized_for"]}
    for key, flat in (("provider", "optimized_provider"), ("onnxruntime", "optimized_onnxruntime")):
        if flat in g:
            opt_for.setdefault(key, g[flat])
    batch = (g.get("profile") or {}).get("batch") or {}
    return GraphSpec(
        name=name,
        file=resolve_inside(folder, g["file"]),
        inputs=_tensors(folder, name, "inputs", g.get("inputs")),
        outputs=_tensors(folder, name, "outputs", g.get("outputs")),
        optimized_file=resolve_inside(folder, opt_file) if opt_file else None,
        optimized_for=opt_for,
        max_batch=int(batch["max"]) if "max" in batch else None,
        trt={str(k): resolve_inside(folder, v) for k, v in (g.get("trt") or {}).items()},
        raw=g,
    )


def _check_stage(folder: Path, where: str, stage: dict, graphs: dict, *, diffusion: bool) -> None:
    if not isinstance(stage, dict):
        raise _fail(folder, f"{where} must be an object")
    if stage.get("graph") not in graphs:
        raise _fail(folder, f"{where}.graph {stage.get('graph')!r} is not in graphs")
    if not diffusion:
        return
    if stage.get("parameterization") not in KINDS:
        raise _fail(folder, f"{where}.parameterization must be one of {KINDS}, got {stage.get('parameterization')!r}")
    try:
        abar = stage_alphas_cumprod(stage)
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(folder, f"{where}.schedule is unusable ({e})") from None
    if abar.ndim != 1 or len(abar) < 2 or not np.all(np.isfinite(abar)) or not np.all((abar > 0) & (abar < 1)):
        raise _fail(folder, f"{where}.schedule.alphas_cumprod must be T values in (0, 1)")
    betas = stage_betas(stage)
    if betas is not None and (betas.shape != abar.shape or not np.all((betas > 0) & (betas < 1))):
        raise _fail(folder, f"{where}.schedule.betas must be T values in (0, 1), as many as alphas_cumprod")
    problems = stage_problems(stage, graphs, sr=where.startswith("stages.sr"))
    if problems:
        raise _fail(folder, f"{where}: " + "; ".join(problems))


def stage_alphas_cumprod(stage: dict) -> np.ndarray:
    """ᾱ over the stage's T training timesteps: the recorded values, else rebuilt from the schedule's name."""
    sched = stage["schedule"]
    if "alphas_cumprod" in sched:
        return np.asarray(sched["alphas_cumprod"], dtype=np.float64)
    return alphas_cumprod_for(sched["name"], int(sched["num_timesteps"]))


def stage_betas(stage: dict) -> np.ndarray | None:
    """The training chain's own β_t (T,) when the schedule records them (imported schedulers), else None."""
    betas = stage["schedule"].get("betas")
    return None if betas is None else np.asarray(betas, dtype=np.float64)


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Parse and validate ``folder/manifest.json``; no model file is read (see ``verify_files``)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise EngineFolderError(f"engine folder {folder} {what}")
    path = folder / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EngineFolderError(f"{folder} has no {MANIFEST}; not an engine folder") from None
    except OSError as e:
        raise EngineFolderError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise _fail(folder, f"schema is not {SCHEMA!r}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _fail(folder, f"schema_version {version!r}; this runtime reads version {SCHEMA_VERSION} "
                            "(re-export the folder, or upgrade dalle2-rt)")
    for key in ("graphs", "stages", "tokenizer", "files"):
        if not isinstance(data.get(key), dict):
            raise _fail(folder, f"missing object {key!r}")
    graphs = {name: _graph(folder, name, g) for name, g in data["graphs"].items()}
    stages = data["stages"]
    for name in ("text_encoder", "prior", "decoder"):
        if name not in stages:
            raise _fail(folder, f"stages.{name} is missing")
    _check_stage(folder, "stages.text_encoder", stages["text_encoder"], graphs, diffusion=False)
    mask = stages["text_encoder"].get("text_mask")
    if mask is not None and mask not in TEXT_MASKS:
        raise _fail(folder, f"stages.text_encoder.text_mask {mask!r} is not one of {TEXT_MASKS}")
    for name in ("prior", "decoder"):
        graph = graphs.get(stages[name].get("graph"))
        if mask is None and graph is not None and any(t.name == "text_mask" for t in graph.inputs):
            raise _fail(folder, f"graph {graph.name!r} takes text_mask but stages.text_encoder.text_mask is not set")
    if "image_encoder" in stages:
        _check_stage(folder, "stages.image_encoder", stages["image_encoder"], graphs, diffusion=False)
    _check_stage(folder, "stages.prior", stages["prior"], graphs, diffusion=True)
    _check_stage(folder, "stages.decoder", stages["decoder"], graphs, diffusion=True)
    sr = stages.get("sr", [])
    if not isinstance(sr, list):
        raise _fail(folder, "stages.sr must be a list")
    for k, s in enumerate(sr):
        _check_stage(folder, f"stages.sr[{k}]", s, graphs, diffusion=True)
        if "noise_aug_t" not in s:
            raise _fail(folder, f"stages.sr[{k}].noise_aug_t is missing")
    files = {str(k): str(v) for k, v in data["files"].items()}
    for rel in files:
        resolve_inside(folder, rel)
    # Every file the runtime may read must be covered by a hash, the graphs' external data files included.
    needed = [data["tokenizer"].get("file", "")]
    for g in graphs.values():
        needed += [g.file, *([g.optimized_file] if g.optimized_file else []), *g.trt.values()]
        for key in ("external_data", "optimized_external_data"):
            listed = g.raw.get(key, [])
            if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
                raise _fail(folder, f"graphs.{g.name}.{key} must be a list of file names")
            needed += [resolve_inside(folder, f) for f in listed]
    for p in needed:
        rel = Path(p).relative_to(folder).as_posix() if isinstance(p, Path) else str(p)
        if rel not in files:
            raise _fail(folder, f"{rel!r} is not listed in 'files' (its hash cannot be checked)")
    return Manifest(folder=folder, data=data, sha256=hashlib.sha256(raw).hexdigest(), graphs=graphs, files=files)


# --------------------------------------------------------------------------------------------------------
# sha256 verification with a (stat -> digest) cache

_RACY_SECONDS = 2.0
_lock = threading.Lock()
_memory: dict[str, str] = {}  # stat key -> sha256, this process


def user_cache_dir() -> Path:
    """``$DALLE2_RT_CACHE``, else ``$XDG_CACHE_HOME/dalle2-rt``, else ``~/.cache/dalle2-rt``."""
    base = os.environ.get("DALLE2_RT_CACHE")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dalle2-rt")
    return Path(base)


def _cache_file() -> Path | None:
    if os.environ.get("DALLE2_RT_HASH_CACHE", "1") == "0":
        return None
    return user_cache_dir() / "verified-sha256.json"


def _stat_key(path: Path, st: os.stat_result) -> str:
    return f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_cache(cache: Path | None) -> dict[str, str]:
    if cache is None:
        return {}
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


_CACHE_ENTRIES = 4096


def _write_cache(cache: Path, entries: dict[str, str]) -> None:
    """Merge ``entries`` into the cache file atomically; a cache that cannot be written is not an error.

    An entry replaces older ones of the same path (keys start with the path), and only the newest
    ``_CACHE_ENTRIES`` are kept, so the file stays small however often engine folders are rebuilt.
    """
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        paths = {key.split("|", 1)[0] for key in entries}
        kept = {k: v for k, v in _read_cache(cache).items() if k.split("|", 1)[0] not in paths}
        merged = dict(list({**kept, **entries}.items())[-_CACHE_ENTRIES:])
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".verified-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(merged, f)
        os.replace(tmp, cache)
    except OSError:
        pass


def verify_files(manifest: Manifest, *, use_cache: bool = True) -> None:
    """Check every file of ``manifest.files`` against its sha256; raise naming the first bad one."""
    cache = _cache_file() if use_cache else None
    known = {}
    if use_cache:
        with _lock:  # another thread may be adding to _memory
            known = {**_read_cache(cache), **_memory}
    fresh: dict[str, str] = {}
    for rel, expected in sorted(manifest.files.items()):
        path = manifest.path(rel)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise EngineFolderError(f"{path}: missing (listed in {manifest.folder / MANIFEST})") from None
        key = _stat_key(path, st)
        digest = known.get(key)
        if digest is None:
            started = time.time()
            try:
                digest = sha256_file(path)
            except OSError as e:
                raise EngineFolderError(f"{path}: cannot read ({e.strerror})") from None
            if started - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 > _RACY_SECONDS:
                fresh[key] = digest
        if digest != expected.lower():
            raise HashMismatchError(path, expected, digest)
    if fresh and use_cache:
        with _lock:
            _memory.update(fresh)
            if cache is not None:
                _write_cache(cache, fresh)
