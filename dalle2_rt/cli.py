"""``dalle2-rt`` (alias ``dream``): text -> PNG files with the unCLIP engines. Torch-free.

Every user mistake ends in ONE line on stderr, ``dalle2-rt: error: <what to fix>``, a non-zero exit and no
file written: arguments are checked, the prompt file read, the variations image opened, the output folder
probed and the engine folder verified before the first image is generated. Written paths go to stdout,
one a line, so ``dalle2-rt ... | xargs`` works; the progress bar goes to stderr and only to a terminal.
SIGINT (exit 130) and SIGTERM (exit 143) stop it with one line and no partial file left behind.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import __version__
from .runtime.backends import BACKENDS
from .runtime.cpu import int8_dot_product
from .runtime.errors import Dalle2RTError, InputError, PromptTruncatedWarning
from .runtime.noise import new_seed
from .runtime.settings import MAX_IMAGES, OPTIONS, VARIATION_OPTIONS, check, check_int, check_prompts

PROG = "dalle2-rt"
CORES = os.cpu_count() or 1
MAX_THREADS = 4 * CORES  # more only wait for a core, each with its own stack and arena: memory for no speed

EPILOG = """\
examples:
  dalle2-rt "a large red circle on the left, black background"
  dalle2-rt "two blue squares" -n 4 --seed 7 -o out/ --grid
  dalle2-rt --from-file prompts.txt -n 2 --seed 1 -o out/      # one prompt a line; '#' comments
  dalle2-rt --variations out/two-blue-squares-s7-0.png -n 4 -o out/
  dalle2-rt "a green triangle" --sampler dpm++ --decoder-steps 15 --decoder-guidance 3
  dalle2-rt "a red star above a blue circle" --decoder-candidates 8   # more tries, CLIP keeps the best
  dream "a small yellow star" --backend torch                  # same program, shorter name

files: <prompt-slug>-s<seed>-<index>.png in the output folder (default: the current one); an existing
file is never replaced (a -1, -2, ... suffix is added). Each PNG carries its prompt, seed, sampler,
steps, guidance, backend and the engine manifest's sha256 as text chunks. The same prompt, seed and
settings give the same pixels on the same backend; image i does not depend on -n.

engines: --engines DIR, else $DALLE2_RT_ENGINES, else engines/shapes-v2 of a clone (`make engines`),
else the copy installed with the package. `dalle2-rt info` says which folder that is, and its defaults.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as SIGINT's KeyboardInterrupt is, so the same ``finally`` blocks run
    (``save_png`` removes its ``.png.tmp``) instead of the process dying mid-write."""


_HELD = {"depth": 0, "pending": None}  # signals_held: how deep, and the signal that came meanwhile


def _raise_terminated(signum, frame):
    """The CLI's SIGTERM and SIGINT handler: Terminated / KeyboardInterrupt, or, inside ``signals_held``, later."""
    if _HELD["depth"]:
        _HELD["pending"] = signum
        return
    _interrupt(signum)


