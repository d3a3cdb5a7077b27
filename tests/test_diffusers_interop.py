"""diffusers UnCLIPPipeline (karlo) -> engine folder: tokenizer, per-graph and sampler conformance.

A tiny random-weight UnCLIPPipeline is built here from configs (nothing downloaded: the tokenizer's
vocab.json / merges.txt are written from open_clip's bundled BPE file), saved with ``save_pretrained``
and converted by ``export/diffusers_unclip.py``. Checks: the manifest; the runtime tokenizer against
transformers' CLIPTokenizer; each ONNX graph against the diffusers modules called the way
``UnCLIPPipeline.__call__`` calls them; our DDPM sampler against ``UnCLIPScheduler`` on the same noise; and
the whole dalle2-rt pipeline against ``UnCLIPPipeline`` on the same latents and per-step noise, in float64
(the algorithm) and as deployed (fp32 ONNX Runtime vs the stock float32 pipeline).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import onnxruntime as ort  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from dalle2_rt.runtime.manifest import load_manifest, verify_files  # noqa: E402
from dalle2_rt.runtime.parameterization import make_denoiser  # noqa: E402
from dalle2_rt.runtime.samplers import sample_ddpm  # noqa: E402
from dalle2_rt.runtime.schedules import respace  # noqa: E402
from dalle2_rt.runtime.tokenizer import Tokenizer  # noqa: E402
from export.diffusers_unclip import _text_proj_class, export_diffusers  # noqa: E402
from export.hf_clip_tokenizer import bytes_to_unicode, check_parity, reference_tokens  # noqa: E402

D = 32  # CLIP embedding = text width (the prior and text_proj project the token encodings as embeddings)
L = 77
DECODER_SIZE, SR_SIZE = 16, 32
GRAPH_TOL = 1e-4

PROMPTS = ["a horse", "A photo of an astronaut riding a HORSE on the moon, “trending”", ""]


def write_clip_vocab(folder: Path) -> Path:
    """vocab.json + merges.txt of the standard CLIP BPE, built from open_clip's bundled merges file."""
    import open_clip

    raw = gzip.open(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8")
    merges = raw.split("\n")[1:49152 - 256 - 2 + 1]  # CLIP's 48,894 merges after the version line
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = bytes_to_unicode()
    # CLIP's id order: the printable bytes first, then the others (the order bytes_to_unicode builds them in).
    symbols = [alphabet[b] for b in printable] + [alphabet[b] for b in range(256) if b not in printable]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def _jitter_(module, gen, scale=0.05):
    """Zero-initialised parameters (prd embedding, positions, CFG embedding, clip_mean) would hide bugs."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def build_tiny_pipeline(vocab_dir: Path) -> UnCLIPPipeline:
    tokenizer = CLIPTokenizer(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"),
                              model_max_length=L)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=D, projection_dim=D, intermediate_size=37, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=L, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=D,
                             num_embeddings=L, additional_embeddings=4)
    text_proj = _text_proj_class()(clip_extra_context_tokens=4, clip_embeddings_dim=D, time_embed_dim=128,
                                   cross_attention_dim=40)
    for m in (prior, text_proj):
        _jitter_(m, gen)
    with torch.no_grad():
        prior.clip_std.copy_(torch.rand(prior.clip_std.shape, generator=gen) + 0.5)
    decoder = UNet2DConditionModel(
        sample_size=DECODER_SIZE, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=40, attention_head_dim=8,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity")
    sr = {"sample_size": SR_SIZE, "in_channels": 6, "out_channels": 3, "layers_per_block": 1,
          "block_out_channels": (32, 64), "down_block_types": ("ResnetDownsampleBlock2D",) * 2,
          "up_block_types": ("ResnetUpsampleBlock2D",) * 2}
    sr_first, sr_last = UNet2DModel(**sr), UNet2DModel(**sr)
    return UnCLIPPipeline(
        prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tokenizer, text_proj=text_proj,
        super_res_first=sr_first, super_res_last=sr_last,
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    ).to(torch.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(pipeline, its save_pretrained folder, the exported engine folder)."""
    root = tmp_path_factory.mktemp("karlo_tiny")
    pipe = build_tiny_pipeline(write_clip_vocab(root / "vocab"))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "pipe")
    result = export_diffusers(root / "pipe", root / "engines", max_batch=2, quiet=True)
    return pipe, root / "pipe", result.folder


