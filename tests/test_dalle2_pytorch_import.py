"""DALLE2-pytorch checkpoints -> engine folder (export/dalle2_pytorch.py), conformant with its own sampling.

Tiny random-weight DALLE2-pytorch 1.15.6 models are built in its own venv (bench/.venv-dalle2, made by
``python -m bench.dalle2_venv``; these tests skip without it), saved as a user has them (a plain state_dict for
the prior, a DecoderTrainer-style saved dict for the decoder, LAION-style train config JSON, an open_clip
model-config JSON and weights), exported with ``python -m export.all --from-dalle2-pytorch`` (DALLE2-pytorch's
package appended to the exporter's path), and run by the runtime. The reference is DALLE2-pytorch's own
``p_sample_loop`` (DDPM over all T steps, where the two samplers coincide) with its ``torch.randn`` fed the
runtime's noise streams (runtime/noise.py: default_rng([seed, image, stage]) float32), so both draw the same
noise; each stage's final x0 is compared.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / "bench" / ".venv-dalle2" / "bin" / "python"
T = 25  # training (and sampling) steps of every tiny stage (linear β at T < 25 leaves (0, 1)): DDPM over all
SEED, PROMPT = 3, "a red circle"

SIDE = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import numpy as np, torch, open_clip
    import dalle2_pytorch.dalle2_pytorch as d2
    from dalle2_pytorch import Decoder, DiffusionPrior, DiffusionPriorNetwork, Unet

    op, out, cfg = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    T = cfg["T"]
    clip_cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                               "head_width": 16},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    # depth 2: the layers share one rotary embedding, whose in-forward cache once kept deeper priors from exporting
    prior_cfg = {"prior": {"net": {"dim": 32, "depth": 2, "dim_head": 8, "heads": 2, "num_timesteps": T,
                                   "max_text_len": 77},
                           "image_embed_dim": 32, "timesteps": T, "cond_drop_prob": 0.2,
                           "predict_x_start": cfg["prior_x0"], "condition_on_text_encodings": cfg["text"],
                           "beta_schedule": "cosine"}}
    base = {"dim": 16, "image_embed_dim": 32, "text_embed_dim": 32, "cond_dim": 16, "channels": 3,
            "dim_mults": [1, 2], "cond_on_text_encodings": cfg["text"], "attn_dim_head": 8, "attn_heads": 2}
    up = {"dim": 8, "dim_mults": [1, 2], "channels": 3, "attn_dim_head": 8, "attn_heads": 2}
    decoder_cfg = {"decoder": {"unets": [base, up][:cfg["unets"]], "image_sizes": [16, 32][:cfg["unets"]],
                               "timesteps": T, "learned_variance": cfg["learned_variance"],
                               "predict_v": cfg["predict_v"], "beta_schedule": ["cosine", "linear"][:cfg["unets"]]}}

    def models():
        (out / "tiny-clip.json").write_text(json.dumps(clip_cfg))
        open_clip.add_model_config(out / "tiny-clip.json")
        p = prior_cfg["prior"]
        prior = DiffusionPrior(net=DiffusionPriorNetwork(**p["net"]), **{k: v for k, v in p.items() if k != "net"})
        dc = dict(decoder_cfg["decoder"])
        decoder = Decoder(tuple(Unet(**u) for u in dc.pop("unets")), **dc)
        return prior.eval(), decoder.eval()

    if op == "make":
        torch.manual_seed(cfg["seed"])
        prior, decoder = models()
        for m in (prior, decoder):  # zero-initialised output layers would make every prediction 0
            for name, t in m.named_parameters():
                t.data.add_(0.05 * torch.randn_like(t))
        clip = open_clip.create_model("tiny-clip")
        torch.save(clip.state_dict(), out / "clip.pt")
        torch.save(prior.state_dict(), out / "prior.pth")  # a plain state_dict
        torch.save({"model": decoder.state_dict(), "version": "1.15.6", "step": 0}, out / "decoder.pth")
        (out / "prior.json").write_text(json.dumps(prior_cfg))
        (out / "decoder.json").write_text(json.dumps(decoder_cfg))
        sys.exit(0)

    # op == "sample": DALLE2-pytorch's own loops, torch.randn fed the runtime's noise streams; with cfg["steps"]
    # fewer than T, its DDIM loops, and each unet's last x0 estimate (what its clamp returned) is the result
    prior, decoder = models()
    steps = cfg.get("steps")
    if steps:
        decoder.sample_timesteps = (steps,) * cfg["unets"]
        last_x0 = []
        clamp = decoder.dynamic_threshold
        decoder.dynamic_threshold = lambda x: last_x0.append(clamp(x)) or last_x0[-1]
    prior.load_state_dict(torch.load(out / "prior.pth"))
    decoder.load_state_dict(torch.load(out / "decoder.pth")["model"])
    clip = open_clip.create_model("tiny-clip", pretrained=str(out / "clip.pt")).eval()
    gen = {}
    def draw(shape):
        return torch.from_numpy(gen["g"].standard_normal(tuple(shape), dtype=np.float32))
    torch.randn = lambda *shape, **kw: draw(shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)
    torch.randn_like = lambda x, **kw: draw(x.shape)
    seen = []
    clip.ln_final.register_forward_hook(lambda m, i, o: seen.append(o))
    tokens = open_clip.tokenize([cfg["prompt"]])
    with torch.no_grad():
        embed = d2.l2norm(clip.encode_text(tokens).float())
        mask = d2.F.pad((tokens == 49407).cumsum(-1) == 0, (1, -1), value=True) & (tokens != 0)
        enc = seen[-1].float().masked_fill(~mask[..., None], 0.)
        k = 2
        text_cond = {"text_embed": embed.repeat(k, 1)}
        if cfg["text"]:
            text_cond["text_encodings"] = enc.repeat(k, 1, 1)
        gen["g"] = np.random.default_rng([cfg["seed"], 0, 0])
        pred = prior.p_sample_loop((k, 32), text_cond=text_cond, cond_scale=cfg["guidance"],
                                   timesteps=steps)  # (k, D) / scale
        sims = (d2.l2norm(pred) * embed).sum(-1)
        image_embed = pred[sims.argmax()][None]
        result = {"prior": (pred * prior.image_embed_scale).tolist()}
        img = None
        for n in range(1, cfg["unets"] + 1):
            gen["g"] = np.random.default_rng([cfg["seed"], 0, n])
            img = decoder.sample(image=img, image_embed=image_embed, text_encodings=enc if cfg["text"] else None,
                                 cond_scale=cfg["guidance"], start_at_unet_number=n, stop_at_unet_number=n)
            # back to the diffusion range [-1, 1]
            result[f"unet{n}"] = last_x0[-1].tolist() if steps else (img * 2 - 1).tolist()
    (out / "reference.json").write_text(json.dumps(result))
''')


def _side(op: str, folder: Path, cfg: dict) -> None:
    script = folder / "side.py"
    script.write_text(SIDE)
    run = subprocess.run([str(VENV_PY), str(script), op, str(folder), json.dumps(cfg)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def _site_packages() -> str:
    return next(str(p) for p in (VENV_PY.parent.parent / "lib").glob("python*/site-packages"))


def _export(folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """python -m export.all --from-dalle2-pytorch with DALLE2-pytorch appended to the path (this venv's torch
    and everything else it has win; the same torch version is in both)."""
    code = (f"import sys; sys.path.append({_site_packages()!r}); from export.all import main; "
            "sys.exit(main(sys.argv[1:]))")
    args = ["--from-dalle2-pytorch", "--prior", folder / "prior.pth", "--prior-config", folder / "prior.json",
            "--decoder", folder / "decoder.pth", "--decoder-config", folder / "decoder.json",
            "--clip", folder / "tiny-clip.json", "--clip-weights", folder / "clip.pt", "--out", out,
            "--max-batch", "2", "-q", *extra]
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)


# make test-dalle2-pytorch (CI) builds the venv and sets DALLE2_RT_REQUIRE_DALLE2: there a missing venv fails
needs_venv = pytest.mark.skipif(not VENV_PY.exists() and not os.environ.get("DALLE2_RT_REQUIRE_DALLE2"),
                                reason="no DALLE2-pytorch venv: python -m bench.dalle2_venv")

CONFIGS = {
    # text encodings on, x0 prior, learned variance + v on the base unet, two unets, guidance 1
    "text-x0-v-learned-2unets": {"text": True, "prior_x0": True, "predict_v": False, "learned_variance": True,
                                 "unets": 2, "guidance": 1.0},
    # no text encodings, eps prior (x0 clamped to ±1), v-prediction, fixed variance, one unet, guidance 3
    "notext-eps-v-1unet-guided": {"text": False, "prior_x0": False, "predict_v": True, "learned_variance": False,
                                  "unets": 1, "guidance": 3.0},
}


@needs_venv
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_conformance_with_dalle2_pytorch_ddpm_and_ddim(tmp_path, name):
    cfg = {**CONFIGS[name], "T": T, "seed": SEED, "prompt": PROMPT}
    _side("make", tmp_path, cfg)
    out = tmp_path / "engines"
    run = _export(tmp_path, out)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["stages"]
    assert stages["prior"]["parameterization"] == ("x0" if cfg["prior_x0"] else "eps")
    assert stages["prior"]["clip_x0"] == (None if cfg["prior_x0"] else [-1.0, 1.0])
    assert stages["prior"]["embed_norm"]["kind"] == "mean_std"
    assert stages["decoder"]["variance"] == ("learned_range" if cfg["learned_variance"] else "small")
    assert stages["decoder"]["parameterization"] == ("v" if cfg["predict_v"] else "eps")
    assert len(stages["sr"]) == cfg["unets"] - 1
    if cfg["unets"] == 2:
        assert stages["sr"][0]["schedule"]["name"] == "linear" and stages["sr"][0]["noise_aug_t"] is None
    assert ("text_encodings" in {t["name"] for t in manifest["graphs"]["prior"]["inputs"]}) == cfg["text"]

    _side("sample", tmp_path, cfg)
    ref = json.loads((tmp_path / "reference.json").read_text())

    from dalle2_rt import Pipeline

    last = {}
    pipe = Pipeline.load(out)
    pipe(PROMPT, seed=SEED, sampler="ddpm", prior_steps=T, decoder_steps=T, sr_steps=T if cfg["unets"] > 1 else None,
         prior_guidance=cfg["guidance"], decoder_guidance=cfg["guidance"], candidates=2,
         callback=lambda stage, step, total, x0: last.__setitem__(stage, x0))
    got = {"prior": last["prior"], "unet1": last["decoder"]}
    if cfg["unets"] > 1:
        got["unet2"] = last["sr0"]
    for key, want in ref.items():
        want = np.asarray(want)
        err = float(np.abs(np.asarray(got[key], np.float64) - want).max())
        assert err < 2e-4 * max(1.0, float(np.abs(want).max())), (key, err)

    # few-step DDIM: its own grids (the prior's from −1 with ᾱ_{t−1} and η = 1, the unets' down to t = 0) against
    # the runtime on the spacings the importer wrote; S = 5 of T = 25 has no float32 rounding edge in its grids
    assert stages["prior"]["schedule"]["spacing"] == "linspace_floor_shifted"
    assert stages["prior"]["schedule"]["ddim_eta"] == 1.0
    assert stages["decoder"]["schedule"]["spacing"] == "linspace_floor"
    steps = 5
    _side("sample", tmp_path, {**cfg, "steps": steps})
    ref = json.loads((tmp_path / "reference.json").read_text())
    last.clear()
    pipe(PROMPT, seed=SEED, sampler="ddim", prior_steps=steps, decoder_steps=steps,
         sr_steps=steps if cfg["unets"] > 1 else None, prior_guidance=cfg["guidance"],
         decoder_guidance=cfg["guidance"], candidates=2, callback=lambda stage, step, total, x0: last.__setitem__(
             stage, (step, total, x0)))
    assert last["prior"][1] == steps - 1 and last["decoder"][1] == steps  # model calls: 4 and 5, as its loops make
    got = {"prior": last["prior"][2], "unet1": last["decoder"][2]}
    if "sr0" in last:
        got["unet2"] = last["sr0"][2]
    for key, want in ref.items():
        want = np.asarray(want)
        err = float(np.abs(np.asarray(got[key], np.float64) - want).max())
        assert err < 2e-4 * max(1.0, float(np.abs(want).max())), ("ddim", key, err)


def test_missing_flags_and_bad_files_are_one_line(tmp_path):
    code = "import sys; from export.all import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", code, "--from-dalle2-pytorch", "--prior", "p.pth"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("export: error: --from-dalle2-pytorch needs --prior-config")
    (tmp_path / "empty.pth").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "c.json").write_text("{}")
    out = tmp_path / "out"
    args = ["--from-dalle2-pytorch", "--prior", tmp_path / "empty.pth", "--prior-config", tmp_path / "c.json",
            "--decoder", tmp_path / "empty.pth", "--decoder-config", tmp_path / "c.json", "--clip", "x",
            "--clip-weights", tmp_path / "empty.pth", "--out", out]
    run = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export: error: ")
    assert not out.exists()


@needs_venv
def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    cfg = {**CONFIGS["notext-eps-v-1unet-guided"], "T": T, "seed": SEED, "prompt": PROMPT}
    _side("make", tmp_path, cfg)
    prior = json.loads((tmp_path / "prior.json").read_text())
    prior["prior"]["net"]["depth"] = 3
    (tmp_path / "prior.json").write_text(json.dumps(prior))
    out = tmp_path / "engines"
    run = _export(tmp_path, out)
    assert run.returncode == 1
    assert run.stderr.strip().startswith("export: error: ") and "do not match the DiffusionPrior config" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not out.exists()
