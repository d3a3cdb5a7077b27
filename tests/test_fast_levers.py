"""The levers of cost per image: early candidate choice, split schedules, the guidance-distilled decoder (its
training step, export, manifest and runtime), and the frontier's default rule."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from dalle2_rt.runtime import pipeline as pipeline_mod
from dalle2_rt.runtime.errors import InputError
from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.runtime.samplers import sample_ddim, sample_ddpm
from dalle2_rt.runtime.schedules import alphas_cumprod_for, respace

FAST = {"prior_steps": 2, "decoder_steps": 4, "sr_steps": 1}


pytestmark = pytest.mark.usefixtures("private_hash_cache")


@pytest.fixture(scope="module")
def pipe(tiny_engines) -> Pipeline:
    return Pipeline.load(tiny_engines, threads=1)


class _Recorder:
    def __init__(self, engine):
        self.engine, self.spec, self.max_batch, self.name = engine, engine.spec, engine.max_batch, engine.name
        self.calls = []

    def __call__(self, **arrays):
        self.calls.append(arrays)
        return self.engine(**arrays)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


# --------------------------------------------------------------------------------------------------------
# split schedules


def _toy_denoiser(x, i):
    return np.tanh(x * (0.5 + 0.1 * i))  # a closed-form stand-in: any function of (x, i) will do


@pytest.mark.parametrize("s", [1, 2, 4])
def test_a_split_schedule_takes_the_same_steps_as_the_whole(s):
    sched = respace(alphas_cumprod_for("cosine", 1000), 5)
    head, tail = sched.split(s)
    assert len(head) == s and len(tail) == 5 - s and head.alphas_cumprod_prev[-1] == sched.alphas_cumprod[s]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    whole = sample_ddim(_toy_denoiser, x, sched)
    part = sample_ddim(lambda x, i: _toy_denoiser(x, i + s), sample_ddim(_toy_denoiser, x, head), tail)
    np.testing.assert_array_equal(whole, part)
    # DDPM draws noise on every step but the one reaching the clean sample, whether split or not
    whole = sample_ddpm(_toy_denoiser, x, sched, rng=np.random.default_rng(1))
    rng = np.random.default_rng(1)
    mid = sample_ddpm(_toy_denoiser, x, head, rng=rng)
    np.testing.assert_array_equal(whole, sample_ddpm(lambda x, i: _toy_denoiser(x, i + s), mid, tail, rng=rng))


def test_split_step_out_of_range_is_refused():
    sched = respace(alphas_cumprod_for("cosine", 1000), 3)
    for s in (0, 3):
        with pytest.raises(ValueError, match="split step"):
            sched.split(s)


# --------------------------------------------------------------------------------------------------------
# early candidate choice


def test_early_choice_ranks_after_s_steps_and_finishes_one_row_per_image(pipe, monkeypatch):
    rec = _Recorder(pipe.engines["decoder"])
    enc = _Recorder(pipe.engines["image_encoder"])
    monkeypatch.setitem(pipe.engines, "decoder", rec)
    monkeypatch.setitem(pipe.engines, "image_encoder", enc)
    picked = {}
    real = pipeline_mod.select_samples

    def spy(x, image_embed, text_embed, k):
        out = real(x, image_embed, text_embed, k)
        picked.update(x=x, out=out)
        return out

    monkeypatch.setattr(pipeline_mod, "select_samples", spy)
    images = pipe("a red circle", seed=3, num_images=2, decoder_candidates=3, decoder_choice_step=1,
                  decoder_guidance=2.0, **FAST)
    rows = [len(c["x_t"]) for c in rec.calls]
    assert rows == [2 * 2 * 3] + [2 * 2] * 3  # step 1: (cond, uncond) × 2 images × 3; then 2 images × 1
    assert len(enc.calls) == 1 and len(enc.calls[0]["pixels"]) == 6  # ranked once, on the step-1 estimates
    chosen = picked["out"][1]
    # the finishing rows start from the chosen candidates' x after step 1: the step-2 input of image j is
    # (cond half) row j, which must equal what the full run had for candidate chosen[j] after step 1
    full = _Recorder(pipe.engines["decoder"].engine)
    monkeypatch.setitem(pipe.engines, "decoder", full)
    pipe("a red circle", seed=3, num_images=2, decoder_candidates=3, decoder_choice_step=4, decoder_guidance=2.0,
         **FAST)
    step2_full = full.calls[1]["x_t"][:6]  # cond half of the second call: 2 images × 3 candidates
    np.testing.assert_allclose(rec.calls[1]["x_t"][:2], step2_full[np.arange(2) * 3 + chosen], atol=1e-6)
    assert images[0].info["decoder_choice_step"] == "1"


def test_early_choice_leaves_one_candidate_and_late_choices_unchanged(pipe):
    base = pixels(pipe("a blue star", seed=5, num_images=2, decoder_candidates=1, **FAST))
    assert np.array_equal(base, pixels(pipe("a blue star", seed=5, num_images=2, decoder_candidates=1,
                                            decoder_choice_step=1, **FAST)))
    ranked_at_end = pixels(pipe("a blue star", seed=5, num_images=2, decoder_candidates=2, **FAST))
    at_last = pipe("a blue star", seed=5, num_images=2, decoder_candidates=2, decoder_choice_step=4, **FAST)
    assert np.array_equal(ranked_at_end, pixels(at_last)) and "decoder_choice_step" not in at_last[0].info
    assert pipe.settings(decoder_candidates=2, decoder_choice_step=9, **FAST)["decoder_choice_step"] is None


def test_early_choice_images_do_not_depend_on_the_batch(pipe):
    opts = {"decoder_candidates": 2, "decoder_choice_step": 2, **FAST}
    alone = pixels(pipe("a blue star", seed=4, num_images=2, **opts))
    together = pixels(pipe(["a red circle", "a blue star"], seed=4, num_images=2, **opts))
    assert np.array_equal(alone, together[2:])


def test_early_choice_needs_a_one_step_sampler_and_a_positive_step(pipe):
    for ask in (lambda: pipe.settings(decoder_candidates=2, decoder_choice_step=1, sampler="dpm++", **FAST),
                lambda: pipe("a red circle", seed=0, decoder_candidates=2, decoder_choice_step=1, sampler="dpm++",
                             **FAST)):
        with pytest.raises(InputError, match="one-step sampler"):  # refused when the settings are resolved
            ask()
    with pytest.raises(InputError, match="decoder choice step must be at least 1"):
        pipe.settings(decoder_choice_step=0)


# --------------------------------------------------------------------------------------------------------
# the guidance-distilled decoder


def guided_model() -> dict:
    """The tiny models with a guidance-distilled decoder (w an input, trained on [1, 4])."""
    from tests.conftest import TINY_MODEL

    return {**TINY_MODEL, "decoder": {**TINY_MODEL["decoder"], "guidance_input": True, "guidance_range": [1.0, 4.0]}}


def distill_config(tmp_path, ckpt, stage: str, **extra) -> dict:
    """A two-step run of a distillation ``stage`` on the tiny checkpoints ``ckpt``: its decoder the teacher and
    the student's start."""
    return {
        "run": {"out_dir": str(tmp_path / "runs"), "seed": 0, "log_every": 1, "ckpt_every": 2, "sample_every": 0,
                "threads": 1},
        "stages": {stage: {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup": 1,
                           "teacher": str(ckpt / "decoder" / "model"), "clip": str(ckpt / "clip" / "model"),
                           "init_from": str(ckpt / "decoder" / "model"), **extra}},
    }


