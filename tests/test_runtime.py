"""The torch-free runtime on the tiny exported engines: manifest, hashes, backends, the loop, determinism.

Everything runs on the session's ``tiny_engines`` folder (random-weight tiny models exported by the real
exporter), with ONNX Runtime on one thread and few sampling steps.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle2_rt.runtime import manifest as manifest_mod
from dalle2_rt.runtime import pipeline as pipeline_mod
from dalle2_rt.runtime.backends import BackendOptions, OnnxRuntimeBackend, open_backend
from dalle2_rt.runtime.errors import (
    BackendUnavailableError,
    EngineFolderError,
    HashMismatchError,
    InputError,
    NonFiniteError,
    PromptTruncatedWarning,
)
from dalle2_rt.runtime.manifest import load_manifest, verify_files
from dalle2_rt.runtime.pipeline import NoiseStreams, Pipeline, select_candidates
from dalle2_rt.runtime.settings import Settings

FAST = {"prior_steps": 3, "decoder_steps": 3, "sr_steps": 2}


pytestmark = pytest.mark.usefixtures("private_hash_cache")


@pytest.fixture(scope="module")
def engines(tiny_engines) -> Path:
    return Path(tiny_engines)


@pytest.fixture(scope="module")
def pipe(engines) -> Pipeline:
    return Pipeline.load(engines, threads=1)


@pytest.fixture(scope="module")
def full(engines) -> Pipeline:
    """The same folder running the prior's full graph at every step (no prefix cache)."""
    return Pipeline.load(engines, threads=1, prefix_cache=False)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def copy_engines(engines: Path, dest: Path) -> Path:
    shutil.copytree(engines, dest)
    return dest


def rewrite_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------------------------------------
# manifest and hashes


