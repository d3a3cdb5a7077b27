"""Training: tiny random-weight configs, a few steps per stage, overfitting, save/load, resume, DDP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dalle2_rt.training import checkpoint, stages  # noqa: E402
from dalle2_rt.training.config import ConfigError, config_from_dict, load_config  # noqa: E402
from dalle2_rt.world import world_stream  # noqa: E402
from tests.conftest import TINY_MODEL, tiny_config_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """All four tiny stages trained 4 steps (CLIP first: the prior and decoder need it)."""
    cfg = config_from_dict(tiny_config_dict(tmp_path_factory.mktemp("run")))
    stages.train_all(cfg)
    return cfg


def _fixed_batch(n=4):
    it = world_stream(123, size=64)
    items = [next(it) for _ in range(n)]
    return np.stack([i for i, _ in items]), [c for _, c in items]


@pytest.mark.parametrize("name", ["clip", "prior", "decoder", "sr"])
def test_loss_decreases_on_a_fixed_batch(trained, name):
    spec = stages.SPECS[name](trained)
    torch.manual_seed(0)
    opt = torch.optim.Adam(spec.model.parameters(), lr=2e-3)
    images, captions = _fixed_batch()

    def loss_at_fixed_noise():
        return spec.loss(spec.model, images, captions, torch.Generator().manual_seed(5))

    first = loss_at_fixed_noise().item()
    for _ in range(30):
        loss = loss_at_fixed_noise()
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = loss_at_fixed_noise().item()
    assert last < 0.7 * first, (name, first, last)


@pytest.mark.parametrize("name", ["clip", "prior", "decoder", "sr"])
def test_checkpoint_has_config_and_weights_only(trained, name):
    folder = trained.stage_dir(name)
    files = sorted(p.name for p in (folder / "model").iterdir())
    assert files == ["model.json", "model.safetensors"]
    meta = json.loads((folder / "model" / "model.json").read_text())
    assert meta["kind"] == name and meta["step"] == 4
    state = json.loads((folder / "state" / "state.json").read_text())
    assert state["step"] == 4
    assert not list(folder.rglob("*.pt")) and not list(folder.rglob("*.pkl"))
    log = [json.loads(line) for line in (folder / "train.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)


def test_save_load_gives_identical_outputs(trained, tmp_path):
    spec = stages.SPECS["decoder"](trained)
    model = spec.model.eval()
    checkpoint.save_model(tmp_path / "m", "decoder", model, spec.model_cfg)
    meta = checkpoint.read_model_meta(tmp_path / "m")
    cfg2 = checkpoint.config_from_dict(type(spec.model_cfg), meta["config"])
    assert cfg2 == spec.model_cfg
    model2 = type(model)(cfg2).eval()
    model2.load_state_dict(checkpoint.load_weights(tmp_path / "m"))
    g = torch.Generator().manual_seed(0)
    s = cfg2.image_size
    args = dict(x_t=torch.randn(2, 3, s, s, generator=g), t=torch.tensor([3.0, 700.0]),
                image_embed=torch.randn(2, cfg2.embed_dim, generator=g),
                text_encodings=torch.randn(2, 77, cfg2.text_width, generator=g),
                image_keep=torch.tensor([1.0, 0.0]), text_keep=torch.tensor([1.0, 0.0]))
    with torch.no_grad():
        assert torch.equal(model(**args), model2(**args))


def test_half_weights_are_stored_fp16_and_load_fp32(trained, tmp_path):
    spec = stages.SPECS["sr"](trained)
    checkpoint.save_model(tmp_path / "h", "sr", spec.model, spec.model_cfg, half=True)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "h" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert all(v.dtype == torch.float32 for v in checkpoint.load_weights(tmp_path / "h").values())


def test_conditioning_dropout_is_a_mask_not_randomness(trained):
    """forward is deterministic; keep=0 swaps in the learned null, keep=1 uses the input."""
    prior = stages.SPECS["prior"](trained).model.eval()
    d = prior.cfg.embed_dim
    g = torch.Generator().manual_seed(1)
    x, te = torch.randn(2, d, generator=g), torch.randn(2, d, generator=g)
    enc = torch.randn(2, 77, prior.cfg.text_width, generator=g)
    t = torch.tensor([10.0, 10.0])
    with torch.no_grad():
        a = prior(x, t, te, enc, torch.ones(2))
        b = prior(x, t, te, enc, torch.ones(2))
        u1 = prior(x, t, te, enc, torch.zeros(2))
        u2 = prior(x, t, te * 5, enc * 3, torch.zeros(2))  # unconditional ignores the text
    assert torch.equal(a, b)
    assert torch.allclose(u1, u2, atol=1e-6)
    assert not torch.allclose(a, u1, atol=1e-4)


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nout_dri = 'x'\n")
    with pytest.raises(ConfigError, match="out_dri"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="kind"):
        config_from_dict({"data": [{"kind": "webcam"}]})


def _write_toml(path: Path, d: dict) -> None:
    lines = ["[run]"] + [f"{k} = {json.dumps(v)}" for k, v in d["run"].items()]
    lines += ["[[data]]", 'kind = "world"']
    for s, o in d["stages"].items():
        lines += [f"[stages.{s}]"] + [f"{k} = {json.dumps(v)}" for k, v in o.items()]

    def emit(prefix, table):
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items())
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}", v)

    for s, o in d["model"].items():
        emit(f"model.{s}", o)
    path.write_text("\n".join(lines) + "\n")


def test_cli_resumes_after_a_kill_with_nothing_lost(tmp_path):
    """SIGKILL mid-run, rerun the same command: it restarts from the last checkpoint and finishes."""
    d = tiny_config_dict(tmp_path / "run", steps=400, batch_size=2)
    d["run"]["ckpt_every"] = 5
    cfg_path = tmp_path / "c.toml"
    _write_toml(cfg_path, d)
    cmd = [sys.executable, "-m", "dalle2_rt.training.cli", "sr", "--config", str(cfg_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "sr" / "state" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["step"] >= 10):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_step = json.loads(state.read_text())["step"]
    assert saved_step >= 10 and saved_step % 5 == 0
    saved = checkpoint.load_train_state(tmp_path / "run" / "sr" / "state")[0]
    # Resume for exactly one step: the weights before that step must be the checkpoint's.
    r = subprocess.run(cmd + ["--max-steps", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    after = json.loads(state.read_text())
    assert after["step"] == saved_step + 1
    resumed = checkpoint.load_train_state(tmp_path / "run" / "sr" / "state")[0]
    # the optimizer's step counter advanced by one from the checkpoint's, not from zero
    assert resumed["opt.0.step"].item() == saved["opt.0.step"].item() + 1
    assert not (tmp_path / "run" / "sr" / "state.tmp").exists()


def test_ddp_two_cpu_ranks_stay_in_sync_and_only_rank0_writes(tmp_path):
    d = tiny_config_dict(tmp_path / "run", steps=3, batch_size=2)
    cfg_path = tmp_path / "c.toml"
    _write_toml(cfg_path, d)
    script = tmp_path / "ddp_check.py"
    script.write_text(f"""
