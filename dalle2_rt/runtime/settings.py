"""The options of one generation, checked once: a frozen ``Settings`` and the checks behind it.

    s = Settings(num_images=4, seed=7, decoder_steps=10)      # InputError on a bad value
    pipe("a red circle", **dataclasses.asdict(s))              # the field names are the call's keywords
    pipe.settings(decoder_steps=10)                            # per-stage values, folder defaults filled in

A field left None takes the engine folder's default for the stage (``stages.*.defaults`` of the manifest)
when ``resolve`` meets the folder. ``check`` is the one check per field; the CLI's argument types call it
too, so a value is refused with the same words on the command line and in the library.

``Settings`` is the one carrier of the sampling options: ``OPTIONS`` (name, type, help, choices, whether image
variations take it) is read off its fields, and the CLI flags (``cli.add_sampling_options``), the HTTP schema
(``serve/app.py``), the Triton orchestrator's inputs (``triton/orchestrator_io.py``), bench and ``Pipeline`` 's
keywords are built from it, so none of them lists the options by hand.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from .errors import InputError
from .samplers import SAMPLERS

MAX_IMAGES = 64  # per prompt and call
# samplers whose step reads only the current x, so that a schedule can be split (early candidate choice)
ONE_STEP_SAMPLERS = ("ddim", "ddpm")
MAX_CANDIDATES = 16
MAX_SEED = 2**64 - 1  # a seed is any unsigned 64-bit integer
FALLBACK_STEPS = 25  # a stage whose folder states no default steps


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in lo … hi (hi None: no upper bound); bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if hi is None and value < lo:
        raise InputError(f"{name} must be at least {lo}, got {value}")
    if hi is not None and not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {value}")
    return int(value)


def check_guidance(name: str, value) -> float:
    """A classifier-free guidance scale: a finite number ≥ 0 (1 = the conditional prediction alone)."""
    try:
        g = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(g) or g < 0:
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return g


def check_sampler(value) -> str:
    if value not in SAMPLERS:
        raise InputError(f"unknown sampler {value!r}; choose from {', '.join(SAMPLERS)}")
    return value


def check_prompts(prompt: str | Sequence[str] | None) -> list[str]:
    """One prompt or a sequence of them, as a non-empty list of non-blank strings."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
    if not prompts:
        raise InputError("no prompt given")
    for p in prompts:
        if not isinstance(p, str):
            raise InputError(f"a prompt must be a string, got {type(p).__name__}")
        if not p.strip():
            raise InputError("the prompt is empty")
        try:  # a lone surrogate (undecodable argv bytes, a JSON "\ud800") has no UTF-8: PNG text would fail
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"the prompt is not valid Unicode text (a lone surrogate {p[e.start]!a} at "
                             f"character {e.start}; undecodable bytes?)") from None
    return prompts


MAX_PROMPT_CHARS = 2000  # a negative prompt's length; longer text is a mistake, not a prompt


def check_negative_prompt(value) -> str:
    """A negative prompt: a non-blank string of valid Unicode, at most ``MAX_PROMPT_CHARS`` characters."""
    if isinstance(value, str) and len(value) > MAX_PROMPT_CHARS:
        raise InputError(f"negative prompt: at most {MAX_PROMPT_CHARS} characters, got {len(value)}")
    try:
        return check_prompts(value if isinstance(value, str) else [value])[0]
    except InputError as e:
        message = str(e)
        raise InputError(message.replace("the prompt", "the negative prompt", 1) if message.startswith("the prompt")
                         else f"negative prompt: {message}") from None


@dataclass(frozen=True)
class Option:
    """One sampling option as every surface shows it: the CLI flag ``--<name with dashes>``, the HTTP field
    and the Triton input ``<name>``, the ``Pipeline`` keyword ``<name>``."""

    name: str
    kind: type  # int | float | str: what the command line parses and the HTTP / Triton input carries
    help: str
    metavar: str
    choices: tuple[str, ...] | None = None
    variations: bool = False  # also an option of image variations (no prior, no text, one decoder sample)


