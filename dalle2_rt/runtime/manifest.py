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
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import EngineFolderError, HashMismatchError
from .schedules import alphas_cumprod_for, respace
from .stages import TEXT_MASKS, stage_problems
from .untrusted import open_regular, parse_json, read_bounded

SCHEMA = "dalle2-rt/engine-manifest"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("eps", "x0", "v")
BATCH_AXIS = "batch"  # the name of the dynamic batch axis in every graph's shapes and batch profile
_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}
# Names that become folder and model names (export/triton.py): no path separators, no "." or "..".
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# Bounds of what a manifest may ask of the runtime; beyond them a folder is refused before anything is allocated.
MAX_TIMESTEPS = 100_000  # T of a training chain (ours: 1000)
MAX_SIDE = 8192  # image sides, pixels
MAX_CONTEXT = 4096  # tokens of the text encoder's context
MAX_BATCH = 4096  # profile.batch.max
MAX_DIM = 2**20  # one fixed axis of a graph tensor
MAX_ROW_ELEMENTS = 2**28  # one batch row of a graph tensor (1 GiB of float32)


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
    int8_file: Path | None = None  # an int8 (QDQ) variant with the same I/O, for CPU hosts (graphs.<g>.int8)


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
    def int8_graphs(self) -> list[str]:
        """The graphs that have an int8 variant (``graphs.<g>.int8``), sorted."""
        return sorted(name for name, g in self.graphs.items() if g.int8_file is not None)

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


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def graph_io_problems(spec: GraphSpec, inputs, outputs) -> list[str]:
    """What differs between the manifest's I/O of ``spec`` and a graph's own (ONNX Runtime's ``NodeArg`` s:
    name, type "tensor(float)", shape with ints for fixed axes): names, dtypes, ranks, fixed sizes."""
    problems = []
    for kind, got, want in (("inputs", inputs, spec.inputs), ("outputs", outputs, spec.outputs)):
        have = {a.name: a for a in got}
        if set(have) != {t.name for t in want}:
            problems.append(f"graph {kind} {sorted(have)} differ from the manifest's {sorted(t.name for t in want)}")
            continue
        for t in want:
            arg = have[t.name]
            dtype = _ORT_TYPES.get(arg.type, arg.type)
            if dtype != t.dtype.name:
                problems.append(f"{t.name} is {dtype} in the graph, {t.dtype.name} in the manifest")
            shape = list(arg.shape or [])
            fixed = [(a, b) for a, b in zip(shape, t.shape) if isinstance(a, int) and isinstance(b, int)]
            if shape and (len(shape) != len(t.shape) or any(a != b for a, b in fixed)):  # []: shape unknown
                problems.append(f"{t.name} has shape {shape} in the graph, {list(t.shape)} in the manifest")
    return problems


def _fail(folder: Path, what: str) -> EngineFolderError:
    return EngineFolderError(f"{folder / MANIFEST}: {what}")


def _tensors(folder: Path, graph: str, key: str, entries) -> tuple[TensorSpec, ...]:
    if not isinstance(entries, list) or not entries:
        raise _fail(folder, f"graphs.{graph}.{key} must be a non-empty list")
    out = []
    for k, e in enumerate(entries):
        where = f"graphs.{graph}.{key}[{k}]"
        try:
            dtype = np.dtype(_DTYPES[e["dtype"]])
            name = e["name"]
        except (KeyError, TypeError):
            raise _fail(folder, f"{where}: bad entry (need name and a dtype of {', '.join(_DTYPES)})") from None
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise _fail(folder, f"{where}.name {name!r} is not a name ([A-Za-z0-9_.-], at most 64)")
        out.append(TensorSpec(name, dtype, _shape(folder, f"{where}.shape", e.get("shape", []))))
    return tuple(out)


def _shape(folder: Path, where: str, shape) -> tuple:
    """A tensor's shape: fixed axes ints in 1 … MAX_DIM, dynamic axes names; at most MAX_ROW_ELEMENTS a row."""
    if not isinstance(shape, list) or len(shape) > 8:
        raise _fail(folder, f"{where} must be a list of at most 8 axes")
    for d in shape:
        fixed = isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_DIM
        if not fixed and not (isinstance(d, str) and NAME.fullmatch(d)):
            raise _fail(folder, f"{where}: axis {d!r} is neither a size in 1 … {MAX_DIM} nor an axis name")
    if math.prod(d for d in shape if isinstance(d, int)) > MAX_ROW_ELEMENTS:
        raise _fail(folder, f"{where} {shape} has over {MAX_ROW_ELEMENTS} elements a row")
    return tuple(shape)