@pytest.fixture(scope="module")
def distilled_engines(tmp_path_factory):
    from export.all import export_folder
    from tests.conftest import write_tiny_checkpoints

    ckpt = write_tiny_checkpoints(tmp_path_factory.mktemp("distilled") / "ckpt", model=guided_model(), seed=3)
    out = ckpt.parent / "engines"
    export_folder(ckpt, out, name="tiny-distilled", quiet=True)
    return out


def test_a_distilled_decoder_exports_w_as_an_input_and_says_so(distilled_engines):
    m = json.loads((Path(distilled_engines) / "manifest.json").read_text())
    assert m["stages"]["decoder"]["guidance_input"] == "guidance"
    inputs = {t["name"]: t for t in m["graphs"]["decoder"]["inputs"]}
    assert inputs["guidance"]["shape"] == ["batch"] and inputs["guidance"]["dtype"] == "float32"
    assert m["stages"]["decoder"]["guidance_range"] == [1.0, 4.0]


def test_a_distilled_decoder_refuses_a_scale_outside_the_range_it_was_trained_on(distilled_engines, tmp_path):
    import shutil

    from dalle2_rt.runtime.errors import EngineFolderError

    pipe = Pipeline.load(distilled_engines, threads=1)
    for g in (0.5, 4.5):
        with pytest.raises(InputError, match=f"decoder guidance {g:g} is outside 1 … 4"):
            pipe("a red circle", seed=1, decoder_guidance=g, **FAST)
    assert pipe.settings(decoder_guidance=4.0, **FAST)["decoder"]["guidance"] == 4.0
    folder = tmp_path / "e"
    shutil.copytree(distilled_engines, folder)
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    for bad in ([4.0, 1.0], [1.0], ["1", 4.0], [1.0, 1e9]):
        m["stages"]["decoder"]["guidance_range"] = bad
        path.write_text(json.dumps(m))
        with pytest.raises(EngineFolderError, match="guidance_range"):
            Pipeline.load(folder, verify=False)