def _sessions(folder: Path) -> dict:
    m = load_manifest(folder)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return {name: ort.InferenceSession(str(g.optimized_file or g.file), opts, providers=["CPUExecutionProvider"])
            for name, g in m.graphs.items()}


# --------------------------------------------------------------------------------------------------------
# the folder and its manifest


def test_folder_and_manifest(tiny):
    from tests.test_manifest_schema import check_manifest_schema

    pipe, _, folder = tiny
    check_manifest_schema(folder)
    m = load_manifest(folder)
    verify_files(m, use_cache=False)
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not mkdtemp's private one
    assert set(m.graphs) == {"text_encoder", "prior", "decoder", "super_res_first", "super_res_last"}
    for name, g in m.graphs.items():
        assert g.raw["validation"]["rel_err"] <= GRAPH_TOL, name
    st = m.stages
    assert st["text_encoder"]["text_mask"] == "tokens" and st["text_encoder"]["text_embed_normalized"] is False
    prior = st["prior"]
    assert prior["parameterization"] == "x0" and prior["clip_x0"] == [-5.0, 5.0] and prior["variance"] == "small"
    assert prior["uncond_text"] == "empty_prompt" and prior["schedule"]["spacing"] == "linspace"
    np.testing.assert_array_equal(prior["embed_norm"]["mean"], pipe.prior.clip_mean.detach().double().reshape(-1))
    np.testing.assert_array_equal(prior["embed_norm"]["std"], pipe.prior.clip_std.detach().double().reshape(-1))
    np.testing.assert_array_equal(prior["schedule"]["alphas_cumprod"], pipe.prior_scheduler.alphas_cumprod.double())
    np.testing.assert_array_equal(prior["schedule"]["betas"], pipe.prior_scheduler.betas.double())
    dec = st["decoder"]
    assert (dec["parameterization"], dec["variance"], dec["clip_x0"]) == ("eps", "learned_range", [-1.0, 1.0])
    assert dec["uncond_text"] == "empty_prompt" and dec["cond_inputs"] == ["image_keep"]
    assert dec["defaults"] == {"sampler": "ddpm", "steps": 25, "guidance": 8.0}
    [sr] = st["sr"]
    assert (sr["graph"], sr["last_step_graph"], sr["noise_aug_t"]) == ("super_res_first", "super_res_last", None)
    assert (sr["low_res_size"], sr["image_size"], m.data["output"]["image_size"]) == (DECODER_SIZE, SR_SIZE, SR_SIZE)
    assert sr["low_res_resize"] == {"mode": "bicubic", "align_corners": False, "antialias": True, "in_graph": True}
    assert [t.name for t in m.graphs["decoder"].inputs] == [
        "x_t", "t", "image_embed", "text_embed", "text_encodings", "text_mask", "image_keep"]
    assert m.graphs["decoder"].outputs[0].shape[1] == 6  # eps and the variance interpolation


@pytest.mark.parametrize("where,key,value,match", [
    ("decoder", "variance", "learned", "variance"),
    ("prior", "uncond_text", "zeros", "uncond_text"),
    ("sr", "last_step_graph", "nope", "last_step_graph"),
    ("prior", "embed_norm", {"kind": "mean_std", "mean": [0.0], "std": [1.0, 2.0]}, "embed_norm"),
    ("text_encoder", "text_mask", "attention", "text_mask"),
    ("text_encoder", "text_mask", None, "takes text_mask"),  # the graphs need one
    ("sr", "noise_aug_t", 100, "aug_t"),  # the SR graphs have no aug_t input
])
def test_manifest_refuses_unknown_additions(tiny, tmp_path, where, key, value, match):
    import shutil

    from dalle2_rt.runtime.errors import EngineFolderError

    _, _, folder = tiny
    copy = tmp_path / "engines"
    shutil.copytree(folder, copy)
    data = json.loads((copy / "manifest.json").read_text())
    entry = data["stages"][where][0] if where == "sr" else data["stages"][where]
    entry[key] = value
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineFolderError, match=match):
        load_manifest(copy)


def test_export_is_idempotent(tiny):
    _, pipe_dir, folder = tiny
    before = (folder / "manifest.json").read_bytes()
    assert export_diffusers(pipe_dir, folder, max_batch=2, quiet=True).status == "up to date"
    assert (folder / "manifest.json").read_bytes() == before


