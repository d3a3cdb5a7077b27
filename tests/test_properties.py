"""The hostile-input contract (issue 31) as properties, checked by hypothesis on generated cases.

Engine folders: a copy of the tiny folder whose ``manifest.json`` is mutated (values replaced by wrong types,
huge, negative or non-finite numbers, deep nesting, odd or path-like strings; keys dropped or added; graphs
renamed; the file's bytes cut or prefixed) either loads and makes a right image, or ``Pipeline.load`` (what the
CLI calls) refuses it with one ``Dalle2RTError`` line (the CLI's ``error: …``), within CPU_SECONDS, with bounded
memory, and writing nothing outside the copy's sandbox.

HTTP: a mutated body for ``POST /v1/images`` (wrong types and ranges, unknown or many keys, huge strings, lone
surrogates, non-standard JSON, bytes that are not JSON) and a mutated upload for ``POST /v1/variations`` get a 200
with valid images or a 4xx whose body is the API's one line of JSON, never a 5xx; the good request sent after
each one still gets its image.

Examples are derandomized (the same cases on every run: CI is reproducible) and few, so the file runs in about a
minute with the tiny folder's export; hypothesis shrinks a failure to a minimal mutation and prints it. No example
database is written. DALLE2_RT_PROPERTY_EXAMPLES=600 searches further (what found the loader's unchecked
``optimized_for``, ``pixel_range``, ``clip_x0``, ``spacing`` and ``preprocess``).
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e '.[dev]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'dalle2-rt[serve]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from dalle2_rt.runtime.errors import Dalle2RTError  # noqa: E402
from dalle2_rt.runtime.manifest import MANIFEST  # noqa: E402
from dalle2_rt.runtime.pipeline import Pipeline  # noqa: E402
from dalle2_rt.runtime.settings import OPTIONS  # noqa: E402
from dalle2_rt.serve.service import Limits, Service  # noqa: E402
from tests.test_hostile_input import png_header  # noqa: E402
from tests.test_serve import FAST, LocalServer  # noqa: E402

# deadline=None: hypothesis' deadline is wall-clock time, which a starved process on a busy 2-core machine
# exceeds 50-fold (an example of 0.7 s took 40 s); ``bounded`` holds each example to CPU seconds instead
EXAMPLES = int(os.environ.get("DALLE2_RT_PROPERTY_EXAMPLES", "40"))  # per property (uploads: 5/8 of it)
PROPERTY = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=False)
CPU_SECONDS = 5.0  # of this process (every thread: the server's, onnxruntime's) per example
WALL_SECONDS = 120  # past it an example is interrupted: a hang (a read that never ends) fails, not blocks
# every sampling option given, so a mutated stage default cannot change the work an example does
RUN = {**FAST, "sampler": "ddim", "prior_guidance": 2.0, "decoder_guidance": 2.0, "candidates": 1,
       "decoder_candidates": 1}
PROMPT, SEED = "a red circle", 7
GOOD = {"prompt": PROMPT, "seed": SEED, **FAST}
MAX_RSS_GROWTH = 1 << 30  # bytes of peak RSS an entire property may add: a huge allocation fails it


class Raw(str):
    """JSON text put into a document as it is: NaN, 1e400, a 5,000-digit integer, nesting 100,000 deep."""


OUTSIDE = "\u2063outside"  # stands for the absolute path of the sandbox's outside/ folder, which must stay empty

NUMBERS = [0, -1, 1, 2, 3, 16, 77, 2**31, 2**53 + 1, 2**63, 2**64, -2**63, 10**12, 10**30, 0.5, 4.5, -0.0,
           1e300, -1e300, 5e-324]
STRINGS = ["", " ", ".", "..", "../sr0", "../../x", "sr0/..", "a/b", OUTSIDE, OUTSIDE + "/x.onnx", "sr0.onnx",
           "tokenizer.json", "manifest.json", "decoder", "\ud800", "a \udfff b", "\x00", "é", "x" * 10_000, "NaN",
           "eps", "v", "cosine", "float16", "bool", "batch", "ddpm"]
RAW_TEXT = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 5000, "[" * 40 + "]" * 40,
            "[" * 100_000 + "]" * 100_000, '{"a": ' * 40 + "0" + "}" * 40]
scalars = st.one_of(st.sampled_from([None, True, False, *NUMBERS, *STRINGS]), st.integers(), st.floats(),
                    st.text(max_size=12))
hostile = st.one_of(scalars, scalars, st.sampled_from(RAW_TEXT).map(Raw), st.lists(scalars, max_size=4),
                    st.dictionaries(st.text(max_size=6), scalars, max_size=3), st.just([0.5] * 5000))
ODD_KEYS = ["x_unknown", "", "../x", "\ud800", "__class__", "0", "k" * 300]
GRAPH_NAMES = ["renamed_ok", "../sr0", "..", ".", "", "a/b", OUTSIDE, "sr0 ", "x" * 65, "\ud800", "decoder",
               "-lead"]


def dumps(value) -> bytes:
    """JSON bytes of ``value`` (ASCII: a lone surrogate becomes its escape), each ``Raw`` spliced in as is."""
    raws: list[str] = []

    def mark(v):
        if isinstance(v, Raw):
            raws.append(str(v))
            return f"\u2062raw{len(raws) - 1}"
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    text = json.dumps(mark(value))
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\u2062raw{i}"), raw, 1)
    return text.encode("ascii")


def replace_outside(value, outside: str):
    """``value`` with the OUTSIDE marker in every string (keys too) made the sandbox's outside/ path."""
    if isinstance(value, str) and not isinstance(value, Raw):
        return value.replace(OUTSIDE, outside)
    if isinstance(value, dict):
        return {replace_outside(k, outside): replace_outside(v, outside) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_outside(v, outside) for v in value]
    return value


