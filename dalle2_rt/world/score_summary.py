"""Scoring a batch: per-attribute accuracy over the images whose caption names the attribute.

This is what model evaluation and the benchmarks call. Rates are kept apart for one- and two-object captions
(two-object prompts are much harder for a small model, and mixing them would hide either number).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .captions import parse_caption
from .scorer import ATTRIBUTES, score_spec

KINDS = ("single", "two", "all")


@dataclass
class Tally:
    """How many images named an attribute, and on how many of those it was right."""

    right: int = 0
    named: int = 0

    @property
    def rate(self) -> float | None:
        return self.right / self.named if self.named else None


@dataclass
class ScoreSummary:
    """tallies[kind][attribute] for kind in single / two / all; `results` keeps each image's score dict."""

    tallies: dict[str, dict[str, Tally]] = field(
        default_factory=lambda: {k: {a: Tally() for a in ATTRIBUTES} for k in KINDS})
    results: list[dict[str, bool | None]] = field(default_factory=list)

    def add(self, kind: str, result: dict[str, bool | None]) -> None:
        self.results.append(result)
        for k in (kind, "all"):
            for attr, value in result.items():
                if value is not None:
                    t = self.tallies[k][attr]
                    t.named += 1
                    t.right += bool(value)

    def rate(self, attribute: str = "fully_right", kind: str = "all") -> float | None:
        """Share of the images of `kind` that name `attribute` on which it is right (None when none names it)."""
        return self.tallies[kind][attribute].rate

    def count(self, kind: str = "all") -> int:
        """Number of images of `kind` (every image has a fully_right verdict)."""
        return self.tallies[kind]["fully_right"].named

    def as_dict(self) -> dict:
        """Plain nested dict for JSON: {kind: {"n": int, attribute: {"right", "named", "rate"}}}."""
        out = {}
        for kind, by_attr in self.tallies.items():
            out[kind] = {"n": self.count(kind)}
            for attr, t in by_attr.items():
                out[kind][attr] = {"right": t.right, "named": t.named, "rate": t.rate}
        return out

    def __str__(self) -> str:
        rows = [f"{'':12s}" + "".join(f"{k:>20s}" for k in KINDS)]
        for attr in ATTRIBUTES:
            cells = []
            for kind in KINDS:
                t = self.tallies[kind][attr]
                cells.append(f"{t.rate:7.1%} ({t.right}/{t.named})" if t.named else "-")
            rows.append(f"{attr:12s}" + "".join(f"{c:>20s}" for c in cells))
        return "\n".join(rows)


def score_many(images: Iterable, captions: Iterable[str]) -> ScoreSummary:
    """Score each image against its canonical caption and aggregate (images: uint8 (H, W, 3) arrays or PIL images,
    or one (N, H, W, 3) array). Raises CaptionError on the first non-canonical caption, ValueError on a length
    mismatch."""
    images, captions = list(images), list(captions)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    summary = ScoreSummary()
    specs = [parse_caption(c) for c in captions]  # parse all first: a bad prompt fails before any scoring work
    for image, spec in zip(images, specs):
        summary.add(spec.kind, score_spec(image, spec))
    return summary