def test_a_distilled_decoder_runs_one_row_per_sample_with_w_fed(distilled_engines, monkeypatch):
    pipe = Pipeline.load(distilled_engines, threads=1)
    rec = _Recorder(pipe.engines["decoder"])
    monkeypatch.setitem(pipe.engines, "decoder", rec)
    pipe("a red circle", seed=1, num_images=2, decoder_guidance=3.0, decoder_candidates=2, **FAST)
    assert [len(c["x_t"]) for c in rec.calls] == [4] * 4  # 2 images × 2 candidates, no unconditional half
    for c in rec.calls:
        np.testing.assert_array_equal(c["guidance"], np.full(4, 3.0, np.float32))
        np.testing.assert_array_equal(c["image_keep"], np.ones(4, np.float32))
    source = pipe("a red circle", seed=1, **FAST)[0]
    rec.calls.clear()
    pipe.variations(source, seed=0, decoder_steps=2, sr_steps=1,
                    decoder_guidance=1.0)
    assert rec.calls[0]["guidance"].tolist() == [1.0] and rec.calls[0]["text_keep"].tolist() == [0.0]


def test_a_distilled_decoder_matches_its_torch_module(distilled_engines):
    pytest.importorskip("torch")
    ort = Pipeline.load(distilled_engines, threads=1)
    ref = Pipeline.load(distilled_engines, backend="torch", threads=1)
    a = pixels(ort("a red circle", seed=2, num_images=2, decoder_guidance=2.5, **FAST))
    b = pixels(ref("a red circle", seed=2, num_images=2, decoder_guidance=2.5, **FAST))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 3


def test_a_manifest_naming_a_missing_guidance_input_is_refused(distilled_engines, tmp_path):
    import shutil

    from dalle2_rt.runtime.errors import EngineFolderError

    folder = tmp_path / "e"
    shutil.copytree(distilled_engines, folder)
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    m["stages"]["decoder"]["guidance_input"] = "w_scale"
    path.write_text(json.dumps(m))
    with pytest.raises(EngineFolderError, match="guidance_input 'w_scale'"):
        Pipeline.load(folder, verify=False)


# --------------------------------------------------------------------------------------------------------
# distillation training


def test_the_distillation_target_is_the_teachers_guided_prediction():
    torch = pytest.importorskip("torch")
    from dalle2_rt.models.decoder import Decoder
    from dalle2_rt.training.config import TrainConfig
    from dalle2_rt.training.distill import guided_target
    from dalle2_rt.training.stages import model_config
    from tests.conftest import TINY_MODEL, _randomize_

    cfg = model_config(TrainConfig(model=TINY_MODEL), "decoder", embed_dim=16, text_width=32, context_length=77)
    teacher = Decoder(cfg).eval()
    _randomize_(teacher, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([10.0, 500.0, 999.0])
    emb, txt = torch.randn(3, 16, generator=g), torch.randn(3, 77, 32, generator=g)
    keep, text_keep, w = torch.ones(3), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 4.0])
    got = guided_target(teacher, x, t, emb, txt, keep, text_keep, w)
    with torch.no_grad():
        c = teacher(x, t, emb, txt, keep, text_keep)
        u = teacher(x, t, emb, txt, torch.zeros(3), torch.zeros(3))
    torch.testing.assert_close(got, u + w.reshape(-1, 1, 1, 1) * (c - u), rtol=1e-4, atol=1e-5)


