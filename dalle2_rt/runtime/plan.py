"""The sampling stages of an engine folder, resolved once at load: what each stage runs and how.

``resolve_stages(manifest, prefix_cache)`` reads the prior, decoder and SR entries of the manifest into frozen
``StagePlan`` s (pipeline order: prior, decoder, sr0, sr1, …) and refuses a folder whose stages do not fit
together (a ``prefix_cache`` naming graphs or tensors that do not exist, an SR stage whose ``low_res`` is not
the previous stage's output), before any graph is opened. Nothing here runs a graph: the plans name graphs,
and the pipeline looks them up in its engines at call time (so a caller may wrap or replace an engine).

Prefix cache (``stages.<stage>.prefix_cache``, ARCHITECTURE.md): the graph is split into ``prefix_graph``
(the inputs that are the same at every step, i.e. the conditioning → the ``cache`` tensors) and
``step_graph`` (x_t, t and the cache → the prediction). With ``prefix_cache=False`` the plan ignores the
entry and runs the full graph every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import EngineFolderError
from .manifest import GraphSpec, Manifest, stage_alphas_cumprod, stage_betas


@dataclass(frozen=True)
class StagePlan:
    """One sampling stage as it will run."""

    name: str  # "prior", "decoder", "sr0", ...
    graph: str  # the stage's full graph (the manifest's ``graph``)
    kind: str  # the graph's native prediction: eps | x0 | v
    abar: np.ndarray  # (T,) float64 ᾱ over the training timesteps
    spacing: str  # schedule spacing for respacing to the sampling steps
    betas: np.ndarray | None  # (T,) the training β_t where the manifest records them
    clip_x0: tuple[float, float] | None  # clamp of the x0 estimate, None = none
    x_shape: tuple[int, ...]  # one row of x_t, e.g. (128,) or (3, 32, 32)
    inputs: frozenset[str]  # the inputs of the graph run at each step (x_t, t and its conditioning)
    output: str  # that graph's prediction output
    defaults: dict  # the folder's {"steps", "guidance", "sampler", ("candidates")} for this stage
    variance: str = "small"  # small | large | learned_range (stages.py)
    ddim_eta: float = 0.0  # η of the ddim sampler on this stage (manifest schedule.ddim_eta)
    uncond_text: str = "null_input"  # null_input | empty_prompt: the unconditional half's text
    cond_input: str = "cond_keep"  # the prior's keep input (ARCHITECTURE.md: stages.prior.cond_input)
    last_graph: str | None = None  # runs the last sampling step instead of the step graph, when set
    noise_aug_t: int | None = None  # SR stages: the timestep of the low-res noise augmentation, None = none
    prefix_graph: str | None = None  # prefix cache: the graph computing the cache once per conditioning row
    step_graph: str | None = None  # … and the graph fed the cache at every step in place of ``graph``
    cache: tuple[str, ...] = ()  # … the cache tensors (outputs of prefix_graph, inputs of step_graph)
    prefix_inputs: frozenset[str] = frozenset()  # … the inputs of prefix_graph
    # guidance-distilled: the step graph's input taking the guidance scale w (one row per sample, no
    # unconditional half); None = classic classifier-free guidance (the pair of rows)
    guidance_input: str | None = None
    guidance_range: tuple[float, float] | None = None  # … the scales it was trained on (None: not stated)

    @property
    def num_timesteps(self) -> int:
        return len(self.abar)

    @property
    def graphs(self) -> tuple[str, ...]:
        """Every graph this stage runs (what the backend must open)."""
        run = (self.prefix_graph, self.step_graph) if self.step_graph else (self.graph,)
        return run + ((self.last_graph,) if self.last_graph else ())


def resolve_stages(manifest: Manifest, prefix_cache: bool = True) -> list[StagePlan]:
    """The sampling stages in pipeline order: prior, decoder, sr0, sr1, …; ``EngineFolderError`` if they do
    not fit together."""
    st = manifest.stages
    named = [("prior", st["prior"]), ("decoder", st["decoder"]),
             *((f"sr{m}", e) for m, e in enumerate(st.get("sr", [])))]
    plans = [_plan(manifest, name, entry, prefix_cache) for name, entry in named]
    for before, sr in zip(plans[1:], plans[2:]):  # each SR stage's low_res is the previous stage's x
        low = _input(manifest.graphs[sr.graph], "low_res")
        low_shape = tuple(low.shape[1:]) if low is not None else None
        if low_shape != before.x_shape:
            raise EngineFolderError(f"{manifest.folder}: {sr.name} takes low_res {low_shape} but the previous "
                                    f"stage makes {before.x_shape}")
    return plans


def graphs_to_open(manifest: Manifest, plans: list[StagePlan]) -> list[str]:
    """The graphs a pipeline over ``plans`` runs: the encoders and every stage's graphs (sorted)."""
    graphs = {manifest.stages[s]["graph"] for s in ("text_encoder", "image_encoder") if s in manifest.stages}
    for plan in plans:
        graphs.update(plan.graphs)
    return sorted(graphs)


