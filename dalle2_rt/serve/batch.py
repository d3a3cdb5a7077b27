"""One pass through every stage for the images of several requests: rows of (prompt, seed, index).

``Pipeline.__call__`` takes one seed for all its images, so requests with different seeds cannot share one of
its calls; ``Pipeline.generate`` takes one (prompt, seed, index) per image. The seed contract
(``dalle2_rt/runtime/noise.py``: image j of seed s draws all its noise from ``default_rng([s, j, stage])``
whatever batch it runs in) makes a served image equal ``Pipeline(prompt, seed=s, num_images > j)[j]`` pixel
for pixel, metadata included (tests/test_serve.py). The loop is the runtime's; nothing of it is repeated here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ..runtime.stage_runner import Callback


@dataclass(frozen=True)
class Row:
    """One image to make: its prompt, and the (seed, index) naming its noise."""

    prompt: str
    seed: int
    index: int


def generate(pipe, rows: Sequence[Row], options: dict, callback: Callback | None = None) -> list[Image.Image]:
    """The images of ``rows``, in order, all with the sampling ``options`` (Pipeline's keyword arguments; None =
    the folder's default). Image r equals ``pipe(rows[r].prompt, seed=rows[r].seed, num_images=rows[r].index +
    1, **options)[-1]``. ``callback(stage, step, total, x0)`` as ``Pipeline``'s."""
    return pipe.generate([r.prompt for r in rows], [r.seed for r in rows], [r.index for r in rows], **options,
                         callback=callback)
