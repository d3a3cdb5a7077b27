"""The shapes-v2 recipe's training pieces: attribute targets and heads, warm starts, the cosine schedule, devices."""
from __future__ import annotations

import itertools
import json
import math
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dalle2_rt.models import registry  # noqa: E402
from dalle2_rt.training import loop, stages  # noqa: E402
from dalle2_rt.training.attributes import IGNORE, AttributeHeads, image_targets, text_targets  # noqa: E402
from dalle2_rt.training.config import ConfigError, StageRun, config_from_dict  # noqa: E402
from dalle2_rt.training.data import batch_stream, stage_sources  # noqa: E402
from dalle2_rt.training.device import OnDevice, resolve_device  # noqa: E402
from dalle2_rt.world import (  # noqa: E402
    CaptionSpec,
    Scene,
    SceneObject,
    caption_text,
    random_caption_spec,
    score_spec,
    world_stream,
)
from tests.conftest import tiny_config_dict  # noqa: E402

# Indices in the world's vocabulary order (docs/world.md tables): colours red orange yellow green cyan blue purple
# pink; backgrounds white gray black; shapes circle square triangle star cross.
RED, BLUE, PINK = 0, 5, 7
GRAY = 1
SQUARE, STAR = 1, 3


def test_image_targets_read_the_scene():
    scene = Scene("gray", (SceneObject("blue", "star", 0.3, 0.2, 0.7), SceneObject("pink", "square", 0.28, 0.8, 0.3)))
    t = image_targets([scene, None])
    assert t["bg"].tolist() == [GRAY, IGNORE]
    assert t["known"].tolist() == [1.0, 0.0]
    assert t["present"][0].nonzero().flatten().tolist() == [BLUE, PINK]
    assert t["shape"][0, BLUE] == STAR and t["shape"][0, PINK] == SQUARE and t["shape"][0, RED] == IGNORE
    assert torch.allclose(t["box"][0, BLUE], torch.tensor([0.2, 0.7, 0.3]))
    assert t["box_mask"][0].sum() == 2 and t["box_mask"][1].sum() == 0


def test_text_targets_only_what_the_caption_names():
    single = CaptionSpec("single", ("red",), ("star",), position="at the top")  # no size, no background
    two = CaptionSpec("two", ("blue", "pink"), ("square", "star"), relation="above", background="gray")
    t = text_targets([single, two])
    assert t["bg"].tolist() == [IGNORE, GRAY]
    assert t["size"][0].tolist() == [IGNORE] * 8  # "a red star at the top" names no size
    assert t["position"][0, RED] == 2  # POSITIONS: left right top bottom center
    assert t["relation"][1, BLUE] == 2 and t["relation"][1, PINK] == 3  # blue above pink = pink below blue
    assert t["relation"][0].tolist() == [IGNORE] * 8
    assert t["shape"][1, BLUE] == SQUARE and t["shape"][1, PINK] == STAR


