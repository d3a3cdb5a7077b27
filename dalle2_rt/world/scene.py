"""A scene: what the renderer draws. Resolution-free: every length is a fraction of the canvas side W."""

from __future__ import annotations

from dataclasses import dataclass, field

from .palette import BACKGROUNDS, COLOURS, SHAPES


@dataclass(frozen=True)
class SceneObject:
    """One flat shape filling the square box of side `s` centred at (`cx`, `cy`) (fractions of W; y grows down)."""

    colour: str
    shape: str
    s: float
    cx: float
    cy: float

    def __post_init__(self):
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {', '.join(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {', '.join(SHAPES)}")
        if not self.s > 0:
            raise ValueError(f"box side must be positive, got {self.s}")

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the object's square box, fractions of W."""
        h = self.s / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    """A background word and the objects drawn on it, in drawing order."""

    background: str
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {', '.join(BACKGROUNDS)}")
        object.__setattr__(self, "objects", tuple(self.objects))
