"""A one-line progress bar for the pipeline callback (no tqdm in the runtime).

    bar = ProgressBar(sys.stderr)          # draws only when the stream is a terminal
    pipe(prompt, callback=bar); bar.close()

Each stage gets its own line, redrawn in place with ``\\r`` as its steps complete:
    decoder      [##########..........]  12/25
"""
from __future__ import annotations

import threading
import time


class ProgressBar:
    def __init__(self, stream, *, enabled: bool | None = None, width: int = 24, label: str = ""):
        self.stream, self.width, self.label = stream, width, label
        if enabled is None:
            isatty = getattr(stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._stage: str | None = None
        self._last = 0.0
        self._lock = threading.Lock()

    def __call__(self, stage: str, step: int, total: int, x0=None) -> None:
        if not self.enabled:
            return
        with self._lock:
            if stage != self._stage:
                if self._stage is not None:
                    self.stream.write("\n")
                self._stage = stage
            now = time.monotonic()
            if step < total and now - self._last < 0.05:  # at most 20 redraws a second
                return
            self._last = now
            done = self.width * step // max(total, 1)
            bar = "#" * done + "." * (self.width - done)
            prefix = f"{self.label} " if self.label else ""
            self.stream.write(f"\r{prefix}{stage:<13}[{bar}] {step:>4}/{total}")
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self.enabled and self._stage is not None:
                self.stream.write("\n")
                self.stream.flush()
            self._stage = None