def test_attribute_heads_learn_position_from_the_embedding():
    """Given embeddings that carry cx linearly, the box head's loss falls; given noise it cannot."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    scenes = [Scene("black", (SceneObject("red", "circle", 0.3, float(x), 0.5),)) for x in rng.uniform(0.2, 0.8, 64)]
    t = image_targets(scenes)
    cx = t["box"][:, RED, 0:1]
    informative = torch.nn.functional.normalize(torch.cat([cx - 0.5, torch.ones(64, 1), torch.zeros(64, 6)], 1), dim=1)
    noise = torch.nn.functional.normalize(torch.randn(64, 8), dim=1)
    txt = text_targets([None] * 64)
    final = {}
    for name, emb in (("informative", informative), ("noise", noise)):
        heads = AttributeHeads(8)
        opt = torch.optim.Adam(heads.parameters(), lr=0.05)
        for _ in range(300):
            loss = heads.losses(emb, emb, t, txt)["image.box"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        final[name] = loss.item()
    assert final["informative"] < 0.2 * final["noise"], final


def test_world_batches_carry_labels_that_match_their_images():
    cfg = config_from_dict(tiny_config_dict("unused"))
    images, captions, labels = next(batch_stream(cfg.data, 6, seed=3))
    assert len(labels) == 6
    for img, (spec, scene) in zip(images, labels):
        assert score_spec(img, spec)["fully_right"]  # the render shows what the spec names
        assert len(scene.objects) == spec.n_objects
    # labels do not change the stream: the same seed without labels gives the same images and captions
    plain = list(itertools.islice(world_stream(3, size=64), 2))
    with_labels = list(itertools.islice(world_stream(3, size=64, labels=True), 2))
    for a, b in zip(plain, with_labels):
        assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_the_world_sources_share_of_two_object_scenes_is_a_setting():
    for share, kinds in ((0.0, {"single"}), (1.0, {"two"})):
        cfg = config_from_dict({"data": [{"kind": "world", "two_object_prob": share}]})
        _, _, labels = next(batch_stream(cfg.data, 12, seed=5))
        assert {spec.kind for spec, _ in labels} == kinds
    default = config_from_dict({"data": [{"kind": "world"}]})
    _, _, labels = next(batch_stream(default.data, 200, seed=5))
    assert 0.25 < np.mean([spec.kind == "two" for spec, _ in labels]) < 0.55  # 0.4, as before the setting
    with pytest.raises(ConfigError, match="two_object_prob must be in"):
        config_from_dict({"data": [{"kind": "world", "two_object_prob": 1.5}]})


def test_a_stage_can_ask_its_own_share_of_two_object_scenes():
    cfg = config_from_dict({"data": [{"kind": "world"}, {"kind": "folder", "path": "imgs"}],
                            "stages": {"decoder": {"two_object_prob": 1.0}}})
    decoder, prior = cfg.stages["decoder"], cfg.stages.get("prior")
    world, folder = stage_sources(cfg.data, decoder.two_object_prob)
    assert world.two_object_prob == 1.0 and folder == cfg.data[1]
    assert cfg.data[0].two_object_prob == 0.4  # the shared [[data]] entry is left as it was
    assert stage_sources(cfg.data, prior.two_object_prob if prior else None) == cfg.data
    _, _, labels = next(batch_stream(stage_sources(cfg.data[:1], decoder.two_object_prob), 12, seed=5))
    assert {spec.kind for spec, _ in labels} == {"two"}
    with pytest.raises(ConfigError, match=r"\[stages.decoder\]: two_object_prob must be in"):
        config_from_dict({"stages": {"decoder": {"two_object_prob": -0.1}}})


def test_cosine_schedule_endpoints():
    run = StageRun(steps=110, lr=1e-3, warmup=10, schedule="cosine", min_lr_ratio=0.1)
    assert loop._lr(4, run) == pytest.approx(1e-3 * 5 / 10)  # warm-up: linear in (step + 1)
    assert loop._lr(10, run) == pytest.approx(1e-3)  # cosine starts at the peak
    assert loop._lr(60, run) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # halfway: cos(π/2) = 0
    assert loop._lr(110, run) == pytest.approx(1e-4)  # the end: lr · min_lr_ratio
    assert loop._lr(60, StageRun(steps=110, lr=1e-3, warmup=10)) == pytest.approx(1e-3)  # constant


def test_config_rejects_an_unknown_schedule(tmp_path):
    d = tiny_config_dict(tmp_path)
    d["stages"]["clip"]["schedule"] = "linear"
    with pytest.raises(ConfigError, match="schedule must be constant or cosine"):
        config_from_dict(d)


def test_clip_with_attribute_heads_trains_saves_heads_only_in_state_and_resumes(tmp_path):
    d = tiny_config_dict(tmp_path / "run", steps=4)
    d["stages"]["clip"]["attribute_weight"] = 1.0
    cfg = config_from_dict(d)
    stages.train_clip(cfg, max_steps=2)
    folder = cfg.stage_dir("clip")
    from safetensors.torch import load_file

    state = load_file(str(folder / "state" / "state.safetensors"))
    model = load_file(str(folder / "model" / "model.safetensors"))
    assert any(k.startswith("aux.") for k in state)  # the heads are trained and kept for resuming
    assert not any(k.startswith(("aux.", "image.", "text.")) for k in model)  # ... and never exported
    spec = stages.clip_spec(cfg)
    before = {k: v.clone() for k, v in spec.aux.state_dict().items()}
    stages.train_clip(cfg)  # resumes at step 2, restores the heads, runs to 4
    assert json.loads((folder / "state" / "state.json").read_text())["step"] == 4
    restored = load_file(str(folder / "state" / "state.safetensors"))
    assert any(not torch.equal(before[k], restored[f"aux.{k}"]) for k in before)  # trained further, not reset


def test_warm_start_loads_model_and_ema_and_refuses_a_mismatch(tmp_path):
    src = config_from_dict(tiny_config_dict(tmp_path / "a", steps=2))
    stages.train_sr(src)
    origin = src.stage_dir("sr") / "model"
    d = tiny_config_dict(tmp_path / "b", steps=2)
    d["stages"]["sr"]["init_from"] = str(origin)
    spec = stages.sr_spec(config_from_dict(d))
    ema = loop.EMA(spec.model)
    loop.warm_start(spec.model, ema, spec, str(origin))
    from dalle2_rt.training import checkpoint

    want = checkpoint.load_weights(origin)
    for k, v in spec.model.state_dict().items():
        assert torch.equal(v, want[k].float()) and torch.equal(ema.model.state_dict()[k], want[k].float())
    other = stages.clip_spec(config_from_dict(tiny_config_dict(tmp_path / "c")))
    with pytest.raises(loop.WarmStartError, match="'sr' model, this stage trains 'clip'"):
        loop.warm_start(other.model, loop.EMA(other.model), other, str(origin))
    with pytest.raises(loop.WarmStartError, match="no model.json"):
        loop.warm_start(spec.model, ema, spec, str(tmp_path))


def test_model_json_counts_the_warm_start_s_steps_across_runs_and_resumes(tmp_path):
    """step is this run's; trained_steps adds the warm start's (a steps = 0 stage keeps its source's count)."""
    src = config_from_dict(tiny_config_dict(tmp_path / "a", steps=2))
    stages.train_sr(src)
    origin = src.stage_dir("sr") / "model"

    def meta(cfg):
        return json.loads((cfg.stage_dir("sr") / "model" / "model.json").read_text())

    assert (meta(src)["step"], meta(src)["trained_steps"]) == (2, 2)
    d = tiny_config_dict(tmp_path / "b", steps=3)
    d["stages"]["sr"]["init_from"] = str(origin)
    warm = config_from_dict(d)
    stages.train_sr(warm, max_steps=1)  # stops at step 1; a rerun resumes from the state
    assert (meta(warm)["step"], meta(warm)["trained_steps"]) == (1, 3)
    stages.train_sr(warm)
    assert (meta(warm)["step"], meta(warm)["trained_steps"]) == (3, 5)
    d0 = tiny_config_dict(tmp_path / "c", steps=0)
    d0["stages"]["sr"]["init_from"] = str(warm.stage_dir("sr") / "model")
    carried = config_from_dict(d0)
    stages.train_sr(carried)
    assert (meta(carried)["step"], meta(carried)["trained_steps"]) == (0, 5)


def test_warm_start_config_mismatch_names_the_field(tmp_path):
    src = config_from_dict(tiny_config_dict(tmp_path / "a", steps=1))
    stages.train_sr(src)
    d = tiny_config_dict(tmp_path / "b")
    d["model"] = json.loads(json.dumps(d["model"]))
    d["model"].setdefault("sr", {})["num_timesteps"] = 500
    spec = stages.sr_spec(config_from_dict(d))
    with pytest.raises(loop.WarmStartError, match="num_timesteps"):
        loop.warm_start(spec.model, loop.EMA(spec.model), spec, str(src.stage_dir("sr") / "model"))


def test_training_cli_reports_a_bad_init_from_in_one_line(tmp_path, capsys):
    from dalle2_rt.training import cli

    toml = tmp_path / "c.toml"
    toml.write_text(f'[run]\nout_dir = "{tmp_path / "run"}"\nthreads = 1\n'
                    f'[stages.sr]\nsteps = 1\nbatch_size = 2\ninit_from = "{tmp_path}"\n')
    assert cli.main(["sr", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dalle2-train: init_from") and "no model.json" in err and len(err.splitlines()) == 1


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="cpu, cuda or auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    out = OnDevice(lin, torch.device("cpu"))(x)
    out.sum().backward()  # gradients cross the boundary
    assert torch.allclose(out, lin(x)) and x.grad is not None and math.isfinite(float(x.grad.sum()))


def test_the_v2_recipe_warm_starts_from_committed_folders_of_the_right_kind():
    """A machine without runs/ continues shapes-v2 from what the repository holds (issue 11)."""
    from pathlib import Path

    from dalle2_rt.training.config import STAGES, load_config

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "shapes-v2.toml")
    # every stage but the distillations (their own recipes)
    assert set(cfg.stages) == set(STAGES) - {"decoder_distill", "decoder_steps", "decoder_compact", "sr_steps"}
    for stage in cfg.stages:
        folder = repo / cfg.stage(stage).init_from
        meta = json.loads((folder / "model.json").read_text())
        assert meta["kind"] == stage, folder
        assert (folder / "model.safetensors").stat().st_size > 0
    for stage in cfg.stages:  # and each committed folder is one the recipe's stage can warm-start from
        kind = registry.kind(stage)
        linked = stages.clip_links(stages.model_config(cfg, "clip")) if stage in ("prior", "decoder") else {}
        model_cfg = stages.model_config(cfg, stage, **linked)
        model = kind.build(model_cfg)
        spec = types.SimpleNamespace(name=stage, kind=stage, model_cfg=model_cfg)
        loop.warm_start(model, loop.EMA(model), spec, str(repo / cfg.stage(stage).init_from),
                        cfg.stage(stage).init_fresh)


def test_the_distillation_recipe_continues_from_the_committed_student():
    """configs/shapes-v2-fast.toml: the teacher and CLIP are the bundled ones, and a machine without runs/ warm-starts
    the student from the committed guidance-distilled decoder (all of it: nothing fresh)."""
    from pathlib import Path

    from dalle2_rt.training.config import load_config

    repo = Path(__file__).resolve().parents[1]
    run = load_config(repo / "configs" / "shapes-v2-fast.toml").stage("decoder_distill")
    assert run.teacher == "checkpoints/shapes-v2-guided/decoder/model"
    assert run.clip == "checkpoints/shapes-v2/clip/model"
    student = json.loads((repo / run.init_from / "model.json").read_text())
    assert student["kind"] == "decoder" and student["config"]["guidance_input"] is True and not run.init_fresh
    teacher = json.loads((repo / run.teacher / "model.json").read_text())
    assert {k: v for k, v in student["config"].items() if k not in ("guidance_input", "guidance_range")} == \
        teacher["config"]
    assert student["config"]["guidance_range"] == list(run.guidance_range)  # the scales it was trained on


@pytest.mark.parametrize("config, steps, name", [("shapes-v2-steps.toml", 2, "shapes-v2-steps"),
                                                 ("shapes-v2-steps3.toml", 3, "shapes-v2")])
def test_the_step_distillation_recipe_builds_on_the_committed_guidance_distilled_decoder(config, steps, name):
    """configs/shapes-v2-steps*.toml: the teacher is the committed guidance-distilled decoder, the student starts
    from a committed student of the same config and step count (a machine without runs/ can run it), the grids
    nest, and the folder recipe (make engines-steps; the 3-step student is the bundled decoder: make engines)
    finds the student and its defaults."""
    from pathlib import Path

    from dalle2_rt.runtime.schedules import alphas_cumprod_for
    from dalle2_rt.training.config import load_config
    from dalle2_rt.training.distill import step_grids

    repo = Path(__file__).resolve().parents[1]
    run = load_config(repo / "configs" / config).stage("decoder_steps")
    assert run.teacher == "checkpoints/shapes-v2-fast/decoder/model" and run.clip == "checkpoints/shapes-v2/clip/model"
    assert run.student_steps == steps
    teacher = json.loads((repo / run.teacher / "model.json").read_text())
    student = json.loads((repo / run.init_from / "model.json").read_text())
    assert teacher["config"]["guidance_input"] is True and student["config"] == teacher["config"]
    assert student["distilled_steps"] == steps
    folder = repo / "checkpoints" / name
    assert (repo / run.init_from).parent == folder / "decoder"
    assert json.loads((folder / "defaults.json").read_text())["decoder"]["steps"] == steps
    makefile = (repo / "Makefile").read_text()
    assert (f"$(call variant_engines,{name.removeprefix('shapes-v2-')})" in makefile if name != "shapes-v2"
            else "\nCHECKPOINTS := checkpoints/shapes-v2\n" in makefile)
    ts, _, ts_mid, _, _ = step_grids(alphas_cumprod_for(teacher["config"]["schedule"], 1000), run.student_steps)
    assert len(ts) == run.student_steps and all(ts_mid < ts)


def test_the_block_removal_recipe_builds_on_the_committed_3_step_student():
    """configs/shapes-v2-compact.toml: the teacher is the committed 3-step student, the student warm-starts from a
    committed compact decoder (the teacher's config with fewer blocks per level, the same sampler), and the folder
    recipe (make engines-compact) finds it and its defaults."""
    from pathlib import Path

    from dalle2_rt.training.config import load_config

    repo = Path(__file__).resolve().parents[1]
    run = load_config(repo / "configs" / "shapes-v2-compact.toml").stage("decoder_compact")
    assert run.teacher == "checkpoints/shapes-v2/decoder/model"
    assert run.clip == "checkpoints/shapes-v2/clip/model"
    teacher = json.loads((repo / run.teacher / "model.json").read_text())
    student = json.loads((repo / run.init_from / "model.json").read_text())
    blocks = student["config"]["unet"]["num_res_blocks"]
    assert blocks == run.num_res_blocks < teacher["config"]["unet"]["num_res_blocks"]
    unet = {k: v for k, v in student["config"]["unet"].items() if k != "num_res_blocks"}
    assert unet == {k: v for k, v in teacher["config"]["unet"].items() if k != "num_res_blocks"}
    assert {k: v for k, v in student["config"].items() if k != "unet"} == \
        {k: v for k, v in teacher["config"].items() if k != "unet"}
    assert student["distilled_steps"] == teacher["distilled_steps"] == 3
    folder = repo / "checkpoints" / "shapes-v2-compact"
    assert (repo / run.init_from).parent == folder / "decoder"
    assert json.loads((folder / "defaults.json").read_text())["decoder"]["steps"] == 3
    assert "$(call variant_engines,compact)" in (repo / "Makefile").read_text()


def test_the_sr_step_distillation_recipe_builds_on_the_committed_sr():
    """configs/shapes-v2-sr1.toml: the teacher is the bundled SR, the student warm-starts from the committed
    one-step student (the teacher's config), and the folder recipe (make engines-sr1) finds it and its defaults."""
    from pathlib import Path

    from dalle2_rt.training.config import load_config

    repo = Path(__file__).resolve().parents[1]
    run = load_config(repo / "configs" / "shapes-v2-sr1.toml").stage("sr_steps")
    assert run.teacher == "checkpoints/shapes-v2/sr/model" and run.student_steps == 1
    teacher = json.loads((repo / run.teacher / "model.json").read_text())
    student = json.loads((repo / run.init_from / "model.json").read_text())
    assert student["kind"] == teacher["kind"] == "sr" and student["config"] == teacher["config"]
    assert student["distilled_steps"] == 1 and "distilled_steps" not in teacher
    folder = repo / "checkpoints" / "shapes-v2-sr1"
    assert (repo / run.init_from).parent == folder / "sr"
    assert json.loads((folder / "defaults.json").read_text())["sr"]["steps"] == 1
    assert "$(call variant_engines,sr1)" in (repo / "Makefile").read_text()


def test_clip_contrastive_with_hard_negatives():
    """No extra texts: the symmetric InfoNCE as before. Extra texts are columns of image→text only; a text equal to an
    image's caption is a positive of it, and a hard negative near an image's embedding raises its loss."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 8), dim=1)
    txt = F.normalize(torch.randn(5, 8), dim=1)
    caps = ["a", "b", "c"]
    plain = stages.clip_contrastive(img, txt[:3], 10.0, caps, caps)
    logits = 10.0 * img @ txt[:3].t()
    want = 0.5 * (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3)))
    assert plain.item() == pytest.approx(want.item(), rel=1e-6)

    far = torch.cat([txt[:3], -img[:1], -img[1:2]])  # negatives pointing away from every image: little change
    near = torch.cat([txt[:3], img[:1], img[1:2]])  # negatives on top of images 0 and 1: a much higher loss
    assert stages.clip_contrastive(img, near, 10.0, caps, caps + ["x", "y"]) > \
        stages.clip_contrastive(img, far, 10.0, caps, caps + ["x", "y"]) > plain
    # an extra text identical to caption "a" is a second positive of image 0, not a negative
    dup = stages.clip_contrastive(img, torch.cat([txt[:3], img[:1]]), 10.0, caps, caps + ["a"])
    assert dup < stages.clip_contrastive(img, torch.cat([txt[:3], img[:1]]), 10.0, caps, caps + ["x"])


def test_clip_trains_with_hard_negatives_without_attribute_heads(tmp_path):
    d = tiny_config_dict(tmp_path / "run", steps=2)
    d["stages"]["clip"]["hard_negatives"] = 0.5
    cfg = config_from_dict(d)
    spec = stages.clip_spec(cfg)
    assert spec.wants_labels and spec.aux is None
    gen = torch.Generator().manual_seed(0)
    labels = [(random_caption_spec(np.random.default_rng(i)), None) for i in range(8)]
    negs = stages.hard_negative_captions(labels, 1.0, gen)
    assert len(negs) == 8 and all(n != caption_text(lab[0]) for n, lab in zip(negs, labels))
    assert stages.hard_negative_captions(labels, 0.0, gen) == []
    stages.train_clip(cfg)
    assert json.loads((cfg.stage_dir("clip") / "state" / "state.json").read_text())["step"] == 2
    for bad, msg in ((1.5, "hard_negatives must be in"), (0.5, "applies to CLIP only")):
        dd = tiny_config_dict(tmp_path / "x")
        dd["stages"]["prior" if msg.startswith("applies") else "clip"]["hard_negatives"] = bad
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(dd)
