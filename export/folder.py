"""The engine folder as files on disk: atomic replacement, crash recovery, and carrying files over from an old folder.

Shared by both exporters (``all.py`` for our checkpoints, ``diffusers_unclip.py`` for imported pipelines). A
new folder is built as the hidden sibling ``.<name>.export-<pid>-<random>`` and put in place with two renames
(``swap_into_place``); ``recover_stale`` cleans up after an exporter that was killed between them. Files of
the old folder that the new one keeps (graphs whose inputs did not change, their external data and their
TensorRT plans) are copied after their sha256 was checked against the old manifest (``intact_files``). The swap
deletes the old folder, so ``check_replaceable`` first refuses one that holds anything its manifest does not list.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath

from dalle2_rt.runtime import trt_keys

from . import manifest as mf
from .sources import sha256_file


class ExportError(RuntimeError):
    """The export cannot proceed as asked (e.g. --out names a folder that is not an engine folder)."""


def previous_manifest(out: Path) -> dict | None:
    """The manifest of the engine folder ``out`` is about to replace (None: no folder, or an empty one), after
    cleaning up what a killed export left; ExportError when ``out`` is something else, which is never replaced
    (and so never deleted)."""
    recover_stale(out)
    old = mf.read_manifest(out) if out.is_dir() else None
    if out.exists() and old is None and not is_ours(out):
        raise ExportError(f"{out} exists and is not an engine folder (no readable {mf.MANIFEST}); "
                          "remove it or choose another --out")
    return old


def check_replaceable(out: Path) -> None:
    """ExportError unless replacing ``out`` (None or an engine folder ``previous_manifest`` accepted) deletes only
    what an export wrote: its ``manifest.json`` and the files that manifest lists. A file or folder a user put
    beside them (notes, images, a copy of a graph) would go with the old folder, so it is named instead."""
    if not out.is_dir():
        return
    try:
        listed = json.loads((out / mf.MANIFEST).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    known = {mf.MANIFEST, *(listed if isinstance(listed, dict) else ())}
    parents = {q.as_posix() for rel in known for q in PurePosixPath(rel).parents if q.as_posix() != "."}
    foreign = []
    for root, dirs, files in os.walk(out):  # symlinks are listed, never followed
        here = Path(root).relative_to(out)
        for name in sorted(files) + sorted(dirs):
            rel = (here / name).as_posix()
            if rel not in known and rel not in parents:
                foreign.append(rel)
        dirs[:] = [d for d in dirs if (here / d).as_posix() in parents]  # a foreign folder is named once
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ExportError(f"{out} holds what its {mf.MANIFEST} does not list ({shown}); rebuilding would delete "
                          "it: move it out of the folder or choose another --out")


def is_ours(out: Path) -> bool:
    """An empty folder, or an engine folder of any schema version (one we may replace)."""
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    try:
        return json.loads((out / mf.MANIFEST).read_text(encoding="utf-8")).get("schema") == mf.SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def intact_files(folder: Path, manifest: dict) -> set[str]:
    """The files of ``manifest.files`` present in ``folder`` with the recorded sha256."""
    ok = set()
    for rel, want in manifest.get("files", {}).items():
        path = folder / rel
        if path.is_file() and sha256_file(path) == want:
            ok.add(rel)
    return ok


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with two renames; between them the old folder waits as ``.<name>.old-<pid>``.

    ``tmp`` (made private by mkdtemp) first gets the mode of an ordinary folder under the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    aside = None
    if out.exists():
        aside = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        out.rename(aside)
    try:
        tmp.rename(out)
    except BaseException:
        if aside is not None:
            aside.rename(out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(out: Path) -> None:
    """Clean up after an export that was killed (SIGKILL, power loss) and so could not clean up itself:
    its build folder is removed; an old folder set aside just before the final rename is put back."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("export", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            p.rename(out)
        else:
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# carrying graphs and plans over from the old folder


def graph_files(entry: dict) -> set[str]:
    """Every file of a manifest graph entry: the graph, its optimised copy, their external data files and the
    int8 variant."""
    return {entry["file"], *([entry["optimized_file"]] if entry.get("optimized_file") else []),
            *entry.get("external_data", ()), *entry.get("optimized_external_data", ()),
            *([entry["int8"]["file"]] if isinstance(entry.get("int8"), dict) else [])}


def carry_graph(out: Path, tmp: Path, previous: dict) -> dict:
    for rel in graph_files(previous):
        shutil.copy2(out / rel, tmp / rel)
    return {**previous, "trt": {}}  # plans are re-attached by carry_trt


def carry_trt(out: Path, tmp: Path, old: dict, graphs: dict, reused: list[str]) -> dict:
    """Copy the old folder's plans of carried-over graphs (same ONNX, so the same engine); keep their records."""
    records = {}
    for key, record in (old.get("trt") or {}).items():
        plans = {g: p for g, p in record.get("plans", {}).items() if g in reused and (out / p).is_file()}
        if not plans:
            continue
        (tmp / trt_keys.engine_dir(key)).mkdir(parents=True, exist_ok=True)
        for g, p in plans.items():
            shutil.copy2(out / p, tmp / p)
            graphs[g]["trt"][key] = p
        cache = out / record["timing_cache"]
        if cache.is_file():
            shutil.copy2(cache, tmp / record["timing_cache"])
        keep = set(plans)
        records[key] = {**record, "plans": plans,
                        **{k: {g: v for g, v in record.get(k, {}).items() if g in keep}
                           for k in ("fp32_layers", "validation", "build_seconds")}, "failed": {}}
    return records


def trt_satisfied(old: dict, key: str | None, precision: str) -> bool:
    """No plans wanted, or the folder already has this machine's plans at this precision."""
    if key is None:
        return True
    record = (old.get("trt") or {}).get(key)
    return bool(record) and record.get("precision") == precision
