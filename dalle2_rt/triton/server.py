"""Start a ``tritonserver`` on loopback over a model repository: free ports, bounded waits, clean shutdown.

    with LocalServer("out/triton-repo") as server:      # pytriton's bundled tritonserver (Python backend only)
        pipe = Pipeline.load(engines, backend="triton", url=server.url)

    python -m dalle2_rt.triton.server REPO                       # serve until Ctrl-C, print the URLs
    python -m dalle2_rt.triton.server REPO --demo "a red circle" -o out/   # one image through the orchestrator

The binary. ``nvidia-pytriton`` 0.7.0's wheel (installed in the stub's environment below) bundles
``tritonserver`` 2.51 with the Python backend only (no onnxruntime or TensorRT backend), plus a Python-backend
stub per Python version. Like pytriton, this
module copies ``backends/python`` to a private folder with the stub of the stub's Python put in it, and runs
the binary with ``LD_LIBRARY_PATH`` = pytriton's bundled libraries + that Python's ``LIBDIR`` (without the
latter the stub does not find libpython and fails with ``RLock._recursion_count`` on Python 3.11.7).
Any other ``tritonserver`` (an NGC container's, with the onnxruntime and TensorRT backends) can be given
as ``binary=`` / ``--binary``; ``backends=`` then names its backend folder.

The stub's Python. The stub embeds the interpreter found first on ``PATH`` and imports that environment's
packages. tritonserver 2.51's stub reads numpy arrays with numpy 1.x's memory layout: under numpy 2 an
output tensor comes back empty (0 bytes) and the next request crashes the stub. So the Python-backend models
run in a separate environment with ``numpy<2`` (``make triton-env`` makes ``.venv/triton-env``: numpy 1.26,
nvidia-pytriton, onnxruntime, pillow, regex, ftfy), chosen by ``python=``, ``$DALLE2_RT_TRITON_PYTHON``, or
that folder. (pytriton itself pins numpy<2, which is why it is not in the ``triton`` extra: that extra is
the client side, tritonclient, and keeps the main environment's numpy.)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TRITON_ENV = REPO_ROOT / ".venv" / "triton-env"
STARTUP_TIMEOUT = 180.0  # seconds: every Python-backend model starts a stub process and imports numpy + ORT
EXIT_TIMEOUT = 5  # seconds tritonserver waits for in-flight requests (and open client connections) on SIGTERM
STOP_TIMEOUT = 30.0  # then SIGKILL


class ServerError(RuntimeError):
    """The server could not be started (or died); the message carries the end of its log."""


def pytriton_dist(facts: dict | None = None) -> tuple[Path, Path]:
    """(pytriton's ``tritonserver`` folder, its bundled shared libraries), without importing pytriton: from the
    stub's environment (``facts`` of ``python_facts``) where it is installed, else from this interpreter's."""
    where = (facts or {}).get("pytriton")
    if where is None:
        spec = importlib.util.find_spec("pytriton")
        if spec is not None and spec.submodule_search_locations:
            where = list(spec.submodule_search_locations)[0]
    if where is None:
        raise ServerError("no tritonserver: `make triton-env` installs nvidia-pytriton (whose wheel bundles one) in "
                          ".venv/triton-env; or pass binary=")
    root = Path(where)
    return root / "tritonserver", root.parent / "nvidia_pytriton.libs"


def stub_python(python: str | os.PathLike | None = None) -> Path:
    """The interpreter whose environment the Python-backend models run in (see the module docstring)."""
    chosen = python or os.environ.get("DALLE2_RT_TRITON_PYTHON")
    if chosen:
        return Path(chosen)
    local = TRITON_ENV / "bin" / "python"
    return local if local.exists() else Path(sys.executable)


def python_facts(python: Path) -> dict:
    """{"version": "3.11", "libdir": ..., "numpy": "1.26.4" or None, "pytriton": its package folder or None}."""
    code = ("import importlib.util, json, sys, sysconfig\n"
            "try:\n import numpy; np = numpy.__version__\nexcept ImportError:\n np = None\n"
            "spec = importlib.util.find_spec('pytriton')\n"
            "pt = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None\n"
            "print(json.dumps({'version': '%d.%d' % sys.version_info[:2], "
            "'libdir': sysconfig.get_config_var('LIBDIR'), 'numpy': np, 'pytriton': pt}))")
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise ServerError(f"cannot run the stub's Python {python}: {e}") from None
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free now: all ``n`` are bound at once before any is released (one socket
    at a time, the system may hand out the same port twice)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            sockets.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sockets[-1].bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


class LocalServer:
    """One ``tritonserver`` process on 127.0.0.1 over ``repository``; a context manager.

    ``url`` (HTTP, ``http://127.0.0.1:PORT``) and ``grpc_url`` (``grpc://127.0.0.1:PORT``) are set once
    ``start`` returns, which is when every model of the repository is ready (``/v2/health/ready``).
    """

    def __init__(self, repository: str | os.PathLike, *, binary: str | os.PathLike | None = None,
                 backends: str | os.PathLike | None = None, python: str | os.PathLike | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT, log_verbose: int = 0):
        self.repository = Path(repository).resolve()
        if not (self.repository.is_dir() and any(self.repository.iterdir())):
            raise ServerError(f"{self.repository} is not a model repository (write one with python -m export.triton)")
        self.binary, self.backends = binary, backends
        self.python = stub_python(python)
        self.startup_timeout, self.log_verbose = startup_timeout, log_verbose
        self.process: subprocess.Popen | None = None
        self.url = self.grpc_url = None
        self._work: Path | None = None

    # ------------------------------------------------------------------------------------------------
    def _prepare(self) -> tuple[Path, Path, dict]:
        """(binary, backend folder, environment) for the server process."""
        facts = python_facts(self.python)
        if facts["numpy"] is None:
            raise ServerError(f"{self.python} has no numpy; the Python backend needs numpy<2 there (make triton-env)")
        if int(facts["numpy"].split(".")[0]) >= 2:
            raise ServerError(f"{self.python} has numpy {facts['numpy']}; tritonserver 2.51's Python-backend stub "
                              "needs numpy<2 (outputs come back empty under numpy 2). Run `make triton-env` or set "
                              "DALLE2_RT_TRITON_PYTHON to an interpreter with numpy 1.x")
        env = dict(os.environ)
        env["PATH"] = f"{self.python.parent}{os.pathsep}{env.get('PATH', '')}"
        libs = [facts["libdir"]] if facts["libdir"] else []
        if self.binary is not None:
            backends = Path(self.backends) if self.backends else Path("/opt/tritonserver/backends")
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
            return Path(self.binary), backends, env
        dist, bundled = pytriton_dist(facts)
        stub = dist / "python_backend_stubs" / facts["version"] / "triton_python_backend_stub"
        if not stub.exists():
            raise ServerError(f"pytriton has no Python-backend stub for Python {facts['version']} ({stub})")
        backends = self._work / "backends"
        shutil.copytree(dist / "backends" / "python", backends / "python",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(bundled), *libs, env.get("LD_LIBRARY_PATH", "")]).strip(
            os.pathsep)
        return dist / "bin" / "tritonserver", backends, env

    def start(self) -> LocalServer:
        if self.process is not None:
            return self
        self._work = Path(tempfile.mkdtemp(prefix="dalle2-rt-triton-"))
        try:
            binary, backends, env = self._prepare()
            http, grpc, metrics = free_ports(3)
            cmd = [str(binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                   "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", f"--http-port={http}",
                   f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--allow-metrics=false",
                   "--exit-on-error=true", "--strict-readiness=true", f"--exit-timeout-secs={EXIT_TIMEOUT}",
                   f"--log-verbose={self.log_verbose}"]
            self.log_path = self._work / "tritonserver.log"
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                cwd=self._work, start_new_session=True)
            self.url, self.grpc_url = f"http://127.0.0.1:{http}", f"grpc://127.0.0.1:{grpc}"
            self._wait_ready(http)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.process.returncode} while starting:\n"
                                  f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        """The server's error lines (glog ``E`` lines: a model that failed to load says why there), then the
        last ``lines`` lines of its log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except (OSError, AttributeError):
            return "(no log)"
        errors = [line for line in text if line.startswith("E") or "| UNAVAILABLE" in line]
        return "\n".join([*errors[-20:], "...", *text[-lines:]])

    def stop(self) -> None:
        """SIGTERM to the server (it unloads the models and stops their stubs), SIGKILL to its process group
        after ``STOP_TIMEOUT``; the private folder is removed."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the session start_new_session gave it: the server + stubs
                proc.wait(timeout=10)
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------------
# python -m dalle2_rt.triton.server


def demo(url: str, prompt: str, out: Path, seed: int, model: str = "unclip") -> list[Path]:
    """One request to the orchestrator over HTTP; the images written as PNGs with their metadata."""
    import numpy as np
    import tritonclient.http as httpclient
    from PIL import Image, PngImagePlugin

    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=600.0)
    inputs = []
    for name, value, dtype in (("prompt", np.array([prompt.encode()], dtype=object), "BYTES"),
                               ("seed", np.array([seed], np.uint64), "UINT64")):
        tensor = httpclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput(n) for n in ("images", "metadata")])
    images, meta = result.as_numpy("images"), result.as_numpy("metadata")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, (pixels, info) in enumerate(zip(images, meta)):
        info = json.loads(info)
        png = PngImagePlugin.PngInfo()
        for k, v in info.items():
            png.add_text(k, str(v))
        path = out / f"triton-s{seed}-{j}.png"
        Image.fromarray(pixels).save(path, pnginfo=png)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dalle2_rt.triton.server",
                                description="Run tritonserver on loopback over a model repository written by "
                                            "python -m export.triton.")
    p.add_argument("repository")
    p.add_argument("--binary", help="a tritonserver binary (default: the one bundled with nvidia-pytriton)")
    p.add_argument("--backends", help="its backend folder (with --binary; default /opt/tritonserver/backends)")
    p.add_argument("--python", help="interpreter of the Python-backend models (numpy<2; default .venv/triton-env)")
    p.add_argument("--demo", metavar="PROMPT", help="generate one image through the orchestrator, then stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output-dir", default="out", help="where --demo writes its PNG (default: out)")
    args = p.parse_args(argv)
    try:
        with LocalServer(args.repository, binary=args.binary, backends=args.backends, python=args.python) as server:
            print(f"tritonserver ready: {server.url} (HTTP), {server.grpc_url} (gRPC)", file=sys.stderr, flush=True)
            if args.demo:
                started = time.perf_counter()
                for path in demo(server.url, args.demo, Path(args.output_dir), args.seed):
                    print(path, flush=True)
                print(f"one request to the orchestrator: {time.perf_counter() - started:.2f} s", file=sys.stderr)
                return 0
            try:
                while server.process.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                return 0
            print(f"tritonserver exited:\n{server.log_tail()}", file=sys.stderr)
            return 1
    except ServerError as e:
        print(f"triton: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
