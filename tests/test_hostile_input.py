"""Hostile input (issue 31): prompts that cannot become UTF-8, engine folders as a trust boundary, the Triton
exporter kept inside ``--out``, and the server's bounds. Each case asserts the contract: one line naming what
to fix (never a traceback), nothing written outside the target, and no request failing another's."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from dalle2_rt.runtime.errors import EngineFolderError, InputError
from dalle2_rt.runtime.images import png_info
from dalle2_rt.runtime.manifest import MANIFEST, load_manifest, verify_files
from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.runtime.settings import check_prompts

REPO = Path(__file__).resolve().parents[1]
MAIN = "import sys; from dalle2_rt.cli import main; sys.exit(main())"


# ------------------------------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("prompt", ["a red circle \ud800", "\udcff", ["ok", "x\udfff y"]])
def test_a_prompt_with_a_lone_surrogate_is_refused_in_one_line(prompt):
    with pytest.raises(InputError, match=r"not valid Unicode text \(a lone surrogate '\\ud[89a-f][0-9a-f]{2}'"):
        check_prompts(prompt)


def test_png_text_with_a_lone_surrogate_is_written_with_a_replacement_character():
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG", pnginfo=png_info({"prompt": "a \ud800 b", "x": "é"}))
    assert Image.open(io.BytesIO(buf.getvalue())).text == {"prompt": "a \ufffd b", "x": "é"}


def test_cli_prompt_argument_that_is_not_utf8_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8", "DALLE2_RT_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "-c", MAIN, b"a red \xff circle", "-o", str(tmp_path / "o")],
                          capture_output=True, env=env, timeout=120, cwd=tmp_path)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("dalle2-rt: error: the prompt is not valid Unicode text") and "'\\udcff'" in err
    assert not (tmp_path / "o").exists()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width × height (a decompression bomb's header; no need for its pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------- engine folders

def linked_folder(src: Path, dst: Path, edit=None) -> Path:
    """``src``'s files hard-linked into ``dst`` (no copy of the graphs), manifest.json rewritten by ``edit``."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != MANIFEST:
            os.link(f, dst / f.name)
    data = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    if edit is not None:
        edit(data)
    (dst / MANIFEST).write_text(json.dumps(data), encoding="utf-8")
    return dst


def one_line_refusal(folder: Path, words: str, *, verify: bool = False) -> str:
    with pytest.raises(EngineFolderError) as caught:
        verify_files(load_manifest(folder)) if verify else load_manifest(folder)
    message = str(caught.value)
    assert "\n" not in message and words in message, message
    return message


def _set(path: str, value):
    """An edit of the manifest: the value at a dotted path (list indices as numbers) set to ``value``."""
    def edit(data):
        *head, last = path.split(".")
        node = data
        for key in head:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


def _drop_abar_and_set_t(t):
    def edit(data):
        del data["stages"]["prior"]["schedule"]["alphas_cumprod"]
        data["stages"]["prior"]["schedule"]["num_timesteps"] = t
    return edit


def _rename_graph(data):
    data["graphs"]["../sr0"] = data["graphs"].pop("sr0")
    data["stages"]["sr"][0]["graph"] = "../sr0"


@pytest.mark.parametrize("edit, words", [
    (_set("schema_version", True), "schema_version True"),
    (_drop_abar_and_set_t(10**12), "stages.prior.schedule.num_timesteps must be an integer in 2 … 100000"),
    (_set("tokenizer.context_length", 10**9), "tokenizer.context_length must be an integer in 2 … 4096"),
    (_set("stages.text_encoder.context_length", 10**9), "stages.text_encoder.context_length must be an integer"),
    (_set("stages.decoder.image_size", 10**6), "stages.decoder.image_size must be an integer in 1 … 8192"),
    (_set("output.image_size", 10**6), "output.image_size must be an integer in 1 … 8192"),
    (_set("graphs.decoder.profile.batch.max", -3), "graphs.decoder.profile.batch.max must be an integer in 1 … 4096"),
    (_set("graphs.decoder.profile.batch.min", 0), "graphs.decoder.profile.batch.min must be an integer in 1 …"),
    (_set("stages.sr.0.noise_aug_t", -1), "stages.sr[0].noise_aug_t must be an integer in 0 … 999"),
    (_set("stages.prior.embed_scale", 0), "stages.prior.embed_scale must be a number"),
    (_set("stages.decoder.defaults.steps", 10**9), "stages.decoder.defaults.steps must be an integer in 1 … 1000"),
    (_set("stages.decoder.defaults.operation_steps", 0),
     "stages.decoder.defaults.operation_steps must be an integer in 1 … 1000"),
    (_rename_graph, "graph name '../sr0' is not a name"),
    (_set("graphs.decoder.inputs.0.shape", ["batch", True, 16, 16]), "axis True is neither a size"),
    (_set("graphs.decoder.inputs.0.shape", ["batch", 3, -16, 16]), "axis -16 is neither a size"),
    (_set("graphs.decoder.inputs.0.shape", ["batch", 3, 2**20, 2**20]), "elements a row"),
    (_set("graphs.decoder.inputs.0.name", "../x"), "graphs.decoder.inputs[0].name '../x' is not a name"),
    (lambda data: data["files"].update({"decoder.onnx": 5}), "files['decoder.onnx'] must be a sha256"),
])
def test_manifest_values_out_of_range_are_one_line(tiny_engines, tmp_path, edit, words):
    one_line_refusal(linked_folder(tiny_engines, tmp_path / "e", edit), words)


