"""``dalle2-rt`` / ``dream`` on the tiny engines: files, metadata, prompts files, variations, every user error."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle2_rt import cli
from dalle2_rt.runtime import pipeline as pipeline_mod
from dalle2_rt.runtime.progress import ProgressBar

REPO = Path(__file__).resolve().parents[1]
FAST = ["--prior-steps", "2", "--decoder-steps", "2", "--sr-steps", "1", "--threads", "1"]


@pytest.fixture
def work(tmp_path, monkeypatch, tiny_engines):
    """An empty working directory, the tiny engines as the default engines, a private hash cache."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DALLE2_RT_ENGINES", str(tiny_engines))
    monkeypatch.setenv("DALLE2_RT_CACHE", str(tmp_path / "cache"))
    return cwd


def run(argv, capsys) -> tuple[int, list[str], str]:
    """(exit code, stdout lines, stderr) of the CLI run in-process."""
    try:
        rc = cli.main([*argv])
    except SystemExit as e:  # argparse: --help and usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def files_under(folder: Path) -> list[str]:
    """Files below ``folder``, less the verified-hash cache (a cache, not output)."""
    found = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(f for f in found if not f.startswith("cache/"))


def test_writes_pngs_to_the_current_directory_and_prints_their_paths(work, capsys):
    rc, out, err = run(["a red circle, on the left!", "-n", "2", "--seed", "5", *FAST], capsys)
    assert rc == 0 and err == ""  # stderr is not a terminal: no progress bar
    assert out == ["a-red-circle-on-the-left-s5-0.png", "a-red-circle-on-the-left-s5-1.png"]
    assert files_under(work) == out
    im = Image.open(work / out[0])
    assert im.format == "PNG" and im.mode == "RGB"
    meta = im.text
    assert meta["prompt"] == "a red circle, on the left!" and meta["seed"] == "5"
    assert meta["sampler"] == "ddim" and meta["steps"] == "prior=2 decoder=2 sr0=1"
    assert meta["guidance"].startswith("prior=") and meta["backend"].startswith("onnxruntime")
    manifest = (Path(os.environ["DALLE2_RT_ENGINES"]) / "manifest.json").read_bytes()
    import hashlib

    assert meta["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()


def test_never_overwrites_and_reproduces_with_the_same_seed(work, capsys):
    _, first, _ = run(["two squares", "--seed", "3", *FAST], capsys)
    _, second, _ = run(["two squares", "--seed", "3", *FAST], capsys)
    assert first == ["two-squares-s3-0.png"] and second == ["two-squares-s3-0-1.png"]
    assert np.array_equal(np.asarray(Image.open(work / first[0])), np.asarray(Image.open(work / second[0])))
    assert not [n for n in os.listdir(work) if n.endswith(".tmp")]


def test_output_dir_is_created_and_grid_written(work, capsys):
    rc, out, _ = run(["a green triangle", "-n", "3", "--seed", "1", "-o", "out/deep", "--grid", *FAST], capsys)
    assert rc == 0 and len(out) == 4 and all(p.startswith("out/deep/") for p in out)
    grid = Image.open(work / out[-1])
    tile = Image.open(work / out[0]).size[0]
    assert Path(out[-1]).name == "grid-a-green-triangle-s1.png" and grid.size == (3 * tile, tile)


def test_from_file_skips_blank_and_comment_lines(work, capsys):
    (work / "prompts.txt").write_text("# shapes\n\na red circle\n   \ntwo blue squares  \n#x\n", encoding="utf-8")
    rc, out, _ = run(["--from-file", "prompts.txt", "--seed", "9", "-o", "o", *FAST], capsys)
    assert rc == 0
    assert out == ["o/a-red-circle-s9-0.png", "o/two-blue-squares-s9-0.png"]
    assert Image.open(work / out[1]).text["prompt"] == "two blue squares"


def test_variations_need_no_prompt(work, capsys):
    Image.new("RGB", (48, 40), (220, 30, 30)).save(work / "red.png")
    rc, out, _ = run(["--variations", "red.png", "-n", "2", "--seed", "4", "-o", "v", *FAST], capsys)
    assert rc == 0 and out == ["v/red-var-s4-0.png", "v/red-var-s4-1.png"]
    assert Image.open(work / out[0]).text["variation_of"] == "red.png"


def test_long_prompt_warns_and_unicode_prompt_works(work, capsys):
    rc, out, err = run(["circle " * 100, "--seed", "0", *FAST], capsys)
    assert rc == 0 and len(out) == 1
    assert err.count("\n") == 1 and err.startswith("dalle2-rt: warning: prompt longer")
    rc, out, err = run(["日本語 😀 «ünïcödé»", "--seed", "0", *FAST], capsys)
    assert rc == 0 and err == "" and out == ["unicode-s0-0.png"]
    assert Image.open(work / out[0]).text["prompt"] == "日本語 😀 «ünïcödé»"


def test_quiet_and_progress_bar_on_a_terminal(work, capsys, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert cli.main(["a red circle", "--seed", "0", *FAST]) == 0
    drawn = tty.getvalue()
    for stage in ("text_encoder", "prior", "decoder", "sr0"):
        assert stage in drawn
    assert "2/2" in drawn and "\r" in drawn
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert cli.main(["a red circle", "--seed", "0", "-q", *FAST]) == 0
    assert tty.getvalue() == ""
    capsys.readouterr()


def test_progress_bar_is_silent_off_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar("decoder", 1, 2)
    bar.close()
    assert stream.getvalue() == ""


@pytest.fixture
def inputs(work):
    """Files the error cases point at."""
    (work / "notes.txt").write_text("not an image")
    (work / "afile").write_text("x")
    (work / "empty.txt").write_text("\n# only a comment\n")
    corrupt = work.parent / "corrupt"
    shutil.copytree(os.environ["DALLE2_RT_ENGINES"], corrupt)
    data = bytearray((corrupt / "decoder.onnx").read_bytes())
    data[100] ^= 0xFF
    (corrupt / "decoder.onnx").write_bytes(bytes(data))
    bad_schema = work.parent / "bad_schema"
    shutil.copytree(os.environ["DALLE2_RT_ENGINES"], bad_schema)
    m = json.loads((bad_schema / "manifest.json").read_text())
    m["schema_version"] = 99
    (bad_schema / "manifest.json").write_text(json.dumps(m))
    return work


ERRORS = {
    "empty prompt": ([""], "empty"),
    "blank prompt": (["  \t "], "empty"),
    "no prompt": ([], "no prompt"),
    "n zero": (["x", "-n", "0"], "num-images"),
    "n negative": (["x", "-n", "-3"], "num-images"),
    "n too large": (["x", "-n", "65"], "num_images must be between 1 and 64, got 65"),
    "n not a number": (["x", "-n", "two"], "not an integer"),
    "prior steps zero": (["x", "--prior-steps", "0"], "prior-steps"),
    "decoder steps negative": (["x", "--decoder-steps", "-1"], "decoder-steps"),
    "sr steps zero": (["x", "--sr-steps", "0"], "sr-steps"),
    "steps above T": (["x", "--decoder-steps", "5000"], "decoder steps must be between 1 and"),
    "too many candidates": (["x", "--candidates", "17"], "candidates must be between 1 and 16, got 17"),
    "decoder candidates zero": (["x", "--decoder-candidates", "0"], "decoder-candidates"),
    "guidance not a number": (["x", "--prior-guidance", "lots"], "'lots' is not a number"),
    "threads zero": (["x", "--threads", "0"], "threads must be at least 1"),
    "guidance negative": (["x", "--decoder-guidance", "-1"], "decoder-guidance"),
    "guidance nan": (["x", "--prior-guidance", "nan"], "finite"),
    "guidance inf": (["x", "--decoder-guidance", "inf"], "finite"),
    "unknown sampler": (["x", "--sampler", "euler"], "invalid choice: 'euler'"),
    "unknown backend": (["x", "--backend", "jax"], "invalid choice: 'jax'"),
    "negative seed": (["x", "--seed", "-1"], "seed"),
    "missing engines": (["x", "--engines", "nowhere"], "does not exist"),
    "corrupt engines": (["x", "--engines", "../corrupt"], "decoder.onnx"),
    "wrong schema": (["x", "--engines", "../bad_schema"], "schema_version 99"),
    "engines folder is a file": (["x", "--engines", "afile"], "is not a folder"),
    "output dir under a file": (["x", "-o", "afile/sub"], "not writable"),
    "missing prompt file": (["--from-file", "missing.txt"], "does not exist"),
    "prompt file without prompts": (["--from-file", "empty.txt"], "no prompts"),
    "prompt file is a dir": (["--from-file", "."], "directory"),
    "variations not an image": (["--variations", "notes.txt"], "not a readable image"),
    "variations missing": (["--variations", "nope.png"], "does not exist"),
    "prompt and file": (["x", "--from-file", "empty.txt"], "not PROMPT and --from-file"),
    "unknown option": (["x", "--steps", "3"], "unrecognized arguments"),
}


@pytest.mark.parametrize("argv,message", list(ERRORS.values()), ids=list(ERRORS))
def test_user_errors_are_one_line_nonzero_and_write_nothing(inputs, capsys, argv, message):
    before = files_under(inputs.parent)
    rc, out, err = run(argv, capsys)
    assert rc not in (0, None)
    assert out == []
    assert err.count("\n") == 1 and err.startswith("dalle2-rt: error: "), err
    assert message in err
    assert "Traceback" not in err
    assert files_under(inputs.parent) == before


def test_missing_default_engines_say_make_engines(work, capsys, monkeypatch):
    monkeypatch.delenv("DALLE2_RT_ENGINES")
    monkeypatch.setattr(pipeline_mod, "default_engines", lambda: work / "engines" / "shapes-v2")
    rc, out, err = run(["x"], capsys)
    assert rc == 1 and out == [] and "make engines" in err and err.count("\n") == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_dir(work, capsys):
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = run(["x", "-o", "ro", *FAST], capsys)
    finally:
        ro.chmod(0o700)
    assert rc != 0 and "not writable" in err and files_under(ro) == []


def test_tensorrt_backend_error_is_one_line(work, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed")
    except ImportError:
        pass
    rc, out, err = run(["x", "--backend", "tensorrt"], capsys)
    assert rc == 1 and out == [] and err.startswith("dalle2-rt: error: TensorRT backend needs tensorrt and a CUDA GPU")


def test_help_teaches_with_examples(capsys):
    rc, out, _ = run(["--help"], capsys)
    text = "\n".join(out)
    assert rc == 0
    assert "examples:" in text and "--from-file" in text and "--variations" in text and "make engines" in text


def test_dream_alias_is_the_same_main():
    """Both installed console scripts load the CLI's entry function (skips where the package is not installed)."""
    from importlib.metadata import entry_points

    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.name in ("dalle2-rt", "dream")}
    if not scripts:
        pytest.skip("dalle2-rt is not installed in this environment (pip install -e .)")
    assert set(scripts) == {"dalle2-rt", "dream"}
    assert all(e.load() is cli.entry for e in scripts.values())


def test_console_script_end_to_end(work, tiny_engines):
    exe = Path(sys.executable).parent / "dream"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from dalle2_rt.cli import entry; "
                                                                 "sys.exit(entry())"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, "a red circle", "--seed", "2", "-n", "2", *FAST], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["a-red-circle-s2-0.png", "a-red-circle-s2-1.png"]
    assert done.stderr == ""
    # its own process: onnxruntime's sessions share one thread pool (recorded in the PNG's metadata)
    assert "shared thread pool" in Image.open(work / "a-red-circle-s2-0.png").info["backend"]
    bad = subprocess.run([*cmd, "-n", "0", "x"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stdout == ""


_OWN_POOL_SCRIPT = """
import sys
import onnxruntime as ort
from dalle2_rt import cli
from dalle2_rt.runtime.backends import PER_SESSION_REFUSED
engines, out, shared = sys.argv[1], sys.argv[2], sys.argv[3] == "shared"
argv = ["a red circle", "--seed", "0", "-q", "-o", out, "--engines", engines, "--prior-steps", "2",
        "--decoder-steps", "2", "--sr-steps", "1", "--threads", "1"]
assert cli.main(argv, shared_threads=shared) == 0
so = ort.SessionOptions()
so.intra_op_num_threads = 1  # a session with its own pool, as a host application might make
try:
    sess = ort.InferenceSession(sys.argv[4], so, providers=["CPUExecutionProvider"])
except Exception as e:
    print("refused" if PER_SESSION_REFUSED in str(e) else f"other error: {e}")
else:
    print("own pool", sess.get_session_options().intra_op_num_threads)
"""


def test_main_as_a_function_leaves_onnxruntime_usable(tmp_path, tiny_engines):
    """``cli.main`` called in-process keeps per-session pools: afterwards the host process can still make
    onnxruntime sessions with their own threads; the console scripts' shared pool (``shared_threads=True``)
    would make onnxruntime refuse them. Each case in a fresh interpreter: the pool is process-wide."""
    graph = str(next(Path(tiny_engines).glob("*.onnx")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DALLE2_RT_CACHE": str(tmp_path / "cache")}
    said = {}
    for mode in ("own", "shared"):
        done = subprocess.run([sys.executable, "-c", _OWN_POOL_SCRIPT, str(tiny_engines), str(tmp_path / mode), mode,
                               graph], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        said[mode] = done.stdout.strip().splitlines()[-1]
    assert said == {"own": "own pool 1", "shared": "refused"}


@pytest.mark.parametrize("flag,text,field,value", [
    ("-n", "65", "num_images", 65), ("--seed", "18446744073709551616", "seed", 2**64),
    ("--prior-steps", "0", "prior_steps", 0), ("--decoder-guidance", "-2", "decoder_guidance", -2.0),
    ("--candidates", "17", "candidates", 17), ("--decoder-candidates", "17", "decoder_candidates", 17)])
def test_cli_refuses_a_setting_with_the_librarys_words(work, capsys, flag, text, field, value):
    from dalle2_rt.runtime.errors import InputError
    from dalle2_rt.runtime.settings import Settings

    with pytest.raises(InputError) as library:
        Settings(**{field: value})
    rc, out, err = run(["x", flag, text], capsys)
    assert rc == 2 and out == [] and str(library.value) in err
