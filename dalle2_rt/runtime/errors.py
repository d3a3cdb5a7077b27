"""The runtime's exceptions: every failure a user can cause or meet has its own class and a one-line message.

The CLI prints ``str(error)`` of any ``Dalle2RTError`` as ``dalle2-rt: error: <message>`` and exits non-zero;
anything else escaping is a bug and keeps its traceback. Messages name the thing to fix (the file, the
argument, the stage and step), so they must stand on one line without context.
"""
from __future__ import annotations


class Dalle2RTError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class InputError(Dalle2RTError, ValueError):
    """A bad argument: empty prompt, num_images out of range, unknown sampler, negative guidance, ..."""


class EngineFolderError(Dalle2RTError):
    """The engine folder is missing, unreadable, of another schema, or a file in it is corrupt."""


class HashMismatchError(EngineFolderError):
    """A file's sha256 differs from the manifest's; ``path`` is the offending file."""

    def __init__(self, path, expected: str, actual: str):
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(
            f"{path}: sha256 {actual[:16]}… does not match the manifest's {expected[:16]}… "
            "(corrupt or modified file; re-export the engine folder)"
        )


class BackendUnavailableError(Dalle2RTError):
    """The requested backend cannot run here (missing package, no GPU, engine built for another GPU)."""


class NonFiniteError(Dalle2RTError, FloatingPointError):
    """A stage produced NaN or inf; raised instead of writing a black or garbage image."""

    def __init__(self, stage: str, output: str, step: int | None = None, total: int | None = None,
                 timestep: int | None = None):
        self.stage, self.output, self.step, self.total, self.timestep = stage, output, step, total, timestep
        where = f"stage {stage!r}"
        if step is not None:
            where += f" at step {step}/{total}" + (f" (t={timestep})" if timestep is not None else "")
        super().__init__(f"{where}: output {output!r} contains NaN or inf; stopping (no image written)")


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder's context; the tail was dropped."""