@pytest.mark.parametrize("text, words", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"schema": "dalle2-rt/engine-manifest", "n": ' + "7" * 5000 + "}", "a number of 5000 characters"),
    ('{"schema": "dalle2-rt/engine-manifest", "embed_scale": 1e400}', "the number 1e400 is out of range"),
    ('{"schema": "dalle2-rt/engine-manifest", "x": NaN}', "NaN is not a JSON number"),
    ("[" * 40 + "]" * 40, "nested over 32 deep"),
])
def test_hostile_manifest_json_is_one_line(tmp_path, text, words):
    (tmp_path / MANIFEST).write_text(text, encoding="utf-8")
    one_line_refusal(tmp_path, words)


def test_manifest_that_is_a_pipe_or_a_symlink_out_of_the_folder_is_refused(tmp_path):
    os.mkfifo(tmp_path / MANIFEST)  # opening it for reading would block until a writer came
    one_line_refusal(tmp_path, "is a named pipe")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.json"
    outside.write_text("{}", encoding="utf-8")
    folder = tmp_path / "e"
    folder.mkdir()
    (folder / MANIFEST).symlink_to(outside)
    one_line_refusal(folder, "resolves outside the engine folder")


@pytest.mark.parametrize("make, words", [
    (lambda p: os.mkfifo(p), "is a named pipe"),
    (lambda p: p.symlink_to("/dev/zero"), "resolves outside the engine folder"),
    (lambda p: p.symlink_to("/etc/passwd"), "resolves outside the engine folder"),
    (lambda p: p.mkdir(), "is a folder"),
])
def test_graph_files_that_hang_or_leave_the_folder_are_refused_before_hashing(tiny_engines, tmp_path, make, words):
    folder = linked_folder(tiny_engines, tmp_path / "e")
    (folder / "decoder.onnx").unlink()  # the first file verify_files checks
    make(folder / "decoder.onnx")
    message = one_line_refusal(folder, words, verify=True)
    assert "sha256" not in message  # nothing outside was read, so no hash of it is shown


def test_a_symlink_inside_the_folder_is_still_followed(tiny_engines, tmp_path):
    folder = linked_folder(tiny_engines, tmp_path / "e")
    os.rename(folder / "tokenizer.json", folder / "tok.real")
    (folder / "tokenizer.json").symlink_to("tok.real")
    verify_files(load_manifest(folder), use_cache=False)


def test_an_input_dtype_unlike_the_graph_s_is_refused_when_its_session_opens(tiny_engines, tmp_path):
    folder = linked_folder(tiny_engines, tmp_path / "e", _set("graphs.text_encoder.inputs.0.dtype", "int32"))
    with pytest.raises(EngineFolderError, match="tokens is int64 in the graph, int32 in the manifest"):
        Pipeline.load(folder, threads=1).engines["text_encoder"]


# ------------------------------------------------------------------------------------------------- Triton exporter

def _rename_graph_to(name):
    def edit(data):
        data["graphs"][name] = data["graphs"].pop("sr0")
        data["stages"]["sr"][0]["graph"] = name
    return edit


def run_writer(argv, capsys) -> tuple[int, str]:
    from export import triton as writer

    rc = writer.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "..", ".", "", "a/b"])
def test_triton_writer_never_writes_outside_out_through_a_graph_name(tiny_engines, tmp_path, capsys, name):
    work = tmp_path / "w"
    folder = linked_folder(tiny_engines, work / "engines", _rename_graph_to(name))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, err = run_writer([folder, "--out", work / "repo" / "r"], capsys)
    assert rc == 1 and err.count("\n") == 1 and "is not a name" in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written anywhere