def _interrupt(signum: int):
    """Raise what ``signum`` means to the CLI: Terminated for SIGTERM, KeyboardInterrupt for SIGINT."""
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM (under the CLI's handler) held while a PNG is published and its path printed, then
    raised: a file on disk is always one that was reported, never linked and left unsaid by an interrupt in
    between. A handler, not a signal mask: onnxruntime's threads would take a signal the main thread masks."""
    _HELD["depth"] += 1
    try:
        yield
    finally:
        _HELD["depth"] -= 1
        if not _HELD["depth"] and _HELD["pending"] is not None:
            signum, _HELD["pending"] = _HELD["pending"], None
            _interrupt(signum)


def check_threads(value) -> int:
    """``--threads``: 1 … 4 × the machine's cores."""
    value = check_int("threads", value, 1)
    if value > MAX_THREADS:
        raise InputError(f"threads must be at most {MAX_THREADS} (4 × the {CORES} cores), got {value}")
    return value


def _typed(rule, parse=int):
    """An argparse type: the text parsed by ``parse``, then checked by ``rule`` (the library's own check, so
    the command line refuses a value with the library's words)."""
    what = "an integer" if parse is int else "a number"

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        try:
            return rule(value)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _setting(field: str, parse=int):
    """The argparse type of the ``settings.Settings`` field ``field``."""
    return _typed(lambda value: check(field, value), parse)


def add_sampling_options(group) -> None:
    """A flag ``--<name-with-dashes>`` per sampling option of ``settings.OPTIONS`` (unset: None, the folder's
    default), typed and checked by the library's own check, with the option's help text."""
    for option in OPTIONS:
        flag = "--" + option.name.replace("_", "-")
        if option.choices:
            group.add_argument(flag, choices=list(option.choices), help=option.help)
        else:
            group.add_argument(flag, type=_setting(option.name, option.kind), metavar=option.metavar,
                               help=option.help)


def sampling_options(args: argparse.Namespace, options=OPTIONS) -> dict:
    """The sampling options parsed by ``add_sampling_options`` (None: not given), as ``Pipeline`` keywords."""
    return {option.name: getattr(args, option.name) for option in options}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Generate images from text with the DALL-E 2 (unCLIP) engines.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="*", help="the text to draw (quote it, or give it as several words)")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    what = p.add_argument_group("what to generate")
    what.add_argument("-n", "--num-images", type=_setting("num_images"), default=1, metavar="N",
                      help=f"images per prompt, 1 … {MAX_IMAGES} (default 1)")
    what.add_argument("--seed", type=_setting("seed"), metavar="S",
                      help="noise seed (default: random; it is in the file names and PNG metadata)")
    what.add_argument("--from-file", metavar="FILE",
                      help="read prompts from FILE (- = stdin), one a line; blank and # lines skipped")
    what.add_argument("--variations", metavar="IMAGE",
                      help="make variations of IMAGE instead (no prompt; the prior options do not apply, "
                           "--negative-prompt is refused)")
    out = p.add_argument_group("output")
    out.add_argument("-o", "--output-dir", default=".", metavar="DIR", help="where PNGs go (default: .)")
    out.add_argument("--grid", action="store_true", help="also write one grid PNG of all images")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bar or warnings")
    add_sampling_options(p.add_argument_group("sampling (defaults come from the engine manifest)"))
    run = p.add_argument_group("runtime")
    run.add_argument("--backend", choices=list(BACKENDS), default="onnxruntime",
                     help="onnxruntime (default: TensorRT or CUDA provider when available, else CPU), tensorrt "
                          "(native engines, needs a GPU), torch (reference, needs the train extra), triton (each graph "
                          "call on a Triton server, --url)")
    run.add_argument("--url", metavar="URL",
                     help="with --backend triton: the server, http://HOST:8000 or grpc://HOST:8001")
    run.add_argument("--engines", metavar="DIR", help="engine folder (with manifest.json)")
    run.add_argument("--threads", type=_typed(check_threads), metavar="N",
                     help=f"CPU threads per graph, 1 … {MAX_THREADS} (default: one per core). On a machine busy "
                          "with other work, --threads 1 is often faster: threads that wait for a core stall every step")
    precision = run.add_mutually_exclusive_group()
    precision.add_argument("--fp32", action="store_true",
                           help="run the fp32 graphs only (default: onnxruntime on the CPU runs a graph's int8 "
                                "variant where the engine folder has one and the CPU has int8 dot products: AMX, "
                                "VNNI or Arm dot product; dalle2-rt info says which)")
    precision.add_argument("--int8", action="store_true",
                           help="run the folder's int8 variants even on a CPU without int8 dot products (where their "
                                "sums may saturate)")
    return p


def int8_option(args) -> bool | None:
    """``Pipeline.load``'s int8 from --fp32 / --int8 (None: the CPU decides)."""
    return False if getattr(args, "fp32", False) else True if getattr(args, "int8", False) else None


def _int8_note(facts: dict) -> str:
    if not facts["int8"]:
        return ""
    if facts["int8_dot_product"]:
        return f"  (run on this CPU, which has {facts['int8_dot_product']}, unless --fp32)"
    return "  (not run by default: this CPU has no int8 dot-product instructions; --int8 runs them)"


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"{PROG}: error: {' '.join(str(message).split())}\n")
    return code