def test_refuses_other_pipelines(tmp_path):
    from export.sources import SourceError

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(SourceError, match="UnCLIPPipeline"):
        export_diffusers(tmp_path, tmp_path / "out", quiet=True)


def _empty_prior(pipe_dir: Path) -> None:
    for f in (pipe_dir / "prior").iterdir():
        f.unlink()


def _truncated_decoder(pipe_dir: Path) -> None:
    weights = pipe_dir / "decoder" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _prior_config_without(key: str):
    def breakage(pipe_dir: Path) -> None:
        config = pipe_dir / "prior" / "config.json"
        data = json.loads(config.read_text())
        del data[key]
        config.write_text(json.dumps(data))
    return breakage


def _missing(pipe_dir: Path) -> None:
    import shutil

    shutil.rmtree(pipe_dir)


@pytest.mark.parametrize("breakage,message", [
    (_empty_prior, "prior/config.json: not found"),
    (_truncated_decoder, "decoder/diffusion_pytorch_model.safetensors: not a complete safetensors file"),
    (_prior_config_without("embedding_dim"), "prior: its config has no 'embedding_dim'"),
    (_missing, "pipe does not exist"),
], ids=["empty-prior", "truncated-decoder", "config-key", "missing"])
def test_source_problem_is_one_line_before_any_export(tiny, tmp_path, monkeypatch, capsys, breakage, message):
    """What a new user meets with a damaged download: one ``export: error:`` line naming the file, exit 1, no
    graph exported (every component is checked first), nothing left behind."""
    import shutil

    from export import all as export_all
    from export import driver

    _, pipe_dir, _ = tiny
    broken = tmp_path / "pipe"
    shutil.copytree(pipe_dir, broken)
    breakage(broken)
    exported = []
    monkeypatch.setattr(driver, "export_onnx", lambda spec, *a, **k: exported.append(spec.name))
    out = tmp_path / "engines" / "karlo"
    status = export_all.main(["--from-diffusers", str(broken), "--out", str(out), "-q"])
    captured = capsys.readouterr()
    assert status == 1 and captured.out == ""
    assert captured.err.startswith("export: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err
    assert exported == [] and not out.parent.exists()


def test_without_diffusers_installed_the_cli_says_which_extra(tiny, tmp_path, monkeypatch, capsys):
    import sys

    from export import all as export_all

    _, pipe_dir, _ = tiny
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    status = export_all.main(["--from-diffusers", str(pipe_dir), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1
    assert err.startswith("export: error: --from-diffusers needs diffusers and transformers") and "[diffusers]" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------
# tokenizer


def _probe_texts() -> list[str]:
    from tests.test_tokenizer import CORPUS

    karlo = ["horse", "<|startoftext|>", "a<|endoftext|>b", "x <|ENDOFTEXT|> <<|endoftext|>>", "ΟΔΟΣ Σίσυφος",
             "it’s “quoted” &amp; café", "word " * 100]
    # CORPUS (1,100 texts: captions, ASCII noise, scripts, emoji, entities, whitespace kinds, truncation) minus
    # the ones with lone surrogates, which transformers cannot encode at all.
    return karlo + [t for t in CORPUS if t.encode("utf-8", "surrogatepass").decode("utf-8", "ignore") == t]


def test_tokenizer_matches_transformers(tiny):
    pipe, _, folder = tiny
    m = load_manifest(folder)
    tok = Tokenizer.load(folder, m.tokenizer)
    texts = _probe_texts()
    assert len(texts) > 1000
    assert check_parity(tok, pipe.tokenizer, texts) == []
    # and the folder's entry: pad with <|endoftext|>, as the tokenizer config says
    assert (m.tokenizer["sot_id"], m.tokenizer["eot_id"], m.tokenizer["pad_id"]) == (49406, 49407, 49407)
    ids, mask = reference_tokens(pipe.tokenizer, ["a horse"])
    assert ids[0, :4].tolist() == [49406, 320, 4558, 49407] and mask[0].sum() == 4


def test_tokenizer_from_vocab_and_merges_files(tmp_path):
    """karlo's layout (vocab.json + merges.txt + tokenizer_config.json, no tokenizer.json), here with the
    pad token "!" (id 0) so that the mask cannot be read off the ids."""
    from export.hf_clip_tokenizer import write_tokenizer

    folder = write_clip_vocab(tmp_path / "tokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": L, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!"}))
    ref = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    entry = write_tokenizer(tmp_path / "engine", ref)
    assert entry["pad_id"] == 0 and entry["preprocess"] == ["nfc", "whitespace_collapse", "lower_chars"]
    tok = Tokenizer.load(tmp_path / "engine", entry)
    texts = _probe_texts()[:300]
    assert check_parity(tok, ref, texts) == []
    assert tok.text_mask(["a horse", ""]).sum(axis=1).tolist() == [4, 2]


# --------------------------------------------------------------------------------------------------------
# graphs vs the diffusers modules, called as UnCLIPPipeline.__call__ calls them


def _text(pipe, prompts):
    ids, mask = reference_tokens(pipe.tokenizer, prompts)
    with torch.no_grad():
        out = pipe.text_encoder(torch.from_numpy(ids))
    return ids, mask, out.text_embeds, out.last_hidden_state


def _close(got, want, what):
    want = want.detach().numpy() if hasattr(want, "detach") else want
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= GRAPH_TOL, f"{what}: max abs err {err:.3g}"
    return err


def test_graphs_match_diffusers_modules(tiny):
    pipe, _, folder = tiny
    sess = _sessions(folder)
    gen = torch.Generator().manual_seed(3)
    ids, mask, embeds, hidden = _text(pipe, PROMPTS)
    te, tenc = sess["text_encoder"].run(None, {"tokens": ids})
    _close(te, embeds, "text_encoder.text_embed")
    _close(tenc, hidden, "text_encoder.text_encodings")

    # prior: rows [uncond, cond] as the pipeline stacks them (the graph does not care about the order)
    b = len(PROMPTS)
    x = torch.randn(2 * b, D, generator=gen)
    t = torch.tensor([999.0] * b + [437.0] * b)
    cond = (torch.cat([embeds[-1:].expand(b, -1), embeds]), torch.cat([hidden[-1:].expand(b, -1, -1), hidden]),
            torch.from_numpy(np.concatenate([np.repeat(mask[-1:], b, 0), mask])))
    with torch.no_grad():
        want = pipe.prior(x, timestep=t, proj_embedding=cond[0], encoder_hidden_states=cond[1],
                          attention_mask=cond[2].bool()).predicted_image_embedding
    [got] = sess["prior"].run(None, {"x_t": x.numpy(), "t": t.numpy(), "text_embed": cond[0].numpy(),
                                     "text_encodings": cond[1].numpy(), "text_mask": cond[2].float().numpy()})
    _close(got, want, "prior")

    # decoder: text_proj with do_classifier_free_guidance stacks [learned null, image_embed] itself
    image_embed = torch.randn(b, D, generator=gen) * 2
    xd = torch.randn(b, 3, DECODER_SIZE, DECODER_SIZE, generator=gen)
    with torch.no_grad():
        context, added = pipe.text_proj(image_embeddings=image_embed, prompt_embeds=cond[0],
                                        text_encoder_hidden_states=cond[1], do_classifier_free_guidance=True)
        dmask = F.pad(cond[2].bool(), (pipe.text_proj.clip_extra_context_tokens, 0), value=True)
        want = pipe.decoder(torch.cat([xd, xd]), torch.tensor(611), encoder_hidden_states=context,
                            class_labels=added, attention_mask=dmask).sample
    [got] = sess["decoder"].run(None, {
        "x_t": torch.cat([xd, xd]).numpy(), "t": np.full(2 * b, 611, np.float32),
        "image_embed": torch.cat([image_embed, image_embed]).numpy(), "text_embed": cond[0].numpy(),
        "text_encodings": cond[1].numpy(), "text_mask": cond[2].float().numpy(),
        "image_keep": np.repeat(np.float32([0, 1]), b)})
    _close(got, want, "decoder")

    # super-res: the pipeline upscales once with antialiased bicubic and concatenates per step
    low = torch.rand(2, 3, DECODER_SIZE, DECODER_SIZE, generator=gen) * 2 - 1
    xs = torch.randn(2, 3, SR_SIZE, SR_SIZE, generator=gen)
    up = F.interpolate(low, size=[SR_SIZE, SR_SIZE], mode="bicubic", align_corners=False, antialias=True)
    for name, unet in (("super_res_first", pipe.super_res_first), ("super_res_last", pipe.super_res_last)):
        with torch.no_grad():
            want = unet(torch.cat([xs, up], dim=1), torch.tensor(500)).sample
        [got] = sess[name].run(None, {"x_t": xs.numpy(), "t": np.full(2, 500, np.float32), "low_res": low.numpy()})
        _close(got, want, name)


# --------------------------------------------------------------------------------------------------------
# our DDPM sampler vs UnCLIPScheduler.step on the same noise (closed-form fake denoisers)


class _ScriptedNoise:
    """Stands in for np.random.Generator (the samplers only call standard_normal): returns the given draws."""

    def __init__(self, draws):
        self.draws = list(draws)

    def standard_normal(self, shape, dtype=np.float32):
        d = self.draws.pop(0)
        assert d.shape == tuple(shape)
        return d.astype(dtype)


def _fake(x: np.ndarray, t: float, learned: bool) -> np.ndarray:
    """A smooth, t-dependent 'network': (B, C, ...) -> (B, C or 2C, ...)."""
    pred = 0.8 * np.tanh(x) + 1e-3 * t - 0.3
    return np.concatenate([pred, np.tanh(0.5 * x + 0.2)], axis=1) if learned else pred


def _run_scheduler(sched, x_init, noise, learned, monkeypatch, dtype):
    """UnCLIPScheduler's loop as UnCLIPPipeline runs it, with the given per-step noise; every x_t, (S, ...)."""
    import diffusers.schedulers.scheduling_unclip as su

    draws = iter(noise)
    monkeypatch.setattr(su, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(draws)).to(dtype))
    x = torch.from_numpy(x_init).to(dtype)
    out = []
    for i, t in enumerate(sched.timesteps):
        pred = torch.from_numpy(_fake(x.numpy(), float(t), learned)).to(dtype)
        prev = None if i + 1 == len(sched.timesteps) else sched.timesteps[i + 1]
        x = sched.step(pred, t, x, prev_timestep=prev).prev_sample
        out.append(x.numpy().astype(np.float64))
    return np.stack(out)


def _run_ours(abar, steps, x_init, noise, prediction, clip, learned):
    schedule = respace(abar, steps, "linspace")
    kind = {"sample": "x0", "epsilon": "eps"}[prediction]
    denoise = make_denoiser(lambda xb, tb: _fake(xb, float(tb[0]), learned), kind=kind, schedule=schedule,
                            clip_x0=(-clip, clip), learned_variance=learned)
    out = []
    sample_ddpm(denoise, x_init.copy(), schedule, rng=_ScriptedNoise(noise), variance="small",
                callback=lambda i, x, x0: out.append(x.astype(np.float64)))
    return schedule, np.stack(out)


@pytest.mark.parametrize("prediction,variance,clip,steps", [
    ("sample", "fixed_small_log", 5.0, 25),  # karlo prior
    ("epsilon", "learned_range", 1.0, 25),  # karlo decoder
    ("epsilon", "fixed_small_log", 1.0, 7),  # karlo super-res
    ("epsilon", "learned_range", 1.0, 1000),  # consecutive timesteps: the scheduler's own betas[t]
])
def test_ddpm_matches_unclip_scheduler(monkeypatch, prediction, variance, clip, steps):
    """The same algorithm: run in float64 on both sides, every step agrees to rounding."""
    sched = UnCLIPScheduler(variance_type=variance, prediction_type=prediction, clip_sample_range=clip)
    sched.set_timesteps(steps)
    # float64 scheduler state from its float32 betas (what step() reads: betas, alphas, alphas_cumprod, one)
    sched.betas = sched.betas.double()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    learned = variance == "learned_range"
    rng = np.random.default_rng(0)
    x_init = rng.standard_normal((2, 3, 4, 4)).astype(np.float64)
    # float32 draws (what the samplers take from an rng), handed to the float64 scheduler unchanged
    noise = [rng.standard_normal(x_init.shape, dtype=np.float32).astype(np.float64) for _ in range(steps - 1)]
    want = _run_scheduler(sched, x_init, noise, learned, monkeypatch, torch.float64)
    schedule, got = _run_ours(sched.alphas_cumprod.numpy(), steps, x_init, noise, prediction, clip, learned)
    np.testing.assert_array_equal(schedule.timesteps, sched.timesteps.numpy())
    np.testing.assert_allclose(got, want, atol=1e-9, rtol=0)


def test_ddpm_vs_float32_unclip_scheduler(monkeypatch):
    """The stock (float32) scheduler differs by its rounding only; the largest effect is the last step.

    UnCLIPScheduler forms α = 1 − (1 − ᾱ/ᾱ') and 1 − ᾱ₀ in float32 (cancellations): at t = 999 the x_t
    coefficient is 2.5 % off (it is ~8e-4), and at the last step (t = 0 -> ᾱ = 1) it returns
    x0 · β₀ / (1 − fl32(1 − β₀)) ≈ 1.001 x0 where exact arithmetic (ours, and karlo's float64 sampler) gives x0.
    """
    sched = UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon")
    sched.set_timesteps(25)
    rng = np.random.default_rng(1)
    x_init = rng.standard_normal((2, 3, 4, 4), dtype=np.float32)
    noise = [rng.standard_normal(x_init.shape, dtype=np.float32) for _ in range(24)]
    want = _run_scheduler(sched, x_init, noise, True, monkeypatch, torch.float32)
    abar = sched.alphas_cumprod.double().numpy()  # what the manifest records
    _, got = _run_ours(abar, 25, x_init, noise, "epsilon", 1.0, True)
    factor = float(sched.betas[0]) / float(1 - sched.alphas_cumprod[0])
    assert 1e-4 < abs(factor - 1) < 3e-3
    np.testing.assert_allclose(got[:-1], want[:-1], atol=3e-4, rtol=0)
    np.testing.assert_allclose(got[-1] * factor, want[-1], atol=3e-4, rtol=0)


# --------------------------------------------------------------------------------------------------------
# end to end: dalle2-rt on the exported folder vs UnCLIPPipeline, same starting latents and per-step noise


class _ScriptedStreams:
    """Replaces pipeline.NoiseStreams: each stage's draws come, in order, from ``SCRIPT[stage]``, in the
    script's dtype (float64 keeps the pipeline's x_t in float64)."""

    SCRIPT: dict[int, list] = {}

    def __init__(self, seed, indices, stage, rows=1):
        self.generators, self.rows, self.queue = list(indices), rows, self.SCRIPT[stage]

    def subset(self, images):
        return self  # one chunk per stage at these batch sizes (the queues must empty exactly)

    def standard_normal(self, size, dtype=None):
        draw = self.queue.pop(0)
        assert draw.shape == tuple(size), (draw.shape, size)
        return draw


class _TorchGraph:
    """A graph wrapper module run in float64 behind the engine call signature (stands in for an ORT engine)."""

    def __init__(self, engine, module):
        self.spec, self.name, self.max_batch = engine.spec, engine.name, engine.max_batch
        self.module = module.double().eval()

    def __call__(self, **arrays):
        feeds = {k: torch.from_numpy(np.asarray(v)).to(torch.int64 if k == "tokens" else torch.float64)
                 for k, v in arrays.items()}
        with torch.no_grad():
            out = self.module(**feeds)
        return {t.name: o.numpy() for t, o in zip(self.spec.outputs, out if isinstance(out, tuple) else (out,))}


def _script(b, steps, seed=7):
    """Per stage (0 prior, 1 decoder, 2 SR): x_T then one draw per step but the last, float32 values."""
    rng = np.random.default_rng(seed)
    shapes = {0: (b, D), 1: (b, 3, DECODER_SIZE, DECODER_SIZE), 2: (b, 3, SR_SIZE, SR_SIZE)}
    return {k: [rng.standard_normal(shapes[k], dtype=np.float32) for _ in range(steps[k])] for k in shapes}


def _diffusers_images(pipe, prompts, script, steps, monkeypatch, dtype):
    """UnCLIPPipeline(prompts) with the script's latents and step noise; pixels (B, H, W, 3) in [0, 1]."""
    import diffusers.schedulers.scheduling_unclip as su

    pipe = pipe.to(dtype)
    for s in (pipe.prior_scheduler, pipe.decoder_scheduler, pipe.super_res_scheduler):  # its own values, in dtype
        s.betas, s.alphas, s.alphas_cumprod, s.one = (v.to(dtype) for v in (s.betas, s.alphas, s.alphas_cumprod,
                                                                              s.one))
    noise = iter([d for k in (0, 1, 2) for d in script[k][1:]])  # schedulers step prior, decoder, SR in turn
    monkeypatch.setattr(su, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(noise)).to(dtype))
    latents = {f"{name}_latents": torch.from_numpy(script[k][0]).to(dtype)
               for k, name in enumerate(("prior", "decoder", "super_res"))}
    with torch.no_grad():
        out = pipe(prompts, prior_num_inference_steps=steps[0], decoder_num_inference_steps=steps[1],
                   super_res_num_inference_steps=steps[2], output_type="np", **latents).images
    assert next(noise, None) is None
    return out.astype(np.float64)


def _runtime_images(rt, prompts, script, monkeypatch):
    """dalle2-rt's images for the script, as floats in [0, 1] (taken just before the uint8 conversion)."""
    import dalle2_rt.runtime.pipeline as pipeline_mod

    monkeypatch.setattr(pipeline_mod, "NoiseStreams", _ScriptedStreams)
    monkeypatch.setattr(_ScriptedStreams, "SCRIPT", {k: list(v) for k, v in script.items()})
    seen = []
    real = pipeline_mod.to_uint8
    monkeypatch.setattr(pipeline_mod, "to_uint8", lambda x, r: seen.append(np.asarray(x, np.float64)) or real(x, r))
    images = rt(prompts, seed=0)  # the manifest's defaults: ddpm, 25/25/7 steps, guidance 4/8, one candidate
    assert all(not q for q in _ScriptedStreams.SCRIPT.values())  # every scripted draw used, none missing
    [x] = seen
    return np.clip(x * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 1), images


STEPS = (25, 25, 7)  # UnCLIPPipeline's defaults = the manifest's


def test_pipeline_reproduces_unclip_pipeline(tiny, monkeypatch):
    """The algorithm: every stage in float64 on both sides (graph modules and diffusers' networks and
    schedulers), same latents and noise. Left: float32 casts the runtime makes for its engines (image_embed,
    low_res), which the SR's first step (x0 = (x − √(1−ᾱ)ε)/√ᾱ, √ᾱ_999 ≈ 5e-5) magnifies."""
    import copy

    from dalle2_rt.runtime.pipeline import Pipeline
    from export.diffusers_wrappers import DecoderGraph, PriorGraph, SuperResGraph, TextEncoderGraph

    pipe, _, folder = tiny
    ref = copy.deepcopy(pipe).to(torch.float64)
    prompts = PROMPTS[:2]  # two lengths of text mask; one image each
    script = _script(len(prompts), STEPS)
    want = _diffusers_images(copy.deepcopy(ref), prompts, script, STEPS, monkeypatch, torch.float64)

    rt = Pipeline.load(folder, threads=1)
    modules = {"text_encoder": TextEncoderGraph(ref.text_encoder), "prior": PriorGraph(ref.prior),
               "decoder": DecoderGraph(ref.text_proj, ref.decoder),
               "super_res_first": SuperResGraph(ref.super_res_first, DECODER_SIZE),
               "super_res_last": SuperResGraph(ref.super_res_last, DECODER_SIZE)}
    rt.engines = {name: _TorchGraph(engine, modules[name]) for name, engine in rt.engines.items()}
    got, _ = _runtime_images(rt, prompts, {k: [a.astype(np.float64) for a in v] for k, v in script.items()},
                             monkeypatch)
    assert got.shape == want.shape == (len(prompts), SR_SIZE, SR_SIZE, 3)
    assert float(want.std()) > 0.05  # not a flat image: the comparison means something
    err = float(np.abs(got - want).max())
    assert err <= 1e-4, f"max |dalle2-rt − UnCLIPPipeline| = {err:.3g} on [0, 1] pixels (float64)"


def test_engines_match_unclip_pipeline(tiny, monkeypatch):
    """Deployment: the exported fp32 ONNX graphs under ONNX Runtime vs the stock (float32) UnCLIPPipeline.

    At t = 999 an eps model's x0 estimate divides by √ᾱ ≈ 5e-5, so float32 rounding anywhere upstream moves
    the few values that escape the [−1, 1] clamp there; diffusers' own float32 and float64 runs differ by
    as much (checked below). Most pixels agree to 1e-3; the bound on the rest is that self-difference.
    """
    import copy

    from dalle2_rt.runtime.pipeline import Pipeline

    pipe, _, folder = tiny
    prompts = PROMPTS[:2]
    script = _script(len(prompts), STEPS)
    want32 = _diffusers_images(copy.deepcopy(pipe), prompts, script, STEPS, monkeypatch, torch.float32)
    want64 = _diffusers_images(copy.deepcopy(pipe), prompts, script, STEPS, monkeypatch, torch.float64)
    got, images = _runtime_images(Pipeline.load(folder, threads=1), prompts, script, monkeypatch)
    self_diff = float(np.abs(want32 - want64).max())
    for name, want in (("float32", want32), ("float64", want64)):
        err = np.abs(got - want)
        assert float(err.mean()) <= 1e-3, (name, float(err.mean()))
        assert float(np.mean(err > 1e-3)) <= 0.03, (name, float(np.mean(err > 1e-3)))
        assert float(err.max()) <= max(2 * self_diff, 1e-3), (name, float(err.max()), self_diff)
    u8 = np.stack([np.asarray(im) for im in images]).astype(int)
    np.testing.assert_array_equal(u8, np.rint(got * 255).astype(int))  # the PNG pixels are these floats


# --------------------------------------------------------------------------------------------------------
# karlo-size graphs: external data, and --trt


@pytest.fixture(scope="module")
def tiny_external(tiny, tmp_path_factory):
    """The tiny pipeline through the CLI with every graph's weights in external data files (threshold 0, the
    layout karlo's 4 GB prior needs) and ``--trt`` (TensorRT is not installed here); (exit status, output, folder)."""
    import contextlib
    import io

    from export import all as export_all

    _, pipe_dir, _ = tiny
    out = tmp_path_factory.mktemp("karlo_external") / "engines"
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        status = export_all.main(["--from-diffusers", str(pipe_dir), "--out", str(out), "--max-batch", "2",
                                  "--trt", "--external-data-threshold", "0"])
    return status, log.getvalue(), out


def test_external_data_and_trt_without_tensorrt(tiny_external):
    from tests.test_external_data import check_external_folder

    status, log, folder = tiny_external
    assert status == 0 and "no TensorRT engines were built" in log  # said, and the ONNX folder is written
    m = check_external_folder(folder)
    assert set(m["graphs"]) == {"text_encoder", "prior", "decoder", "super_res_first", "super_res_last"}
    assert m["trt"] == {} and all(g["trt"] == {} for g in m["graphs"].values())
    verify_files(load_manifest(folder), use_cache=False)


def test_external_data_folder_gives_the_same_images(tiny, tiny_external, tmp_path, monkeypatch):
    from dalle2_rt.runtime.errors import EngineFolderError
    from dalle2_rt.runtime.pipeline import Pipeline

    monkeypatch.setenv("DALLE2_RT_CACHE", str(tmp_path / "cache"))
    _, _, inline = tiny
    _, _, external = tiny_external

    def images(folder):
        pipe = Pipeline.load(folder, threads=1)
        return np.stack([np.asarray(im) for im in pipe(PROMPTS[:2], seed=5, prior_steps=3, decoder_steps=3,
                                                       sr_steps=2)])

    got = images(external)
    assert got.std() > 0
    np.testing.assert_array_equal(got, images(inline))

    import shutil

    copy = tmp_path / "engines"
    shutil.copytree(external, copy)
    with open(copy / "super_res_last.opt.onnx.data", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(EngineFolderError, match=r"super_res_last\.opt\.onnx\.data: sha256"):
        Pipeline.load(copy)


def test_trt_plans_through_the_native_build_path(tiny, tiny_external, tmp_path, monkeypatch):
    """``--trt`` with TensorRT faked (tests/test_trt_logic.py): graphs are carried over from the up-to-date
    folder, external data included, and the plans are built by ``trt.build_missing`` as for our own folders."""
    import shutil

    from tests.test_external_data import check_external_folder
    from tests.test_manifest_schema import check_manifest_schema
    from tests.test_trt_logic import check_plans, fake_tensorrt

    calls = fake_tensorrt(monkeypatch)
    _, pipe_dir, _ = tiny
    _, _, external = tiny_external
    out = tmp_path / external.name  # the same name: the same fingerprint
    shutil.copytree(external, out)
    result = export_diffusers(pipe_dir, out, max_batch=2, trt=True, external_data_threshold=0, quiet=True)
    graphs = sorted(json.loads((external / "manifest.json").read_text())["graphs"])
    assert result.status == "built" and result.exported == [] and sorted(result.reused) == graphs
    assert [sorted(c["graphs"]) for c in calls] == [graphs]
    check_plans(out, "fp16")
    check_external_folder(out)
    assert export_diffusers(pipe_dir, out, max_batch=2, trt=True, quiet=True).status == "up to date"
    export_diffusers(pipe_dir, out, max_batch=2, trt=True, precision="fp32", quiet=True)
    assert [c["precision"] for c in calls] == ["fp16", "fp32"]
    check_plans(out, "fp32")
    check_manifest_schema(out)  # with TensorRT records