def test_distillation_warm_starts_from_the_teacher_and_saves_a_guidance_input_decoder(tmp_path):
    pytest.importorskip("torch")
    from dalle2_rt.training.config import config_from_dict
    from dalle2_rt.training.distill import train_decoder_distill
    from tests.conftest import write_tiny_checkpoints

    ckpt = write_tiny_checkpoints(tmp_path / "ckpt")
    cfg = config_from_dict(distill_config(tmp_path, ckpt, "decoder_distill", init_fresh=["guidance_embed."],
                                          guidance_range=[1.0, 3.0]))
    folder = train_decoder_distill(cfg)
    meta = json.loads((folder / "model" / "model.json").read_text())
    assert meta["kind"] == "decoder" and meta["config"]["guidance_input"] is True and meta["step"] == 2
    assert meta["config"]["guidance_range"] == [1.0, 3.0]  # the scales it learned, for the exporter's manifest
    # a rerun resumes at the end instead of training again
    assert train_decoder_distill(cfg) == folder


def test_distillation_refuses_a_missing_teacher(tmp_path):
    pytest.importorskip("torch")
    from dalle2_rt.training.config import config_from_dict
    from dalle2_rt.training.distill import DistillError, distill_spec

    cfg = config_from_dict({"run": {"out_dir": str(tmp_path)},
                            "stages": {"decoder_distill": {"teacher": str(tmp_path / "nope")}}})
    with pytest.raises(DistillError, match="teacher must name a decoder model folder"):
        distill_spec(cfg)


def test_one_student_ddim_step_to_the_step_target_lands_where_two_teacher_steps_land():
    """The step-distillation target, checked against the runtime's own DDIM on the trailing grids."""
    torch = pytest.importorskip("torch")
    from dalle2_rt.training.distill import step_grids, two_step_target

    abar = alphas_cumprod_for("cosine", 1000)
    ts, a_t, ts_mid, a_mid, a_end = step_grids(abar, 2)
    teacher, student = respace(abar, 4, "trailing"), respace(abar, 2, "trailing")
    assert ts.tolist() == student.timesteps.tolist() and ts_mid.tolist() == teacher.timesteps[1::2].tolist()
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((2, 3, 8, 8))
    seen = {}
    sample_ddim(lambda x, i: np.tanh(x * (0.5 + i)), x_T, teacher, callback=lambda i, x, x0: seen.__setitem__(i, x))
    # student step 0 goes T-1 → the teacher's step-1 result; its target x0 makes the runtime's DDIM land there
    target = two_step_target(torch.from_numpy(x_T), torch.from_numpy(seen[1]), torch.tensor([a_t[0]]),
                             torch.tensor([a_end[0]])).numpy()
    landed = {}
    sample_ddim(lambda x, i: target if i == 0 else x, x_T, student,
                callback=lambda i, x, x0: landed.__setitem__(i, x))
    np.testing.assert_allclose(landed[0], seen[1], rtol=1e-9, atol=1e-9)
    assert a_end[-1] == 1.0  # the last student step reaches the clean sample: its target is the teacher's x0


def test_a_step_count_outside_its_bounds_is_a_config_error():
    from dalle2_rt.training.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="student_steps must be in 1"):
        config_from_dict({"stages": {"decoder_steps": {"student_steps": 0}}})


def test_step_distillation_trains_a_student_that_records_its_step_count(tmp_path):
    pytest.importorskip("torch")
    from dalle2_rt.training.config import config_from_dict
    from dalle2_rt.training.distill import train_decoder_steps
    from tests.conftest import write_tiny_checkpoints

    ckpt = write_tiny_checkpoints(tmp_path / "ckpt", model=guided_model(), seed=3)
    cfg = config_from_dict(distill_config(tmp_path, ckpt, "decoder_steps", student_steps=2))
    folder = train_decoder_steps(cfg)
    meta = json.loads((folder / "model" / "model.json").read_text())
    assert meta["distilled_steps"] == 2 and meta["config"]["guidance_range"] == [1.0, 4.0]
    assert meta["config"]["guidance_input"] is True
    # model.json's distilled_steps is checked like its other counts
    from dalle2_rt.models.registry import CheckpointError, read_meta

    assert read_meta(folder / "model")["distilled_steps"] == 2
    (folder / "model" / "model.json").write_text(json.dumps({**meta, "distilled_steps": 0}))
    with pytest.raises(CheckpointError, match="distilled_steps = 0: must be an integer in 1"):
        read_meta(folder / "model")


