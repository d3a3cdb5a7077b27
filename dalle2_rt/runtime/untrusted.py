"""Reading the files of an engine folder as untrusted input: regular files inside the folder, bounded JSON.

An engine folder may come from anywhere, so what it names is opened only if it resolves (symlinks followed)
to a path inside the folder and is a regular file: a symlink to ``/etc/passwd`` is refused before a byte is
read, and a named pipe or ``/dev/zero`` (whose hashing would never end) is refused without blocking, because
the file is opened with O_NONBLOCK and checked with fstat before reading. JSON is parsed with bounded size,
nesting depth and number literals, so a crafted ``manifest.json`` is one ``EngineFolderError`` line, not a
RecursionError, a 5,000-digit integer or an ``inf``.

The same reader serves the exporter's sources (a checkpoint's ``model.json``, a foreign pipeline's config files),
without the confinement (``folder`` None: a user may link a checkpoint's files from elsewhere) and with
``constants``: there NaN, inf and overflowing literals are parsed, for the config's field check to name them.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from .errors import EngineFolderError

MAX_JSON_BYTES = 64 * 2**20  # manifest.json and tokenizer.json (the bundled ones: 0.1 MB and 2 MB)
MAX_JSON_DEPTH = 32  # the manifest nests 6 deep
MAX_NUMBER_CHARS = 40  # an int64 has 20 characters, a float64 in repr at most 24


def inside(folder: Path, path: Path) -> Path:
    """``path`` resolved (symlinks followed); an ``EngineFolderError`` if that leaves ``folder``."""
    root, real = Path(os.path.realpath(folder)), Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise EngineFolderError(f"{path}: resolves outside the engine folder {folder} (a symlink?); refused")
    return real


def open_regular(folder: Path | None, path: Path) -> int:
    """A read-only descriptor of ``path``, a regular file inside ``folder`` (None: anywhere); never blocks on a
    FIFO."""
    real = inside(folder, path) if folder is not None else path
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise EngineFolderError(f"{path}: cannot open ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a named pipe" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
            stat.S_ISBLK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) else "a socket or another special file"
        raise EngineFolderError(f"{path}: is {kind}, not a regular file")
    return fd


def read_bounded(folder: Path | None, path: Path, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file inside ``folder`` (None: anywhere), refused when over ``limit``."""
    fd = open_regular(folder, path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise EngineFolderError(f"{path}: {size} bytes, over the {limit} this file may have")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while read
        raise EngineFolderError(f"{path}: over the {limit} bytes this file may have")
    return data


def _number(kind, finite: bool = True):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise ValueError(f"a number of {len(text)} characters ({text[:12]}…)")
        value = kind(text)
        if kind is float and finite and not math.isfinite(value):
            raise ValueError(f"the number {text} is out of range")
        return value
    return parse


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _depth(value) -> int:
    """The nesting depth of parsed JSON, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            stack += [(c, d + 1) for c in (v.values() if isinstance(v, dict) else v)]
    return deepest


def parse_json(data: bytes, path: Path, *, constants: bool = False):
    """``data`` as JSON, number literals bounded in length, nesting at most MAX_JSON_DEPTH; NaN, inf and literals
    that overflow a float are refused, or with ``constants`` parsed (for a field check to refuse by name)."""
    try:
        value = json.loads(data.decode("utf-8"), parse_int=_number(int), parse_float=_number(float, not constants),
                           parse_constant=float if constants else _refuse_constant)
    except RecursionError:
        raise EngineFolderError(f"{path}: not usable JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise EngineFolderError(f"{path}: not valid JSON ({e})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise EngineFolderError(f"{path}: not usable JSON (nested over {MAX_JSON_DEPTH} deep)")
    return value