def _input(spec: GraphSpec, name: str):
    return next((t for t in spec.inputs if t.name == name), None)


def _plan(manifest: Manifest, name: str, entry: dict, prefix_cache: bool) -> StagePlan:
    spec = manifest.graphs[entry["graph"]]
    x_spec = _input(spec, "x_t")
    if x_spec is None or not all(isinstance(d, int) for d in x_spec.shape[1:]):
        raise EngineFolderError(f"{manifest.folder}: graph {spec.name!r} needs an input x_t with a fixed row shape")
    clip = entry.get("clip_x0")
    cached = _prefix_cache(manifest, name, entry) if prefix_cache else {}
    runs = manifest.graphs[cached["step_graph"]] if cached else spec  # the graph called at every step
    aug = entry.get("noise_aug_t")
    guidance_input = entry.get("guidance_input")
    if guidance_input is not None:
        graphs = [manifest.graphs[g] for g in (runs.name, entry.get("last_step_graph")) if g]
        if not isinstance(guidance_input, str) or any(
                _input(g, guidance_input) is None or _input(g, guidance_input).shape[1:] for g in graphs):
            raise EngineFolderError(f"{manifest.folder}: stages.{name}.guidance_input {guidance_input!r} is not a "
                                    f"(batch,) input of its step graph")
    trained = entry.get("guidance_range")
    if trained is not None:
        if (guidance_input is None or not isinstance(trained, list) or len(trained) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 100 for v in trained)
                or trained[0] > trained[1]):
            raise EngineFolderError(f"{manifest.folder}: stages.{name}.guidance_range must be [lo, hi] with "
                                    f"0 <= lo <= hi <= 100, on a stage with guidance_input; got {trained!r}")
        trained = (float(trained[0]), float(trained[1]))
    return StagePlan(
        name=name, graph=spec.name, kind=entry["parameterization"], abar=stage_alphas_cumprod(entry),
        spacing=entry["schedule"].get("spacing", "trailing"), betas=stage_betas(entry),
        clip_x0=(float(clip[0]), float(clip[1])) if clip else None, x_shape=tuple(x_spec.shape[1:]),
        inputs=frozenset(t.name for t in runs.inputs), output=runs.outputs[0].name,
        defaults=dict(entry.get("defaults") or {}), variance=entry.get("variance", "small"),
        ddim_eta=float(entry["schedule"].get("ddim_eta", 0.0)),
        uncond_text=entry.get("uncond_text", "null_input"), cond_input=entry.get("cond_input", "cond_keep"),
        last_graph=entry.get("last_step_graph"), noise_aug_t=None if aug is None else int(aug),
        guidance_input=guidance_input, guidance_range=trained, **cached,
    )


def _prefix_cache(manifest: Manifest, name: str, entry: dict) -> dict:
    """The checked ``prefix_cache`` of a stage entry as StagePlan fields ({} when it has none)."""
    pc = entry.get("prefix_cache")
    if not pc:
        return {}
    try:
        prefix, step, cache = manifest.graphs[pc["prefix_graph"]], manifest.graphs[pc["step_graph"]], pc["cache"]
    except (KeyError, TypeError) as e:
        raise EngineFolderError(f"{manifest.folder}: stages.{name}.prefix_cache names no graph {e}") from None
    full = manifest.graphs[entry["graph"]]
    step_in, full_in = {t.name for t in step.inputs}, {t.name for t in full.inputs}
    prefix_in = {t.name for t in prefix.inputs}
    problems = [f"{n!r} is not an output of {prefix.name}" for n in cache if n not in {t.name for t in prefix.outputs}]
    problems += [f"{n!r} is not an input of {step.name}" for n in cache if n not in step_in]
    problems += [f"{step.name} input {n!r} is neither x_t, t nor a cache tensor"
                 for n in sorted(step_in - {"x_t", "t", *cache})]
    problems += [f"{prefix.name} input {n!r} is not an input of {full.name}" for n in sorted(prefix_in - full_in)]
    if problems:
        raise EngineFolderError(f"{manifest.folder}: stages.{name}.prefix_cache: {'; '.join(problems)}")
    return {"prefix_graph": prefix.name, "step_graph": step.name, "cache": tuple(cache),
            "prefix_inputs": frozenset(prefix_in)}