def test_step_distillation_refuses_a_teacher_that_is_not_guidance_distilled(tmp_path):
    pytest.importorskip("torch")
    from dalle2_rt.training.config import config_from_dict
    from dalle2_rt.training.distill import DistillError, steps_spec
    from tests.conftest import write_tiny_checkpoints

    ckpt = write_tiny_checkpoints(tmp_path / "ckpt")
    cfg = config_from_dict(distill_config(tmp_path, ckpt, "decoder_steps"))
    with pytest.raises(DistillError, match="not a guidance-distilled decoder"):
        steps_spec(cfg)


def _deep_teacher(tmp_path, steps: int | None = 2):
    """Tiny checkpoints whose decoder is a guidance-distilled U-Net with 2 blocks per level over 3 levels,
    recorded as step-distilled to ``steps`` (None: not step-distilled)."""
    from tests.conftest import TINY_MODEL, write_tiny_checkpoints

    unet = {**TINY_MODEL["decoder"]["unet"], "channel_mults": [1, 2, 2], "num_res_blocks": 2,
            "attention_levels": [1, 2]}
    model = guided_model()
    model = {**model, "decoder": {**model["decoder"], "unet": unet}}
    ckpt = write_tiny_checkpoints(tmp_path / "ckpt", model=model, seed=5)
    if steps is not None:
        path = ckpt / "decoder" / "model" / "model.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "distilled_steps": steps}))
    return ckpt


def _teacher_and_student(tmp_path):
    """The tiny deep teacher and its one-block-per-level student started from the blocks it keeps."""
    from dalle2_rt.models import registry
    from dalle2_rt.models.decoder import Decoder
    from dalle2_rt.training.distill import compact_weights

    teacher = registry.load(_deep_teacher(tmp_path) / "decoder" / "model").model
    cfg = teacher.cfg
    student = Decoder(dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, num_res_blocks=1)))
    student.load_state_dict(compact_weights(teacher.state_dict(), 3, 2, 1), strict=True)
    return teacher, student


def test_block_removal_keeps_each_levels_first_blocks_down_and_first_and_last_up(tmp_path):
    torch = pytest.importorskip("torch")
    from dalle2_rt.training.distill import DistillError, compact_weights

    teacher, student = _teacher_and_student(tmp_path)
    t, s = teacher.unet, student.unet
    # down: teacher [L0 b0, L0 b1, down0, L1 b0, L1 b1, down1, L2 b0, L2 b1];
    #       student [L0 b0, down0, L1 b0, down1, L2 b0]
    # up: teacher per level [b0, b1, b2 (+ upsample, conv)]; student [b0, b1 = the teacher's b2 (+ upsample, conv)]
    pairs = [(s.down[0], t.down[0]), (s.down[1], t.down[2]), (s.down[2], t.down[3]), (s.down[3], t.down[5]),
             (s.down[4], t.down[6]), (s.up[0], t.up[0]), (s.up[1], t.up[2]), (s.up[3], t.up[4]),
             (s.up[4], t.up[5]), (s.up[5], t.up[7]), (s.up[9], t.up[12]), (s.mid, t.mid)]
    for mine, theirs in pairs:
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    assert torch.equal(student.image_to_emb.weight, teacher.image_to_emb.weight)
    # as many blocks as the teacher: the same state; more, or none: refused
    same = compact_weights(teacher.state_dict(), 3, 2, 2)
    assert same.keys() == teacher.state_dict().keys()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in same.items())
    for blocks in (0, 3):
        with pytest.raises(DistillError, match="num_res_blocks must be 1 … 2"):
            compact_weights(teacher.state_dict(), 3, 2, blocks)


def test_block_removal_trains_a_smaller_student_of_the_same_sampler(tmp_path):
    pytest.importorskip("torch")
    from dalle2_rt.models.registry import read_meta
    from dalle2_rt.training.config import config_from_dict
    from dalle2_rt.training.distill import train_decoder_compact

    ckpt = _deep_teacher(tmp_path)
    run = distill_config(tmp_path, ckpt, "decoder_compact", num_res_blocks=1, feature_weight=1.0)
    del run["stages"]["decoder_compact"]["init_from"]  # the student starts from the teacher's kept blocks
    folder = train_decoder_compact(config_from_dict(run))
    meta = read_meta(folder / "model")
    assert meta["config"]["unet"]["num_res_blocks"] == 1 and meta["distilled_steps"] == 2
    assert meta["config"]["guidance_input"] is True and meta["step"] == 2
    teacher_size = (ckpt / "decoder" / "model" / "model.safetensors").stat().st_size
    assert (folder / "model" / "model.safetensors").stat().st_size < 0.9 * teacher_size


