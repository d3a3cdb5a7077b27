"""``dalle2-rt edit`` and ``dalle2-rt interpolate``: unCLIP's operations on images (runtime/operations.py).

    dalle2-rt edit circle.png --from "a red circle" --to "a red star" [--amount 0.2 0.35 0.5] [-o DIR]
    dalle2-rt interpolate a.png b.png --frames 7 [--gif strip.gif] [-o DIR]
    dalle2-rt interpolate "a red circle" "a blue square" --frames 5

As the rest of the CLI: every mistake is one ``dalle2-rt: error: …`` line, a non-zero exit and no file, the
images, captions, numbers and the output folder being checked before the engines load; written paths go to
stdout one a line; PNGs are never overwritten and carry the operation and its inputs as text chunks.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from .cli import MAX_THREADS, PROG, _fail, _Parser, _typed, check_output_dir, check_threads
from .runtime.errors import Dalle2RTError, InputError
from .runtime.noise import new_seed
from .runtime.operations import (
    DEFAULT_AMOUNT,
    DEFAULT_GUIDANCE,
    DEFAULT_REFINE,
    LATENT_MODES,
    MAX_FRAMES,
    MAX_REFINE,
    check_amounts,
    check_frames,
)
from .runtime.settings import MAX_SEED, check, check_int, check_prompts

COMMANDS = ("edit", "interpolate")


def _common(p) -> None:
    """The options both operations take."""
    p.add_argument("-o", "--output-dir", default=".", metavar="DIR", help="where PNGs go (default: .)")
    p.add_argument("--seed", type=_typed(lambda v: check_int("seed", v, 0, MAX_SEED)), metavar="S",
                   help="the SR stage's noise (and the fixed latent of interpolate --latent fixed)")
    p.add_argument("--decoder-steps", type=_typed(lambda v: check("decoder_steps", v)), metavar="K",
                   help="DDIM steps of the inversion and the decoding (default: the folder's operation_steps, else its "
                        "steps)")
    p.add_argument("--decoder-guidance", type=_typed(lambda v: check("decoder_guidance", v), float), metavar="G",
                   help=f"decoder guidance of the inversion (and of interpolate's decoding; default "
                        f"{DEFAULT_GUIDANCE:g}: unguided, where inversion is exact)")
    p.add_argument("--refine", type=_typed(lambda v: check_int("refine", v, 0, MAX_REFINE)), default=DEFAULT_REFINE,
                   metavar="K", help=f"fixed-point iterations per inversion step (default {DEFAULT_REFINE})")
    p.add_argument("--engines", metavar="DIR", help="engine folder (with manifest.json)")
    p.add_argument("--threads", type=_typed(check_threads), metavar="N",
                   help=f"CPU threads per graph, 1 … {MAX_THREADS}")


def build_edit_parser() -> _Parser:
    p = _Parser(prog=f"{PROG} edit", description="A text diff of an image: decode slerp(z_i, normalise(z_to − "
                                                 "z_from), θ) from the image's own inverted latent.")
    p.add_argument("image", help="the image to edit (PNG, JPEG, …)")
    p.add_argument("--from", dest="source", required=True, metavar="TEXT", help="a caption of the image as it is")
    p.add_argument("--to", dest="target", required=True, metavar="TEXT", help="the caption to move it towards")
    p.add_argument("--amount", nargs="+", type=_typed(lambda v: check_amounts(v)[0], float), metavar="θ",
                   default=[DEFAULT_AMOUNT], help=f"how far, 0 … 1 (several: a sweep; default {DEFAULT_AMOUNT})")
    p.add_argument("--edit-guidance", type=_typed(lambda v: check("decoder_guidance", v), float), metavar="G",
                   help="decoder guidance of the edited frames (default: the folder's generation guidance, which "
                        "changes the image where the unguided decoder redraws it)")
    p.add_argument("--no-text", action="store_true",
                   help="decode without the captions' text (θ = 0 is then exactly the reconstruction)")
    _common(p)
    return p


def build_interpolate_parser() -> _Parser:
    p = _Parser(prog=f"{PROG} interpolate", description="Frames between two images (or prompts, through the "
                                                        "prior) along slerp of their CLIP image embeddings.")
    p.add_argument("a", help="an image path, or a prompt")
    p.add_argument("b", help="an image path, or a prompt")
    p.add_argument("--frames", type=_typed(check_frames), default=5, metavar="N",
                   help=f"frames, both ends included (2 … {MAX_FRAMES}; default 5)")
    p.add_argument("--latent", choices=list(LATENT_MODES), default="slerp",
                   help="slerp: the decoder latent slerped too (the ends reconstruct the inputs); fixed: one latent")
    p.add_argument("--gif", metavar="FILE", help="also write the frames as an animated GIF here")
    _common(p)
    return p


def main(argv: list[str]) -> int:
    """``dalle2-rt edit …`` / ``dalle2-rt interpolate …`` (argv[0] is the command)."""
    command, rest = argv[0], argv[1:]
    args = (build_edit_parser() if command == "edit" else build_interpolate_parser()).parse_args(rest)
    try:
        jobs = _plan(command, args)
    except Dalle2RTError as e:
        return _fail(str(e), 2)
    from .runtime import operations as ops
    from .runtime.pipeline import Pipeline

    try:
        pipe = Pipeline.load(args.engines, threads=args.threads)
        pipe.settings(decoder_steps=args.decoder_steps, decoder_guidance=args.decoder_guidance)
        if command == "edit":
            pipe.settings(decoder_guidance=args.edit_guidance)
    except InputError as e:
        return _fail(str(e), 2)
    except Dalle2RTError as e:
        return _fail(str(e))
    seed = args.seed if args.seed is not None else new_seed()
    settings = {"decoder_steps": args.decoder_steps, "decoder_guidance": args.decoder_guidance, "refine": args.refine}
    try:
        if command == "edit":
            images = ops.edit(pipe, jobs["image"], args.source, args.target, amount=args.amount, seed=seed,
                              text=not args.no_text, edit_guidance=args.edit_guidance, **settings)
            stems = [f"{jobs['stem']}-edit-a{a:g}-s{seed}" for a in args.amount]
            extra = {"image": Path(args.image).name}
        else:
            ends = [_endpoint(pipe, ops, end, seed, j, settings) for j, end in enumerate(jobs["ends"])]
            images = ops.interpolate(pipe, *ends, frames=args.frames, latent=args.latent, seed=seed, **settings)
            stems = [f"{jobs['stem']}-s{seed}-{j}" for j in range(len(images))]
            extra = {"a": args.a, "b": args.b}
        return _write(images, stems, extra, jobs)
    except Dalle2RTError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"cannot write to {jobs['folder']}: {e.strerror or e}")


def _endpoint(pipe, ops, end, seed: int, j: int, settings: dict):
    """An interpolation end: an image as given, or a prompt's (z_i, x_T) from the prior and (seed, j)."""
    kind, value = end
    if kind == "image":
        return value
    return ops.from_prompt(pipe, value, seed=seed, index=j, decoder_steps=settings["decoder_steps"],
                           decoder_guidance=settings["decoder_guidance"])


