"""Pixels in and out: arrays <-> PIL images, input images for variations, PNG files with text metadata.

``save_png`` never leaves a partial file and never replaces an existing one: the PNG is written to a
temporary file in the target folder, flushed, then published with ``os.link`` (atomic, and fails if the
name exists), so two writers racing for one name both end with a file of their own.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import InputError


def to_uint8(x: np.ndarray, pixel_range=(-1.0, 1.0)) -> np.ndarray:
    """(B, 3, H, W) floats in ``pixel_range`` -> (B, H, W, 3) uint8, rounded to nearest."""
    lo, hi = (float(v) for v in pixel_range)
    scaled = (np.asarray(x, np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def open_image(image) -> Image.Image:
    """A PIL image from a PIL image or a path; anything that is not a readable image is an ``InputError``."""
    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise InputError(f"image {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"image {str(path)!r} is a directory") from None
    except Image.DecompressionBombError as e:  # a small file whose header claims billions of pixels
        raise InputError(f"{str(path)!r} is too large to decode ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not an image PIL can read"
        raise InputError(f"{str(path)!r} is not a readable image ({reason})") from None


def to_pixels(image: Image.Image, size: int, pixel_range=(0.0, 1.0)) -> np.ndarray:
    """Centre-crop to a square, resize to ``size`` (bicubic), RGB -> (3, size, size) float32 in ``pixel_range``."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    lo, hi = (float(v) for v in pixel_range)
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, S, S) in [0, 1]
    return (lo + x * (hi - lo)).astype(np.float32)


def slugify(text: str, max_len: int = 48) -> str:
    """ASCII file-name slug: 'A red Circle, left!' -> 'a-red-circle-left'; 'image' when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) > max_len:
        slug = slug[:max_len].rsplit("-", 1)[0] or slug[:max_len]
    return slug or "image"


def png_info(metadata: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        # A lone surrogate has no UTF-8: it becomes U+FFFD here rather than failing the save after the work.
        text = re.sub("[\ud800-\udfff]", "\ufffd", str(value))
        if text.isascii():
            info.add_text(key, text)
        else:
            info.add_itxt(key, text)  # iTXt: UTF-8 (tEXt is Latin-1)
    return info


def save_png(image: Image.Image, folder: Path, stem: str, metadata: dict | None = None) -> Path:
    """Write ``folder/stem.png`` (or ``stem-1.png``, ``stem-2.png``, ... if taken) atomically; return the path."""
    folder = Path(folder)
    # Not mkstemp: its 0600 mode would stay on the published file; 0666 here is reduced by the umask.
    tmp = str(folder / f".{stem[:32]}-{secrets.token_hex(6)}.png.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(metadata or {}))
            f.flush()
            os.fsync(f.fileno())
        for n in range(10_000):
            path = folder / (f"{stem}.png" if n == 0 else f"{stem}-{n}.png")
            try:
                os.link(tmp, path)  # atomic and exclusive: fails if the name exists
                return path
            except FileExistsError:
                continue
            except OSError as e:  # a filesystem without hard links (FAT, some network mounts)
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                if path.exists():  # check-then-rename: exclusive on Windows, racy only on such POSIX mounts
                    continue
                os.rename(tmp, path)
                return path
        raise FileExistsError(f"no free file name for {folder / stem}.png")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images (all one size) tiled row-major, ``columns`` per row, on black."""
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h))
    for k, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((k % columns) * w, (k // columns) * h))
    return grid
