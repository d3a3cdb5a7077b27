"""Config dataclasses to and from plain dicts (model.json, TOML tables): the one deserialiser of the project.

Torch-free (stdlib only), so that readers of TOML or JSON that must not import torch can use it.

Deserialising refuses a key the dataclass has no field for, naming it: a config written by a newer version (or a
misspelt override) would otherwise build something other than what it describes, silently. Keys the dict lacks
take the field's default, so data written before a field was added still loads.
"""
from __future__ import annotations

import dataclasses
import typing

__all__ = ["ConfigError", "config_from_dict", "config_to_dict"]


class ConfigError(ValueError):
    """A dict that does not describe its dataclass (a key it has no field for, or not an object at all)."""


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(cls, data: dict, *, where: str = ""):
    """Rebuild the (possibly nested) dataclass ``cls`` from its dict.

    Refuses a key ``cls`` has no field for (ConfigError naming it, under ``where``); missing keys take the
    field's default; JSON/TOML lists become tuples where the field is a tuple. Nested dataclass fields recurse.
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
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
