"""The checkpoint kinds and their folders: one table from ``kind`` to config dataclass and network, one loader.

A checkpoint folder (written by ``dalle2_rt.training.checkpoint.save_model``) holds
  model.safetensors   the weights (fp32, or fp16 for the bundled model: upcast to fp32 on load)
  model.json          {"kind": "clip" | "prior" | "decoder" | "sr", "config": {...}, "step", ...}
The config is the network's dataclass as a dict (``config_to_dict``), so a folder rebuilds its network
without the code that trained it (constructor arguments travel with the weights). Everything that loads
weights goes through here: the torch reference backend (``dalle2_rt.runtime.torch_reference``), the
exporter (``export/sources.py``) and training (``dalle2_rt.training.stages``).

Configs are (de)serialised by ``config_dict.py`` (torch-free, so a TOML reader can use it too): an unknown key
is refused by name, a missing one takes the dataclass default, and every value must lie within the bounds its
dataclass field states (``config_dict.bounded``), so a hostile or mistyped ``model.json`` is one line naming the
file and the field before any module is built. ``model.json`` and ``defaults.json`` are read as untrusted input
(``read_json``): a regular file of at most 1 MiB, JSON of bounded depth and number sizes; a symlink to
``/dev/zero`` or a named pipe is refused at once instead of hanging the reader.

A save is atomic through a sibling ``<folder>.old`` (``checkpoint._write_atomic_dir``); ``resolve`` is its
read side: the folder to read when a kill landed between the two renames.

A checkpoint *directory* (one ``<stage>/model`` folder per stage) may hold ``defaults.json``: the model's chosen
sampling defaults, ``{"<stage>": {"sampler", "steps", "guidance", "candidates"}}``, read by ``read_defaults``.
The bundler writes them into each stage's ``model.json`` and the exporter applies them on top of it, so a
retrained run bundled into the directory keeps them.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..runtime.errors import EngineFolderError
from ..runtime.settings import MAX_CANDIDATES
from ..runtime.untrusted import parse_json, read_bounded
from .clip import ClipConfig, ClipImageEncoder, ClipTextEncoder, build_clip
from .config_dict import ConfigError, config_from_dict, config_to_dict, short_repr
from .decoder import Decoder, DecoderConfig
from .prior import DiffusionPrior, PriorConfig, PriorPrefix, PriorStep
from .sr import SRConfig, SuperRes

__all__ = ["DEFAULTS", "KINDS", "META", "WEIGHTS", "CheckpointError", "ConfigError", "Kind", "Loaded", "a_kind",
           "build", "check_defaults", "check_values", "check_weights", "config_from_dict", "config_to_dict", "kind",
           "load", "load_weights", "read_config", "read_defaults", "read_defaults_file", "read_json", "read_meta",
           "resolve"]

WEIGHTS = "model.safetensors"
META = "model.json"
DEFAULTS = "defaults.json"
MAX_JSON_BYTES = 2**20  # model.json, defaults.json (the bundled ones: under 1 KB)
# What a stage's sampling defaults may say, and the check of each value.
DEFAULT_KEYS = {
    "sampler": lambda v: isinstance(v, str) and bool(v),
    "steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "guidance": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < float("inf"),
    # the runtime's own bound: the exporter sizes graph batches by it (10⁹ would be a multi-TB allocation)
    "candidates": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_CANDIDATES,
    # decoder: rank the candidates after this many steps and finish only the best (early candidate choice)
    "choice_step": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    # decoder: the DDIM steps of unCLIP's operations (inversion, decoding a latent); absent: "steps"
    "operation_steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
}
# model.json's top level: what save_model writes (kind, config), the training loop adds (step, trained_steps,
# open_clip_cfg, distilled_steps) and bundle adds (defaults). Anything else is a typo or a foreign file: refused
# by name.
META_KEYS = ("kind", "config", "step", "trained_steps", "defaults", "open_clip_cfg", "distilled_steps")
# The top-level values other than config and defaults (checked by their own rules): steps are counts.
META_VALUES = {
    "kind": (lambda v: isinstance(v, str), "a string"),
    "step": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**53, "an integer in 0 … 2**53"),
    "trained_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**53,
                      "an integer in 0 … 2**53"),
    "open_clip_cfg": (lambda v: isinstance(v, dict), "an object"),
    # a step-distilled decoder (training/distill.py, decoder_steps): the sampling steps it was trained to take
    "distilled_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000,
                        "an integer in 1 … 1000"),
}


def a_kind(kind: str) -> str:
    """A model kind with its article, for messages: "an sr", "a decoder"."""
    return f"an {kind}" if kind == "sr" else f"a {kind}"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as what it claims to be (missing file, unknown kind, a config
    that does not deserialise, weights that do not fit the config)."""