def read_prompt_file(path: str) -> list[str]:
    """Prompts of a UTF-8 file ('-' = stdin), one a line; blank lines and lines starting with # skipped."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"prompt file {path!r} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"prompt file {path!r} is a directory") from None
    except UnicodeDecodeError:
        raise InputError(f"prompt file {path!r} is not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"cannot read prompt file {path!r} ({e.strerror})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputError(f"prompt file {path!r} has no prompts (blank lines and # comments are skipped)")
    return prompts


def check_output_dir(path: str) -> Path:
    """The output folder, probed for writing (created later, after everything else is checked)."""
    folder = Path(path).expanduser()
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"output directory {str(folder)!r} is not writable ({probe} is not a directory)")
    test_file = probe / f".dalle2-rt-probe-{secrets.token_hex(4)}"
    try:  # os.access is wrong for root and some mounts: create and remove a file instead
        os.close(os.open(test_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(test_file)
    except OSError as e:
        raise InputError(f"output directory {str(folder)!r} is not writable ({e.strerror})") from None
    return folder


def entry() -> int:
    """The console scripts (``dalle2-rt``, ``dream``): ``main`` in a process of its own, so onnxruntime's
    sessions may share one process-wide thread pool (faster; ``Pipeline.load(shared_threads=True)``)."""
    return main(shared_threads=True)


def main(argv: list[str] | None = None, *, shared_threads: bool = False) -> int:
    """The CLI as a function (tests, embedding): the same, on the library's default per-session pools."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["serve"]:  # the HTTP service parses its own options (dalle2_rt/serve/cli.py)
        from .serve.cli import main as serve_main

        return serve_main(args[1:])
    # SIGTERM takes SIGINT's path; both go through _raise_terminated, which signals_held can hold (only the main
    # thread may set a handler; the caller's are put back after).
    previous = ({s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGINT)}
                if _in_main_thread() else None)
    try:
        if args[:1] in (["edit"], ["interpolate"]):  # unCLIP's operations on images (cli_operations.py)
            from .cli_operations import main as operations_main

            return operations_main(args)
        return info(args[1:]) if args[:1] == ["info"] else _main(argv, shared_threads)
    except Terminated:
        sys.stderr.write(f"{PROG}: terminated\n")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:  # stdout closed early (| head): nothing more to say
        return 1
    finally:
        for signum, handler in (previous or {}).items():
            signal.signal(signum, handler)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _main(argv, shared_threads: bool) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        jobs = _plan(args)
    except Dalle2RTError as e:
        return _fail(str(e), 2)
    from .runtime.images import make_grid, save_png, slugify
    from .runtime.pipeline import Pipeline
    from .runtime.progress import ProgressBar

    try:
        pipe = Pipeline.load(args.engines, backend=args.backend, threads=args.threads,
                             shared_threads=shared_threads, url=args.url, int8=int8_option(args))
        options = sampling_options(args, OPTIONS if jobs["prompts"] else VARIATION_OPTIONS)
        pipe.settings(**options)
    except InputError as e:
        return _fail(str(e), 2)
    except Dalle2RTError as e:
        return _fail(str(e))
    seed = args.seed if args.seed is not None else new_seed()
    bar = ProgressBar(sys.stderr, enabled=False if args.quiet else None)
    all_images = []
    try:
        if jobs["prompts"]:
            for prompt, cut in zip(jobs["prompts"], pipe.truncated(jobs["prompts"])):
                if cut and not args.quiet:
                    sys.stderr.write(f"{PROG}: warning: prompt longer than the text encoder's "
                                     f"{pipe.tokenizer.context_length - 2} tokens, truncated: "
                                     f"{' '.join(prompt.split())[:60]!r}\n")
        jobs["folder"].mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            for number, prompt in enumerate(jobs["prompts"] or [None], 1):
                if len(jobs["prompts"]) > 1:
                    bar.label = f"[{number}/{len(jobs['prompts'])}]"
                if prompt is None:
                    images = pipe.variations(args.variations, num_images=args.num_images, seed=seed,
                                             callback=bar, **options)
                    slug = slugify(Path(args.variations).stem) + "-var"
                else:
                    images = pipe(prompt, seed=seed, num_images=args.num_images, callback=bar, **options)
                    slug = slugify(prompt)
                bar.close()
                for j, image in enumerate(images):
                    with signals_held():
                        print(save_png(image, jobs["folder"], f"{slug}-s{seed}-{j}", image.info), flush=True)
                all_images += images
        if args.grid and all_images:
            meta = {**all_images[0].info, "prompt": "\n".join(jobs["prompts"] or [""]), "index": "grid"}
            name = f"grid-{slugify(jobs['prompts'][0]) if jobs['prompts'] else slugify(Path(args.variations).stem)}"
            grid = make_grid(all_images, args.num_images)
            with signals_held():
                print(save_png(grid, jobs["folder"], f"{name}-s{seed}", meta), flush=True)
    except Dalle2RTError as e:
        bar.close()
        return _fail(str(e))
    except OSError as e:  # disk full, folder removed meanwhile, ...
        bar.close()
        return _fail(f"cannot write to {jobs['folder']}: {e.strerror or e}")
    return 0