# ------------------------------------------------------------------------------------------------- engine folders

def paths(value, at: tuple = ()) -> list[tuple]:
    """Every path into a parsed manifest (dict keys, list indices); a long list by its ends only, a graph's
    export-time ``validation`` record as one value."""
    out = [at] if at else []
    if isinstance(value, dict) and at[-1:] != ("validation",):
        for k, v in value.items():
            out += paths(v, (*at, k))
    elif isinstance(value, list):
        ends = range(len(value)) if len(value) <= 8 else (0, 1, len(value) - 1)
        for i in ends:
            out += paths(value[i], (*at, i))
    return out


# mutations under these leave every pixel as it was: provenance, the export's records, the hash table (a wrong
# entry is refused, never read as something else), the TensorRT table (not read by onnxruntime)
INERT = ("name", "created", "options", "fingerprint", "sources", "files", "trt")
INERT_GRAPH_KEYS = ("validation", "fingerprint", "source")


def inert(path: tuple) -> bool:
    return (path[0] in INERT or (path[0] == "graphs" and len(path) > 2 and path[2] in INERT_GRAPH_KEYS)
            or path[:2] == ("tokenizer", "reference"))


@st.composite
def manifest_edits(draw, manifest: dict) -> list[tuple]:
    """One or two mutations, each a tuple that ``apply_edit`` performs (printed by hypothesis on a failure)."""
    every = paths(manifest)
    # the sections the runtime reads drawn 3 times as often as the provenance ones
    sections = [s for s in sorted({p[0] for p in every}) for _ in range(1 if s in INERT else 3)]
    containers = [p for p in every if isinstance(lookup(manifest, p), dict | list)]

    def one():
        kind = draw(st.sampled_from(["set", "set", "set", "drop", "add", "rename", "bytes"]))
        if kind in ("set", "drop"):
            section = draw(st.sampled_from(sections))
            path = draw(st.sampled_from([p for p in every if p[0] == section]))
            return (kind, path, draw(hostile)) if kind == "set" else (kind, path)
        if kind == "add":
            return kind, draw(st.sampled_from(containers)), draw(st.sampled_from(ODD_KEYS)), draw(hostile)
        if kind == "rename":
            return kind, draw(st.sampled_from(sorted(manifest["graphs"]))), draw(st.sampled_from(GRAPH_NAMES))
        how = draw(st.sampled_from(["cut", "bom", "latin1", "empty", "garbage", "trailing"]))
        return kind, how, draw(st.floats(0, 1) if how == "cut" else st.binary(max_size=32))

    first = one()
    return [first] if first[0] == "bytes" or draw(st.booleans()) else [first, one()]


def lookup(value, path: tuple):
    for key in path:
        value = value[key]
    return value