@dataclass(frozen=True)
class Kind:
    """One checkpoint kind: its config dataclass, the network built from a config, and the extra graph
    modules that wrap a built network (``views``: graph name -> wrapper class)."""

    name: str
    config: type
    build: typing.Callable[[typing.Any], torch.nn.Module]
    views: dict[str, type] = dataclasses.field(default_factory=dict)


KINDS: dict[str, Kind] = {k.name: k for k in (
    # open_clip builds CLIP; the exported graphs are its two towers, never the whole model.
    Kind("clip", ClipConfig, build_clip, {"text_encoder": ClipTextEncoder, "image_encoder": ClipImageEncoder}),
    # the prior is a graph itself, and so is its split at the text prefix (a key/value cache).
    Kind("prior", PriorConfig, DiffusionPrior, {"prior_prefix": PriorPrefix, "prior_step": PriorStep}),
    Kind("decoder", DecoderConfig, Decoder),
    Kind("sr", SRConfig, SuperRes),
)}


def kind(name: str) -> Kind:
    if not isinstance(name, str) or name not in KINDS:
        raise CheckpointError(f"unknown checkpoint kind {name!r}; known: {', '.join(KINDS)}")
    return KINDS[name]


# --------------------------------------------------------------------------------------------------------
# checkpoint folders


def resolve(folder: str | Path) -> Path:
    """The checkpoint folder to read: ``folder``, or ``folder.old`` if a kill hit between the two renames."""
    folder = Path(folder)
    old = folder.with_name(folder.name + ".old")
    return folder if folder.exists() or not old.exists() else old


def read_defaults(ckpt_dir: str | Path) -> dict[str, dict]:
    """``<ckpt_dir>/defaults.json`` as {stage: {key: value}}, checked; {} when the directory has none."""
    path = Path(ckpt_dir) / DEFAULTS
    return read_defaults_file(path) if path.exists() else {}


def read_json(path: str | Path, limit: int = MAX_JSON_BYTES):
    """A JSON file from a source the user named, read as untrusted input: a regular file (not a FIFO, a device or
    a folder; checked without blocking) of at most ``limit`` bytes, nesting and number literals bounded (NaN and
    inf are parsed: the field they sit in refuses them by name). FileNotFoundError passes through; every other
    problem is one CheckpointError line."""
    path = Path(path)
    try:
        return parse_json(read_bounded(None, path, limit), path, constants=True)
    except EngineFolderError as e:
        raise CheckpointError(str(e)) from None


def read_defaults_file(path: str | Path) -> dict[str, dict]:
    """A sampling-defaults JSON file, {stage: {sampler, steps, guidance, candidates}}, every value checked."""
    path = Path(path)
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected an object {{stage: {{sampler, steps, guidance, candidates}}}}")
    for stage, entry in data.items():
        check_defaults(entry, f"{path}: {stage}", f"{path}: {stage!r}")
    return data