def test_block_removal_pairs_each_levels_output_of_teacher_and_student(tmp_path):
    torch = pytest.importorskip("torch")
    from dalle2_rt.training.distill import _level_features

    teacher, student = _teacher_and_student(tmp_path)
    feats = _level_features(teacher, student, 3, 2, 1)
    g = torch.Generator().manual_seed(0)
    inputs = dict(x_t=torch.randn(2, 3, 16, 16, generator=g), t=torch.tensor([10.0, 900.0]),
                  image_embed=torch.randn(2, 16, generator=g), text_encodings=torch.randn(2, 77, 32, generator=g),
                  image_keep=torch.ones(2), text_keep=torch.ones(2), guidance=torch.tensor([1.0, 3.0]))
    with torch.no_grad():
        teacher(**inputs)
        student(**inputs)
    # what each level's last block stage outputs, caught independently: teacher down [1, 4, 7], up [2, 7, 12];
    # student down [0, 2, 4], up [1, 5, 9] (the layouts in the test above), the middle's last module in both
    ref = {"teacher": [teacher.unet.down[1], teacher.unet.down[4], teacher.unet.down[7], teacher.unet.mid,
                       teacher.unet.up[2], teacher.unet.up[7], teacher.unet.up[12]],
           "student": [student.unet.down[0], student.unet.down[2], student.unet.down[4], student.unet.mid,
                       student.unet.up[1], student.unet.up[5], student.unet.up[9]]}
    seen = {who: [None] * 7 for who in ref}
    for who, stages in ref.items():
        for i, stage in enumerate(stages):
            stage[-1].register_forward_hook(lambda m, a, out, who=who, i=i: seen[who].__setitem__(i, out))
    with torch.no_grad():
        teacher(**inputs)
        student(**inputs)
    for who in ref:
        assert all(torch.equal(a, b) for a, b in zip(feats[who], seen[who], strict=True)), who
    # three levels down, the middle, three levels up: 16, 8, 4, 4, 4, 8, 16 pixels a side
    sides = [16, 8, 4, 4, 4, 8, 16]
    assert [f.shape[-1] for f in feats["teacher"]] == [f.shape[-1] for f in feats["student"]] == sides
    assert all(a.shape == b.shape for a, b in zip(feats["teacher"], feats["student"], strict=True))
    # every call replaces what the hooks kept
    before = [f.clone() for f in feats["student"]]
    with torch.no_grad():
        student(**{**inputs, "x_t": -inputs["x_t"]})
    assert all(not torch.equal(a, b) for a, b in zip(before, feats["student"], strict=True))


def test_block_removal_refuses_a_start_that_is_not_a_compact_student(tmp_path):
    pytest.importorskip("torch")
    from dalle2_rt.training.config import ConfigError, config_from_dict
    from dalle2_rt.training.distill import DistillError, compact_spec

    ckpt = _deep_teacher(tmp_path)
    run = distill_config(tmp_path, ckpt, "decoder_compact")  # init_from: the teacher itself
    with pytest.raises(DistillError, match="has 2 blocks per level, not num_res_blocks = 1"):
        compact_spec(config_from_dict(run))
    with pytest.raises(ConfigError, match="feature_weight at least 0"):
        config_from_dict(distill_config(tmp_path, ckpt, "decoder_compact", feature_weight=-1.0))


def test_block_removal_can_also_learn_the_operation_grid(tmp_path, monkeypatch):
    """operation_steps: the student also learns the teacher where the operations query the decoder (a 6-step
    trailing grid holds the 3-step one's timesteps and adds three); 0 keeps the sampling grid alone."""
    pytest.importorskip("torch")
    from dalle2_rt.runtime.schedules import alphas_cumprod_for
    from dalle2_rt.training import distill
    from dalle2_rt.training.config import ConfigError, config_from_dict

    abar = alphas_cumprod_for("cosine", 1000)
    assert distill.compact_timesteps(abar, 3).tolist() == [332, 666, 999]
    assert distill.compact_timesteps(abar, 3, 6).tolist() == [166, 332, 499, 666, 832, 999]
    ckpt = _deep_teacher(tmp_path)
    seen = []
    real = distill.compact_timesteps
    monkeypatch.setattr(distill, "compact_timesteps", lambda *a: seen.append(a[1:]) or real(*a))
    run = distill_config(tmp_path, ckpt, "decoder_compact", operation_steps=6)
    del run["stages"]["decoder_compact"]["init_from"]
    distill.compact_spec(config_from_dict(run))
    assert seen == [(2, 6)]  # the tiny teacher's distilled steps, and the operation grid asked for
    with pytest.raises(ConfigError, match="operation_steps must be in 0"):
        config_from_dict(distill_config(tmp_path, ckpt, "decoder_compact", operation_steps=-1))