@pytest.mark.parametrize("argv, words", [
    (["--orchestrator", "../x"], "model name '../x' is not a name"),
    (["--orchestrator", "/tmp/x"], "model name '/tmp/x' is not a name"),
    (["--instances", "-1"], "instances must be an integer in 1 … 256, got -1"),
    (["--orchestrator-instances", "0"], "orchestrator instances must be an integer in 1 … 256"),
    (["--queue-delay-us", "-5"], "queue delay (µs) must be an integer"),
    (["--threads", "0"], "threads must be an integer in 1 … 1024"),
    (["--gpus", "0,-1"], "a GPU id must be an integer in 0 … 1023, got -1"),
])
def test_triton_writer_refuses_bad_options_in_one_line_and_writes_nothing(tiny_engines, tmp_path, capsys, argv,
                                                                           words):
    rc, err = run_writer([tiny_engines, "--out", tmp_path / "repo", *argv], capsys)
    assert rc == 1 and err.count("\n") == 1 and words in err, err
    assert list(tmp_path.iterdir()) == []


def test_triton_force_replaces_a_repository_but_never_another_folder(tiny_engines, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work", encoding="utf-8")
    rc, err = run_writer([tiny_engines, "--out", mine, "--force", "--no-orchestrator"], capsys)
    assert rc == 1 and "is not a model repository" in err and err.count("\n") == 1
    assert (mine / "thesis.tex").read_text(encoding="utf-8") == "years of work"
    repo = tmp_path / "repo"
    assert run_writer([tiny_engines, "--out", repo, "--no-orchestrator"], capsys)[0] == 0
    assert run_writer([tiny_engines, "--out", repo, "--force", "--no-orchestrator"], capsys)[0] == 0  # a repository
    link = tmp_path / "link"
    link.symlink_to(repo)
    rc, err = run_writer([tiny_engines, "--out", link, "--force", "--no-orchestrator"], capsys)
    assert rc == 1 and "is not a model repository" in err


def test_triton_writer_checks_declared_dtypes_against_the_graph(tiny_engines, tmp_path, capsys):
    folder = linked_folder(tiny_engines, tmp_path / "engines", _set("graphs.decoder.inputs.0.dtype", "bool"))
    rc, err = run_writer([folder, "--out", tmp_path / "repo"], capsys)
    assert rc == 1 and err.count("\n") == 1 and "x_t is float32 in the graph, bool in the manifest" in err, err
    assert not (tmp_path / "repo").exists() and not list(tmp_path.glob(".repo*"))


def test_cli_variations_of_a_decompression_bomb_is_one_line(tmp_path, capsys):
    from dalle2_rt import cli
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))  # 400 M pixels claimed by a tiny file
    rc = cli.main(["--variations", str(bomb), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is too large to decode" in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- CLI resources, SIGTERM

@pytest.mark.parametrize("command", [["a red circle"], ["interpolate", "a red circle", "a blue square"]])
def test_cli_threads_above_four_per_core_is_one_line_and_writes_nothing(tmp_path, capsys, command):
    from dalle2_rt import cli
    for threads in (cli.MAX_THREADS + 1, 100_000):
        with pytest.raises(SystemExit) as exited:  # argparse's exit, before anything is opened
            cli.main([*command, "--threads", str(threads), "-o", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1, err
        assert f"threads must be at most {cli.MAX_THREADS} (4 × the {cli.CORES} cores)" in err
    assert not (tmp_path / "o").exists()
    assert cli.check_threads(cli.MAX_THREADS) == cli.MAX_THREADS


def test_cli_sigterm_while_saving_leaves_no_partial_file(tmp_path):
    """SIGTERM takes SIGINT's path: ``save_png``'s ``finally`` removes its ``.png.tmp`` (the default action would
    kill the process between the temporary file and its link), the exit status is 128 + 15 and one line says so."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a red circle number {i}\n" for i in range(32)))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DALLE2_RT_CACHE": str(tmp_path / "c")}
    proc = subprocess.Popen([sys.executable, "-c", MAIN, "--from-file", str(prompts), "-n", "8", "--seed", "1",
                             "--threads", "1", "-q", "-o", str(out), "--engines",
                             str(REPO / "dalle2_rt" / "engines" / "shapes-v2")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        first = proc.stdout.readline()  # the first PNG is linked: the other seven are being written now
        assert first.strip().endswith(b".png"), proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.decode() == "dalle2-rt: terminated\n"
    names = os.listdir(out)
    assert not [n for n in names if n.endswith(".tmp")], names
    assert 1 <= len(names) < 32 * 8, names
    for name in names:  # every file left is a whole PNG that was reported on stdout
        with Image.open(out / name) as image:
            image.load()
    assert sorted(names) == sorted(Path(line.decode()).name for line in (first + rest).splitlines())


# ------------------------------------------------------------------------------------------ export.all's input

def _edit_meta(stage, edit):
    def breakage(ckpt: Path):
        path = ckpt / stage / "model" / "model.json"
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))
    return breakage


def _edit_weights(stage, edit):
    def breakage(ckpt: Path):
        from safetensors.torch import load_file, save_file

        path = ckpt / stage / "model" / "model.safetensors"
        state = load_file(str(path))
        key = sorted(state)[0]
        state[key] = edit(state[key])
        save_file(state, str(path))
    return breakage


def _nan_at_one(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


def _defaults_json(data):
    return lambda ckpt: (ckpt / "defaults.json").write_text(json.dumps(data))


@pytest.mark.parametrize("breakage, words", [
    (_edit_meta("prior", lambda m: m.update(dept=4)),
     "prior/model/model.json: unknown key 'dept' (known: kind, config, step"),
    (_edit_meta("decoder", lambda m: m["config"].update(colour="red")), "model.json: config: unknown key 'colour'"),
    (_edit_meta("decoder", lambda m: m.update(defaults={"steps": 7, "colour": "red"})),
     "decoder/model/model.json: defaults.colour: unknown key; known: sampler, steps"),
    (_edit_meta("sr", lambda m: m.update(defaults={"steps": -1})), "model.json: defaults.steps = -1 is not a valid"),
    (_edit_meta("prior", lambda m: m.update(defaults=[5])), "prior/model/model.json: defaults must be an object"),
    (_defaults_json({"prior": {"steps": 5, "colour": "red"}}), "defaults.json: prior.colour: unknown key"),
    (_defaults_json({"prior2": {"steps": 5}}), "defaults.json: no stage folder for 'prior2'"),
    (_defaults_json({"prior": {"candidates": 10**9}}), "defaults.json: prior.candidates = 1000000000 is not a valid"),
    (_edit_weights("prior", _nan_at_one), "prior/model/model.safetensors: {key} has 1 non-finite value (NaN or inf)"),
    (_edit_weights("sr", lambda t: t.char()),  # int8
     "sr/model/model.safetensors: {key} is stored as int8, the network's is float32"),
], ids=["model-key", "config-key", "defaults-key", "defaults-value", "defaults-list", "defaults-json-key",
        "defaults-json-stage", "defaults-json-candidates", "nan-weight", "int8-weight"])
def test_export_refuses_unknown_keys_and_bad_weights_in_one_line_before_any_graph(
        tiny_checkpoints, tmp_path, monkeypatch, capsys, breakage, words):
    from export import all as export_all
    from export import driver

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints, ckpt)
    breakage(ckpt)
    exported = []
    monkeypatch.setattr(driver, "export_onnx", lambda spec, *a, **k: exported.append(spec.name))
    out = tmp_path / "engines" / "x"
    rc = export_all.main(["--checkpoints", str(ckpt), "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("export: error: ") and err.count("\n") == 1, err
    stage = words.split("/")[0]
    if "{key}" in words:  # the first tensor of the stage, in name order
        from safetensors import safe_open

        with safe_open(str(ckpt / stage / "model" / "model.safetensors"), framework="pt") as f:
            words = words.format(key=sorted(f.keys())[0])
    assert words in err, err
    assert exported == [] and not out.parent.exists()


def _engine_copy(tiny_engines: Path, tiny_checkpoints: Path, tmp_path: Path) -> tuple[Path, Path]:
    ckpt, out = tmp_path / "ckpt", tmp_path / "engines" / "tiny"
    shutil.copytree(tiny_checkpoints, ckpt)
    shutil.copytree(tiny_engines, out)
    return ckpt, out


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_never_deletes_files_it_did_not_write_in_out(tiny_engines, tiny_checkpoints, tmp_path, capsys):
    """Rebuilding replaces the whole folder: a file a user put beside the graphs is named, and kept, instead."""
    from export import all as export_all

    ckpt, out = _engine_copy(tiny_engines, tiny_checkpoints, tmp_path)
    (out / "notes.txt").write_text("keep me")
    (out / "samples").mkdir()
    (out / "samples" / "a.png").write_bytes(b"png")
    before = _tree(out)
    assert export_all.main(["--checkpoints", str(ckpt), "--out", str(out), "--name", "tiny", "-q"]) == 0
    assert capsys.readouterr().out.strip().endswith("up to date")  # nothing to replace: nothing refused
    rc = export_all.main(["--checkpoints", str(ckpt), "--out", str(out), "--name", "renamed", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert "does not list (notes.txt, samples); rebuilding would delete it" in err
    assert _tree(out) == before and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "samples")
    assert export_all.main(["--checkpoints", str(ckpt), "--out", str(out), "--name", "renamed", "-q"]) == 0
    assert json.loads((out / MANIFEST).read_text())["name"] == "renamed"


def test_export_out_under_a_file_is_one_line(tiny_checkpoints, tmp_path, capsys):
    from export import all as export_all

    (tmp_path / "file").write_text("x")
    rc = export_all.main(["--checkpoints", str(tiny_checkpoints), "--out", str(tmp_path / "file" / "sub"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "cannot make the folder" in err, err
    assert (tmp_path / "file").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ------------------------------------------------------------------------------------ model configs, bounded

def _set_config(stage, dotted, value):
    """An edit of one stage's model.json: ``config.<dotted>`` set to ``value`` (NaN is written as JSON's NaN)."""
    def edit(meta):
        *head, last = dotted.split(".")
        node = meta["config"]
        for key in head:
            node = node[key]
        node[last] = value
    return _edit_meta(stage, edit)


def _raw_meta(stage, text):
    return lambda ckpt: (ckpt / stage / "model" / "model.json").write_text(text)


def _exported_nothing(ckpt: Path, out: Path, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``export.all`` from ``ckpt`` to ``out`` with graph export faked and asserted not to run; (exit status,
    stderr)."""
    from export import all as export_all
    from export import driver

    exported = []
    monkeypatch.setattr(driver, "export_onnx", lambda spec, *a, **k: exported.append(spec.name))
    rc = export_all.main(["--checkpoints", str(ckpt), "--out", str(out), "-q", *argv])
    assert exported == []
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("breakage, words", [
    (_set_config("prior", "depth", "four"), "prior/model/model.json: config.depth = 'four': must be an integer in 1 …"),
    (_set_config("prior", "depth", 4.5), "config.depth = 4.5: must be an integer in 1 … 128"),
    (_set_config("prior", "depth", True), "config.depth = True: must be an integer"),
    (_set_config("prior", "heads", -4), "prior/model/model.json: config.heads = -4: must be an integer in 1 … 128"),
    (_set_config("decoder", "unet.heads", -4), "decoder/model/model.json: config.unet.heads = -4: must be an integer"),
    (_set_config("prior", "dim", 10**9), "config.dim = 1000000000: must be an integer in 1 … 8192"),
    (_set_config("prior", "dim", 1e9), "config.dim = 1000000000.0: must be an integer in 1 … 8192"),
    (_set_config("prior", "mlp_ratio", float("nan")), "config.mlp_ratio = nan: must be a finite number in 0.125 … 16"),
    (_set_config("prior", "mlp_ratio", float("inf")), "config.mlp_ratio = inf: must be a finite number"),
    (_set_config("prior", "num_timesteps", 10**12), "config.num_timesteps = 1000000000000: must be an integer in 2 …"),
    (_set_config("decoder", "image_size", 10**6), "decoder/model/model.json: config.image_size = 1000000: must be an"),
    (_set_config("sr", "low_res_size", 0), "sr/model/model.json: config.low_res_size = 0: must be an integer in 1 …"),
    (_set_config("clip", "context_length", 10**9), "clip/model/model.json: config.context_length = 1000000000: must"),
    (_set_config("decoder", "unet.channel_mults", [1, "2"]), "config.unet.channel_mults[1] = '2': must be an integer"),
    (_set_config("decoder", "unet.channel_mults", list(range(1, 12))), "config.unet.channel_mults = [1, 2, 3"),
    (_set_config("decoder", "unet.context_dim", -1), "config.unet.context_dim = -1: must be an integer in 1 … 8192 ("),
    (_set_config("sr", "schedule", "warp"), "config.schedule = 'warp': must be one of 'cosine', 'linear'"),
    (_set_config("decoder", "parameterization", "z"), "config.parameterization = 'z': must be one of 'eps', 'x0', 'v'"),
    (_set_config("decoder", "guidance_input", 1), "config.guidance_input = 1: must be true or false"),
    (_set_config("clip", "vision_tower", ["vit"]), "config.vision_tower = ['vit']: must be one of 'vit', 'conv'"),
    (_edit_meta("prior", lambda m: m.update(step=-1)), "prior/model/model.json: step = -1: must be an integer in 0 …"),
    (_edit_meta("prior", lambda m: m.update(kind=["prior"])), "model.json: kind = ['prior']: must be a string"),
    (_raw_meta("prior", '{"kind": "prior", "config": {"dim": ' + "9" * 5000 + "}}"), "a number of 5000 characters"),
    (_raw_meta("prior", '{"kind": "prior", "config": ' + "[" * 50_000 + "]" * 50_000 + "}"), "nested too deeply"),
], ids=["str-int", "float-int", "bool-int", "negative", "nested", "huge", "huge-float", "nan", "inf", "timesteps",
        "image-size", "zero-size", "context", "element", "length", "optional", "schedule", "parameterization", "bool",
        "list-str", "step", "kind", "digits", "depth"])
def test_export_refuses_config_values_out_of_bounds_in_one_line_before_any_module(
        tiny_checkpoints, tmp_path, monkeypatch, capsys, breakage, words):
    from dalle2_rt.models import registry

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints, ckpt)
    breakage(ckpt)
    built, build = [], registry.build
    monkeypatch.setattr(registry, "build", lambda kind, cfg: built.append(kind) or build(kind, cfg))
    out = tmp_path / "engines" / "x"
    rc, err = _exported_nothing(ckpt, out, [], monkeypatch, capsys)
    assert rc == 1 and err.startswith("export: error: stage ") and err.count("\n") == 1, err
    assert words in err, err
    stage = err.split("'")[1]  # the stages before it were checked whole; it had no network built, not even on meta
    assert stage not in built and not out.parent.exists()


def _sparse(path: Path, size: int = 2**34) -> None:
    with path.open("wb") as f:
        f.truncate(size)  # 16 GiB that take no disk


def _not_a_file(make):
    def breakage(ckpt: Path):
        path = ckpt / "clip" / "model" / "model.json"
        path.unlink()
        make(path)
    return breakage


@pytest.mark.parametrize("breakage, words", [
    (_not_a_file(lambda p: p.symlink_to("/dev/zero")), "clip/model/model.json: is a device, not a regular file"),
    (_not_a_file(os.mkfifo), "clip/model/model.json: is a named pipe, not a regular file"),
    (_not_a_file(lambda p: p.mkdir()), "clip/model/model.json: is a folder, not a regular file"),
    (_not_a_file(_sparse), "clip/model/model.json: 17179869184 bytes, over the 1048576 this file may have"),
    (_not_a_file(lambda p: p.symlink_to(p.parent / "gone.json")), "clip/model: no model.safetensors + model.json"),
], ids=["dev-zero", "fifo", "folder", "16-gib-sparse", "dangling"])
def test_model_json_that_is_not_a_small_regular_file_is_one_line_at_once(
        tiny_checkpoints, tmp_path, monkeypatch, capsys, breakage, words):
    """Reading it would block (a FIFO with no writer), never end (``/dev/zero``) or fill the memory: the reader
    checks the opened file with fstat first. SIGALRM fails the test instead of hanging it."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints, ckpt)
    breakage(ckpt)

    def hung(*_):
        raise TimeoutError("export.all did not answer within 20 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    out = tmp_path / "engines" / "x"
    try:
        rc, err = _exported_nothing(ckpt, out, [], monkeypatch, capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert rc == 1 and err.count("\n") == 1 and words in err, err
    assert not out.parent.exists()


@pytest.mark.parametrize("argv, words", [
    (["--max-batch", str(10**8)], "export: error: --max-batch must be an integer in 1 … 2048, got 100000000"),
    (["--max-batch", "0"], "--max-batch must be an integer in 1 … 2048, got 0"),
    (["--opset", str(10**6)], "--opset must be at most"),
    (["--opset", "9"], "--opset must be >= 18"),
    (["--external-data-threshold", "-1"], "--external-data-threshold must be >= 0"),
])
def test_export_numeric_flags_out_of_range_are_one_line(tiny_checkpoints, tmp_path, monkeypatch, capsys, argv, words):
    out = tmp_path / "engines" / "x"
    rc, err = _exported_nothing(tiny_checkpoints, out, argv, monkeypatch, capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("export: error: ") and words in err, err
    assert not out.parent.exists()


def test_export_flag_that_is_not_a_number_is_one_line(tiny_checkpoints, capsys):
    from export import all as export_all

    with pytest.raises(SystemExit) as exited:
        export_all.main(["--checkpoints", str(tiny_checkpoints), "--max-batch", "many"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("export: error: argument --max-batch: invalid int value: 'many'")


def test_export_refuses_batch_profiles_the_manifest_could_not_state(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    """--max-batch 2048 is within its bound, but the prior's rows are 2 × max_batch × candidates."""
    out = tmp_path / "engines" / "x"
    rc, err = _exported_nothing(tiny_checkpoints, out, ["--max-batch", "2048"], monkeypatch, capsys)
    assert rc == 1 and err.count("\n") == 1, err
    assert "graph prior: a batch of up to 8192 rows at --max-batch 2048, over the 4096 an engine manifest" in err
    assert not out.parent.exists()


def test_configs_we_ship_and_dall_e_2_sized_ones_are_within_bounds(tiny_checkpoints):
    """The bounds pass the tiny test models, the bundled checkpoints, the training recipes' model tables and a
    config of DALL-E 2's size; every field of every checkpoint kind states them; and they lie within what an
    engine manifest may state, so what loads also exports and runs."""
    import dataclasses

    from dalle2_rt.models import config_dict, registry
    from dalle2_rt.models.clip import ClipConfig
    from dalle2_rt.models.decoder import DecoderConfig
    from dalle2_rt.models.prior import PriorConfig
    from dalle2_rt.models.sr import SRConfig
    from dalle2_rt.models.unet import UNetConfig
    from dalle2_rt.runtime import manifest as rt_manifest
    from dalle2_rt.training.config import load_config
    from dalle2_rt.training.stages import model_config
    from export.driver import MAX_BATCH_BOUND

    for cls in (*(k.config for k in registry.KINDS.values()), UNetConfig):
        unbounded = [f.name for f in dataclasses.fields(cls) if "bounds" not in f.metadata and f.name != "unet"]
        assert unbounded == [], (cls.__name__, unbounded)
    folders = [tiny_checkpoints / stage / "model" for stage in ("clip", "prior", "decoder", "sr")]
    folders += [meta.parent for meta in sorted((REPO / "checkpoints").glob("*/*/model/model.json"))]
    assert len(folders) >= 9  # the bundled model's four stages, and the distilled decoder
    for folder in folders:
        _, cfg, _ = registry.read_config(folder)
        config_dict.check_config(cfg)
    for toml in sorted((REPO / "configs").glob("*.toml")):
        for stage in ("clip", "prior", "decoder", "sr"):
            config_dict.check_config(model_config(load_config(toml), stage))
    # CLIP ViT-bigG/14; a prior 2048 wide, 24 layers deep; a decoder and a 256 → 1024 upsampler of unCLIP's kind
    config_dict.check_config(ClipConfig(embed_dim=1280, image_size=224, patch_size=14, vision_layers=48,
                                        vision_width=1664, vision_head_width=104, text_layers=32, text_width=1280,
                                        text_heads=20))
    config_dict.check_config(PriorConfig(embed_dim=768, text_width=768, dim=2048, depth=24, heads=32))
    unet = UNetConfig(channels=512, channel_mults=(1, 2, 3, 4), num_res_blocks=3, attention_levels=(1, 2, 3),
                      heads=32, emb_dim=2048, context_dim=2048, groups=32)
    config_dict.check_config(DecoderConfig(image_size=64, embed_dim=768, text_width=768, context_dim=2048,
                                           unet=unet, num_timesteps=4000))
    config_dict.check_config(SRConfig(image_size=1024, low_res_size=256, unet=UNetConfig(
        in_channels=6, channels=192, channel_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_levels=())))
    assert config_dict.MAX_SIDE <= rt_manifest.MAX_SIDE and config_dict.MAX_CONTEXT <= rt_manifest.MAX_CONTEXT
    assert config_dict.MAX_TIMESTEPS <= rt_manifest.MAX_TIMESTEPS and 2 * MAX_BATCH_BOUND <= rt_manifest.MAX_BATCH


# ---------------------------------------------------------------------------- foreign configs, the same bounds

def test_dalle2_pytorch_config_sizes_are_checked_before_dalle2_pytorch_is_needed(tmp_path, capsys):
    """The check runs before DALLE2-pytorch is imported, so it holds (and is tested) without its environment."""
    from export import all as export_all

    prior = {"prior": {"net": {"dim": 32, "depth": 10**9, "heads": 2}, "image_embed_dim": 32, "timesteps": 25}}
    decoder = {"decoder": {"unets": [{"dim": 16, "dim_mults": [1, 2]}, {"dim": 8, "dim_mults": [1, 10**6]}],
                           "image_sizes": [16, 10**6], "timesteps": 25}}
    (tmp_path / "prior.json").write_text(json.dumps(prior))
    (tmp_path / "decoder.json").write_text(json.dumps(decoder))
    (tmp_path / "clip.json").write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"width": -1}}))
    out = tmp_path / "out"

    def run(**files):
        given = {"prior": "p.pth", "prior-config": tmp_path / "prior.json", "decoder": "d.pth",
                 "decoder-config": tmp_path / "decoder.json", "clip": "x", "clip-weights": "c.pt", **files}
        rc = export_all.main(["--from-dalle2-pytorch", "--out", str(out),
                              *(str(a) for k, v in given.items() for a in (f"--{k}", v))])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and err.startswith("export: error: "), err
        return err

    assert "prior.json: prior.net.depth = 1000000000: must be an integer in 1 … 128" in run()
    prior["prior"]["net"]["depth"] = 1
    (tmp_path / "prior.json").write_text(json.dumps(prior))
    from export import dalle2_pytorch

    with pytest.raises(dalle2_pytorch.SourceError, match=r"decoder.json: decoder.image_sizes\[1\] = 1000000: must"):
        dalle2_pytorch.build_decoder(tmp_path / "decoder.json", tmp_path / "d.pth", "ema")
    decoder["decoder"]["image_sizes"] = [16, 32]
    (tmp_path / "decoder.json").write_text(json.dumps(decoder))
    with pytest.raises(dalle2_pytorch.SourceError, match=r"decoder.unets\[1\].dim_mults\[1\] = 1000000: must be"):
        dalle2_pytorch.build_decoder(tmp_path / "decoder.json", tmp_path / "d.pth", "ema")
    with pytest.raises(dalle2_pytorch.SourceError, match=r"clip.json: open_clip.vision_cfg.width = -1: must be"):
        dalle2_pytorch.build_clip(str(tmp_path / "clip.json"), tmp_path / "c.pt")
    os.mkfifo(tmp_path / "fifo.json")
    assert "fifo.json: is a named pipe, not a regular file" in run(**{"prior-config": tmp_path / "fifo.json"})
    assert not out.exists()