def check_defaults(entry, where: str, name: str | None = None) -> None:
    """One stage's sampling defaults ({sampler, steps, guidance, candidates, choice_step, operation_steps}): an
    object whose keys are all known and whose values pass their check; ``where`` prefixes each key in an error
    (``name``: the entry itself, when it is not an object)."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{name or where} must be an object")
    for key, value in entry.items():
        check = DEFAULT_KEYS.get(key)
        if check is None:
            raise CheckpointError(f"{where}.{key}: unknown key; known: {', '.join(DEFAULT_KEYS)}")
        if not check(value):
            raise CheckpointError(f"{where}.{key} = {short_repr(value)} is not a valid value")


def read_meta(folder: str | Path) -> dict:
    """``model.json`` of a checkpoint folder."""
    path = resolve(folder) / META
    try:
        meta = read_json(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: expected an object with 'kind' and 'config'")
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        raise CheckpointError(f"{path}: unknown key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(META_KEYS)})")
    for key, (check, what) in META_VALUES.items():
        if key in meta and not check(meta[key]):
            raise CheckpointError(f"{path}: {key} = {short_repr(meta[key])}: must be {what}")
    if "defaults" in meta:
        check_defaults(meta["defaults"], f"{path}: defaults")
    return meta


def read_config(folder: str | Path, expect: str | None = None) -> tuple[str, object, dict]:
    """(kind, config dataclass, model.json) of a checkpoint folder; ``expect``: the kind it must be."""
    meta = read_meta(folder)
    name = meta.get("kind")
    if expect is not None and name != expect:
        raise CheckpointError(f"{resolve(folder) / META}: kind {name!r}, expected {expect!r}")
    try:
        config = config_from_dict(kind(name).config, meta["config"], where=f"{resolve(folder) / META}: config")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return name, config, meta


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The saved weights, floating-point tensors upcast to fp32."""
    state = load_file(str(resolve(folder) / WEIGHTS))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def build(name: str, config) -> torch.nn.Module:
    """The untrained network of kind ``name`` for ``config``."""
    return kind(name).build(config)


def check_weights(folder: str | Path, name: str, config) -> None:
    """Refuse weights that would not load into the network of ``config``, reading only the safetensors header:
    a truncated file, or tensor names or shapes that differ from the network's (built on the meta device,
    so no memory is spent on it). What an exporter calls on every source before it writes anything."""
    path = resolve(folder) / WEIGHTS
    if not path.is_file():  # also a named pipe or a device, which reading would block on or never finish
        raise CheckpointError(f"{path}: {'not a regular file' if path.exists() else 'not found'}")
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a complete safetensors file ({e})") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build(name, config).state_dict().items()}
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    wrong = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
    problems = [f"{what} {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''} ({len(keys)})"
                for what, keys in (("missing", missing), ("unexpected", extra)) if keys]
    problems += [f"{k} has shape {list(saved[k])}, the config gives {list(expected[k])}" for k in wrong[:3]]
    if problems:
        raise CheckpointError(f"{path}: weights do not fit the {name} config in {META}: " + "; ".join(problems))


def check_values(folder: str | Path, name: str, config) -> None:
    """Refuse weights whose values would export a broken graph, after ``check_weights``: a floating-point
    parameter stored as an integer or bool tensor (or the reverse), or any NaN or inf (which would only fail
    at run time, as a NaN image). Reads one tensor at a time, so memory stays one tensor's."""
    path = resolve(folder) / WEIGHTS
    with torch.device("meta"):
        expected = {k: v.dtype for k, v in build(name, config).state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() != expected[key].is_floating_point:
                raise CheckpointError(f"{path}: {key} is stored as {str(tensor.dtype).removeprefix('torch.')}, "
                                      f"the network's is {str(expected[key]).removeprefix('torch.')}")
            if tensor.is_floating_point():
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    raise CheckpointError(f"{path}: {key} has {bad} non-finite value{'s' * (bad > 1)} (NaN or inf) "
                                          f"of {tensor.numel()}")


@dataclass(frozen=True)
class Loaded:
    """A checkpoint folder rebuilt: its kind, config dataclass, model.json and network (eval, no gradients)."""

    kind: str
    config: object
    meta: dict
    model: torch.nn.Module

    def view(self, graph: str) -> torch.nn.Module:
        """The module of graph ``graph`` over this network: a wrapper (CLIP's towers, the prior's split) or the
        network itself when ``graph`` names no wrapper of its kind."""
        views = KINDS[self.kind].views
        if graph in views:
            return views[graph](self.model).eval()
        if self.kind == "clip":  # the whole open_clip model is never a graph
            raise CheckpointError(f"graph {graph!r} cannot come from a CLIP checkpoint "
                                  f"(its graphs: {', '.join(views)})")
        return self.model


def load(folder: str | Path, expect: str | None = None) -> Loaded:
    """Rebuild the network of a checkpoint folder from its config and load its weights (strictly)."""
    name, config, meta = read_config(folder, expect)
    model = build(name, config)
    model.load_state_dict(load_weights(folder), strict=True)
    return Loaded(name, config, meta, model.eval().requires_grad_(False))