def _field(kind: type, check, help: str, metavar: str = "K", *, default=None, choices=None,
           variations: bool = False, option: bool = True):
    """A ``Settings`` field: its default, its check (value -> normalised value, ``InputError``) and, for a
    sampling option, how the CLI, the HTTP API and the Triton orchestrator show it."""
    return field(default=default, metadata={"check": check, "kind": kind, "help": help, "metavar": metavar,
                                            "choices": choices, "variations": variations, "option": option})


@dataclass(frozen=True)
class Settings:
    """What to generate and how; every value is checked on construction (``InputError``).

    The one definition of the sampling options: a field declares its default (None: the folder's, filled in
    by ``resolve``), its check and its help text; the CLI flags, the HTTP schema, the Triton orchestrator's
    inputs, bench and ``Pipeline`` 's keywords are derived from ``OPTIONS``. Adding an option is a field here,
    its use in ``resolve`` (and the stage that reads it), and tests.
    """

    num_images: int = _field(int, lambda v: check_int("num_images", v, 1, MAX_IMAGES),
                             f"images per prompt, 1 … {MAX_IMAGES}", "N", default=1, option=False)
    seed: int | None = _field(int, lambda v: check_int("seed", v, 0, MAX_SEED),  # None: a drawn one (noise.new_seed)
                              "noise seed", "S", option=False)
    # the upper bound of steps (T) is the folder's: resolve checks it
    prior_steps: int | None = _field(int, lambda v: check_int("prior steps", v, 1), "sampling steps of the prior")
    decoder_steps: int | None = _field(int, lambda v: check_int("decoder steps", v, 1),
                                       "sampling steps of the decoder", variations=True)
    sr_steps: int | None = _field(int, lambda v: check_int("sr steps", v, 1),
                                  "steps of every super-resolution stage", variations=True)
    prior_guidance: float | None = _field(
        float, lambda v: check_guidance("prior guidance", v),
        "classifier-free guidance scale of the prior (1 = unguided; higher follows the text more)", "G")
    decoder_guidance: float | None = _field(float, lambda v: check_guidance("decoder guidance", v),
                                            "classifier-free guidance scale of the decoder", "G", variations=True)
    sampler: str | None = _field(str, check_sampler, "the sampler of every stage", "NAME", choices=tuple(SAMPLERS),
                                 variations=True)
    candidates: int | None = _field(int, lambda v: check_int("candidates", v, 1, MAX_CANDIDATES),
                                    "prior samples per image; the one closest to the text is kept")
    decoder_candidates: int | None = _field(
        int, lambda v: check_int("decoder candidates", v, 1, MAX_CANDIDATES),
        "decoder samples per image; the one CLIP finds closest to the text is kept (K times the decoder's work; "
        "1 = off)")
    decoder_choice_step: int | None = _field(
        int, lambda v: check_int("decoder choice step", v, 1),
        "rank the decoder candidates on their clean estimate after S steps and finish only the best (early "
        "choice: cheaper candidates); S >= the decoder's steps ranks finished images", "S")
    negative_prompt: str | None = _field(
        str, lambda v: check_negative_prompt(v),
        "text the images should not show: the guided stages' unconditional branch is conditioned on it instead "
        "of on no text (the prior's, and the decoder's unless it is guidance-distilled)", "TEXT")

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))

    def resolve(self, stages) -> dict:
        """Per stage (``plan.StagePlan`` s, prior first) {"steps", "guidance", "sampler"}, "candidates" (the
        prior's) and "decoder_candidates": the values given here, else the folder's defaults, all checked
        (steps ≤ the stage's T).

        SR stages have no conditioning to drop, so no guidance (None); a guidance of None elsewhere (a
        folder without a default) also means unguided.
        """
        given = {"prior": (self.prior_steps, self.prior_guidance),
                 "decoder": (self.decoder_steps, self.decoder_guidance)}
        run = {}
        for st in stages:
            steps, guidance = given.get(st.name, (self.sr_steps, None))
            d = st.defaults
            steps = check_int(f"{st.name} steps", d.get("steps", FALLBACK_STEPS) if steps is None else steps,
                              1, st.num_timesteps)
            if guidance is None and st.name in given:
                guidance = d.get("guidance")
            run[st.name] = {
                "steps": steps,
                "guidance": None if guidance is None else check_guidance(f"{st.name} guidance", guidance),
                "sampler": check_sampler(self.sampler or d.get("sampler", "ddim")),
            }
        prior = next(st for st in stages if st.name == "prior")
        k = prior.defaults.get("candidates", 1) if self.candidates is None else self.candidates
        run["candidates"] = check_int("candidates", k, 1, MAX_CANDIDATES)
        decoder = next(st for st in stages if st.name == "decoder")
        k = decoder.defaults.get("candidates", 1) if self.decoder_candidates is None else self.decoder_candidates
        run["decoder_candidates"] = check_int("decoder candidates", k, 1, MAX_CANDIDATES)
        at = decoder.defaults.get("choice_step") if self.decoder_choice_step is None else self.decoder_choice_step
        # None: rank the finished samples; so is any step at or past the last
        early = at is not None and run["decoder_candidates"] > 1 and at < run["decoder"]["steps"]
        run["decoder_choice_step"] = check_int("decoder choice step", at, 1) if early else None
        run["negative_prompt"] = self.negative_prompt
        if early and run["decoder"]["sampler"] not in ONE_STEP_SAMPLERS:
            raise InputError(f"decoder choice step: early candidate choice needs a one-step sampler "
                             f"({', '.join(ONE_STEP_SAMPLERS)}), not {run['decoder']['sampler']}")
        return run