def test_block_removal_needs_a_step_distilled_teacher(tmp_path):
    pytest.importorskip("torch")
    from dalle2_rt.training.config import config_from_dict
    from dalle2_rt.training.distill import DistillError, compact_spec

    ckpt = _deep_teacher(tmp_path, steps=None)
    with pytest.raises(DistillError, match="not a step-distilled decoder"):
        compact_spec(config_from_dict(distill_config(tmp_path, ckpt, "decoder_compact")))


# --------------------------------------------------------------------------------------------------------
# the frontier's rule


def sr_steps_config(tmp_path, ckpt, **extra) -> dict:
    """A two-step sr_steps run on the tiny checkpoints ``ckpt``: its SR the teacher and the student's start."""
    sr = str(ckpt / "sr" / "model")
    return {"run": {"out_dir": str(tmp_path / "runs"), "seed": 0, "log_every": 1, "ckpt_every": 2,
                    "sample_every": 0, "threads": 1},
            "stages": {"sr_steps": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup": 1, "teacher": sr,
                                    "init_from": sr, "student_steps": 1, **extra}}}


def test_sr_step_distillation_target_is_the_runtimes_two_step_sample_of_the_teacher(tmp_path):
    """sr_steps at S = 1: a student whose one prediction is what the runtime's DDIM draws from the same noise and
    conditioning with the teacher in 2 steps (x0 clamped, as the runtime's stage does) has zero loss."""
    torch = pytest.importorskip("torch")
    from dalle2_rt.models import registry
    from dalle2_rt.runtime.parameterization import to_x0
    from dalle2_rt.training.config import config_from_dict
    from dalle2_rt.training.distill import sr_steps_spec, x0_to_pred
    from tests.conftest import write_tiny_checkpoints

    ckpt = write_tiny_checkpoints(tmp_path / "ckpt", seed=7)
    spec = sr_steps_spec(config_from_dict(sr_steps_config(tmp_path, ckpt)))
    teacher = registry.load(ckpt / "sr" / "model").model.float()
    abar = alphas_cumprod_for(teacher.cfg.schedule, teacher.cfg.num_timesteps)
    grid, kind = respace(abar, 2, "trailing"), teacher.cfg.parameterization
    calls = []

    def runtime_two_steps(x_t, t, low_res, aug_t):
        calls.append(t.tolist())

        def denoise(x, i):
            with torch.no_grad():
                pred = teacher(x_t=torch.from_numpy(x), t=torch.full((len(x),), float(grid.timesteps[i])),
                               low_res=low_res, aug_t=aug_t).numpy()
            return np.clip(to_x0(pred, x, grid.alphas_cumprod[i], kind), -1, 1)

        x_out = sample_ddim(denoise, x_t.numpy().astype(np.float32), grid)
        return x0_to_pred(torch.from_numpy(x_out).double(), x_t, torch.full((len(x_t),), abar[999]), kind).float()

    images = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    loss = spec.loss(runtime_two_steps, images, ["a"] * 3, torch.Generator().manual_seed(0))
    assert calls == [[999.0] * 3]  # one student step, from the top of the trailing grid
    assert loss.item() < 1e-9
    # the teacher's own single step is not that sample: the target is not the input's own prediction
    assert spec.loss(teacher, images, ["a"] * 3, torch.Generator().manual_seed(0)).item() > 1e-6


def test_the_halving_loss_draws_the_step_and_the_noise_before_the_conditioning():
    """decoder_steps draws (step, noise, then w and text_keep) in that order, as before the loss was shared with
    sr_steps: a run resumed across the change draws the same batches."""
    torch = pytest.importorskip("torch")
    from dalle2_rt.training.diffusion import Diffusion
    from dalle2_rt.training.distill import halving_loss, step_grid_tensors

    diffusion = Diffusion("cosine", 1000)
    grids = step_grid_tensors(diffusion, 2)
    x0 = torch.zeros(3, 3, 4, 4)
    seen = {}
    gen = torch.Generator().manual_seed(5)

    def conditioning():
        seen["state"] = gen.get_state()
        return {}

    halving_loss(lambda x_t, t: x_t, lambda x_t, t: x_t, diffusion, grids, "v", x0, conditioning, gen)
    expected = torch.Generator().manual_seed(5)
    torch.randint(0, len(grids[0]), (3,), generator=expected)
    torch.randn(x0.shape, generator=expected)
    assert torch.equal(seen["state"], expected.get_state())