def test_manifest_is_parsed_with_graph_io_and_stages(engines):
    m = load_manifest(engines)
    assert {"text_encoder", "image_encoder", "prior", "decoder", "sr0"} <= set(m.graphs)
    dec = m.graphs["decoder"]
    assert [t.name for t in dec.inputs] == ["x_t", "t", "image_embed", "text_encodings", "image_keep", "text_keep"]
    assert m.graphs["text_encoder"].inputs[0].dtype == np.int64
    assert dec.file.is_file() and dec.file.parent == m.folder
    assert dec.max_batch and dec.max_batch >= 2
    assert m.sha256 == hashlib.sha256((engines / "manifest.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(schema_version=2), "schema_version 2"),
    (lambda d: d.update(schema="something/else"), "schema is not"),
    (lambda d: d.pop("graphs"), "missing object 'graphs'"),
    (lambda d: d["graphs"]["decoder"].update(file="../decoder.onnx"), "must be relative"),
    (lambda d: d["files"].pop("decoder.onnx"), "'decoder.onnx' is not listed"),
    (lambda d: d["stages"]["decoder"].update(parameterization="score"), "parameterization"),
])
def test_bad_manifests_are_refused_with_the_reason(engines, tmp_path, edit, message):
    folder = copy_engines(engines, tmp_path / "e")
    rewrite_manifest(folder, edit)
    with pytest.raises(EngineFolderError, match=message):
        load_manifest(folder)


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(EngineFolderError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(EngineFolderError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(EngineFolderError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_hash_mismatch_names_the_file(engines, tmp_path):
    folder = copy_engines(engines, tmp_path / "e")
    data = bytearray((folder / "sr0.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "sr0.onnx").write_bytes(bytes(data))
    with pytest.raises(HashMismatchError, match=r"sr0\.onnx") as info:
        Pipeline.load(folder, threads=1)
    assert info.value.path.name == "sr0.onnx"
    (folder / "sr0.onnx").unlink()
    with pytest.raises(EngineFolderError, match=r"sr0\.onnx: missing"):
        Pipeline.load(folder, threads=1)


def test_hash_cache_skips_unchanged_files_and_catches_same_size_rewrites(engines, tmp_path, monkeypatch):
    folder = copy_engines(engines, tmp_path / "e")
    old = time.time() - 3600
    for f in folder.iterdir():
        os.utime(f, (old, old))
    # Digests are remembered only for files changed more than _RACY_SECONDS before hashing; utime just
    # set every ctime to now, so shrink the window instead of waiting.
    monkeypatch.setattr(manifest_mod, "_RACY_SECONDS", 0.0)
    time.sleep(0.02)
    m = load_manifest(folder)
    calls = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    verify_files(m)
    assert len(calls) == len(m.files)
    manifest_mod._memory.clear()  # a new process: only the on-disk cache is left
    calls.clear()
    verify_files(m)
    assert calls == []
    # Same size, same mtime, different bytes: the ctime still moves, so the file is hashed again.
    target = folder / "prior.onnx"
    time.sleep(0.02)  # past the filesystem's timestamp tick
    data = bytearray(target.read_bytes())
    data[-10] ^= 0x01
    target.write_bytes(bytes(data))
    os.utime(target, (old, old))
    with pytest.raises(HashMismatchError, match=r"prior\.onnx"):
        verify_files(m)
    assert calls == ["prior.onnx"]


def test_hash_cache_does_not_remember_files_changed_just_now(engines, tmp_path, monkeypatch):
    folder = copy_engines(engines, tmp_path / "e")  # every file's ctime is now: inside the racy window
    m = load_manifest(folder)
    calls = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    verify_files(m)
    verify_files(m)
    assert len(calls) == 2 * len(m.files)


# --------------------------------------------------------------------------------------------------------
# backends


def test_engine_call_signature_reads_dtypes_from_the_manifest(pipe):
    enc = pipe.engines["text_encoder"]
    tokens = pipe.tokenizer(["a red circle", "two squares"]).astype(np.int32)  # cast back to int64 inside
    out = enc(tokens=tokens)
    d = pipe.manifest.stages["text_encoder"]["embed_dim"]
    assert set(out) == {"text_embed", "text_encodings"}
    assert out["text_embed"].shape == (2, d) and out["text_embed"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out["text_embed"], axis=1), 1.0, rtol=1e-5)
    with pytest.raises(InputError, match="missing"):
        enc()
    with pytest.raises(InputError, match="unexpected"):
        enc(tokens=tokens, extra=tokens)


def test_ort_uses_the_optimized_graph_only_for_its_provider(engines, tmp_path, monkeypatch):
    m = load_manifest(engines)
    backend = OnnxRuntimeBackend(m, BackendOptions(providers=["CPUExecutionProvider"], threads=1))
    spec = m.graphs["decoder"]
    assert spec.optimized_for.get("provider") == "CPUExecutionProvider"
    assert backend.engine("decoder").file == spec.optimized_file
    folder = copy_engines(engines, tmp_path / "e")
    rewrite_manifest(folder, lambda d: d["graphs"]["decoder"]["optimized_for"].update(provider="CUDAExecutionProvider"))
    m2 = load_manifest(folder)
    # not the CUDA one: the CPU's own optimised copy, made from decoder.onnx in the user cache (backends.py) ...
    monkeypatch.setenv("DALLE2_RT_CACHE", str(tmp_path / "cache"))
    made = OnnxRuntimeBackend(m2, BackendOptions(providers=["CPUExecutionProvider"], threads=1)).engine("decoder").file
    assert made.parent == tmp_path / "cache" / "ort-optimized" and made.name.startswith("decoder-")
    monkeypatch.setenv("DALLE2_RT_ORT_CACHE", "0")  # ... or, with that cache off, the plain graph
    cpu = BackendOptions(providers=["CPUExecutionProvider"], threads=1)
    assert OnnxRuntimeBackend(m2, cpu).engine("decoder").file.name == "decoder.onnx"


def test_ort_falls_back_to_the_next_provider(engines, monkeypatch):
    m = load_manifest(engines)
    backend = OnnxRuntimeBackend(m, BackendOptions(providers=["CPUExecutionProvider"], threads=1))
    backend.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # as if CUDA were listed
    real = backend._session
    tried = []

    def session(file, chain, spec):
        tried.append(chain[0])
        if chain[0] == "CUDAExecutionProvider":
            raise RuntimeError("libcudart.so.12: cannot open shared object file")
        return real(file, chain, spec)

    monkeypatch.setattr(backend, "_session", session)
    engine = backend.engine("prior")
    assert tried == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert engine.providers == ["CPUExecutionProvider"]
    monkeypatch.setattr(backend, "_session", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(BackendUnavailableError, match="cannot load prior"):
        backend.engine("prior")


def test_unknown_provider_and_unavailable_backends(engines):
    m = load_manifest(engines)
    with pytest.raises(BackendUnavailableError, match="not available"):
        OnnxRuntimeBackend(m, BackendOptions(providers=["NoSuchExecutionProvider"]))
    with pytest.raises(InputError, match="unknown backend"):
        open_backend("jax", m)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="TensorRT backend needs tensorrt and a CUDA GPU"):
            Pipeline.load(engines, backend="tensorrt")


# --------------------------------------------------------------------------------------------------------
# the loop


def test_outputs_are_rgb_images_of_the_output_size_with_metadata(pipe):
    images = pipe(["a red circle", "two blue squares"], seed=1, num_images=2, **FAST)
    size = pipe.manifest.data["output"]["image_size"]
    assert len(images) == 4
    for im in images:
        assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (size, size)
        assert np.asarray(im).dtype == np.uint8
    assert [im.info["prompt"] for im in images] == ["a red circle"] * 2 + ["two blue squares"] * 2
    assert [im.info["index"] for im in images] == ["0", "1", "0", "1"]
    info = images[0].info
    assert info["seed"] == "1" and info["manifest_sha256"] == pipe.manifest.sha256
    assert info["steps"] == "prior=3 decoder=3 sr0=2" and info["sampler"] == "ddim"
    assert info["backend"].startswith("onnxruntime")


def test_same_seed_same_pixels_different_seed_different_pixels(pipe):
    a = pixels(pipe("a red circle", seed=7, num_images=2, **FAST))
    b = pixels(pipe("a red circle", seed=7, num_images=2, **FAST))
    c = pixels(pipe("a red circle", seed=8, num_images=2, **FAST))
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], a[1])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_image_j_does_not_depend_on_num_images_or_other_prompts(pipe, sampler):
    alone = pixels(pipe("a red circle", seed=11, num_images=3, sampler=sampler, **FAST))
    mixed = pixels(pipe(["two blue squares", "a red circle"], seed=11, num_images=5, sampler=sampler, **FAST))
    assert np.array_equal(alone, mixed[5:8])
    single = pixels(pipe("a red circle", seed=11, num_images=1, sampler=sampler, **FAST))
    assert np.array_equal(single[0], alone[0])


def test_noise_streams_follow_the_documented_seed_mapping():
    s = NoiseStreams(5, [0, 3], stage=1, rows=2)
    got = s.standard_normal((4, 3))
    want = np.concatenate([np.random.default_rng([5, j, 1]).standard_normal((2, 3), dtype=np.float32)
                           for j in (0, 3)])
    assert np.array_equal(got, want)
    with pytest.raises(ValueError):
        s.standard_normal((3, 3))


def test_noise_streams_take_one_seed_per_image():
    s = NoiseStreams([5, 2**64 - 1], [0, 3], stage=2)
    want = np.concatenate([np.random.default_rng([seed, j, 2]).standard_normal((1, 4), dtype=np.float32)
                           for seed, j in ((5, 0), (2**64 - 1, 3))])
    assert np.array_equal(s.standard_normal((2, 4)), want)
    with pytest.raises(ValueError, match="3 seeds for 2 images"):
        NoiseStreams([1, 2, 3], [0, 1], stage=0)


def test_generate_rows_equal_the_calls_they_come_from(pipe):
    """Rows of three different calls (prompt, seed, index) in one pass: each equals its call's image."""
    calls = {("a red circle", 4): 3, ("two blue squares", 9): 2}
    want = {key: pipe(key[0], seed=key[1], num_images=n, **FAST) for key, n in calls.items()}
    rows = [("two blue squares", 9, 1), ("a red circle", 4, 2), ("a red circle", 4, 0), ("two blue squares", 9, 0)]
    got = pipe.generate([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], **FAST)
    for (prompt, seed, j), image in zip(rows, got):
        assert np.array_equal(np.asarray(image), np.asarray(want[prompt, seed][j])), (prompt, seed, j)
        assert image.info == want[prompt, seed][j].info
    with pytest.raises(InputError, match="one seed and one index per prompt"):
        pipe.generate(["a", "b"], [1], [0, 0])
    with pytest.raises(InputError, match="seed must be an integer"):
        pipe.generate(["a"], [None], [0])
    with pytest.raises(InputError, match="index must be between 0 and 63"):
        pipe.generate(["a"], [1], [64])


def test_batches_larger_than_the_graph_profile_are_chunked(pipe, monkeypatch):
    rows = []
    dec = pipe.engines["decoder"]
    wrapped = _Recorder(dec, rows)
    monkeypatch.setitem(pipe.engines, "decoder", wrapped)
    n = dec.max_batch  # twice the images that fit in one guided call
    chunked = pixels(pipe("a red circle", seed=0, num_images=n, **FAST))
    assert max(rows) <= dec.max_batch and len(rows) == 2 * FAST["decoder_steps"]
    whole = pixels(pipe("a red circle", seed=0, num_images=3, **FAST))
    assert np.array_equal(chunked[:3], whole)


class _Recorder:
    """An engine wrapper recording each call's inputs; optionally poisoning one output."""

    def __init__(self, engine, log, poison_call: int | None = None, value=np.nan):
        self.engine, self.log, self.poison_call, self.value = engine, log, poison_call, value
        self.spec, self.max_batch, self.name = engine.spec, engine.max_batch, engine.name
        self.calls = []

    def __call__(self, **arrays):
        self.calls.append(arrays)
        self.log.append(len(next(iter(arrays.values()))))
        out = self.engine(**arrays)
        if self.poison_call is not None and len(self.calls) == self.poison_call:
            first = next(iter(out))
            out[first] = out[first].copy()
            out[first].flat[0] = self.value
        return out


def test_guidance_is_one_batch_with_keep_one_then_zero(full, monkeypatch):
    pipe = full
    log = []
    rec = {g: _Recorder(pipe.engines[g], log) for g in ("prior", "decoder", "sr0")}
    for g, r in rec.items():
        monkeypatch.setitem(pipe.engines, g, r)
    pipe("a red circle", seed=0, num_images=2, candidates=3, **FAST)
    prior_call = rec["prior"].calls[0]
    assert len(rec["prior"].calls) == FAST["prior_steps"]
    assert len(prior_call["x_t"]) == 2 * 2 * 3  # (cond, uncond) × images × candidates, one call
    np.testing.assert_array_equal(prior_call["cond_keep"], [1] * 6 + [0] * 6)
    np.testing.assert_array_equal(prior_call["x_t"][:6], prior_call["x_t"][6:])
    dec_call = rec["decoder"].calls[0]
    np.testing.assert_array_equal(dec_call["image_keep"], [1, 1, 0, 0])
    np.testing.assert_array_equal(dec_call["text_keep"], [1, 1, 0, 0])
    assert len(rec["sr0"].calls[0]["x_t"]) == 2  # unguided
    aug = pipe.manifest.stages["sr"][0]["noise_aug_t"]
    np.testing.assert_array_equal(rec["sr0"].calls[0]["aug_t"], [aug, aug])
    log.clear()
    pipe("a red circle", seed=0, num_images=2, decoder_guidance=1.0, **FAST)  # g = 1: conditional half only
    assert len(rec["decoder"].calls[-1]["x_t"]) == 2


def test_prefix_cache_runs_the_text_once_per_prompt_and_half(pipe, monkeypatch):
    rec = {g: _Recorder(pipe.engines[g], []) for g in ("prior_prefix", "prior_step")}
    for g, r in rec.items():
        monkeypatch.setitem(pipe.engines, g, r)
    assert "prior" not in pipe.engines  # the full graph is not even loaded
    prompts = ["a red circle", "two blue squares"]
    pipe(prompts, seed=0, num_images=2, candidates=3, **FAST)
    (pre,) = rec["prior_prefix"].calls  # one call for the whole stage
    np.testing.assert_array_equal(pre["cond_keep"], [1, 1, 0, 0])  # 2 prompts, cond then uncond
    text_embed = pipe.engines["text_encoder"](tokens=pipe.tokenizer(prompts))["text_embed"]
    np.testing.assert_allclose(pre["text_embed"], np.concatenate([text_embed, text_embed]), atol=1e-6)
    steps = rec["prior_step"].calls
    assert len(steps) == FAST["prior_steps"]
    rows = 2 * 4 * 3  # (cond, uncond) × images × candidates
    assert {k: v.shape[0] for k, v in steps[0].items()} == {"x_t": rows, "t": rows, "keys": rows, "values": rows}
    # row (half, image, candidate) carries the cache of (half, its prompt): images 0, 1 are prompt 0's
    cache = pipe.engines["prior_prefix"](**pre)["keys"].reshape(2, 2, *steps[0]["keys"].shape[1:])
    keys = steps[0]["keys"].reshape(2, 4, 3, *steps[0]["keys"].shape[1:])
    for half in (0, 1):
        for image, prompt in enumerate([0, 0, 1, 1]):
            for c in range(3):
                np.testing.assert_array_equal(keys[half, image, c], cache[half, prompt])
    assert not np.array_equal(cache[0, 0], cache[0, 1]) and not np.array_equal(cache[0, 0], cache[1, 0])
    assert all(np.array_equal(s["keys"], steps[0]["keys"]) for s in steps)  # the same arrays at every step


@pytest.mark.parametrize("options", [
    {"num_images": 3, "candidates": 2}, {"num_images": 2, "candidates": 1, "prior_guidance": 1.0},
    {"num_images": 1, "candidates": 5, "sampler": "ddpm"}, {"num_images": 9, "candidates": 2}])
def test_prefix_cache_gives_the_full_graphs_prior_samples(pipe, full, options):
    """Every step's x0 estimate of the prior, cached vs full graph, within float rounding. (The random-weight
    decoders downstream amplify rounding into saturated pixels, so pixels are compared on the bundled model,
    tests/test_bundled.py.)"""
    prompts = ["a red circle", "a small green triangle on the left"]
    x0 = {"cached": [], "full": []}
    for name, p in (("cached", pipe), ("full", full)):
        p(prompts, seed=5, callback=lambda s, i, n, x, name=name: s == "prior" and x0[name].append(x),
          **FAST, **options)
    assert len(x0["cached"]) == len(x0["full"]) and len(x0["full"]) % FAST["prior_steps"] == 0  # × chunks
    rows = sum(len(x) for x in x0["full"]) // FAST["prior_steps"]
    assert rows == len(prompts) * options["num_images"] * options["candidates"]
    for a, b in zip(x0["cached"], x0["full"]):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())


def test_prefix_cache_chunks_within_both_graphs_profiles(pipe, monkeypatch):
    log = {"prior_prefix": [], "prior_step": []}
    for g in log:
        monkeypatch.setitem(pipe.engines, g, _Recorder(pipe.engines[g], log[g]))
    most = pipe.engines["prior_prefix"].max_batch
    pipe("a red circle", seed=0, num_images=most, candidates=1, **FAST)  # many images, one prompt
    assert log["prior_prefix"] == [2]  # its cond and uncond rows, whatever the number of images
    assert max(log["prior_step"]) <= pipe.engines["prior_step"].max_batch
    log["prior_prefix"].clear()
    prompts = [f"{n} red circles" for n in range(most)]
    pipe(prompts, seed=0, num_images=1, candidates=1, **FAST)  # 2 × most rows of distinct prompts
    assert log["prior_prefix"] == [most, most]
    log["prior_prefix"].clear()
    pipe(["a red circle"] * most, seed=0, num_images=1, candidates=1, **FAST)  # one prompt, given most times
    assert log["prior_prefix"] == [2]


@pytest.mark.parametrize("edit,message", [
    (lambda pc: pc.update(step_graph="nope"), "names no graph"),
    (lambda pc: pc.update(cache=["keys", "queries"]), "'queries' is not an output of prior_prefix"),
    (lambda pc: pc.update(cache=["keys"]), "input 'values' is neither x_t, t nor a cache tensor"),
])
def test_bad_prefix_cache_entries_refuse_the_folder(engines, tmp_path, edit, message):
    folder = copy_engines(engines, tmp_path / "e")
    rewrite_manifest(folder, lambda d: edit(d["stages"]["prior"]["prefix_cache"]))
    with pytest.raises(EngineFolderError, match=message):
        Pipeline.load(folder, threads=1)
    Pipeline.load(folder, threads=1, prefix_cache=False)  # the full graph needs none of it


def test_candidate_selection_keeps_the_highest_dot_product():
    text = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    scale = 4.0
    pred = scale * np.array([
        [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [-1.0, 0.0, 0.0],  # image 0: candidate 1 is closest to x
        [0.0, 0.0, -1.0], [0.1, 0.0, 0.3], [0.0, 1.0, 0.0],  # image 1: candidate 1 (unnormalised) wins
    ])
    embed, chosen, scores = select_candidates(pred, text, 3, scale)
    assert chosen.tolist() == [1, 1]
    np.testing.assert_allclose(embed[0], [0.6, 0.8, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(embed, axis=1), 1.0, rtol=1e-6)
    assert scores.shape == (2, 3) and np.argmax(scores[1]) == 1


def test_pipeline_feeds_the_chosen_candidate_to_the_decoder(pipe, monkeypatch):
    dec = _Recorder(pipe.engines["decoder"], [])
    monkeypatch.setitem(pipe.engines, "decoder", dec)
    chosen = {}
    real = pipeline_mod.select_candidates

    def spy(pred, text_embed, k, embed_scale):
        out = real(pred, text_embed, k, embed_scale)
        chosen.update(pred=pred, text=text_embed, out=out)
        return out

    monkeypatch.setattr(pipeline_mod, "select_candidates", spy)
    pipe("a red circle", seed=3, num_images=2, candidates=4, **FAST)
    pred, text = chosen["pred"], chosen["text"]
    assert pred.shape[0] == 8
    emb = pred.reshape(2, 4, -1) / np.linalg.norm(pred.reshape(2, 4, -1), axis=-1, keepdims=True)
    best = np.argmax(np.einsum("nkd,nd->nk", emb, text), axis=1)
    np.testing.assert_allclose(dec.calls[0]["image_embed"][:2], emb[np.arange(2), best], atol=1e-6)


def test_sample_selection_keeps_the_sample_closest_to_the_text():
    from dalle2_rt.runtime.stages import select_samples

    text = np.array([[1.0, 0.0], [0.0, 1.0]])
    embed = np.array([[0.0, 1.0], [3.0, 0.1], [1.0, 1.0],  # image 0: sample 1 (unnormalised) is closest
                      [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # image 1: sample 2
    x = np.arange(6)[:, None, None, None] * np.ones((6, 3, 2, 2))
    chosen_x, chosen, scores = select_samples(x, embed, text, 3)
    assert chosen.tolist() == [1, 2] and chosen_x[:, 0, 0, 0].tolist() == [1.0, 5.0]
    assert scores.shape == (2, 3)
    one, idx, _ = select_samples(x[:2], embed[:2], text, 1)  # k = 1: every sample is its image's
    assert idx.tolist() == [0, 0] and np.array_equal(one, x[:2])


def test_rank_pixels_repeat_each_pixel_into_the_encoder_s_range():
    from dalle2_rt.runtime.stages import rank_pixels

    x = np.array([[[[-1.0, 0.0], [1.0, 3.0]]]])  # (1, 1, 2, 2) in [-1, 1], one value out of range
    out = rank_pixels(x, (-1.0, 1.0), 4, (0.0, 1.0))
    assert out.shape == (1, 1, 4, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], [[0, 0, .5, .5], [0, 0, .5, .5], [1, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="not a multiple"):
        rank_pixels(x, (-1.0, 1.0), 5)


def test_decoder_candidates_draw_k_samples_and_keep_the_one_clip_ranks_first(pipe, monkeypatch):
    """k decoder samples per image in one guided batch, from the image's own decoder stream (rows n·k …); the
    image encoder scores each against the prompt's text embedding and the best one goes on to SR."""
    rec = {g: _Recorder(pipe.engines[g], []) for g in ("decoder", "image_encoder", "sr0")}
    for g, r in rec.items():
        monkeypatch.setitem(pipe.engines, g, r)
    picked = {}
    real = pipeline_mod.select_samples

    def spy(x, image_embed, text_embed, k):
        out = real(x, image_embed, text_embed, k)
        picked.update(x=x, embed=image_embed, text=text_embed, k=k, out=out)
        return out

    monkeypatch.setattr(pipeline_mod, "select_samples", spy)
    events = []
    pipe("a red circle", seed=3, num_images=2, decoder_candidates=3, callback=lambda *e: events.append(e[0]),
         **FAST)
    dec = rec["decoder"].calls[0]
    assert len(dec["x_t"]) == 2 * 2 * 3  # (cond, uncond) × images × candidates, one call
    np.testing.assert_array_equal(dec["image_keep"], [1] * 6 + [0] * 6)
    # x_T: image j's decoder stream draws its 3 rows at once
    for j in range(2):
        want = np.random.default_rng([3, j, 1]).standard_normal((3, *dec["x_t"].shape[1:]), dtype=np.float32)
        np.testing.assert_array_equal(dec["x_t"][3 * j:3 * j + 3], want)
    assert picked["k"] == 3 and picked["x"].shape[0] == 6 and len(rec["image_encoder"].calls[0]["pixels"]) == 6
    text = pipe.engines["text_encoder"](tokens=pipe.tokenizer(["a red circle"]))["text_embed"]
    np.testing.assert_allclose(picked["text"], np.repeat(text, 2, 0), atol=1e-6)
    chosen_x, chosen, scores = picked["out"]
    assert chosen_x.shape == (2, *dec["x_t"].shape[1:])
    np.testing.assert_array_equal(chosen_x, picked["x"][np.arange(2) * 3 + np.argmax(scores, axis=1)])
    # SR's input is the chosen samples, noised from SR's own stream as always
    from dalle2_rt.runtime.stages import low_res_inputs

    sr = pipe.sr_plans[0]
    want = low_res_inputs(chosen_x, sr.noise_aug_t, sr.abar, NoiseStreams(3, [0, 1], 2), pipe.pixel_range)
    np.testing.assert_array_equal(rec["sr0"].calls[0]["low_res"], want["low_res"])
    assert events.count("image_encoder") == 1 and events.index("image_encoder") > events.index("decoder")
    # k = 1 draws exactly what a call without the option draws (the seed contract is unchanged)
    assert np.array_equal(pixels(pipe("a red circle", seed=3, decoder_candidates=1, **FAST)),
                          pixels(pipe("a red circle", seed=3, **FAST)))


def test_a_folder_whose_decoder_ranks_by_default_needs_an_image_encoder(engines, tmp_path):
    folder = copy_engines(engines, tmp_path / "e")

    def edit(d):
        d["stages"]["decoder"]["defaults"]["candidates"] = 2
        del d["stages"]["image_encoder"]

    rewrite_manifest(folder, edit)
    with pytest.raises(EngineFolderError, match="default candidates 2 need an image_encoder"):
        Pipeline.load(folder, threads=1)
    rewrite_manifest(folder, lambda d: d["stages"]["decoder"]["defaults"].update(candidates=1))
    pipe = Pipeline.load(folder, threads=1)  # no ranking by default: loads, and draws one sample as before
    for ask in (lambda: pipe.settings(decoder_candidates=2), lambda: pipe("a red circle", decoder_candidates=2)):
        with pytest.raises(InputError, match="has no image_encoder; decoder candidates > 1 need one"):
            ask()


def test_decoder_candidates_images_do_not_depend_on_the_batch(pipe):
    alone = pixels(pipe("a blue star", seed=4, num_images=2, decoder_candidates=2, **FAST))
    together = pixels(pipe(["a red circle", "a blue star"], seed=4, num_images=3, decoder_candidates=2, **FAST))
    assert np.array_equal(alone, together[3:5])
    meta = pipe("a blue star", seed=4, decoder_candidates=2, **FAST)[0].info
    assert meta["decoder_candidates"] == "2" and "decoder_candidates" not in pipe("a blue star", seed=4,
                                                                                  **FAST)[0].info


def test_callback_reports_every_stage_and_step(pipe):
    events = []
    pipe("a red circle", seed=0, num_images=1, callback=lambda *e: events.append(e), **FAST)
    stages = [e[0] for e in events]
    assert stages == ["text_encoder"] + ["prior"] * 3 + ["decoder"] * 3 + ["sr0"] * 2
    assert [(e[1], e[2]) for e in events if e[0] == "decoder"] == [(1, 3), (2, 3), (3, 3)]
    size = pipe.manifest.data["output"]["image_size"]
    assert events[-1][3].shape == (1, 3, size, size)  # x0 of the last SR step
    assert events[0][3] is None


@pytest.mark.parametrize("graph,call,stage,step", [
    ("decoder", 2, "decoder", 2), ("prior_step", 1, "prior", 1), ("prior_prefix", 1, "prior", None),
    ("sr0", 2, "sr0", 2)])
def test_nan_stops_with_stage_and_step(pipe, monkeypatch, graph, call, stage, step):
    monkeypatch.setitem(pipe.engines, graph, _Recorder(pipe.engines[graph], [], poison_call=call))
    with pytest.raises(NonFiniteError, match=rf"stage '{stage}'" + (f" at step {step}/" if step else ":")) as info:
        pipe("a red circle", seed=0, **FAST)
    assert info.value.stage == stage and info.value.step == step


def test_inf_in_the_text_encoder_is_caught_too(pipe, monkeypatch):
    monkeypatch.setitem(pipe.engines, "text_encoder",
                        _Recorder(pipe.engines["text_encoder"], [], poison_call=1, value=np.inf))
    with pytest.raises(NonFiniteError, match="stage 'text_encoder'"):
        pipe("a red circle", seed=0, **FAST)


def test_four_threads_get_the_sequential_images(pipe):
    seeds = [0, 1, 2, 3]
    want = {s: pixels(pipe("a red circle", seed=s, num_images=2, **FAST)) for s in seeds}
    got, errors = {}, []
    start = threading.Barrier(len(seeds))

    def work(s):
        try:
            start.wait()
            for _ in range(2):
                got.setdefault(s, []).append(pixels(pipe("a red circle", seed=s, num_images=2, **FAST)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in seeds:
        for result in got[s]:
            assert np.array_equal(result, want[s])


def test_variations(pipe, tmp_path):
    source = pipe("a red circle", seed=2, **FAST)[0]
    path = tmp_path / "src.png"
    source.save(path)
    a = pipe.variations(source, num_images=2, seed=5, decoder_steps=3, sr_steps=2)
    b = pipe.variations(path, num_images=2, seed=5, decoder_steps=3, sr_steps=2)
    c = pipe.variations(str(path), num_images=1, seed=6, decoder_steps=3, sr_steps=2)
    assert len(a) == 2 and a[0].size == source.size
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a)[0], pixels(c)[0])
    assert b[0].info["variation_of"] == "src.png" and b[0].info["prompt"] == ""
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    with pytest.raises(InputError, match="not a readable image"):
        pipe.variations(not_image)


def test_variations_feed_no_text_to_the_decoder(pipe, monkeypatch):
    dec = _Recorder(pipe.engines["decoder"], [])
    monkeypatch.setitem(pipe.engines, "decoder", dec)
    pipe.variations(Image.new("RGB", (40, 30), (200, 10, 10)), num_images=1, seed=0, decoder_steps=2, sr_steps=1)
    call = dec.calls[0]
    np.testing.assert_array_equal(call["image_keep"], [1, 0])
    np.testing.assert_array_equal(call["text_keep"], [0, 0])


@pytest.mark.parametrize("kwargs,message", [
    ({"prompt": ""}, "empty"),
    ({"prompt": "  \t"}, "empty"),
    ({"prompt": []}, "no prompt"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": 65}, "num_images"),
    ({"decoder_steps": 0}, "decoder steps"),
    ({"prior_steps": 100_000}, "prior steps"),
    ({"decoder_guidance": -1.0}, "guidance"),
    ({"prior_guidance": float("nan")}, "guidance"),
    ({"decoder_guidance": float("inf")}, "guidance"),
    ({"sampler": "euler"}, "unknown sampler"),
    ({"candidates": 0}, "candidates"),
    ({"decoder_candidates": 0}, "decoder candidates"),
    ({"decoder_candidates": 17}, "decoder candidates must be between 1 and 16"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_arguments_raise_input_error(pipe, kwargs, message):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(InputError, match=message):
        pipe(kwargs.pop("prompt"), **kwargs)


def test_long_prompts_are_truncated_with_a_warning(pipe):
    long = "red circle " * 60
    with pytest.warns(PromptTruncatedWarning, match="truncated to 75 tokens"):
        images = pipe(long, seed=0, **FAST)
    assert pipe.truncated([long, "short"]) == [True, False]
    assert images[0].info["prompt"] == long  # the metadata keeps what was asked, not the truncation
    # what the text encoder reads is the first 75 tokens: a longer tail changes nothing
    with pytest.warns(PromptTruncatedWarning):
        longer = pipe(long + "blue square " * 10, seed=0, **FAST)
    assert np.array_equal(pixels(images), pixels(longer))


def test_unicode_prompts_reach_the_text_encoder_and_the_metadata(pipe):
    odd = "日本語の赤い円 😀 — «ünïcödé»\u200b"
    filled = pipe.tokenizer.text_mask([odd, ""]).sum(axis=1)  # sot, the prompt's ids, eot
    assert filled[0] > filled[1] == 2  # the characters became ids: they were not cleaned away
    assert not pipe.truncated([odd])[0]
    x0 = {}
    for prompt in (odd, "a red circle"):
        x0[prompt] = []
        images = pipe(prompt, seed=0, callback=lambda s, i, n, x, p=prompt: s == "prior" and x0[p].append(x), **FAST)
        assert images[0].info["prompt"] == prompt  # verbatim, the zero-width space included
    assert not np.allclose(x0[odd][-1], x0["a red circle"][-1])  # another prompt, another prior sample
    alone = pixels(pipe(odd, seed=0, **FAST))
    mixed = pixels(pipe(["a red circle", odd], seed=0, **FAST))
    assert np.array_equal(alone[0], mixed[1])


def test_settings_fill_in_the_folders_defaults(pipe, engines):
    stages = json.loads((engines / "manifest.json").read_text())["stages"]
    prior, dec, sr = stages["prior"]["defaults"], stages["decoder"]["defaults"], stages["sr"][0]["defaults"]
    run = pipe.settings()
    assert run == {
        "prior": {"steps": prior["steps"], "guidance": prior["guidance"], "sampler": prior["sampler"]},
        "decoder": {"steps": dec["steps"], "guidance": dec["guidance"], "sampler": dec["sampler"]},
        "sr0": {"steps": sr["steps"], "guidance": None, "sampler": sr["sampler"]},  # SR: nothing to guide
        "candidates": prior["candidates"], "decoder_candidates": dec["candidates"], "decoder_choice_step": None,
        "negative_prompt": None,
    }
    run = pipe.settings(prior_steps=2, sr_steps=1, decoder_guidance=1.5, sampler="dpm++", candidates=3)
    assert run["prior"] == {"steps": 2, "guidance": prior["guidance"], "sampler": "dpm++"}
    assert run["decoder"] == {"steps": dec["steps"], "guidance": 1.5, "sampler": "dpm++"}
    assert run["sr0"] == {"steps": 1, "guidance": None, "sampler": "dpm++"} and run["candidates"] == 3
    T = len(stages["prior"]["schedule"]["alphas_cumprod"])
    assert pipe.settings(prior_steps=T)["prior"]["steps"] == T
    with pytest.raises(InputError, match=f"prior steps must be between 1 and {T}, got {T + 1}"):
        pipe.settings(prior_steps=T + 1)


def test_settings_object_is_frozen_checked_and_spelled_like_the_call(pipe):
    s = Settings(num_images=2, seed=9, sampler="ddpm", **FAST)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1
    by_object = pixels(pipe("a red circle", **dataclasses.asdict(s)))
    by_keywords = pixels(pipe("a red circle", num_images=2, seed=9, sampler="ddpm", **FAST))
    assert np.array_equal(by_object, by_keywords)
    assert Settings(seed=np.uint64(2**64 - 1), candidates=np.int32(3)) == Settings(seed=2**64 - 1, candidates=3)
    for kwargs, message in [({"num_images": 65}, "num_images must be between 1 and 64, got 65"),
                            ({"num_images": None}, "num_images must be an integer"),
                            ({"seed": 2**64}, "seed must be between 0 and"),
                            ({"decoder_steps": 2.0}, "decoder steps must be an integer, got 2.0"),
                            ({"sr_steps": True}, "sr steps must be an integer"),
                            ({"prior_guidance": "4"}, None),
                            ({"prior_guidance": "x"}, "prior guidance must be a number"),
                            ({"candidates": 17}, "candidates must be between 1 and 16"),
                            ({"sampler": "DDIM"}, "unknown sampler 'DDIM'")]:
        if message is None:
            assert Settings(**kwargs).prior_guidance == 4.0  # a number's text is a number
            continue
        with pytest.raises(InputError, match=message):
            Settings(**kwargs)


def test_more_candidates_than_the_graph_takes_are_refused(engines, tmp_path):
    folder = copy_engines(engines, tmp_path / "e")
    rewrite_manifest(folder, lambda d: d["graphs"]["prior_step"]["profile"]["batch"].update(max=4))
    small = Pipeline.load(folder, threads=1)
    small("a red circle", seed=0, candidates=2, **FAST)  # guided: 2 × 2 rows per image fit
    with pytest.raises(InputError, match=r"prior: 6 rows per image exceed the graph's max batch 4 \(ask for fewer"):
        small("a red circle", seed=0, candidates=3, **FAST)
    small("a red circle", seed=0, candidates=3, prior_guidance=1.0, **FAST)  # unguided: 3 rows fit


def test_stages_that_do_not_fit_together_refuse_the_folder_at_load(engines, tmp_path, monkeypatch):
    folder = copy_engines(engines, tmp_path / "e")

    def shrink(d):  # the decoder now claims to make 8×8 images; sr0 takes 16×16 low_res
        x_t = next(t for t in d["graphs"]["decoder"]["inputs"] if t["name"] == "x_t")
        x_t["shape"] = [x_t["shape"][0], 3, 8, 8]

    rewrite_manifest(folder, shrink)
    opened = []
    monkeypatch.setattr(OnnxRuntimeBackend, "engine", lambda self, g: opened.append(g))
    with pytest.raises(EngineFolderError, match=r"sr0 takes low_res \(3, 16, 16\) but the previous stage makes "
                                                r"\(3, 8, 8\)"):
        Pipeline.load(folder, threads=1)
    assert opened == []  # refused before any graph was opened


def test_load_takes_the_folder_under_its_former_keyword(engines):
    assert Pipeline.load(engines=engines, threads=1).manifest.folder == engines
    with pytest.raises(InputError, match="not both"):
        Pipeline.load(engines, engines=engines)


def test_default_engines_come_from_the_environment(engines, monkeypatch, tmp_path):
    monkeypatch.setenv("DALLE2_RT_ENGINES", str(engines))
    assert pipeline_mod.default_engines() == engines
    assert Pipeline.load(threads=1).manifest.folder == engines
    monkeypatch.delenv("DALLE2_RT_ENGINES")
    assert pipeline_mod.default_engines().parts[-2:] == ("engines", "shapes-v2")
    monkeypatch.setattr(pipeline_mod, "default_engines", lambda: tmp_path / "engines" / "shapes-v2")
    with pytest.raises(EngineFolderError, match="make engines"):
        Pipeline.load()


def test_torch_backend_matches_onnxruntime_within_3_of_255(engines, pipe):
    pytest.importorskip("torch")
    ref = Pipeline.load(engines, backend="torch", threads=1)
    # The prior's estimates live in the unclipped embedding space (the pixels of random-weight models are
    # mostly saturated), so compare them too: same loop, same noise, only float rounding differs.
    x0 = {"ort": [], "torch": []}
    for name, p in (("ort", pipe), ("torch", ref)):
        p("a red circle", seed=4, num_images=2, callback=lambda s, i, n, x, name=name: s == "prior" and
          x0[name].append(x), **FAST)
    for a, b in zip(x0["ort"], x0["torch"]):
        np.testing.assert_allclose(a, b, atol=1e-3 * np.abs(b).max())
    for options in ({}, {"sampler": "ddpm", "decoder_guidance": 2.0}):
        a = pixels(pipe(["a red circle", "two blue squares"], seed=4, num_images=2, **FAST, **options))
        b = pixels(ref(["a red circle", "two blue squares"], seed=4, num_images=2, **FAST, **options))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 3
    assert ref(["x"], seed=0, **FAST)[0].info["backend"].startswith("torch")
    v_ort = pixels(pipe.variations(Image.new("RGB", (32, 32), (9, 90, 200)), seed=1, decoder_steps=2, sr_steps=1))
    v_ref = pixels(ref.variations(Image.new("RGB", (32, 32), (9, 90, 200)), seed=1, decoder_steps=2, sr_steps=1))
    assert np.abs(v_ort.astype(int) - v_ref.astype(int)).max() <= 3


class _FakeOrt:
    """Stands in for onnxruntime's set_global_thread_pool_sizes: records calls; refuses after the first, or
    always (pools made by other code)."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def set_global_thread_pool_sizes(self, intra, inter):
        self.calls.append((intra, inter))
        if self.fail or len(self.calls) > 1:
            raise RuntimeError("Global thread pools have already been created, cannot replace them")


def test_shared_thread_pool_is_made_once(monkeypatch):
    from dalle2_rt.runtime.backends import onnxruntime as backends

    monkeypatch.setattr(backends, "_SHARED_POOL", {})
    fake = _FakeOrt()
    assert backends.make_shared_thread_pool(fake, 2) == 2 and fake.calls == [(2, 1)]
    assert backends.make_shared_thread_pool(fake, 1) == 2 and fake.calls == [(2, 1)]  # cannot be replaced
    monkeypatch.setattr(backends, "_SHARED_POOL", {})
    assert backends.make_shared_thread_pool(_FakeOrt(fail=True), None) == -1  # made by other code


_POOL_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
from dalle2_rt.runtime.pipeline import Pipeline
engines, mode, out = sys.argv[1:4]
if mode == "foreign":  # other code in the process made global pools first
    ort.set_global_thread_pool_sizes(2, 1)
p = Pipeline.load(engines, threads=2, shared_threads=(mode == "shared"))
assert p.backend.shared_pool is (mode != "own"), (mode, p.backend.shared_pool)
if mode == "shared":  # once the pools exist, every later pipeline of the process uses them
    assert Pipeline.load(engines, threads=1).backend.shared_pool is True
ims = p(["a red circle", "two blue squares"], seed=3, prior_steps=3, decoder_steps=3, sr_steps=2)
np.save(out, np.stack([np.asarray(i) for i in ims]))
"""


def test_thread_pool_modes_give_the_same_images(engines, tmp_path):
    """Each mode in a fresh process (the global pool is process-wide): own pools (the default), the shared
    pool (the CLI's), and global pools made by other code before the pipeline loads (used, not refused)."""
    import subprocess
    import sys

    env = {**os.environ, "DALLE2_RT_CACHE": str(tmp_path / "cache")}
    out = {}
    for mode in ("own", "shared", "foreign"):
        subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(engines), mode, str(tmp_path / f"{mode}.npy")],
                       check=True, env=env)
        out[mode] = np.load(tmp_path / f"{mode}.npy").astype(int)
    assert np.abs(out["shared"] - out["own"]).max() <= 1
    assert np.abs(out["foreign"] - out["own"]).max() <= 1