def rename_values(value, old: str, new: str):
    """``value`` with every string equal to ``old`` (a graph's name where a stage names it) made ``new``."""
    if isinstance(value, dict):
        return {k: rename_values(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [rename_values(v, old, new) for v in value]
    return new if value == old else value


def apply_edit(data: dict, edit: tuple, outside: str) -> bool:
    """Perform one structural edit on ``data``; whether it is inert (True also when an earlier edit removed
    what this one would touch: then it does nothing)."""
    kind = edit[0]
    try:
        if kind == "set":
            lookup(data, edit[1][:-1])[edit[1][-1]] = replace_outside(edit[2], outside)
            return inert(edit[1])
        if kind == "drop":
            del lookup(data, edit[1][:-1])[edit[1][-1]]
            return inert(edit[1])
        if kind == "add":
            node = lookup(data, edit[1])
            if isinstance(node, dict):  # an unknown key: never read, wherever it is
                node[replace_outside(edit[2], outside)] = replace_outside(edit[3], outside)
                return True
            node.append(replace_outside(edit[3], outside))
            return inert(edit[1])
        if kind == "rename":
            old, new = edit[1], replace_outside(edit[2], outside)
            data["graphs"][new] = data["graphs"].pop(old)
            data["stages"] = rename_values(data["stages"], old, new)
            return edit[2] == "renamed_ok"
    except (KeyError, IndexError, TypeError, AttributeError):
        return True
    raise AssertionError(f"unknown edit {edit!r}")


def edit_bytes(raw: bytes, how: str, arg) -> bytes:
    """manifest.json's bytes cut, prefixed with a BOM or garbage, not UTF-8, emptied, or with whitespace after."""
    if how == "cut":
        return raw[:int(len(raw) * arg)]
    if how == "garbage":
        return arg + raw[len(arg):]
    return {"bom": b"\xef\xbb\xbf" + raw, "latin1": raw.replace(b'"tiny"', b'"t\xe9ny"'), "empty": b"",
            "trailing": raw + b" \n\t"}[how]


def apply_edits(manifest: dict, edits: list[tuple], outside: Path) -> tuple[bytes, bool]:
    """The bytes of ``manifest`` after ``edits``, and whether every edit was inert (pixels must not change)."""
    data = json.loads(json.dumps(manifest))
    quiet = all([apply_edit(data, e, str(outside)) for e in edits if e[0] != "bytes"])
    raw = dumps(data)
    for _, how, arg in (e for e in edits if e[0] == "bytes"):
        raw = edit_bytes(raw, how, arg)
        quiet = quiet and how == "trailing"
    return raw, quiet


@contextlib.contextmanager
def bounded():
    """Run the block within CPU_SECONDS of CPU time; interrupt it (TimeoutError) after WALL_SECONDS."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {WALL_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(WALL_SECONDS)
    start = time.process_time()
    try:
        yield
    finally:  # an answer or a refusal alike
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        spent = time.process_time() - start
        assert spent < CPU_SECONDS, f"{spent:.1f} CPU seconds"


def one_line(error: BaseException) -> None:
    message = str(error)
    assert message.strip() and "\n" not in message and "Traceback" not in message, repr(message)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``root`` but manifest.json and the cache folder (which a load may write)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.name != MANIFEST and p.relative_to(root).parts[0] != "cache"}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.fixture(scope="module")
def sandbox(tiny_engines, tmp_path_factory):
    """engines/ (a copy of the tiny folder: files, no links), cache/ (the hash and ORT caches), outside/, cwd/,
    home/ ($HOME and $XDG_CACHE_HOME): everything a load may touch; only cache/ and manifest.json may change."""
    root = tmp_path_factory.mktemp("props")
    shutil.copytree(tiny_engines, root / "engines", symlinks=False)
    for name in ("cache", "outside", "cwd", "home"):
        (root / name).mkdir()
    return root


def test_a_mutated_manifest_loads_and_makes_a_right_image_or_is_refused_in_one_line(sandbox, monkeypatch):
    folder, outside = sandbox / "engines", sandbox / "outside"
    for var, sub in (("DALLE2_RT_CACHE", "cache"), ("HOME", "home"), ("XDG_CACHE_HOME", "home")):
        monkeypatch.setenv(var, str(sandbox / sub))
    monkeypatch.chdir(sandbox / "cwd")
    original = (folder / MANIFEST).read_bytes()
    manifest = json.loads(original)
    reference = np.asarray(Pipeline.load(folder, threads=1)(PROMPT, seed=SEED, **RUN)[0])
    decoder_side = manifest["stages"]["decoder"]["image_size"]
    # taken after a first load: onnxruntime writes its device id under $XDG_CACHE_HOME once a process
    files, rss = snapshot(sandbox), peak_rss()
    seen = {"refused": 0, "loaded": 0}

    @PROPERTY
    @given(edits=manifest_edits(manifest))
    def check(edits):
        raw, quiet = apply_edits(manifest, edits, outside)
        (folder / MANIFEST).write_bytes(raw)
        try:
            with bounded():
                image = Pipeline.load(folder, threads=1)(PROMPT, seed=SEED, **RUN)[0]
        except Dalle2RTError as e:
            one_line(e)
            seen["refused"] += 1
        else:
            seen["loaded"] += 1
            pixels = np.asarray(image)
            assert image.mode == "RGB" and pixels.dtype == np.uint8
            if quiet:
                assert np.array_equal(pixels, reference), "an inert edit changed the pixels"
            else:  # another schedule, range or graph may change them; never the image's shape
                assert pixels.shape in (reference.shape, (decoder_side, decoder_side, 3)), pixels.shape
        assert snapshot(sandbox) == files, "a file was written, changed or removed outside cache/"

    try:
        check()
    finally:
        (folder / MANIFEST).write_bytes(original)
    assert peak_rss() - rss < MAX_RSS_GROWTH
    assert seen["refused"] and seen["loaded"], seen  # both sides of the contract were exercised


# ------------------------------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def server(tiny_engines):
    """One in-process server for the module: a service over the tiny folder on 127.0.0.1."""
    pipe = Pipeline.load(tiny_engines, threads=1)
    srv = LocalServer(Service(pipe, Limits(batch_window_s=0.002)))
    yield srv
    srv.close()


BODY_KEYS = ["prompt", "prompts", "n", "num_images", "seed", "response_format", "stream", *(o.name for o in OPTIONS)]
HTTP_INTS = [-1, 0, 1, 2, 3, 16, 17, 65, 1001, 2**31, 2**53 + 1, 2**63, 2**64 - 1, 2**64, -2**63, 10**30]
HTTP_VALUES = [None, True, False, *HTTP_INTS, 0.5, 2.0, -0.0, 1e300, -1e300, 5e-324, "", " ", "1", "ddim", "dpm++",
               "png", "b64_json", "\x00", "a red circle", "x" * 2001, "円" * 2000, "a " * 1000, "x" * 300_000,
               [], {}, [PROMPT] * 17, [PROMPT, 3], [PROMPT, ""], ["a blue star", "a \udfff"], {"prompt": PROMPT}]
HTTP_RAW = ["NaN", "Infinity", "-Infinity", "1e400", "9" * 5000, '"\\ud800"', '"a red circle \\udfff"',
            '"\\u0000"', "[" * 100_000 + "]" * 100_000, "[" * 30 + "]" * 30]
http_values = st.one_of(st.sampled_from(HTTP_VALUES), st.sampled_from(HTTP_VALUES), st.sampled_from(HTTP_RAW).map(Raw),
                        st.text(max_size=8))


@st.composite
def request_bodies(draw) -> tuple[bytes | str, str | None]:
    """(a body, its content-type): the good body mutated key by key, or bytes that are not that at all."""
    kind = draw(st.sampled_from(["edit", "edit", "edit", "many_keys", "raw", "bytes", "content_type"]))
    if kind == "many_keys":  # ~8 bytes a key: some under the JSON size limit, some over it
        return ("keys", draw(st.sampled_from([100, 5000, 40_000]))), "application/json"
    if kind == "raw":
        return Raw(draw(st.sampled_from(["[]", "null", "1", '"a red circle"', "{", '{"prompt": ', "{}" * 3,
                                         '{"prompt": "a", "prompt": 3}', "\ufeff{}", *HTTP_RAW]))), "application/json"
    if kind == "bytes":
        return draw(st.binary(max_size=64)), draw(st.sampled_from(["application/json", None, "text/plain"]))
    if kind == "content_type":
        return "good", draw(st.sampled_from([None, "text/plain", "application/x-www-form-urlencoded",
                                             "multipart/form-data; boundary=x", "application/json; charset=latin-1"]))
    edits = draw(st.lists(st.tuples(st.sampled_from([*BODY_KEYS, *ODD_KEYS]), http_values), min_size=1, max_size=3))
    dropped = draw(st.lists(st.sampled_from(list(GOOD)), max_size=2))
    return ("edits", tuple(edits), tuple(dropped)), "application/json"


def body_bytes(body) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, Raw):
        return str(body).encode("utf-8", "surrogatepass")
    if body == "good":
        return dumps(GOOD)
    if body[0] == "keys":
        return dumps({**GOOD, **{f"k{i}": 0 for i in range(body[1])}})
    _, edits, dropped = body
    data = {k: v for k, v in GOOD.items() if k not in dropped}
    for key, value in edits:
        data[key] = value
    return dumps(data)


def check_answer(reply, side: int) -> None:
    """A 200 with side × side images (JSON, PNG or an NDJSON stream ending in done) or a 4xx of one line of JSON."""
    kind = reply.headers.get("content-type", "")
    if reply.status_code == 200:
        if kind == "image/png":
            images = [Image.open(io.BytesIO(reply.content))]
        elif kind == "application/x-ndjson":
            events = [json.loads(line) for line in reply.text.splitlines()]
            assert events[0]["event"] == "queued" and events[-1]["event"] == "done", events[-1]
            images = [Image.open(io.BytesIO(base64.b64decode(e["b64_json"]))) for e in events if e["event"] == "image"]
        else:
            assert kind == "application/json", kind
            images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in reply.json()["data"]]
        assert images
        for image in images:
            image.load()
            assert image.size == (side, side)
        return
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text[:300])
    assert kind == "application/json", (reply.status_code, kind, reply.text[:300])
    assert "\n" not in reply.text.strip() and set(reply.json()) == {"error"}, reply.text[:300]
    assert isinstance(reply.json()["error"], str) and reply.json()["error"].strip()


def output_side(srv) -> int:
    return srv.service.pipe.manifest.data["output"]["image_size"]


def check_good_request(srv) -> None:
    reply = srv.client.post("/v1/images", json=GOOD)
    assert reply.status_code == 200, reply.text[:300]
    check_answer(reply, output_side(srv))


def test_a_mutated_images_request_is_answered_200_or_one_line_4xx_and_the_next_good_one_succeeds(server):
    rss = peak_rss()
    statuses: set[int] = set()

    @PROPERTY
    @given(case=request_bodies())
    def check(case):
        body, content_type = case
        headers = {"content-type": content_type} if content_type else {}
        with bounded():
            reply = server.client.post("/v1/images", content=body_bytes(body), headers=headers)
        check_answer(reply, output_side(server))
        statuses.add(reply.status_code)
        check_good_request(server)

    check()
    assert peak_rss() - rss < MAX_RSS_GROWTH
    assert 200 in statuses and len(statuses) >= 3, statuses  # both sides, several refusals


def _png(mode: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


UPLOADS = [b"", b"not an image", png_header(5000, 5000), png_header(20000, 20000), png_header(1, 10**6),
           _png("RGB", (8, 8))[:40], _png("RGB", (8, 8)), _png("L", (3, 40)), _png("RGBA", (33, 5)),
           _png("P", (1, 1)), _png("I;16", (16, 16)), _png("1", (64, 2))]
FORM_VALUES = ["1", "0", "-1", "2", "17", "1e3", "nan", "inf", "1.5", "", "x", "\x00", "\ud800", "9" * 400,
               "ddim", "png", "b64_json"]
FORM_KEYS = ["n", "seed", "response_format", "decoder_steps", "sr_steps", "decoder_guidance", "sampler", "x_unknown"]


@st.composite
def uploads(draw) -> tuple[int, tuple]:
    fields = draw(st.dictionaries(st.sampled_from(FORM_KEYS), st.sampled_from(FORM_VALUES), max_size=3))
    return draw(st.integers(0, len(UPLOADS) - 1)), tuple(sorted(fields.items()))


def test_a_mutated_variations_upload_is_answered_200_or_one_line_4xx(server):
    statuses: set[int] = set()

    @settings(PROPERTY, max_examples=EXAMPLES * 5 // 8)
    @given(case=uploads())
    def check(case):
        upload, fields = case
        form = {"decoder_steps": "2", "sr_steps": "1", **dict(fields)}
        form = {k: v.encode("utf-8", "surrogatepass") for k, v in form.items()}
        with bounded():
            reply = server.client.post("/v1/variations", files={"image": ("a.png", UPLOADS[upload], "image/png")},
                                       data=form)
        check_answer(reply, output_side(server))
        statuses.add(reply.status_code)
        check_good_request(server)

    check()
    assert 200 in statuses and len(statuses) >= 3, statuses  # both sides, several refusals
