"""Timing helpers and the side-by-side protocol: each contender runs warm in its own worker process.

A worker (``bench/worker.py`` in this venv, ``bench/dalle2_side.py`` in DALLE2-pytorch's) answers JSON
lines on stdin/stdout: it prints ``{"ready": true, "info": {...}}`` once built and warmed up, then for each
request ``{"op": "run", ...}`` one line ``{"seconds": s, ...}``, and exits on ``{"op": "quit"}`` or EOF.
Its stderr is passed through. Separate processes keep one contender's thread pools (OpenMP, ORT) from
spinning on the cores while the other one runs, and let each import only its own stack.

``alternate`` asks the workers in turn — A, B, A, B, … — so slow drifts of the machine (other load,
frequency) fall on both sides alike; the report takes each side's median and their ratio.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median(xs) -> float:
    return float(statistics.median(xs))


def spread(xs) -> dict:
    """{"median", "min", "max", "n"} of a list of seconds."""
    xs = list(xs)
    return {"median": median(xs), "min": float(min(xs)), "max": float(max(xs)), "n": len(xs)}


class Worker:
    """A contender in its own process, spoken to with JSON lines."""

    def __init__(self, name: str, argv: list[str], *, env: dict | None = None, timeout: float = 900):
        self.name = name
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True,
                                     cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                                     bufsize=1)
        first = self._read(timeout)
        if not first.get("ready"):
            raise RuntimeError(f"worker {name} did not start: {first}")
        self.info = first.get("info", {})

    def _read(self, timeout: float) -> dict:
        # The worker answers every request; a dead one gives EOF, which becomes an error naming it.
        t0 = time.monotonic()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                raise RuntimeError(f"worker {self.name} exited (code {code}) — see its stderr above")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
            print(f"[{self.name}] {line}", file=sys.stderr)  # a library printing to stdout
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"worker {self.name}: no answer in {timeout} s")

    def ask(self, request: dict, timeout: float = 900) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout)
        if "error" in answer:
            raise RuntimeError(f"worker {self.name}: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


SETTLE_S = 0.5  # idle pause before each run: the previous contender's worker threads stop spinning first
# (Intel OpenMP, which torch uses, spins idle threads for KMP_BLOCKTIME = 200 ms after a parallel region;
# ONNX Runtime's pools spin briefly too): without it, the run after a torch run shares the cores.


def alternate(workers: list[Worker], requests: dict[str, dict], rounds: int, *, log=None) -> dict[str, list[dict]]:
    """Ask each worker its request in turn, ``rounds`` times: A, B, A, B, …; returns every answer by name."""
    answers: dict[str, list[dict]] = {w.name: [] for w in workers}
    for r in range(rounds):
        for w in workers:
            time.sleep(SETTLE_S)
            a = w.ask({"op": "run", **requests[w.name]})
            answers[w.name].append(a)
            if log:
                log(f"    round {r + 1}/{rounds} {w.name}: {a['seconds']:.3f} s")
    return answers


def serve(build) -> None:
    """The worker side of the protocol: ``build() -> (run(request) -> dict, info[, {op: handler}])``; answer
    each request with ``run`` (or the handler of its ``op``) until quit/EOF.

    Output of libraries that print to stdout would corrupt the JSON stream, so stdout is re-pointed at
    stderr while the worker's own code runs and only our answers go to the real stdout.
    """
    out = sys.stdout
    sys.stdout = sys.stderr
    try:
        run, info, *extra = build()
        handlers = extra[0] if extra else {}
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        out.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
        raise
    out.write(json.dumps({"ready": True, "info": info}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        try:
            fn = handlers.get(request.get("op"), run)
            answer = fn(request)
        except Exception as e:  # noqa: BLE001
            answer = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
