"""The exporter: graphs agree with PyTorch, the manifest describes the folder, rebuilds are idempotent and atomic.

Most tests read the session's ``tiny_engines`` folder (conftest); the ones that rebuild work on copies.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dalle2_rt.models import registry
from dalle2_rt.models.clip import ClipImageEncoder, ClipTextEncoder
from dalle2_rt.models.prior import PriorPrefix, PriorStep
from dalle2_rt.models.sr import SRConfig
from dalle2_rt.runtime import manifest as rt_manifest
from dalle2_rt.runtime.samplers import SAMPLERS
from dalle2_rt.runtime.schedules import alphas_cumprod_for
from export import all as export_all
from export import driver
from export.manifest import MANIFEST, SCHEMA, stage_entries
from export.onnx_export import REL_TOL
from export.sources import SourceError, find_sources
from export.specs import graph_specs
from tests.conftest import TINY_MODEL, write_tiny_checkpoints

GRAPHS = ("text_encoder", "image_encoder", "prior", "prior_prefix", "prior_step", "decoder", "sr0")


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


# --------------------------------------------------------------------------------------------------------
# Parity with PyTorch


def test_recorded_validation_within_bound(tiny_engines):
    m = _manifest(tiny_engines)
    assert sorted(m["graphs"]) == sorted(GRAPHS)
    for name, g in m["graphs"].items():
        v = g["validation"]
        assert len(v["batch_sizes"]) >= 3 and 1 in v["batch_sizes"], name
        assert max(v["batch_sizes"]) == g["profile"]["batch"]["max"], name
        assert v["output_scale"] > 0, f"{name}: all-zero output proves nothing"
        for figures in (v, v["optimized"]):
            assert figures["max_abs_err"] <= REL_TOL * figures["output_scale"], name
            assert set(figures["per_output"]) == {o["name"] for o in g["outputs"]}, name


def _torch_modules(ckpt: Path) -> dict[str, torch.nn.Module]:
    """The networks rebuilt straight from the checkpoints (the models' registry, not export/), eval mode; the
    graph wrappers named here, not through the registry's views."""
    def load(stage):
        return registry.load(ckpt / stage / "model", stage).model

    clip, prior = load("clip"), load("prior")
    return {"text_encoder": ClipTextEncoder(clip).eval(), "image_encoder": ClipImageEncoder(clip).eval(),
            "prior": prior, "prior_prefix": PriorPrefix(prior).eval(), "prior_step": PriorStep(prior).eval(),
            "decoder": load("decoder"), "sr0": load("sr")}


def _random_feeds(graph: dict, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs drawn here from the manifest's I/O alone (independent of export/specs.py)."""
    feeds = {}
    for t in graph["inputs"]:
        shape = [batch if d == "batch" else d for d in t["shape"]]
        if t["dtype"] == "int64":  # CLIP tokens: <start>, ids, <end> (the highest id), zero padding
            tok = rng.integers(1, 49406, size=shape)
            tok[:, 0] = 49406
            for row in tok:
                end = int(rng.integers(2, shape[1]))
                row[end], row[end + 1:] = 49407, 0
            feeds[t["name"]] = tok.astype(np.int64)
        elif t["name"] in ("t", "aug_t"):
            feeds[t["name"]] = rng.integers(0, 1000, size=shape).astype(np.float32)
        elif t["name"].endswith("_keep"):
            feeds[t["name"]] = (rng.random(shape) < 0.5).astype(np.float32)
        elif t["name"] == "pixels":
            feeds[t["name"]] = rng.random(shape, dtype=np.float32)
        else:
            feeds[t["name"]] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def test_dynamic_batch_recomputed_independently(tiny_engines, tiny_checkpoints):
    """Each graph (plain and optimised) at batch 1 and at its profile max, against the torch networks."""
    m = _manifest(tiny_engines)
    modules = _torch_modules(tiny_checkpoints)
    rng = np.random.default_rng(123)
    for name, g in m["graphs"].items():
        sessions = [ort.InferenceSession(str(tiny_engines / g[k]), providers=["CPUExecutionProvider"])
                    for k in ("file", "optimized_file")]
        for batch in (1, g["profile"]["batch"]["max"]):
            feeds = _random_feeds(g, batch, rng)
            with torch.no_grad():
                ref = modules[name](**{k: torch.from_numpy(v) for k, v in feeds.items()})
            ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
            for sess in sessions:
                got = sess.run([o["name"] for o in g["outputs"]], feeds)
                for o, a, b in zip(g["outputs"], got, ref):
                    assert a.shape == b.shape == tuple(batch if d == "batch" else d for d in o["shape"])
                    assert np.abs(a - b).max() <= REL_TOL * np.abs(b).max(), (name, o["name"], batch)


def test_prior_step_over_prior_prefix_is_the_full_prior(tiny_engines, tiny_checkpoints):
    """The split graphs in ONNX Runtime compose to the full graph, and the manifest says how to chain them."""
    m = _manifest(tiny_engines)
    assert m["stages"]["prior"]["prefix_cache"] == {"prefix_graph": "prior_prefix", "step_graph": "prior_step",
                                                    "cache": ["keys", "values"]}
    _, cfg, _ = registry.read_config(tiny_checkpoints / "prior" / "model", "prior")
    cpu = ["CPUExecutionProvider"]
    sess = {g: ort.InferenceSession(str(tiny_engines / m["graphs"][g]["optimized_file"]), providers=cpu)
            for g in ("prior", "prior_prefix", "prior_step")}
    keys_shape = next(t["shape"] for t in m["graphs"]["prior_prefix"]["outputs"] if t["name"] == "keys")
    assert keys_shape == ["batch", cfg.depth, cfg.heads, cfg.context_length + 1, cfg.dim // cfg.heads]
    feeds = _random_feeds(m["graphs"]["prior"], 6, np.random.default_rng(5))
    feeds["t"] = np.array([999, 700, 400, 100, 1, 0], np.float32)
    feeds["cond_keep"] = np.array([1, 1, 1, 0, 0, 0], np.float32)
    [want] = sess["prior"].run(None, feeds)
    keys, values = sess["prior_prefix"].run(["keys", "values"], {k: feeds[k] for k in
                                                                 ("text_embed", "text_encodings", "cond_keep")})
    [got] = sess["prior_step"].run(None, {"x_t": feeds["x_t"], "t": feeds["t"], "keys": keys, "values": values})
    assert np.abs(got - want).max() <= REL_TOL * np.abs(want).max()
    # the cache depends on the text only: another x_t / t gives the same keys, and the step graph follows x_t
    [other] = sess["prior_step"].run(None, {"x_t": -feeds["x_t"], "t": feeds["t"], "keys": keys, "values": values})
    assert np.abs(other - want).max() > 1e-3


# --------------------------------------------------------------------------------------------------------
# The manifest


def test_manifest_has_every_key_and_hash(tiny_engines, tiny_checkpoints):
    m = _manifest(tiny_engines)
    for key in ("schema", "schema_version", "name", "created", "options", "fingerprint", "sources", "tokenizer",
                "graphs", "stages", "output", "trt", "files"):
        assert key in m, key
    assert (m["schema"], m["schema_version"], m["name"]) == (SCHEMA, 1, "tiny")
    assert {"exporter", "torch", "onnx", "onnxruntime", "opset", "utc"} <= set(m["created"])
    assert m["created"]["opset"] >= 17
    # every file in the folder but the manifest is listed, with its sha256
    on_disk = {p.relative_to(tiny_engines).as_posix() for p in tiny_engines.rglob("*") if p.is_file()}
    assert set(m["files"]) == on_disk - {MANIFEST}
    for rel, digest in m["files"].items():
        assert _sha(tiny_engines / rel) == digest, rel
    assert m["tokenizer"]["file"] in m["files"]
    for stage, src in m["sources"].items():
        assert _sha(Path(src["path"]) / "model.safetensors") == src["sha256"], stage
    assert set(m["sources"]) == {"clip", "prior", "decoder", "sr"}
    for name, g in m["graphs"].items():
        assert {"file", "optimized_file", "optimized_for", "source", "inputs", "outputs", "profile",
                "validation", "trt"} <= set(g), name
        assert g["optimized_for"]["provider"] == "CPUExecutionProvider"
        assert all(t["shape"][0] == "batch" for t in g["inputs"] + g["outputs"]), name
    b = m["options"]["max_batch"]
    assert m["graphs"]["decoder"]["profile"]["batch"] == {"min": 1, "opt": 2, "max": 2 * b}
    assert m["graphs"]["text_encoder"]["profile"]["batch"]["max"] == b


def test_graphs_carry_no_build_paths_or_debug_metadata(tiny_engines):
    """torch records each node's stack trace (absolute source paths of the exporting checkout) and module
    names; the exporter drops them, so the same checkpoint gives the same graph bytes in any checkout."""
    import onnx

    repo = str(Path(__file__).resolve().parents[1]).encode()
    m = _manifest(tiny_engines)
    for name, g in m["graphs"].items():
        data = (tiny_engines / g["file"]).read_bytes()
        assert repo not in data and b"stack_trace" not in data, name
        model = onnx.load_from_string(data)
        assert not model.graph.metadata_props and not model.graph.doc_string, name
        assert not any(n.metadata_props or n.doc_string for n in model.graph.node), name
        assert not any(v.metadata_props for v in model.graph.value_info), name


def test_manifest_stages(tiny_engines):
    s = _manifest(tiny_engines)["stages"]
    clip = TINY_MODEL["clip"]
    assert s["text_encoder"] == {"graph": "text_encoder", "embed_dim": clip["embed_dim"],
                                 "text_width": clip["text_width"], "context_length": 77}
    assert s["image_encoder"]["image_size"] == clip["image_size"]
    prior, dec, (sr,) = s["prior"], s["decoder"], s["sr"]
    assert prior["parameterization"] == "x0" and dec["parameterization"] == "eps" == sr["parameterization"]
    assert prior["embed_scale"] == pytest.approx(clip["embed_dim"] ** 0.5)
    assert prior["clip_x0"] == [-10.0, 10.0] and dec["clip_x0"] == [-1.0, 1.0]
    # no checkpoint defaults here: the exporter's own, which the runtime must be able to run as they are
    for st, keys in ((prior, {"sampler", "steps", "guidance", "candidates"}),
                     (dec, {"sampler", "steps", "guidance", "candidates"}), (sr, {"sampler", "steps"})):
        d = st["defaults"]
        assert set(d) == keys and d["sampler"] in SAMPLERS and 1 <= d["steps"] <= st["schedule"]["num_timesteps"]
        assert d.get("guidance", 1.0) >= 1.0 and d.get("candidates", 1) >= 1
    assert (sr["graph"], sr["noise_aug_t"]) == ("sr0", TINY_MODEL["sr"].get("sample_aug_t", SRConfig().sample_aug_t))
    assert (dec["image_size"], sr["low_res_size"], sr["image_size"]) == (16, 16, 32)
    for st in (prior, dec, sr):
        abar = np.array(st["schedule"]["alphas_cumprod"], dtype=np.float64)
        assert np.array_equal(abar, alphas_cumprod_for("cosine", 1000))  # float64 exactly, through JSON
    assert _manifest(tiny_engines)["output"] == {"image_size": 32, "pixel_range": [-1, 1]}


def test_runtime_reads_the_folder(tiny_engines):
    m = rt_manifest.load_manifest(tiny_engines)
    rt_manifest.verify_files(m, use_cache=False)
    assert set(m.graphs) == set(GRAPHS)


# --------------------------------------------------------------------------------------------------------
# Idempotence and atomicity


def test_rerun_is_up_to_date_and_touches_nothing(tiny_engines, tiny_checkpoints, capsys):
    before = _mtimes(tiny_engines)
    result = export_all.export_folder(tiny_checkpoints, tiny_engines, name="tiny")
    assert result.status == "up to date" and not result.exported
    assert "up to date" in capsys.readouterr().out
    assert export_all.main(["--checkpoints", str(tiny_checkpoints), "--out", str(tiny_engines), "--name", "tiny",
                            "-q", "--trt"]) == 0  # no TensorRT here: says so, exits cleanly, ONNX stays
    out = capsys.readouterr()
    assert "up to date" in out.out and "TensorRT" in out.out + out.err
    assert _mtimes(tiny_engines) == before
    assert _siblings(tiny_engines) == []


def _copy_setup(tiny_engines: Path, tiny_checkpoints: Path, tmp_path: Path) -> tuple[Path, Path]:
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "engines" / "tiny"
    shutil.copytree(tiny_checkpoints, ckpt)
    shutil.copytree(tiny_engines, out)
    return ckpt, out


def test_changed_checkpoint_rebuilds_that_graph(tiny_engines, tiny_checkpoints, tmp_path):
    ckpt, out = _copy_setup(tiny_engines, tiny_checkpoints, tmp_path)
    old = _manifest(out)
    write_tiny_checkpoints(tmp_path / "other", seed=7)  # same configs, other weights
    shutil.rmtree(ckpt / "sr")
    shutil.copytree(tmp_path / "other" / "sr", ckpt / "sr")
    result = export_all.export_folder(ckpt, out, name="tiny", quiet=True)
    new = _manifest(out)
    assert result.status == "built" and result.exported == ["sr0"]
    assert sorted(result.reused) == sorted(set(GRAPHS) - {"sr0"})
    assert new["fingerprint"] != old["fingerprint"]
    assert new["sources"]["sr"]["sha256"] == _sha(ckpt / "sr" / "model" / "model.safetensors")
    assert new["sources"]["sr"]["sha256"] != old["sources"]["sr"]["sha256"]
    assert new["files"]["sr0.onnx"] != old["files"]["sr0.onnx"]
    for g in set(GRAPHS) - {"sr0"}:
        assert new["files"][f"{g}.onnx"] == old["files"][f"{g}.onnx"]
        assert new["graphs"][g]["validation"] == old["graphs"][g]["validation"]
    assert new["graphs"]["sr0"]["validation"]["rel_err"] <= REL_TOL
    for rel, digest in new["files"].items():
        assert _sha(out / rel) == digest
    assert _siblings(out) == []
    assert export_all.export_folder(ckpt, out, name="tiny", quiet=True).status == "up to date"


def test_failure_mid_export_leaves_no_folder(tiny_checkpoints, tmp_path, monkeypatch):
    calls = []

    def explode(spec, module, path, **kwargs):
        calls.append(spec.name)
        path.write_bytes(b"half a graph")
        raise RuntimeError("boom")

    monkeypatch.setattr(driver, "export_onnx", explode)
    out = tmp_path / "engines" / "tiny"
    with pytest.raises(RuntimeError, match="boom"):
        export_all.export_folder(tiny_checkpoints, out, quiet=True)
    assert calls == ["text_encoder"]
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_interrupt_keeps_the_old_folder(tiny_engines, tiny_checkpoints, tmp_path, monkeypatch):
    ckpt, out = _copy_setup(tiny_engines, tiny_checkpoints, tmp_path)
    before = {**_mtimes(out), MANIFEST: (out / MANIFEST).read_bytes()}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_all, "write_tokenizer", interrupt)  # after every graph was carried over
    with pytest.raises(KeyboardInterrupt):
        export_all.export_folder(ckpt, out, name="renamed", quiet=True)  # new name: not up to date
    assert {**_mtimes(out), MANIFEST: (out / MANIFEST).read_bytes()} == before
    assert _siblings(out) == []


def test_stale_build_folder_of_a_dead_process_is_removed(tiny_engines, tiny_checkpoints, tmp_path):
    ckpt, out = _copy_setup(tiny_engines, tiny_checkpoints, tmp_path)
    stale = out.parent / f".{out.name}.export-999999999-abc"
    (stale / "x").mkdir(parents=True)
    assert export_all.export_folder(ckpt, out, name="tiny", quiet=True).status == "up to date"
    assert _siblings(out) == []


# --------------------------------------------------------------------------------------------------------
# Sources: the SR chain is a list


def test_sr_chain_is_list_based(tiny_checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints, ckpt)
    second = {**TINY_MODEL, "sr": {**TINY_MODEL["sr"], "image_size": 64, "low_res_size": 32}}
    write_tiny_checkpoints(tmp_path / "big", model=second)
    shutil.copytree(tmp_path / "big" / "sr", ckpt / "sr1")
    sources = find_sources(ckpt)
    assert [s.stage for s in sources.sr] == ["sr", "sr1"]
    specs = {s.name: s for s in graph_specs(sources, max_batch=4)}
    assert list(specs)[-2:] == ["sr0", "sr1"]
    assert specs["sr1"].source == "sr1" and specs["sr1"].batch.max == 8
    assert specs["sr1"].inputs[2].shape == ("batch", 3, 32, 32)  # low_res of sr1 = output of sr0

    shutil.rmtree(ckpt / "sr")  # now sr1 (32 -> 64) follows the 16x16 decoder directly
    with pytest.raises(SourceError, match="low_res_size"):
        find_sources(ckpt)


def test_decoder_candidates_default_reaches_the_decoder_batch_range(tiny_checkpoints, tmp_path):
    """model.json "defaults": {"candidates": k} of the decoder reaches the manifest; the decoder graph's batch
    range is tuned for one image's k guided samples and holds at most max_batch guided samples a call (its
    memory stays that of k = 1), widened only when one image's k samples need more."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints, ckpt)
    meta_path = ckpt / "decoder" / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["defaults"] = {**meta.get("defaults", {}), "candidates": 3}
    meta_path.write_text(json.dumps(meta))
    family = export_all.CheckpointFamily(ckpt)
    decoder = next(s for s in family.graph_specs(4) if s.name == "decoder")
    assert (decoder.batch.min, decoder.batch.opt, decoder.batch.max) == (1, 6, 8)
    narrow = next(s for s in family.graph_specs(2) if s.name == "decoder")
    assert (narrow.batch.opt, narrow.batch.max) == (6, 6)
    specs = family.graph_specs(4)
    stages = family.stage_entries(specs)
    assert stages["decoder"]["defaults"]["candidates"] == 3
    plain = next(s for s in export_all.CheckpointFamily(tiny_checkpoints).graph_specs(4) if s.name == "decoder")
    assert (plain.batch.opt, plain.batch.max) == (2, 8)


def test_missing_stage_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        find_sources(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="clip"):
        find_sources(tmp_path / "empty")


def test_refuses_to_replace_a_folder_that_is_not_an_engine_folder(tiny_checkpoints, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(export_all.ExportError, match="not an engine folder"):
        export_all.export_folder(tiny_checkpoints, out, quiet=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_checkpoint_defaults_override_the_exporters_key_by_key(tiny_checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints, ckpt)
    meta_file = ckpt / "decoder" / "model" / "model.json"
    meta = json.loads(meta_file.read_text())
    meta["defaults"] = {"steps": 7, "guidance": 2.5}
    meta_file.write_text(json.dumps(meta))
    sources = find_sources(ckpt)
    before = stage_entries(find_sources(tiny_checkpoints), {})["decoder"]["defaults"]
    after = stage_entries(sources, {})["decoder"]["defaults"]
    assert after == {**before, "steps": 7, "guidance": 2.5}  # the sampler stays (an unknown key is refused:
    # tests/test_hostile_input.py)


# --------------------------------------------------------------------------------------------------------
# Source problems: found before the first graph is exported, reported in one line, nothing left behind


def _truncate_sr_weights(ckpt: Path, tmp: Path) -> None:
    weights = ckpt / "sr" / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _misspelt_config_key(ckpt: Path, tmp: Path) -> None:
    meta_file = ckpt / "decoder" / "model" / "model.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["unet"]["chanels"] = meta["config"]["unet"].pop("channels")
    meta_file.write_text(json.dumps(meta))


def _weights_of_another_config(ckpt: Path, tmp: Path) -> None:
    wider = {**TINY_MODEL, "sr": {**TINY_MODEL["sr"], "unet": {**TINY_MODEL["sr"]["unet"], "channels": 24}}}
    write_tiny_checkpoints(tmp / "wider", model=wider)
    shutil.copy(tmp / "wider" / "sr" / "model" / "model.safetensors", ckpt / "sr" / "model" / "model.safetensors")


def _a_file(ckpt: Path, tmp: Path) -> None:
    shutil.rmtree(ckpt)
    ckpt.write_text("not a folder")


@pytest.mark.parametrize("breakage,message", [
    (lambda ckpt, tmp: shutil.rmtree(ckpt), "does not exist"),
    (_a_file, "is not a directory"),
    (_truncate_sr_weights, "sr/model/model.safetensors: not a complete safetensors file"),
    (_misspelt_config_key, "config.unet: unknown key 'chanels'"),
    (_weights_of_another_config, "weights do not fit the sr config"),
], ids=["missing", "file", "truncated", "unknown-key", "foreign-weights"])
def test_source_problem_is_one_line_before_any_export(tiny_checkpoints, tmp_path, monkeypatch, capsys, breakage,
                                                      message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints, ckpt)
    breakage(ckpt, tmp_path)
    exported = []
    monkeypatch.setattr(driver, "export_onnx", lambda spec, *a, **k: exported.append(spec.name))
    out = tmp_path / "engines" / "tiny"
    status = export_all.main(["--checkpoints", str(ckpt), "--out", str(out), "-q"])
    captured = capsys.readouterr()
    assert status == 1 and captured.out == ""
    assert captured.err.startswith("export: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err
    assert exported == [] and not out.exists() and not out.parent.exists()


def test_stage_entries_are_made_before_the_first_graph(tiny_checkpoints, tmp_path, monkeypatch):
    """A problem only the stage entries find (imported schedulers are checked there) stops the export before
    any graph is traced."""
    exported = []
    monkeypatch.setattr(driver, "export_onnx", lambda spec, *a, **k: exported.append(spec.name))

    def refuse(self, specs):
        raise export_all.SourceError("the stages do not fit")

    monkeypatch.setattr(export_all.CheckpointFamily, "stage_entries", refuse)
    out = tmp_path / "engines" / "tiny"
    with pytest.raises(export_all.SourceError, match="do not fit"):
        export_all.export_folder(tiny_checkpoints, out, quiet=True)
    assert exported == [] and not out.parent.exists()  # not even the folder it would have been built in