def _int(folder: Path, where: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(folder, f"{where} must be an integer in {lo} … {hi}, got {value!r}")
    return value


def _number(folder: Path, where: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _fail(folder, f"{where} must be a number in {lo:g} … {hi:g}, got {value!r}")
    return float(value)


def _range(folder: Path, where: str, value) -> tuple[float, float]:
    """A value range [lo, hi]: two finite numbers, lo < hi (pixel ranges, x0 clamps)."""
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            or not value[0] < value[1]):
        raise _fail(folder, f"{where} must be [lo, hi], two finite numbers with lo < hi, got {value!r}")
    return float(value[0]), float(value[1])


def _batch_profile(folder: Path, name: str, g: dict) -> int | None:
    """profile.batch {min, opt, max}: 1 ≤ min ≤ opt ≤ max ≤ MAX_BATCH; returns max (None: no profile)."""
    profile = g.get("profile") or {}
    batch = profile.get("batch") if isinstance(profile, dict) else None
    if not batch:
        return None
    if not isinstance(batch, dict):
        raise _fail(folder, f"graphs.{name}.profile.batch must be an object")
    where = f"graphs.{name}.profile.batch"
    hi = _int(folder, f"{where}.max", batch.get("max"), 1, MAX_BATCH)
    lo = _int(folder, f"{where}.min", batch.get("min", 1), 1, hi)
    _int(folder, f"{where}.opt", batch.get("opt", lo), lo, hi)
    return hi


def _graph(folder: Path, name: str, g: dict) -> GraphSpec:
    if not NAME.fullmatch(name):
        raise _fail(folder, f"graph name {name!r} is not a name ([A-Za-z0-9_.-], at most 64, not starting with .)")
    if not isinstance(g, dict) or not isinstance(g.get("file"), str):
        raise _fail(folder, f"graphs.{name} has no 'file'")
    opt_file = g.get("optimized_file")
    # Where the optimised graph is valid: "optimized_for" {"provider", "onnxruntime"}, or flat keys.
    if not isinstance(g.get("optimized_for") or {}, dict | str):
        raise _fail(folder, f"graphs.{name}.optimized_for must be an object (provider, onnxruntime) or a provider")
    opt_for = dict(g.get("optimized_for") or {})
    if isinstance(g.get("optimized_for"), str):
        opt_for = {"provider": g["optimized_for"]}
    for key, flat in (("provider", "optimized_provider"), ("onnxruntime", "optimized_onnxruntime")):
        if flat in g:
            opt_for.setdefault(key, g[flat])
    if opt_file is not None and not isinstance(opt_file, str):
        raise _fail(folder, f"graphs.{name}.optimized_file must be a file name")
    if not isinstance(g.get("trt") or {}, dict) or not all(isinstance(v, str) for v in (g.get("trt") or {}).values()):
        raise _fail(folder, f"graphs.{name}.trt must map engine keys to file names")
    int8 = g.get("int8")
    if int8 is not None and (not isinstance(int8, dict) or not isinstance(int8.get("file"), str)
                             or int8.get("format") != "QDQ"):
        raise _fail(folder, f"graphs.{name}.int8 must be an object with a 'file' and format 'QDQ'")
    return GraphSpec(
        name=name,
        file=resolve_inside(folder, g["file"]),
        inputs=_tensors(folder, name, "inputs", g.get("inputs")),
        outputs=_tensors(folder, name, "outputs", g.get("outputs")),
        optimized_file=resolve_inside(folder, opt_file) if opt_file else None,
        optimized_for=opt_for,
        max_batch=_batch_profile(folder, name, g),
        trt={str(k): resolve_inside(folder, v) for k, v in (g.get("trt") or {}).items()},
        raw=g,
        int8_file=resolve_inside(folder, int8["file"]) if int8 else None,
    )


def _check_stage(folder: Path, where: str, stage: dict, graphs: dict, *, diffusion: bool) -> None:
    if not isinstance(stage, dict):
        raise _fail(folder, f"{where} must be an object")
    if not isinstance(stage.get("graph"), str) or stage["graph"] not in graphs:
        raise _fail(folder, f"{where}.graph {stage.get('graph')!r} is not in graphs")
    _check_sizes(folder, where, stage)
    if "input_range" in stage:
        _range(folder, f"{where}.input_range", stage["input_range"])
    if stage.get("clip_x0"):  # absent, null or []: no clamp (plan.py)
        _range(folder, f"{where}.clip_x0", stage["clip_x0"])
    if not diffusion:
        return
    if stage.get("parameterization") not in KINDS:
        raise _fail(folder, f"{where}.parameterization must be one of {KINDS}, got {stage.get('parameterization')!r}")
    sched = stage.get("schedule")
    if not isinstance(sched, dict):
        raise _fail(folder, f"{where}.schedule must be an object")
    if "num_timesteps" in sched:
        _int(folder, f"{where}.schedule.num_timesteps", sched["num_timesteps"], 2, MAX_TIMESTEPS)
    for key in ("alphas_cumprod", "betas"):
        if key in sched and (not isinstance(sched[key], list) or len(sched[key]) > MAX_TIMESTEPS):
            raise _fail(folder, f"{where}.schedule.{key} must be a list of at most {MAX_TIMESTEPS} values")
    try:
        abar = stage_alphas_cumprod(stage)
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(folder, f"{where}.schedule is unusable ({e})") from None
    if abar.ndim != 1 or len(abar) < 2 or not np.all(np.isfinite(abar)) or not np.all((abar > 0) & (abar < 1)):
        raise _fail(folder, f"{where}.schedule.alphas_cumprod must be T values in (0, 1)")
    spacing = sched.get("spacing", "trailing")
    try:  # the name checked by the one respacing there is
        if not isinstance(spacing, str):
            raise ValueError(f"a name is needed, got {type(spacing).__name__}")
        respace(abar, 1, spacing)
    except ValueError as e:
        raise _fail(folder, f"{where}.schedule.spacing: {e}") from None
    if "ddim_eta" in sched:
        _number(folder, f"{where}.schedule.ddim_eta", sched["ddim_eta"], 0.0, 1.0)
    betas = stage_betas(stage)
    if betas is not None and (betas.shape != abar.shape or not np.all((betas > 0) & (betas < 1))):
        raise _fail(folder, f"{where}.schedule.betas must be T values in (0, 1), as many as alphas_cumprod")
    problems = stage_problems(stage, graphs, sr=where.startswith("stages.sr"))
    if problems:
        raise _fail(folder, f"{where}: " + "; ".join(problems))
    if stage.get("noise_aug_t") is not None:
        _int(folder, f"{where}.noise_aug_t", stage["noise_aug_t"], 0, len(abar) - 1)
    if "embed_scale" in stage:
        _number(folder, f"{where}.embed_scale", stage["embed_scale"], 1e-6, 1e6)
    defaults = stage.get("defaults", {})
    if not isinstance(defaults, dict):
        raise _fail(folder, f"{where}.defaults must be an object")
    if "steps" in defaults:
        _int(folder, f"{where}.defaults.steps", defaults["steps"], 1, len(abar))
    if "candidates" in defaults:
        _int(folder, f"{where}.defaults.candidates", defaults["candidates"], 1, 64)
    if "choice_step" in defaults:
        _int(folder, f"{where}.defaults.choice_step", defaults["choice_step"], 1, len(abar))
    if "operation_steps" in defaults:
        _int(folder, f"{where}.defaults.operation_steps", defaults["operation_steps"], 1, len(abar))
    if "guidance" in defaults:
        _number(folder, f"{where}.defaults.guidance", defaults["guidance"], 0, 1e4)


def _check_sizes(folder: Path, where: str, stage: dict) -> None:
    """The sizes a stage entry states: sides, channels, widths, context; each bounded before anything is made."""
    for key, hi in (("image_size", MAX_SIDE), ("low_res_size", MAX_SIDE), ("channels", 64),
                    ("context_length", MAX_CONTEXT), ("embed_dim", MAX_DIM), ("text_width", MAX_DIM)):
        if key in stage:
            _int(folder, f"{where}.{key}", stage[key], 1, hi)


def _check_tokenizer(folder: Path, tok: dict) -> None:
    """The tokenizer entry's file and numbers: context 2 … MAX_CONTEXT, ids inside the vocabulary."""
    if not isinstance(tok.get("file"), str):
        raise _fail(folder, "tokenizer.file must be a file name")
    vocab = _int(folder, "tokenizer.vocab_size", tok.get("vocab_size", 2), 2, 2**24) if "vocab_size" in tok else 2**24
    if "context_length" in tok:
        _int(folder, "tokenizer.context_length", tok["context_length"], 2, MAX_CONTEXT)
    steps = tok.get("preprocess", [])
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):  # names checked by the Tokenizer
        raise _fail(folder, "tokenizer.preprocess must be a list of step names")
    if not isinstance(tok.get("special_tokens_match", ""), str):
        raise _fail(folder, "tokenizer.special_tokens_match must be a string")
    for key in ("sot_id", "eot_id", "pad_id"):
        if key in tok:
            _int(folder, f"tokenizer.{key}", tok[key], 0, vocab - 1)


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
        raw = read_bounded(folder, path)  # a regular file inside the folder, of bounded size
    except FileNotFoundError:
        raise EngineFolderError(f"{folder} has no {MANIFEST}; not an engine folder") from None
    except OSError as e:
        raise EngineFolderError(f"{path}: cannot read ({e.strerror})") from None
    data = parse_json(raw, path)  # bounded depth and numbers
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise _fail(folder, f"schema is not {SCHEMA!r}")
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:  # true == 1 in Python
        raise _fail(folder, f"schema_version {version!r}; this runtime reads version {SCHEMA_VERSION} "
                            "(re-export the folder, or upgrade dalle2-rt)")
    for key in ("graphs", "stages", "tokenizer", "files"):
        if not isinstance(data.get(key), dict):
            raise _fail(folder, f"missing object {key!r}")
    graphs = {name: _graph(folder, name, g) for name, g in data["graphs"].items()}
    _check_tokenizer(folder, data["tokenizer"])
    output = data.get("output", {})
    if not isinstance(output, dict):
        raise _fail(folder, "output must be an object")
    if output.get("image_size") is not None:
        _int(folder, "output.image_size", output["image_size"], 1, MAX_SIDE)
    if "pixel_range" in output:
        _range(folder, "output.pixel_range", output["pixel_range"])
    stages = data["stages"]
    for name in ("text_encoder", "prior", "decoder"):
        if name not in stages:
            raise _fail(folder, f"stages.{name} is missing")
        if not isinstance(stages[name], dict):
            raise _fail(folder, f"stages.{name} must be an object")
    _check_stage(folder, "stages.text_encoder", stages["text_encoder"], graphs, diffusion=False)
    mask = stages["text_encoder"].get("text_mask")
    if mask is not None and mask not in TEXT_MASKS:
        raise _fail(folder, f"stages.text_encoder.text_mask {mask!r} is not one of {TEXT_MASKS}")
    for name in ("prior", "decoder"):
        graph = graphs.get(stages[name].get("graph")) if isinstance(stages[name].get("graph"), str) else None
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
    files = data["files"]
    bad = next((k for k, v in files.items() if not isinstance(v, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", v)), None)
    if bad is not None:
        raise _fail(folder, f"files[{bad!r}] must be a sha256 (64 hex digits)")
    for rel in files:
        resolve_inside(folder, rel)
    # Every file the runtime may read must be covered by a hash, the graphs' external data files included.
    needed = [data["tokenizer"].get("file", "")]
    for g in graphs.values():
        needed += [g.file, *([g.optimized_file] if g.optimized_file else []), *g.trt.values(),
                   *([g.int8_file] if g.int8_file else [])]
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
        try:  # a regular file inside the folder: no symlink out of it, no FIFO or device to hash forever
            fd = open_regular(manifest.folder, path)
        except FileNotFoundError:
            raise EngineFolderError(f"{path}: missing (listed in {manifest.folder / MANIFEST})") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
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