def info(argv: list[str]) -> int:
    """``dalle2-rt info [--engines DIR] [--json]``: where the user stands, without opening a graph: the version,
    the engine folder a generation would open and which step of the lookup gave it, the model and its
    checkpoints, and the sampling defaults; ``--json``: the same as one JSON object."""
    import json

    from .runtime import locate
    from .runtime.manifest import load_manifest, user_cache_dir
    from .runtime.plan import resolve_stages

    p = _Parser(prog=f"{PROG} info", description="Which engine folder and model a generation would use.")
    p.add_argument("--engines", metavar="DIR", help="describe this folder instead of the default")
    p.add_argument("--json", action="store_true", help="one JSON object")
    args = p.parse_args(argv)
    folder = Path(args.engines).expanduser() if args.engines else locate.default_engines()
    lookup = [{"step": where, "folder": str(f), "found": (f / locate.MANIFEST).is_file()} for where, f in
              locate.lookup()]
    try:
        if not args.engines and not (folder / locate.MANIFEST).is_file():
            raise Dalle2RTError(locate.missing_message(folder))
        manifest = load_manifest(folder)
        plans = resolve_stages(manifest, True)
    except Dalle2RTError as e:
        return _fail(str(e))
    package = manifest.data.get("package")
    facts = {
        "version": __version__,
        "engines": str(manifest.folder),
        "from": "--engines" if args.engines else locate.source_of(folder),
        "lookup": lookup,
        "model": manifest.name,
        "manifest_sha256": manifest.sha256,
        "weights": "float16-stored package copy" if package else "as exported",
        "checkpoints": {name: {"step": s.get("step"), "sha256": s.get("sha256")}
                        for name, s in manifest.sources.items()},
        "defaults": {plan.name: plan.defaults for plan in plans},
        "int8": manifest.int8_graphs,
        "int8_dot_product": int8_dot_product(),
        "cache": str(user_cache_dir()),
    }
    if args.json:
        print(json.dumps(facts, indent=1))
        return 0
    print(f"{PROG} {__version__}")
    print(f"engines   {facts['engines']}  (from {facts['from']})")
    print("lookup    " + " > ".join(["--engines DIR"] + [f"{s['step']} {s['folder']}"
                                                           f"{'' if s['found'] else ' (none)'}" for s in lookup]))
    print(f"model     {manifest.name}, {facts['weights']}, manifest sha256 {manifest.sha256[:16]}")
    for name, c in facts["checkpoints"].items():
        print(f"          {name}: step {c['step']}, sha256 {str(c['sha256'])[:16]}")
    for name, d in facts["defaults"].items():
        print(f"defaults  {name}: " + ", ".join(f"{k} {v}" for k, v in d.items()))
    print(f"int8      {', '.join(facts['int8']) or 'none'}{_int8_note(facts)}")
    print(f"cache     {facts['cache']}  (hashes, ONNX Runtime's optimised copies)")
    return 0


def _plan(args) -> dict:
    """Everything checkable before loading engines: prompts, the variations image, the output folder."""
    prompt = " ".join(args.prompt)
    given = [name for name, on in (("PROMPT", bool(args.prompt)), ("--from-file", args.from_file is not None),
                                   ("--variations", args.variations is not None)) if on]
    if len(given) > 1:
        raise InputError(f"give one of PROMPT, --from-file or --variations, not {' and '.join(given)}")
    if not given:
        raise InputError("no prompt given (try: dalle2-rt \"a red circle\")")
    if args.url is not None and args.backend != "triton":
        raise InputError("--url goes with --backend triton")
    if args.variations is not None:
        from .runtime.images import open_image

        if args.negative_prompt is not None:  # the prior's options are harmless there; a negative prompt is not
            raise InputError("--variations draws without text: --negative-prompt would be ignored")
        open_image(args.variations)  # fail now, not after loading the engines
        prompts = []
    elif args.from_file is not None:
        prompts = read_prompt_file(args.from_file)
    else:
        prompts = check_prompts(prompt)
    return {"prompts": prompts, "folder": check_output_dir(args.output_dir)}
