"""unCLIP's operations (runtime/operations.py): DDIM inversion against a closed-form denoiser, slerp and text
diffs as geometry, and the operations over the tiny random-weight engine folder."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dalle2_rt.runtime import operations as ops
from dalle2_rt.runtime.errors import InputError
from dalle2_rt.runtime.samplers import sample_ddim
from dalle2_rt.runtime.schedules import cosine_alphas_cumprod, respace

MU, S = 0.3, 0.5  # data ~ N(MU, S² I)


def gaussian_denoiser(schedule):
    """The exact posterior mean E[x0 | x_t] for data ~ N(MU, S² I): affine in x_t,
    x0 = MU + √ᾱ S² / (ᾱ S² + 1 − ᾱ) · (x_t − √ᾱ MU)."""
    def denoise(x, i):
        a = schedule.alphas_cumprod[i]
        return (MU + np.sqrt(a) * S**2 / (a * S**2 + 1 - a) * (x - np.sqrt(a) * MU)).astype(x.dtype)
    return denoise


@pytest.mark.parametrize("steps", [5, 20])
def test_inversion_round_trip_is_exact_with_refinement(steps):
    schedule = respace(cosine_alphas_cumprod(1000), steps)
    denoise = gaussian_denoiser(schedule)
    x0 = np.random.default_rng(0).normal(MU, S, (2, 3, 4, 4))
    plain = sample_ddim(denoise, ops.ddim_invert(denoise, x0, schedule), schedule, eta=0.0)
    refined = sample_ddim(denoise, ops.ddim_invert(denoise, x0, schedule, refine=40), schedule, eta=0.0)
    assert np.abs(refined - x0).max() < 1e-8
    assert np.abs(plain - x0).max() > 1e3 * np.abs(refined - x0).max()  # the one-call step is approximate


def test_inversion_lands_where_sampling_started():
    """Sampling from x_T, then inverting the result, gives back x_T (the ODE's two directions agree)."""
    schedule = respace(cosine_alphas_cumprod(1000), 8)
    denoise = gaussian_denoiser(schedule)
    x_T = np.random.default_rng(1).standard_normal((3, 6))
    x0 = sample_ddim(denoise, x_T, schedule, eta=0.0)
    assert np.allclose(ops.ddim_invert(denoise, x0, schedule, refine=40), x_T, atol=1e-8)


def test_inversion_callback_counts_from_the_clean_end():
    schedule = respace(cosine_alphas_cumprod(1000), 4)
    seen = []
    ops.ddim_invert(gaussian_denoiser(schedule), np.zeros((1, 2)), schedule, callback=lambda i, x, x0: seen.append(i))
    assert seen == [0, 1, 2, 3]


def test_slerp_endpoints_and_angles():
    rng = np.random.default_rng(2)
    a, b = (v / np.linalg.norm(v) for v in rng.standard_normal((2, 16)))
    omega = ops.angle(a, b)
    frames = ops.slerp(a, b, [0.0, 0.25, 0.5, 1.0])
    assert frames.shape == (4, 16)
    assert np.allclose(frames[0], a, atol=1e-7) and np.allclose(frames[-1], b, atol=1e-7)
    assert np.allclose(np.linalg.norm(frames, axis=1), 1.0, atol=1e-6)  # stays on the sphere
    for theta, f in zip([0.25, 0.5], frames[1:3]):
        assert ops.angle(a, f) == pytest.approx(theta * omega, abs=1e-5)
        assert ops.angle(f, b) == pytest.approx((1 - theta) * omega, abs=1e-5)


def test_slerp_takes_the_whole_vectors_angle():
    """A latent (C, H, W) is one vector: the midpoint of two orthogonal latents of norm r has norm r; an
    element-wise arccos would instead treat each coordinate as its own 1-D 'sphere'."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 8, 8))
    b = rng.standard_normal((3, 8, 8))
    b -= np.vdot(a, b) / np.vdot(a, a) * a  # orthogonal to a
    b *= np.linalg.norm(a) / np.linalg.norm(b)
    mid = ops.slerp(a, b, 0.5)
    assert mid.shape == a.shape
    assert np.linalg.norm(mid) == pytest.approx(np.linalg.norm(a), rel=1e-5)
    assert np.allclose(mid, (a + b) / np.sqrt(2), atol=1e-5)  # sin(π/4)/sin(π/2) each


def test_slerp_degenerate_cases():
    a = np.array([1.0, 2.0, 3.0])
    assert np.allclose(ops.slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: linear
    with pytest.raises(InputError, match="opposite"):
        ops.slerp(a, -a, 0.5)
    with pytest.raises(InputError, match="zero vector"):
        ops.slerp(a, np.zeros(3), 0.5)
    with pytest.raises(InputError, match="shapes"):
        ops.slerp(a, np.ones(4), 0.5)


def test_text_direction_and_edit_embeddings():
    z_t0, z_t = np.array([[1.0, 0.0, 0.0]]), np.array([[0.6, 0.8, 0.0]])
    d = ops.text_direction(z_t, z_t0)
    assert np.allclose(d, [[-0.4, 0.8, 0.0] / np.linalg.norm([-0.4, 0.8, 0.0])])
    z_i = np.array([0.0, 0.0, 1.0])
    out = ops.edit_embeddings(z_i, d, [0.0, 0.5, 1.0])
    assert np.array_equal(out[0], z_i.astype(np.float32))  # θ = 0 is exactly the image's embedding
    assert np.allclose(out[-1], d[0]) and np.allclose(np.linalg.norm(out, axis=1), 1.0)
    with pytest.raises(InputError, match="same text embedding"):
        ops.text_direction(z_t, z_t)


def test_argument_checks():
    assert ops.check_amounts(0.3) == [0.3] and ops.check_amounts([0, 1]) == [0.0, 1.0]
    for bad in (-0.1, 1.5, float("nan"), [], True, "0.5"):
        with pytest.raises(InputError):
            ops.check_amounts(bad)
    assert list(ops.frame_thetas(3)) == [0.0, 0.5, 1.0]
    for bad in (1, 0, ops.MAX_FRAMES + 1, 2.0):
        with pytest.raises(InputError):
            ops.check_frames(bad)


def test_interpolation_rows():
    rng = np.random.default_rng(4)

    def inv():
        z = rng.standard_normal((1, 8))
        return ops.Inversion((z / np.linalg.norm(z)).astype(np.float32), rng.standard_normal((1, 3, 4, 4)),
                             np.zeros((1, 3, 4, 4)), 5, 2.0)

    a, b = inv(), inv()
    z, x_T = ops.interpolation_rows(a, b, ops.frame_thetas(5), "slerp")
    assert np.allclose(z[0], a.image_embed[0]) and np.allclose(z[-1], b.image_embed[0], atol=1e-6)
    assert np.allclose(x_T[0], a.latent[0], atol=1e-6) and np.allclose(x_T[-1], b.latent[0], atol=1e-6)
    fixed = rng.standard_normal((3, 4, 4))
    z2, x_T2 = ops.interpolation_rows(a, b, ops.frame_thetas(5), "fixed", fixed)
    assert np.allclose(z2, z) and all(np.allclose(x, fixed) for x in x_T2)
    with pytest.raises(InputError, match="latent"):
        ops.interpolation_rows(a, b, ops.frame_thetas(2), "lerp")


# ----------------------------------------------------------------------------------------------------------
# over the tiny random-weight engine folder


@pytest.fixture(scope="module")
def pipe(tiny_engines):
    from dalle2_rt import Pipeline

    return Pipeline.load(tiny_engines, threads=1)


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]


def test_decode_from_latents_matches_the_pipeline_decoder(pipe):
    """η = 0: the operations' decoder (the denoiser inversion inverts) draws what Pipeline.decode draws from the
    same latents, so the two cannot drift apart."""
    rng = np.random.default_rng(6)
    z = rng.standard_normal((2, pipe.manifest.stages["image_encoder"]["embed_dim"]))
    z = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
    x_T = rng.standard_normal((2, *pipe.decoder_plan.x_shape)).astype(np.float32)
    ours = ops.decode(pipe, z, x_T, steps=3, guidance=2.0, upsample=False)
    theirs = pipe.decode(z, None, seed=0, latents=x_T, decoder_steps=3, decoder_guidance=2.0, sampler="ddim",
                         decoder_candidates=1)
    assert np.allclose(ours, theirs, atol=1e-5)


def test_inversion_reconstructs_a_decoded_image_on_the_tiny_decoder(pipe, pictures):
    """A sample the decoder drew from x_T, inverted with the same embedding, decodes back to itself (the random
    tiny decoder clamps most x0 estimates, so only what it can draw is a fair target)."""
    inv = ops.invert(pipe, pictures, decoder_steps=4, refine=0)
    assert inv.latent.shape == (2, *pipe.decoder_plan.x_shape) and inv.image_embed.shape[0] == 2
    x_T = np.random.default_rng(7).standard_normal(inv.latent.shape).astype(np.float32)
    drawn = ops.decode(pipe, inv.image_embed, x_T, steps=4, guidance=inv.guidance, upsample=False)
    again = ops.Inversion(inv.image_embed, x_T, drawn, 4, inv.guidance)
    latent = ops.invert_targets(pipe, again, refine=0)
    back = ops.decode(pipe, inv.image_embed, latent, steps=4, guidance=inv.guidance, upsample=False)
    assert np.abs(back - drawn).mean() < 0.05


def test_operations_take_the_folders_operation_steps_unless_told(pipe, pictures, monkeypatch):
    """A folder whose decoder defaults name operation_steps (a step-distilled decoder samples in few steps but
    inverts poorly in them) inverts and decodes in that many; the caller's decoder_steps still wins; without it,
    the folder's sampling steps."""
    plain = ops.invert(pipe, pictures[:1], refine=0)
    assert plain.steps == pipe.decoder_plan.defaults["steps"]
    monkeypatch.setitem(pipe.decoder_plan.defaults, "operation_steps", plain.steps + 2)
    assert ops.invert(pipe, pictures[:1], refine=0).steps == plain.steps + 2
    assert ops.from_prompt(pipe, "a red circle", seed=1).steps == plain.steps + 2
    assert ops.invert(pipe, pictures[:1], refine=0, decoder_steps=2).steps == 2
    calls = []
    monkeypatch.setattr(ops, "ddim_invert", lambda denoise, x0, schedule, **kw: calls.append(len(schedule)) or x0)
    ops.reconstruct(pipe, pictures[0])
    assert calls == [plain.steps + 2]


def test_edit_at_zero_is_the_reconstruction(pipe, pictures):
    inv = ops.invert(pipe, pictures[0], decoder_steps=3, refine=1)
    same = ops.reconstruct(pipe, inv, seed=4)[0]
    frames = ops.edit(pipe, inv, "a red circle", "a blue square", amount=[0.0, 0.8], seed=4, text=False,
                      edit_guidance=inv.guidance)
    assert np.array_equal(np.asarray(frames[0]), np.asarray(same))
    assert not np.array_equal(np.asarray(frames[1]), np.asarray(same))
    assert frames[1].info["operation"] == "edit" and frames[1].info["target"] == "a blue square"
    assert frames[1].info["amount"] == "0.8"
    with pytest.raises(InputError, match="same text embedding"):
        ops.edit(pipe, inv, "a red circle", "a red circle")


def test_edits_decode_at_the_folders_guidance_unless_told(pipe, pictures):
    """The inversion stays unguided (exact); the edited frames take the folder's generation guidance by default,
    which redraws even θ = 0, and any guidance given (checked as every guidance is)."""
    inv = ops.invert(pipe, pictures[0], decoder_steps=3, refine=1)
    folder = pipe.settings()["decoder"]["guidance"]
    assert folder != inv.guidance
    default = ops.edit(pipe, inv, "a red circle", "a blue square", amount=0.0, seed=4, text=False)[0]
    told = ops.edit(pipe, inv, "a red circle", "a blue square", amount=0.0, seed=4, text=False,
                    edit_guidance=folder)[0]
    assert np.array_equal(np.asarray(default), np.asarray(told))
    assert not np.array_equal(np.asarray(default), np.asarray(ops.reconstruct(pipe, inv, seed=4)[0]))
    assert default.info["guidance"] == f"inversion={inv.guidance},decoder={folder}"
    with pytest.raises(InputError, match="guidance"):
        ops.edit(pipe, inv, "a red circle", "a blue square", edit_guidance=-1.0)


def test_edit_with_text_decodes_under_the_target_caption(pipe, pictures):
    """An inversion made with the source caption holds its text; its edits decode under the target's, so even
    θ = 0 differs from the reconstruction."""
    inv = ops.invert(pipe, pictures[0], captions=["a red circle"], decoder_steps=3, refine=1)
    assert inv.text is not None and inv.text["text_encodings"].shape[0] == 1
    same = ops.reconstruct(pipe, inv, seed=4)[0]
    plain = ops.reconstruct(pipe, ops.invert(pipe, pictures[0], decoder_steps=3, refine=1), seed=4)[0]
    assert not np.array_equal(np.asarray(same), np.asarray(plain))  # the caption conditions the decoder
    towards = ops.edit(pipe, inv, "a red circle", "a blue square", amount=0.0, seed=4)[0]
    assert not np.array_equal(np.asarray(towards), np.asarray(same))  # θ = 0 redrawn under the target caption


def test_interpolation_endpoints_are_the_reconstructions(pipe, pictures):
    a, b = (ops.invert(pipe, p, decoder_steps=3, refine=1) for p in pictures)
    frames = ops.interpolate(pipe, a, b, frames=3, seed=2)
    assert len(frames) == 3 and [f.info["theta"] for f in frames] == ["0.0", "0.5", "1.0"]
    for frame, inv in ((frames[0], a), (frames[-1], b)):
        assert np.array_equal(np.asarray(frame), np.asarray(ops.reconstruct(pipe, inv, seed=2)[0]))
    fixed = ops.interpolate(pipe, a, b, frames=2, latent="fixed", seed=2)
    assert not np.array_equal(np.asarray(fixed[0]), np.asarray(frames[0]))  # a fresh x_T, not a's own


def test_variations_from_the_inverted_latent(pipe, pictures):
    inv = ops.invert(pipe, pictures[0], decoder_steps=3, refine=1)
    v = ops.vary(pipe, inv, num_images=2, eta=1.0, seed=9)
    again = ops.vary(pipe, inv, num_images=2, eta=1.0, seed=9)
    same = ops.reconstruct(pipe, inv, seed=9)[0]
    assert [np.asarray(x).tobytes() for x in v] == [np.asarray(x).tobytes() for x in again]  # seeded
    assert not np.array_equal(np.asarray(v[0]), np.asarray(v[1]))
    assert not np.array_equal(np.asarray(v[0]), np.asarray(same))
    with pytest.raises(InputError, match="eta"):
        ops.vary(pipe, inv, eta=1.5)


# ----------------------------------------------------------------------------------------------------------
# the CLI: dalle2-rt edit / interpolate


@pytest.fixture()
def files(tmp_path, pictures):
    paths = []
    for j, picture in enumerate(pictures):
        paths.append(tmp_path / f"pic{j}.png")
        picture.save(paths[-1])
    return paths


def run_cli(capsys, *argv):
    from dalle2_rt.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's refusal (one line, exit 2), as for the main command
        code = e.code
    out, err = capsys.readouterr()
    return code, out.split(), err


def test_cli_edit_writes_one_png_per_amount(tiny_engines, files, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, paths, err = run_cli(capsys, "edit", files[0], "--from", "a red circle", "--to", "a blue square",
                               "--amount", "0", "0.5", "-o", out_dir, "--engines", tiny_engines, "--seed", 3,
                               "--decoder-steps", 2, "--refine", 0, "--edit-guidance", 2.5)
    assert code == 0, err
    assert [p.rsplit("/", 1)[1] for p in paths] == ["pic0-edit-a0-s3.png", "pic0-edit-a0.5-s3.png"]
    info = Image.open(paths[1]).info
    assert (info["operation"], info["source"], info["target"], info["amount"]) == (
        "edit", "a red circle", "a blue square", "0.5")
    assert info["guidance"] == "inversion=1.0,decoder=2.5"
    assert info["image"] == "pic0.png" and info["seed"] == "3"


@pytest.mark.parametrize("argv, message", [
    (["--amount", "1.5"], "amount"),
    (["--to", " "], "empty"),
    (["--decoder-steps", "0"], "decoder steps"),
    (["--edit-guidance", "-1"], "edit-guidance"),
])
def test_cli_edit_refuses_bad_input_with_one_line_and_no_file(tiny_engines, files, tmp_path, capsys, argv,
                                                               message):
    out_dir = tmp_path / "out"
    base = {"--from": "a red circle", "--to": "a blue square"}
    extra = dict(zip(argv[::2], argv[1::2]))
    args = [a for k, v in {**base, **extra}.items() for a in (k, v)]
    code, paths, err = run_cli(capsys, "edit", files[0], *args, "-o", out_dir, "--engines", tiny_engines)
    assert code == 2 and not paths and not out_dir.exists()
    assert err.count("\n") == 1 and err.startswith("dalle2-rt: error:") and message in err


def test_cli_edit_missing_image(tiny_engines, tmp_path, capsys):
    code, paths, err = run_cli(capsys, "edit", tmp_path / "nope.png", "--from", "a", "--to", "b",
                               "--engines", tiny_engines)
    assert code == 2 and not paths and "does not exist" in err


def test_cli_interpolate_images_and_gif(tiny_engines, files, tmp_path, capsys):
    out_dir, gif = tmp_path / "out", tmp_path / "strip.gif"
    code, paths, err = run_cli(capsys, "interpolate", files[0], files[1], "--frames", 3, "--gif", gif, "-o", out_dir,
                               "--engines", tiny_engines, "--seed", 1, "--decoder-steps", 2, "--refine", 0)
    assert code == 0, err
    assert len(paths) == 4 and paths[-1] == str(gif)
    assert [Image.open(p).info["theta"] for p in paths[:3]] == ["0.0", "0.5", "1.0"]
    with Image.open(gif) as g:
        assert g.n_frames == 4  # forth and back: 0, 1, 2, 1
    code, paths, err = run_cli(capsys, "interpolate", files[0], files[1], "--gif", gif, "-o", out_dir,
                               "--engines", tiny_engines)
    assert code == 2 and not paths and "never overwritten" in err


def test_cli_interpolate_prompts_through_the_prior(tiny_engines, tmp_path, capsys):
    code, paths, err = run_cli(capsys, "interpolate", "a red circle", "a blue square", "--frames", 2, "-o", tmp_path,
                               "--engines", tiny_engines, "--seed", 0, "--decoder-steps", 2)
    assert code == 0, err
    assert len(paths) == 2 and Image.open(paths[0]).info["a"] == "a red circle"
    code, paths, err = run_cli(capsys, "interpolate", "missing.png", "a blue square", "--engines", tiny_engines)
    assert code == 2 and "does not exist" in err


def test_pipeline_methods_delegate(pipe, pictures):
    inv = pipe.invert(pictures[0], decoder_steps=2, refine=0)
    assert np.array_equal(inv.latent, ops.invert(pipe, pictures[0], decoder_steps=2, refine=0).latent)
    same = ops.reconstruct(pipe, inv, seed=1)[0]
    assert np.array_equal(np.asarray(pipe.reconstruct(inv, seed=1)[0]), np.asarray(same))
    assert len(pipe.interpolate(inv, inv, frames=2)) == 2 and len(pipe.edit(inv, "a", "b", amount=[0.1])) == 1


def test_bench_operations_runs_on_the_tiny_engines(pipe):
    """python -m bench.operations end to end on 2 renders: every row is a rate or a mean with its error."""
    from bench import operations as bench

    items = bench.renders(2, seed=0, size=bench.output_side(pipe))
    settings = {"decoder_steps": 2, "decoder_guidance": None, "refine": 0}
    inversion, inv = bench.bench_inversion(pipe, items, settings)
    assert inversion["n"] == 2 and 0 <= inversion["fully_right"][0] <= 100 and inversion["pixel_error_32"][0] > 0
    interp = bench.bench_interpolation(pipe, items, inv, frames=3)
    assert interp["pairs"] == 1 and len(interp["interior_valid"]) == 2
    edits = bench.bench_edits(pipe, items, inv, [0.3], seed=0)
    assert set(edits["by_kind"]) == set(bench.KINDS) and set(edits["mean"]) == {"0.3"}
    for kind in bench.KINDS:  # each change names a caption the world allows, differing from the source
        spec = items[0][0]
        assert bench.changed(spec, kind, np.random.default_rng(1)) != spec
