"""Config dataclasses to and from plain dicts (model.json, TOML tables): the one deserialiser of the project.

Torch-free (stdlib only), so that readers of TOML or JSON that must not import torch can use it.

Deserialising refuses a key the dataclass has no field for, naming it: a config written by a newer version (or a
misspelt override) would otherwise build something other than what it describes, silently. Keys the dict lacks
take the field's default, so data written before a field was added still loads.

A field may state what it can hold (``bounded``: a range, a set of values, a tuple's length), beside its default;
``config_from_dict`` checks every value it is given against that before the dataclass is built, and
``check_config`` checks a built one (a config made by code from a foreign checkpoint). The type comes from the
annotation: an ``int`` field refuses a bool, a float and a string, a ``float`` field NaN and inf, a
``tuple[int, ...]`` field is checked element by element, ``X | None`` also takes None. So a ``model.json`` saying
``"heads": -4`` or ``"dim": 1e9`` is one line naming the file and the field, before any module is built.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass

__all__ = ["MAX_CONTEXT", "MAX_DEPTH", "MAX_HEADS", "MAX_SIDE", "MAX_TIMESTEPS", "MAX_WIDTH", "Bounds", "ConfigError",
           "bounded", "check_config", "check_foreign", "check_value", "config_from_dict", "config_to_dict",
           "short_repr"]

# Limits shared by the model configs: generous (models of DALL-E 2's size pass: karlo's 2048-wide, 20-layer prior,
# 1024-pixel upsampling, CLIP ViT-bigG's 1664-wide, 48-layer tower) but finite, and within what an engine manifest
# may state (dalle2_rt/runtime/manifest.py; tests/test_hostile_input.py checks that), so what loads also exports
# and runs.
MAX_WIDTH = 8192  # embedding sizes, transformer widths, hidden layers
MAX_DEPTH = 128  # transformer layers
MAX_HEADS = 128  # attention heads
MAX_SIDE = 2048  # image sides, pixels (the exporter validates a graph at this size, so it bounds memory too)
MAX_CONTEXT = 1024  # text tokens
MAX_TIMESTEPS = 100_000  # T of a training chain (ours: 1000)


class ConfigError(ValueError):
    """A dict that does not describe its dataclass: a key it has no field for, a value outside its field's bounds,
    or not an object at all."""


@dataclass(frozen=True)
class Bounds:
    """What one config field may hold: numbers in ``lo`` … ``hi`` (a tuple's elements each), or one of
    ``choices``; ``length``: how many elements a tuple field has, (lo, hi)."""

    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    length: tuple[int, int] | None = None


def bounded(default=MISSING, lo: float | None = None, hi: float | None = None, *, choices: tuple = (),
            length: tuple[int, int] | None = None, default_factory=MISSING):
    """A dataclass field with its default and its ``Bounds`` (``dataclasses.field`` metadata ``"bounds"``)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"bounds": Bounds(lo, hi, tuple(choices), length)})


def short_repr(value) -> str:
    """``repr(value)`` cut to 40 characters, for a one-line error."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr of a 5,000-digit int raises
        return f"<a {value.bit_length()}-bit integer>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "…"


def _range(b: Bounds) -> str:
    return f"{b.lo:g} … {b.hi:g}" if isinstance(b.lo, float) or isinstance(b.hi, float) else f"{b.lo} … {b.hi}"


def _scalar_problem(kind: type, b: Bounds, value) -> str | None:
    """Why ``value`` cannot be a ``kind`` within ``b`` (None: it can)."""
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if kind is str:
        if not isinstance(value, str) or (b.choices and value not in b.choices):
            return "must be one of " + ", ".join(map(repr, b.choices)) if b.choices else "must be a string"
        return None
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    else:  # float: an integer literal is a number too
        ok = isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and math.isfinite(value)
        what = "a finite number"
    if ok and (b.lo is None or value >= b.lo) and (b.hi is None or value <= b.hi):
        return None
    return f"must be {what}" + (f" in {_range(b)}" if b.lo is not None and b.hi is not None else "")


def _shape(hint) -> tuple[type, bool, bool]:
    """(the scalar type, whether it is a tuple of them, whether None is allowed) of a field's annotation."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _check(hint, b: Bounds, value, where: str) -> None:
    kind, many, optional = _shape(hint)
    if value is None and optional:
        return
    if many:
        lo, hi = b.length or (0, 64)
        if not isinstance(value, list | tuple) or not lo <= len(value) <= hi:
            raise ConfigError(f"{where} = {short_repr(value)}: must be a list of {lo} … {hi} values")
        for i, element in enumerate(value):
            problem = _scalar_problem(kind, b, element)
            if problem:
                raise ConfigError(f"{where}[{i}] = {short_repr(element)}: {problem}")
        return
    problem = _scalar_problem(kind, b, value)
    if problem:
        raise ConfigError(f"{where} = {short_repr(value)}: {problem}{' (or null)' if optional else ''}")


def check_value(cls, name: str, value, where: str) -> None:
    """``value`` checked against the bounds that field ``name`` of the dataclass ``cls`` states (a ConfigError
    naming ``where`` if it is outside them; nothing to check if the field states none)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    bounds = field.metadata.get("bounds")
    if bounds is not None:
        _check(typing.get_type_hints(cls)[name], bounds, value, where)


def check_config(cfg, where: str = "") -> None:
    """Every field of the (possibly nested) dataclass instance ``cfg`` within its bounds; ``where`` prefixes the
    field in an error (``<where>.heads = -4: must be an integer in 1 … 128``)."""
    label = where or type(cfg).__name__
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            check_config(value, f"{label}.{f.name}")
        else:
            check_value(type(cfg), f.name, value, f"{label}.{f.name}")


def check_foreign(config: dict, table: dict[str, tuple[type, str]], where: str) -> None:
    """The keys of a foreign config (another library's, read from its checkpoint) that ``table`` maps to one of our
    config fields, each checked against that field's bounds before the other library builds anything from it.
    ``table``: dotted key -> (our dataclass, its field). A list where the field takes one value (one per U-Net of
    a cascade, one per level) is checked element by element; an absent key or a null one (the other library's
    default) is left alone."""
    for dotted, (cls, name) in table.items():
        node = config
        for key in dotted.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            continue
        _, many, _ = _shape(typing.get_type_hints(cls)[name])
        if isinstance(node, list | tuple) and not many:
            for i, element in enumerate(node):
                if element is not None:
                    check_value(cls, name, element, f"{where}.{dotted}[{i}]")
        else:
            check_value(cls, name, node, f"{where}.{dotted}")


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(cls, data: dict, *, where: str = ""):
    """Rebuild the (possibly nested) dataclass ``cls`` from its dict.

    Refuses a key ``cls`` has no field for and a value outside its field's bounds (ConfigError naming it, under
    ``where``); missing keys take the field's default; JSON/TOML lists become tuples where the field is a tuple.
    Nested dataclass fields recurse.
    """
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected an object of {cls.__name__} fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{label}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(k) for k in unknown)} (a {cls.__name__} has "
                          f"{', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = config_from_dict(hint, value, where=f"{label}.{name}")
        else:
            check_value(cls, name, value, f"{label}.{name}")
            if isinstance(value, list) and typing.get_origin(hint) is tuple:
                value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