@pytest.mark.parametrize("component, file, key, value, words", [
    ("text_encoder", "config.json", "hidden_size", 10**9, "text_encoder/config.json: config.hidden_size = 1000000000"),
    ("text_encoder", "config.json", "max_position_embeddings", "77", "config.max_position_embeddings = '77': must"),
    ("tokenizer", "tokenizer_config.json", "model_max_length", 10**30, "model_max_length = 10000000000000000000000"),
    ("prior", "config.json", "num_layers", -1, "prior/config.json: config.num_layers = -1: must be an integer in 1"),
    ("decoder", "config.json", "block_out_channels", [32, 10**9], "config.block_out_channels[1] = 1000000000: must"),
    ("decoder", "config.json", "sample_size", 10**6, "decoder/config.json: config.sample_size = 1000000: must be"),
    ("super_res_last", "config.json", "layers_per_block", 2.5, "config.layers_per_block = 2.5: must be an integer"),
    ("prior_scheduler", "scheduler_config.json", "num_train_timesteps", 10**12,
     "prior_scheduler/scheduler_config.json: config.num_train_timesteps = 1000000000000: must be an integer in 2"),
])
def test_diffusers_config_sizes_are_checked_as_each_config_is_read(tmp_path, component, file, key, value, words):
    from export.diffusers_unclip import SourceError, _read_json

    path = tmp_path / component / file
    path.parent.mkdir()
    path.write_text(json.dumps({key: value}))
    with pytest.raises(SourceError) as caught:
        _read_json(path, component)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_diffusers_folder_with_a_config_out_of_bounds_is_one_line_before_diffusers_loads(tmp_path, capsys):
    """Opening the folder checks each component's config before any network is built (diffusers need not even be
    installed for this to hold)."""
    from export import all as export_all
    from export.diffusers_unclip import COMPONENTS

    pipe = tmp_path / "karlo"
    for name in COMPONENTS:
        (pipe / name).mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "UnCLIPPipeline"}))
    (pipe / "text_encoder" / "config.json").write_text(json.dumps({"projection_dim": 768, "hidden_size": 10**9}))
    out = tmp_path / "out"
    rc = export_all.main(["--from-diffusers", str(pipe), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert "text_encoder/config.json: config.hidden_size = 1000000000: must be an integer in 1 … 8192" in err
    assert not out.exists()


@pytest.mark.parametrize("signum, raised", [("SIGTERM", "Terminated"), ("SIGINT", "KeyboardInterrupt")])
def test_a_signal_waits_until_the_png_is_published_and_reported(signum, raised):
    """The race the SIGTERM test above can hit: a PNG linked, then the interrupt before its path is printed.
    ``signals_held`` delivers the signal only after the block, so the print always happens."""
    import threading

    from dalle2_rt import cli

    number = getattr(signal, signum)
    previous = signal.signal(number, cli._raise_terminated)
    reached = []
    busy = threading.Thread(target=time.sleep, args=(0.5,))  # another thread the signal may land on
    busy.start()
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            with cli.signals_held():
                os.kill(os.getpid(), number)
                time.sleep(0.05)
                reached.append("after the signal, inside the block")
        assert reached == ["after the signal, inside the block"] and type(caught.value).__name__ == raised
    finally:
        signal.signal(number, previous)
        busy.join()
