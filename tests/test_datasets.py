"""User-data iterators: exactly the good samples come out, every bad one is skipped and counted, nothing crashes."""

from __future__ import annotations

import io
import itertools
import tarfile
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dalle2_rt.training.datasets import (
    DataSkipWarning,
    SkipCounter,
    iter_image_folder,
    iter_tar_shards,
    load_image,
    mixed_stream,
)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _solid(colour, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def _three_bands() -> Image.Image:
    """120 x 60: red | green | blue in 30 | 60 | 30 columns, so the centre 60 x 60 crop keeps only green."""
    a = np.zeros((60, 120, 3), np.uint8)
    a[:, :30] = (255, 0, 0)
    a[:, 30:90] = (0, 255, 0)
    a[:, 90:] = (0, 0, 255)
    return Image.fromarray(a)


# ---- image folder --------------------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {
        "a.png": _encode(_three_bands(), "PNG"), "a.txt": b"a green square\n",
        "sub/b.jpg": _encode(_solid((10, 20, 200)), "JPEG"), "sub/b.txt": "un caf\u00e9 bleu".encode(),
        "sub/deeper/c.webp": _encode(_solid((0, 200, 0)), "WEBP"), "sub/deeper/c.txt": b"c",
        "sub/d.PNG": _encode(_solid((0, 0, 0, 0), mode="RGBA"), "PNG"), "sub/d.txt": b"transparent",
        "broken.png": b"\x89PNG\r\n\x1a\n this is not a png", "broken.txt": b"broken",
        "truncated.jpg": _encode(_solid((1, 2, 3), (200, 200)), "JPEG")[:300], "truncated.txt": b"truncated",
        "nocaption.png": _encode(_solid((5, 5, 5)), "PNG"),
        "blank.png": _encode(_solid((5, 5, 5)), "PNG"), "blank.txt": b"  \n",
        "badutf8.png": _encode(_solid((5, 5, 5)), "PNG"), "badutf8.txt": b"\xff\xfe\xfa",
        "orphan.txt": b"a caption without an image", "notes.md": b"ignored",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def test_image_folder_yields_good_items_and_counts_skips(folder):
    skips = SkipCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(iter_image_folder(folder, size=16, skips=skips))
    captions = [c for _, c in items]
    assert captions == ["a green square", "un caf\u00e9 bleu", "transparent", "c"]  # sorted walk, captions stripped
    for img, _ in items:
        assert img.dtype == np.uint8 and img.shape == (16, 16, 3)
    by_caption = {c: img for img, c in items}
    assert (by_caption["a green square"] == (0, 255, 0)).all()  # centre crop kept the green third only
    assert (by_caption["transparent"] == 255).all()  # transparency flattened onto white
    assert skips.counts == Counter(bad_image=2, missing_caption=1, empty_caption=1, bad_caption=1)
    assert skips.total == 5
    skip_warnings = [w for w in caught if issubclass(w.category, DataSkipWarning)]
    assert len(skip_warnings) == 4  # once per kind, not once per sample


def test_image_folder_without_counter_still_skips(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(list(iter_image_folder(folder, size=8))) == 4
    with pytest.raises(FileNotFoundError):
        next(iter_image_folder(folder / "missing"))


def test_load_image_resizes_and_crops():
    img = load_image(_encode(_three_bands(), "PNG"), 60)
    assert img.shape == (60, 60, 3) and (img == (0, 255, 0)).all()  # no resize needed: the crop is 60 x 60
    assert load_image(_encode(_solid((9, 9, 9), (7, 300)), "PNG"), 64).shape == (64, 64, 3)  # upscaling works
    gray = load_image(_encode(_solid(77, (20, 20), mode="L"), "PNG"), 10)
    assert gray.shape == (10, 10, 3) and (gray == 77).all()


# ---- tar shards ----------------------------------------------------------------------------------------------

def _write_tar(path, members: list[tuple[str, bytes | None]]) -> None:
    """members: (name, data); data None makes a directory entry."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _good(i: int) -> list[tuple[str, bytes]]:
    return [(f"s/{i:04d}.png", _encode(_solid((i, 0, 0)), "PNG")), (f"s/{i:04d}.txt", f"item {i}".encode())]


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "shard-000.tar"
    _write_tar(path, [
        ("s", None),
        *_good(1),
        ("s/0002.jpg", _encode(_solid((0, 0, 200)), "JPEG")), ("s/0002.txt", b"item 2"),
        ("s/0003.png", b"garbage"), ("s/0003.txt", b"item 3"),  # corrupt image
        ("s/0004.png", _encode(_solid((1, 1, 1)), "PNG")),  # no caption
        ("s/0005.txt", b"item 5"),  # no image
        ("s/0006.json", b"{}"), ("s/0006.png", _encode(_solid((6, 0, 0)), "PNG")), ("s/0006.txt", b"item 6"),
        ("s/0007.seg.png", _encode(_solid((7, 0, 0)), "PNG")), ("s/0007.txt", b"item 7"),  # key before 1st dot
    ])
    return path


def test_tar_shard_yields_good_items_and_counts_skips(shard):
    skips = SkipCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = list(iter_tar_shards(str(shard), size=8, skips=skips))
    assert [c for _, c in items] == ["item 1", "item 2", "item 6"]
    assert all(img.shape == (8, 8, 3) and img.dtype == np.uint8 for img, _ in items)
    assert items[0][0][0, 0, 0] == 1
    # 0007's image has extension "seg.png", not an image extension: counted as a sample without an image.
    assert skips.counts == Counter(bad_image=1, missing_caption=1, missing_image=2)


def test_tar_shards_by_glob_list_and_damage(tmp_path, shard):
    second = tmp_path / "shard-001.tar"
    _write_tar(second, _good(10) + _good(11))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_glob = [c for _, c in iter_tar_shards(str(tmp_path / "shard-*.tar"), size=8)]
        by_list = [c for _, c in iter_tar_shards([second, shard], size=8)]
    assert by_glob == ["item 1", "item 2", "item 6", "item 10", "item 11"]
    assert by_list == ["item 10", "item 11", "item 1", "item 2", "item 6"]

    # A truncated shard: the samples before the damage come out, the damage is counted, nothing raises.
    whole = tmp_path / "big.tar"
    _write_tar(whole, [m for i in range(20) for m in _good(i)])
    cut = tmp_path / "cut.tar"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 700])  # mid-member: a cut on a 512-byte boundary reads as a clean end
    skips = SkipCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [c for _, c in iter_tar_shards([cut, tmp_path / "nope.tar", second], size=8, skips=skips)]
    assert got[:5] == [f"item {i}" for i in range(5)] and got[-2:] == ["item 10", "item 11"]
    assert 5 <= len(got) - 2 < 20
    assert skips.counts["bad_shard"] == 2  # the truncated one and the missing one


# ---- mixing --------------------------------------------------------------------------------------------------

def test_mixed_stream_weights_cycling_and_reproducibility():
    def endless():
        return itertools.repeat("w")

    a = list(itertools.islice(mixed_stream([endless, ["f1", "f2"]], [3, 1], seed=0), 4000))
    b = list(itertools.islice(mixed_stream([endless, ["f1", "f2"]], [3, 1], seed=0), 4000))
    assert a == b
    counts = Counter(a)
    assert counts["w"] / 4000 == pytest.approx(0.75, abs=0.03)
    # The two-item list cycled: its items alternate in order.
    finite = [x for x in a if x != "w"]
    assert finite[:6] == ["f1", "f2"] * 3 and abs(counts["f1"] - counts["f2"]) <= 1


def test_mixed_stream_one_shot_and_empty_sources_leave():
    with pytest.warns(UserWarning, match="one-shot iterator"):
        out = list(mixed_stream([iter([1, 2, 3]), (x for x in "ab")], [1, 1], seed=1))
    assert sorted(out, key=str) == [1, 2, 3, "a", "b"]
    # An empty re-iterable is dropped rather than restarted forever.
    assert list(itertools.islice(mixed_stream([[], ["x"]], [5, 1], seed=2), 10)) == ["x"] * 10
    # A zero weight means never drawn.
    assert set(itertools.islice(mixed_stream([["a"], ["b"]], [0, 1], seed=3), 50)) == {"b"}
    with pytest.raises(ValueError):
        next(mixed_stream([["a"]], [1, 2], seed=0))
    with pytest.raises(ValueError):
        next(mixed_stream([["a"]], [-1], seed=0))


def test_folder_sources_cycle_in_a_mix(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = lambda: iter_image_folder(folder, size=8)  # noqa: E731
        got = [c for _, c in itertools.islice(mixed_stream([src], [1.0], seed=0), 9)]
    assert got == ["a green square", "un caf\u00e9 bleu", "transparent", "c"] * 2 + ["a green square"]