def test_sr_step_distillation_trains_a_one_step_sr_student_and_refuses_a_decoder_teacher(tmp_path):
    pytest.importorskip("torch")
    from dalle2_rt.training.config import config_from_dict
    from dalle2_rt.training.distill import DistillError, sr_steps_spec, train_sr_steps
    from tests.conftest import write_tiny_checkpoints

    ckpt = write_tiny_checkpoints(tmp_path / "ckpt", seed=9)
    folder = train_sr_steps(config_from_dict(sr_steps_config(tmp_path, ckpt)))
    meta = json.loads((folder / "model" / "model.json").read_text())
    assert meta["kind"] == "sr" and meta["distilled_steps"] == 1 and meta["step"] == 2
    decoder = str(ckpt / "decoder" / "model")
    with pytest.raises(DistillError, match="teacher: .*'decoder'"):
        sr_steps_spec(config_from_dict(sr_steps_config(tmp_path, ckpt, teacher=decoder)))


def test_the_default_is_the_fastest_point_within_one_standard_error_of_the_best():
    from bench.frontier import choose_default

    def pt(label, single, two, ms, se=2.0):
        return {"label": label, "single": single, "single_se": se, "two": two, "two_se": se, "ms": ms}

    points = [pt("slow best", 99.0, 80.0, 400), pt("fast close", 98.0, 78.5, 100), pt("faster worse", 99.0, 70.0, 50)]
    assert choose_default(points)["label"] == "fast close"
    assert choose_default([pt("a", 99.0, 80.0, 400), pt("b", 96.0, 80.0, 10)])["label"] == "a"
    # the error of a difference of two measured rates counts both: 99.8 ± 0.4 vs 99.2 ± 0.5 differ by 0.6 < 0.64
    near = [pt("best", 99.8, 75.2, 390, se=0.4), {**pt("student", 99.2, 77.2, 201, se=0.5), "two_se": 2.1}]
    assert choose_default(near)["label"] == "student"
    assert choose_default([near[0], {**near[1], "single": 99.1}])["label"] == "best"  # 0.7 > 0.64


def test_the_frontier_draws_both_rates_from_a_saved_run(tmp_path, capsys):
    """--from-json --png: the two-object chart where asked and the single-object one beside it, and the rule's
    choice printed, from the counts alone."""
    from PIL import Image

    from bench.frontier import main, single_png

    def pt(name, single, two, ms):
        return {"name": name, "label": "defaults", "settings": {}, "single": single, "n_single": 400, "two": two,
                "n_two": 400, "ms": ms, "gflop": 1.0}

    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"cpu": "test CPU", "points": [pt("slow", 99.75, 75.25, 400),
                                                               pt("fast", 99.25, 77.25, 200)]}))
    png = tmp_path / "chart.png"
    assert main(["--from-json", str(saved), "--png", str(png)]) == 0
    assert single_png(png) == tmp_path / "chart-single.png"
    for path in (png, single_png(png)):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 500
    assert "chosen by the rule: fast defaults" in capsys.readouterr().out


def test_a_rate_with_every_image_right_still_has_an_error():
    from bench.frontier import rate

    p, se = rate([True] * 200)
    assert p == 100.0 and 0.3 < se < 1.0  # p̃ = 201/202: about 0.5 points, not 0
    p, se = rate([True] * 150 + [False] * 50)
    assert p == 75.0 and abs(se - 100 * np.sqrt((151 / 202) * (51 / 202) / 200)) < 1e-9


def test_a_checkpoint_default_choice_step_reaches_the_manifest():
    from types import SimpleNamespace

    from export.manifest import stage_defaults

    src = SimpleNamespace(defaults={"steps": 4, "choice_step": 2, "colour": "red"})
    got = stage_defaults("decoder", src)
    assert got["choice_step"] == 2 and got["steps"] == 4 and "colour" not in got
    assert "choice_step" not in stage_defaults("prior", SimpleNamespace(defaults={"choice_step": 2}))