def _plan(command: str, args) -> dict:
    """Everything checkable before loading the engines: images, captions, the output folder, the GIF path."""
    from .runtime.images import open_image, slugify

    folder = check_output_dir(args.output_dir)
    if command == "edit":
        image = open_image(args.image)
        check_prompts(args.source), check_prompts(args.target)
        return {"image": image, "folder": folder, "stem": slugify(Path(args.image).stem)}
    ends = []
    for text in (args.a, args.b):
        if Path(text).is_file():
            ends.append(("image", open_image(text)))
        else:
            if any(text.lower().endswith(s) for s in (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")):
                raise InputError(f"image {text!r} does not exist")
            ends.append(("prompt", check_prompts(text)[0]))
    gif = None
    if args.gif is not None:
        gif = Path(args.gif).expanduser()
        if gif.exists():
            raise InputError(f"{str(gif)!r} exists (a GIF is never overwritten)")
        check_output_dir(str(gif.parent))
    stem = "interp-" + "-".join(slugify(Path(t).stem if k == "image" else t, 20) for (k, _), t
                                in zip(ends, (args.a, args.b)))
    return {"ends": ends, "folder": folder, "stem": stem, "gif": gif}


def _write(images, stems, extra: dict, jobs: dict) -> int:
    from .cli import signals_held
    from .runtime.images import save_png

    jobs["folder"].mkdir(parents=True, exist_ok=True)
    for image, stem in zip(images, stems):
        with signals_held():
            print(save_png(image, jobs["folder"], stem, {**image.info, **extra}), flush=True)
    if jobs.get("gif") is not None:
        print(_save_gif(images, jobs["gif"]), flush=True)
    return 0


def _save_gif(images, path: Path, ms: int = 200) -> Path:
    """The frames forth and back as a looping GIF, written whole or not at all (never over a file)."""
    tmp = path.parent / f".{path.stem[:32]}-{secrets.token_hex(6)}.gif.tmp"
    frames = [im.convert("RGB") for im in images]
    try:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:] + frames[-2:0:-1], duration=ms,
                       loop=0)
        os.link(tmp, path)  # exclusive: fails if the name was taken meanwhile
    except FileExistsError:
        raise InputError(f"{str(path)!r} exists (a GIF is never overwritten)") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
