"""Cold start and memory of the ``dalle2-rt`` CLI: a fresh process from exec to its first PNG on disk.

Each run starts ``dalle2-rt PROMPT --seed 0 -n N -o TMP -q`` (the console script of this venv) from a
small launcher that waits for it with ``os.wait4``, which returns that child's own resource usage:
``ru_maxrss`` is the CLI process's peak resident set (KiB on Linux). "Cold" is a new process with the
engine files in the page cache (the first run of the series warms the cache and is reported apart); it
includes the interpreter start, the imports, reading and hashing the engine folder, creating the ONNX
Runtime sessions and sampling.

Two more probes, each in a fresh child, split the cold start: imports / ``Pipeline.load`` / first image
(``PHASES``), and within the load, hashing every file uncached and each graph's session (``SESSIONS``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .sides import PROMPT
from .timing import REPO, median

CLI = Path(sys.executable).with_name("dalle2-rt")

PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
from dalle2_rt.runtime.pipeline import Pipeline
t1 = time.perf_counter()
pipe = Pipeline.load(sys.argv[1], threads=int(sys.argv[2]) if sys.argv[2] != "0" else None, shared_threads=True)
t2 = time.perf_counter()
pipe(sys.argv[3], seed=0)[0].save(sys.argv[4])
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_image": t3 - t2}))
"""


SESSIONS = r"""
import json, sys, time
from dalle2_rt.runtime.backends import BackendOptions, open_backend
from dalle2_rt.runtime.manifest import load_manifest, verify_files
t0 = time.perf_counter()
m = load_manifest(sys.argv[1])
verify_files(m, use_cache=False)
t1 = time.perf_counter()
backend = open_backend("onnxruntime", m, BackendOptions(threads=int(sys.argv[2]) if sys.argv[2] != "0" else None))
out = {"sha256_all_files": t1 - t0, "sessions": {}}
for g in m.graphs:
    t = time.perf_counter()
    backend.engine(g)
    out["sessions"][g] = time.perf_counter() - t
print(json.dumps(out))
"""


# Peak RSS needs care: Linux keeps the high-water mark of the pre-exec image in a child's ru_maxrss, so a
# child forked straight from this (large) bench process would report this process's size. A tiny launcher
# process forks and execs the CLI instead and reports the CLI's own wait4 usage.
LAUNCHER = r"""
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"seconds": time.perf_counter() - t0, "code": os.waitstatus_to_exitcode(status),
                  "max_rss_kib": usage.ru_maxrss}))
"""


def run_cli(engines: Path, n: int = 1, threads: int | None = None, out_dir: Path | None = None) -> dict:
    """One CLI run: {"seconds" (fork+exec to exit, the PNGs written), "max_rss_mb", "pngs"}."""
    tmp = Path(out_dir or tempfile.mkdtemp(prefix="bench-cli-"))
    argv = [str(CLI), PROMPT, "--seed", "0", "-n", str(n), "-o", str(tmp), "-q", "--engines", str(engines)]
    if threads:
        argv += ["--threads", str(threads)]
    res = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True, cwd=REPO)
    pngs = sorted(tmp.glob("*.png"))
    try:
        info = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = {"code": res.returncode}
    if info.get("code") != 0 or len(pngs) != n:
        raise RuntimeError(f"dalle2-rt failed ({info.get('code')}, {len(pngs)} PNGs): {res.stderr.strip()[-500:]}")
    if out_dir is None:
        shutil.rmtree(tmp)
    return {"seconds": info["seconds"], "max_rss_mb": info["max_rss_kib"] / 1024, "pngs": len(pngs)}


def phases(engines: Path, threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, "-c", PHASES, str(engines), str(threads or 0), PROMPT,
                              os.path.join(tmp, "x.png")], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(res.stdout.strip().splitlines()[-1])


def load_breakdown(engines: Path, threads: int | None = None) -> dict:
    """In a fresh process: hashing every engine file (no cache) and creating each graph's session."""
    res = subprocess.run([sys.executable, "-c", SESSIONS, str(engines), str(threads or 0)], capture_output=True,
                         text=True, check=True, cwd=REPO)
    return json.loads(res.stdout.strip().splitlines()[-1])


def python_start() -> float:
    """Seconds to start and exit a bare interpreter of this venv (the floor of any CLI)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


def measure(engines: Path, repeats: int = 3, threads: int | None = None, counts=(1, 8), log=print) -> dict:
    first = run_cli(engines, 1, threads)  # warms the page cache; reported apart
    runs = [run_cli(engines, 1, threads) for _ in range(repeats)]
    out = {"first_run_s": first["seconds"], "cold_s": median([r["seconds"] for r in runs]),
           "cold_runs": [r["seconds"] for r in runs], "python_start_s": python_start(),
           "phases": phases(engines, threads), "load": load_breakdown(engines, threads), "max_rss_mb": {}}
    for n in counts:
        out["max_rss_mb"][n] = (runs[0] if n == 1 else run_cli(engines, n, threads))["max_rss_mb"]
    if log:
        log(f"  cold CLI → first PNG: {out['cold_s']:.2f} s (median of {repeats}; first {out['first_run_s']:.2f} s); "
            f"phases {json.dumps({k: round(v, 3) for k, v in out['phases'].items()})}; sessions "
            f"{json.dumps({k: round(v, 3) for k, v in out['load']['sessions'].items()})}, sha256 of all files "
            f"{out['load']['sha256_all_files']:.2f} s; peak RSS "
            + ", ".join(f"-n {n}: {v:.0f} MB" for n, v in out["max_rss_mb"].items()))
    return out