_FIELDS = {f.name: f for f in fields(Settings)}
# the sampling options, in the order every surface lists them
OPTIONS: tuple[Option, ...] = tuple(
    Option(f.name, f.metadata["kind"], f.metadata["help"], f.metadata["metavar"], f.metadata["choices"],
           f.metadata["variations"]) for f in fields(Settings) if f.metadata["option"])
VARIATION_OPTIONS: tuple[Option, ...] = tuple(o for o in OPTIONS if o.variations)


def check(name: str, value):
    """``value`` of the ``Settings`` field ``name``, checked and normalised (int, float, str); ``InputError``
    names the field and the allowed range. None means "unset" for every field but num_images."""
    if value is None and name != "num_images":
        return None
    return _FIELDS[name].metadata["check"](value)


def options_given(options: dict, allowed: tuple[Option, ...] = OPTIONS, *, what: str = "sampling") -> dict:
    """``options`` (keyword arguments) if every name is one of ``allowed``; else a ``TypeError`` naming the
    unknown ones, as a function refuses an unexpected keyword."""
    names = [o.name for o in allowed]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"unknown {what} option(s) {', '.join(unknown)}; the options: {', '.join(names)}")
    return options


def _reads_negative(run: dict, stage) -> bool:
    """Whether ``stage`` ran an unconditional half, the one a negative prompt conditions: a guided prior or
    decoder (guidance not 1) that is not guidance-distilled."""
    g = run[stage.name]["guidance"]
    return (stage.name in ("prior", "decoder") and g is not None and g != 1.0
            and not getattr(stage, "guidance_input", None))


def describe(run: dict, stages, *, candidates: bool) -> dict[str, str]:
    """The PNG text chunks of resolved settings ``run`` for the stages that ran, e.g. {"sampler": "ddim",
    "steps": "prior=5 decoder=5 sr0=3", "guidance": "prior=4.0 decoder=3.0", "candidates": "2",
    "decoder_candidates": "4"} (``candidates``: a text-to-image call, whose prior and decoder candidates count;
    the decoder's are written only when more than one was drawn)."""
    names = [st.name for st in stages]
    samplers = {run[n]["sampler"] for n in names}
    return {
        "sampler": samplers.pop() if len(samplers) == 1 else " ".join(f"{n}={run[n]['sampler']}" for n in names),
        "steps": " ".join(f"{n}={run[n]['steps']}" for n in names),
        "guidance": " ".join(f"{n}={run[n]['guidance']}" for n in names if run[n]["guidance"] is not None),
        **({"candidates": str(run["candidates"])} if candidates else {}),
        **({"decoder_candidates": str(run["decoder_candidates"])}
           if candidates and run.get("decoder_candidates", 1) > 1 else {}),
        **({"decoder_choice_step": str(run["decoder_choice_step"])}
           if candidates and run.get("decoder_choice_step") else {}),
        **({"negative_prompt": run["negative_prompt"]} if candidates and run.get("negative_prompt")
           and any(_reads_negative(run, st) for st in stages) else {}),
    }