import json, os, torch, torch.distributed as dist
from dalle2_rt.training import stages
from dalle2_rt.training.config import load_config
cfg = load_config({str(cfg_path)!r})
spec = stages.sr_spec(cfg)
from dalle2_rt.training.loop import train_stage
train_stage(spec, cfg)
flat = torch.cat([p.detach().flatten() for p in spec.model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    json.dump({{"max_diff": max((g - gathered[0]).abs().max().item() for g in gathered),
               "world": dist.get_world_size()}}, open({str(tmp_path / 'sync.json')!r}, "w"))
dist.destroy_process_group()
""")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"]
    r = subprocess.run(torchrun + [str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    sync = json.loads((tmp_path / "sync.json").read_text())
    assert sync["world"] == 2 and sync["max_diff"] == 0.0
    log = (tmp_path / "run" / "sr" / "train.log.jsonl").read_text().splitlines()
    assert len(log) == 3  # one writer: rank 1 would have doubled every line
    assert json.loads((tmp_path / "run" / "sr" / "state" / "state.json").read_text())["step"] == 3


def test_users_open_clip_checkpoint_is_imported(tmp_path):
    """A small model open_clip builds and saves here becomes our CLIP stage, outputs unchanged."""
    import open_clip

    from dalle2_rt.models.clip import ClipConfig, ClipTextEncoder

    oc = ClipConfig(**TINY_MODEL["clip"]).open_clip_cfg()
    torch.manual_seed(3)
    theirs = open_clip.CLIP(**oc).eval()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}},
               tmp_path / "epoch_1.pt")
    (tmp_path / "model_cfg.json").write_text(json.dumps(oc))
    d = tiny_config_dict(tmp_path / "run", steps=0)
    d["run"].update(init_clip=str(tmp_path / "epoch_1.pt"), init_clip_config=str(tmp_path / "model_cfg.json"))
    folder = stages.train_clip(config_from_dict(d))
    ours, _ = stages.load_clip(folder / "model")
    tokens = open_clip.tokenize(["a red circle", "a blue star to the left of a green cross"])
    with torch.no_grad():
        emb, _ = ClipTextEncoder(ours)(tokens)
        assert torch.allclose(emb, theirs.encode_text(tokens, normalize=True), atol=1e-6)
        img = torch.rand(2, 3, oc["vision_cfg"]["image_size"], oc["vision_cfg"]["image_size"])
        assert torch.allclose(ours.encode_image(img), theirs.encode_image(img), atol=1e-6)


def test_mixed_world_and_folder_data_cycles_and_counts_skips(tmp_path):
    from PIL import Image

    from dalle2_rt.training.data import batch_stream
    from dalle2_rt.training.datasets import SkipCounter

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (80, 80), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} square")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("a broken image")
    d = tiny_config_dict(tmp_path / "run")
    d["data"] = [{"kind": "world", "weight": 1.0}, {"kind": "folder", "path": str(folder), "weight": 1.0}]
    cfg = config_from_dict(d)
    skips = SkipCounter()
    batches = batch_stream(cfg.data, 8, seed=0, skips=skips)
    captions = [c for _ in range(6) for c in next(batches)[1]]
    from_folder = [c for c in captions if c in ("a red square", "a blue square")]
    assert len(from_folder) > 4  # two files, drawn more than twice: the folder cycles
    assert len(captions) - len(from_folder) > 4  # the world stream is mixed in
    assert skips.total >= 2 and "a broken image" not in captions  # broken once per pass over the folder


def test_sample_grids_are_written_with_the_runtime_sampler(tmp_path):
    from PIL import Image

    d = tiny_config_dict(tmp_path / "run", steps=2)
    d["run"]["sample_every"] = 2
    cfg = config_from_dict(d)
    stages.train_clip(cfg)
    from dalle2_rt.training.loop import train_stage
    from dalle2_rt.training.samples import fixed_batch

    def strip(images, side):  # (8, h, w, 3) -> one (side, 8·side, 3) row, nearest-resized as a grid shows it
        return np.concatenate([np.asarray(Image.fromarray(im).resize((side, side), Image.NEAREST))
                               for im in images], axis=1)

    # decoder: [64x64 training images; samples upscaled to 64]; sr: [low-res, samples, truth] at the SR size
    for name, rows, side in (("decoder", 2, 64), ("sr", 3, TINY_MODEL["sr"]["image_size"])):
        train_stage(stages.SPECS[name](cfg), cfg)
        grid = Image.open(cfg.stage_dir(name) / "samples" / "0000002.png")
        assert grid.size == (8 * side, rows * side)
        px = np.asarray(grid.convert("RGB")).reshape(rows, side, 8 * side, 3)
        truth, _ = fixed_batch(8, side)  # the same world images at every grid
        if name == "decoder":
            np.testing.assert_array_equal(px[0], strip(truth, side))
        else:
            low = TINY_MODEL["sr"]["low_res_size"]
            np.testing.assert_array_equal(px[0], strip([np.asarray(Image.fromarray(im).resize((low, low), Image.BOX))
                                                        for im in truth], side))
            np.testing.assert_array_equal(px[2], strip(truth, side))
        # the samples row is the model's output, not a copy of a reference row (2 training steps: noise)
        assert not any(np.array_equal(px[1], px[r]) for r in range(rows) if r != 1)
        assert not list((cfg.stage_dir(name) / "samples").glob("*.tmp"))


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_training_targets_agree_with_the_runtime_parameterisation(kind):
    """A perfect prediction of the training target converts back to x0 through the runtime's adapter."""
    from dalle2_rt.runtime.parameterization import to_x0
    from dalle2_rt.training.diffusion import Diffusion

    d = Diffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 250, 700, 990])
    x_t = d.q_sample(x0, t, noise)
    target = d.target(x0, t, noise, kind)
    back = to_x0(target.numpy(), x_t.numpy(), d.abar[t].numpy(), kind)
    tol = 2e-3 if kind == "eps" else 1e-5  # eps -> x0 divides by √ᾱ (≈ 0.016 at t = 990)
    np.testing.assert_allclose(back, x0.numpy(), atol=tol)
