"""User data as plain Python iterators of (uint8 (size, size, 3) image, caption); torch-free (the trainer wraps them).

Two layouts:
- an image folder: `any/depth/name.png|jpg|jpeg|webp` with its caption in `any/depth/name.txt`;
- webdataset-style .tar shards: members grouped by key, `key.png|jpg|jpeg|webp` + `key.txt`, where the key is the
  member path up to the first dot of its file name (webdataset's rule) and a sample's members are consecutive.

A bad sample (undecodable image, missing/empty/undecodable caption, unreadable member or shard) is skipped and
counted in a `SkipCounter`, with one warning per kind of problem, never an exception: one broken file in a
million must not stop a training run. Pass your own counter to read the counts afterwards.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")

Sample = tuple[np.ndarray, str]


class DataSkipWarning(UserWarning):
    """A sample was skipped; issued once per kind of problem per SkipCounter."""


class SkipCounter:
    """Counts skipped samples by kind ("bad_image", "missing_caption", ...) and warns on the first of each kind."""

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def skip(self, kind: str, where: str, why: str = "") -> None:
        self.counts[kind] += 1
        if self.counts[kind] == 1:
            detail = f": {why}" if why else ""
            warnings.warn(f"skipping {where} ({kind}{detail}); further {kind} skips are counted silently",
                          DataSkipWarning, stacklevel=3)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"SkipCounter({dict(self.counts)})"


def load_image(data: bytes | str | os.PathLike, size: int) -> np.ndarray:
    """Decode an image, flatten transparency onto white, centre-crop to a square, resize to (size, size).

    Raises whatever PIL raises on a broken file; callers turn that into a skip.
    """
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as img:
        img.load()  # decode now, so truncated files fail here rather than later
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        else:
            img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def decode_caption(data: bytes) -> str:
    """UTF-8 caption with surrounding whitespace removed (raises UnicodeDecodeError on bad bytes)."""
    return data.decode("utf-8").strip()


def _sample(image_bytes_or_path, caption_bytes: bytes, size: int, where: str, skips: SkipCounter) -> Sample | None:
    try:
        caption = decode_caption(caption_bytes)
    except UnicodeDecodeError as e:
        skips.skip("bad_caption", where, str(e))
        return None
    if not caption:
        skips.skip("empty_caption", where)
        return None
    try:
        image = load_image(image_bytes_or_path, size)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        skips.skip("bad_image", where, f"{type(e).__name__}: {e}")
        return None
    return image, caption


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def iter_image_folder(path: str | os.PathLike, size: int = 64, skips: SkipCounter | None = None) -> Iterator[Sample]:
    """Yield (image, caption) for every image under `path` (recursively, sorted) with a same-name `.txt`."""
    skips = skips if skips is not None else SkipCounter()
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # a stable order: the same folder gives the same stream
        for name in sorted(filenames):
            if not _is_image(name):
                continue
            image_path = Path(dirpath) / name
            caption_path = image_path.with_suffix(".txt")
            try:
                caption_bytes = caption_path.read_bytes()
            except FileNotFoundError:
                skips.skip("missing_caption", str(image_path))
                continue
            except OSError as e:
                skips.skip("unreadable", str(caption_path), str(e))
                continue
            sample = _sample(image_path, caption_bytes, size, str(image_path), skips)
            if sample is not None:
                yield sample


def _expand(paths_or_glob: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    if isinstance(paths_or_glob, (str, os.PathLike)):
        pattern = os.fspath(paths_or_glob)
        found = sorted(glob.glob(pattern))
        if not found and not glob.has_magic(pattern):
            found = [pattern]  # a plain path that does not exist: reported as a bad shard, not silently empty
        return found
    return [os.fspath(p) for p in paths_or_glob]


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's grouping: 'dir/abc.def.png' -> ('dir/abc', 'def.png')."""
    dirname, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{dirname}/{stem}" if dirname else stem
    return key, ext.lower() if dot else ""


def _emit(key: str, members: dict[str, bytes], shard: str, size: int, skips: SkipCounter) -> Sample | None:
    where = f"{shard}:{key}"
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None:
        skips.skip("missing_image", where)
        return None
    if "txt" not in members:
        skips.skip("missing_caption", where)
        return None
    return _sample(members[image_ext], members["txt"], size, where, skips)


def iter_tar_shards(paths_or_glob, size: int = 64, skips: SkipCounter | None = None) -> Iterator[Sample]:
    """Yield (image, caption) from webdataset-style .tar shards (a glob pattern, a path, or a list of paths).

    Shards are streamed in order; members of one sample must be consecutive, as webdataset writes them. Members
    other than an image and a .txt (e.g. .json) are ignored; a truncated shard yields what precedes the damage
    (a cut exactly on a 512-byte block boundary looks like a clean end to tarfile, so the cut sample then shows up
    as missing its caption or image rather than as a bad shard).
    """
    skips = skips if skips is not None else SkipCounter()
    for shard in _expand(paths_or_glob):
        key, members = None, {}
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    k, ext = _split_key(info.name)
                    if k != key:
                        if key is not None:
                            sample = _emit(key, members, shard, size, skips)
                            if sample is not None:
                                yield sample
                        key, members = k, {}
                    if ext == "txt" or ext in IMAGE_EXTENSIONS:
                        f = tar.extractfile(info)
                        members[ext] = f.read() if f is not None else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            # Whatever was complete before the damage still counts: members are only stored once fully read, so
            # the pending sample is kept if it has both parts; a half-read one goes with the damage count.
            skips.skip("bad_shard", shard, f"{type(e).__name__}: {e}")
            if key is not None and "txt" in members and any(x in members for x in IMAGE_EXTENSIONS):
                sample = _emit(key, members, shard, size, skips)
                if sample is not None:
                    yield sample
            continue
        if key is not None:
            sample = _emit(key, members, shard, size, skips)
            if sample is not None:
                yield sample


def mixed_stream(streams: list, weights: list[float], seed: int) -> Iterator:
    """Interleave several sources, drawing the next item from source i with probability weights[i] / sum.

    A source is a zero-argument callable returning a fresh iterator (preferred: `lambda: iter_image_folder(p)`),
    or a re-iterable (e.g. a list); both are restarted when they run out, so finite datasets cycle. A one-shot
    iterator (a generator object) cannot restart: once exhausted it leaves the mix, as does a source whose fresh
    pass yields nothing. The stream ends when every source has left.
    """
    if len(streams) != len(weights) or not streams:
        raise ValueError(f"need one weight per stream, got {len(streams)} streams and {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    rng = np.random.default_rng(seed)

    def opener(src) -> Callable[[], Iterator] | None:
        if callable(src) and not hasattr(src, "__next__"):
            return src
        if hasattr(src, "__next__"):  # a one-shot iterator: no restart
            return None
        return lambda: iter(src)

    openers = [opener(s) for s in streams]
    iters = [iter(s) if o is None else o() for s, o in zip(streams, openers)]
    alive = w > 0
    while alive.any():
        p = np.where(alive, w, 0.0)
        i = int(rng.choice(len(w), p=p / p.sum()))
        try:
            yield next(iters[i])
            continue
        except StopIteration:
            pass
        if openers[i] is not None:
            iters[i] = openers[i]()
            try:  # a fresh pass that is empty would spin forever: drop the source instead
                yield next(iters[i])
                continue
            except StopIteration:
                pass
        else:
            warnings.warn(f"mixed_stream: source {i} is a one-shot iterator and ran out, so it leaves the mix; "
                          f"pass a zero-argument callable returning a fresh iterator to cycle it", stacklevel=2)
        alive[i] = False
