"""An abusive-client load test of ``dalle2-rt serve``: do good requests still succeed among hostile clients?

    python -m bench.abuse                                      # the engine folder serve finds by itself, 60 s
    python -m bench.abuse --engines DIR --duration 20 --json out/abuse.json
    python -m bench.abuse --max-connections 64 --idle 100 --serve-args "--workers 2"

Starts ``dalle2-rt serve`` on 127.0.0.1 (a free port), then for --duration seconds runs side by side:

  good        --good closed-loop clients sending small valid requests (--steps steps a stage); every answer
              must be a 200 whose PNG decodes
  slowloris   --slow connections sending their request headers one byte a second
  stall       --stall connections sending headers and 10 bytes of the 1,000 announced, then nothing
  idle        connections opened and left silent, up to --idle (default: the connection cap + 64)
  oversized   9 MiB announced and sent; chunked: 9 MiB sent chunked, no length announced
  bomb        a 49 KB PNG that decodes to 4096×4096 (48 MiB of RGB), uploaded to /v1/variations
  nested      JSON nested 100,000 deep;  many_keys: 20,000 unknown keys;  surrogate: a prompt with "\\ud800"
  garbage     bytes that are not HTTP

(the last seven from --hostile threads in turn, each on a fresh connection). Every 0.5 s it samples the server's
VmRSS and VmHWM from /proc/<pid>/status and the latency of GET /healthz on a fresh connection, as a load
balancer's probe sees it.
It prints, per kind, the cases tried and how each was answered (a status code; "closed": the server closed the
connection without an answer; "open": still unanswered when the run ended; "reset", "timeout", …), the good
requests that succeeded and failed, the peak RSS and /healthz p50/p99/max. Exit status 1 if a good request
failed or the server died. The server's log goes to --server-log.
"""
from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import select
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.5
PROMPTS = ["a red circle", "a blue square", "a green star", "a yellow cross"]


class Tally:
    """Per kind: cases tried and a count of each outcome (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def add(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.kinds[kind][outcome] += 1

    def table(self) -> dict[str, dict]:
        with self.lock:
            return {k: {"tried": sum(c.values()), "outcomes": dict(c.most_common())} for k, c in self.kinds.items()}


def status_line(sock: socket.socket) -> str:
    """The status code of the answer waiting on ``sock``, or "closed" when the server closes without one."""
    data = b""
    while b"\r\n" not in data and len(data) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            return "closed" if not data else f"partial {data[:20]!r}"
        data += chunk
    parts = data.split(b"\r\n", 1)[0].split()
    return parts[1].decode("ascii", "replace") if len(parts) > 1 and parts[0].startswith(b"HTTP/") else "not HTTP"


def exchange(addr, parts, timeout: float = 60.0) -> str:
    """Send ``parts`` on a fresh connection; the answer's status code, or what happened instead."""
    try:
        sock = socket.create_connection(addr, timeout=timeout)
    except OSError as e:
        return f"connect: {type(e).__name__}"
    with sock:
        try:
            for part in parts:
                sock.sendall(part)
        except OSError:  # the server answered early (413) and closed: its answer may still be readable
            pass
        try:
            return status_line(sock)
        except TimeoutError:
            return "timeout"
        except OSError as e:
            return "reset" if isinstance(e, ConnectionResetError) else type(e).__name__


def bomb_png(side: int = 4096) -> bytes:
    """A PNG of side × side black pixels: 49 KB of file at 4096, side² × 3 bytes once decoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def multipart(fields: dict[str, str], file: bytes) -> tuple[bytes, str]:
    boundary = "abuse" + os.urandom(8).hex()
    out = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
           for k, v in fields.items()]
    out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="bomb.png"\r\n'
               f"Content-Type: image/png\r\n\r\n".encode() + file + f"\r\n--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def head(path: str, length: int | None, kind: str = "application/json") -> bytes:
    """A POST's request line and headers: ``length`` announced, or the body chunked (None)."""
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n{size}\r\n\r\n".encode()


def post(path: str, body: bytes, kind: str = "application/json") -> bytes:
    return head(path, len(body), kind) + body


KINDS = ("oversized", "chunked", "bomb", "nested", "many_keys", "surrogate", "garbage")  # hostile_cases' kinds


def hostile_cases(steps: int) -> list[tuple[str, list[bytes]]]:
    """(kind, the bytes to send in parts) for the request-shaped abuse, each sent on its own connection."""
    mib = b"x" * 2**20
    chunk = b"%x\r\n" % len(mib) + mib + b"\r\n"
    form, form_type = multipart({"decoder_steps": str(steps), "sr_steps": str(steps)}, bomb_png())
    return [
        ("oversized", [head("/v1/images", 9 * len(mib)), *[mib] * 9]),
        ("chunked", [head("/v1/images", None), *[chunk] * 9, b"0\r\n\r\n"]),
        ("bomb", [post("/v1/variations", form, form_type)]),
        ("nested", [post("/v1/images", b"[" * 100_000 + b"]" * 100_000)]),
        ("many_keys", [post("/v1/images", json.dumps({"prompt": "a red circle", **{f"k{i}": 0 for i in
                                                                                  range(20_000)}}).encode())]),
        ("surrogate", [post("/v1/images", b'{"prompt": "a red circle \\ud800", "seed": 1}')]),
        ("garbage", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n"]),
    ]


class Held:
    """``count`` connections kept open by one thread: each started with ``opening`` bytes, then fed ``trickle``
    one byte a second (slowloris) or nothing; one the server answers or closes is counted and replaced by a new
    one (opened at ``rate`` a second), those left at the end are counted "open"."""

    def __init__(self, kind: str, addr, count: int, tally: Tally, opening: bytes = b"", trickle: bytes = b"",
                 rate: float = 100.0):
        self.kind, self.addr, self.count, self.tally = kind, addr, count, tally
        self.opening, self.trickle, self.rate = opening, trickle, rate
        self.socks: dict[socket.socket, int] = {}  # socket -> bytes of ``trickle`` sent

    def _open(self) -> None:
        try:
            sock = socket.create_connection(self.addr, timeout=5)
            sock.sendall(self.opening)
            sock.setblocking(False)
            self.socks[sock] = 0
        except OSError as e:
            self.tally.add(self.kind, f"connect: {type(e).__name__}")

    def run(self, stop: threading.Event) -> None:
        last_byte = time.monotonic()
        while not stop.is_set():
            started = time.monotonic()
            while len(self.socks) < self.count and time.monotonic() - started < 0.1 and not stop.is_set():
                self._open()
                time.sleep(1 / self.rate)
            poll = select.poll()  # not select.select: more than 1024 descriptors
            by_fd = {sock.fileno(): sock for sock in self.socks}
            for fd in by_fd:
                poll.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            if not by_fd:
                time.sleep(0.1)
            events = poll.poll(100) if by_fd else []
            for sock in (by_fd[fd] for fd, _ in events):
                try:
                    sock.setblocking(True)
                    sock.settimeout(2)
                    outcome = status_line(sock)
                except OSError as e:
                    outcome = "reset" if isinstance(e, ConnectionResetError) else type(e).__name__
                self.tally.add(self.kind, outcome)
                self.socks.pop(sock)
                sock.close()
            if self.trickle and time.monotonic() - last_byte >= 1.0:
                last_byte = time.monotonic()
                for sock, sent in list(self.socks.items()):
                    try:
                        if sock.send(self.trickle[sent:sent + 1]):  # nothing once the headers are all sent
                            self.socks[sock] = sent + 1
                    except OSError:
                        pass  # closed: select reports it
        for sock in self.socks:
            self.tally.add(self.kind, "open")
            sock.close()


def good_client(url: str, steps: int, tally: Tally, latencies: list, failures: list, stop: threading.Event,
                worker: int) -> None:
    import httpx
    from PIL import Image

    seed = worker * 1_000_000
    with httpx.Client(base_url=url, timeout=180) as client:
        while not stop.is_set():
            seed += 1
            body = {"prompt": PROMPTS[seed % len(PROMPTS)], "seed": seed, "prior_steps": steps,
                    "decoder_steps": steps, "sr_steps": steps}
            t = time.perf_counter()
            try:
                reply = client.post("/v1/images", json=body)
                outcome = str(reply.status_code)
                if reply.status_code == 200:
                    Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"]))).load()
                else:
                    failures.append(f"{reply.status_code} {reply.text[:120]!r}")
            except Exception as e:  # noqa: BLE001 - every failure of a good request is counted and named
                outcome = type(e).__name__
                failures.append(f"{outcome}: {str(e)[:120]}")
            if outcome == "200":
                latencies.append(time.perf_counter() - t)
            tally.add("good", outcome)


def hostile_client(addr, cases, tally: Tally, stop: threading.Event, offset: int) -> None:
    k = offset
    while not stop.is_set():
        kind, parts = cases[k % len(cases)]
        tally.add(kind, exchange(addr, parts))
        k += 1


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB ({} once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if k in ("VmRSS", "VmHWM")}


def every(period: float, stop: threading.Event, sample) -> None:
    """Call ``sample(t)`` (t: seconds since the start) every ``period`` seconds until ``stop``; a slow call delays
    only its own loop."""
    start = time.monotonic()
    while not stop.is_set():
        tick = time.monotonic()
        sample(round(tick - start, 2))
        stop.wait(max(0.0, period - (time.monotonic() - tick)))


def memory_sampler(pid: int, samples: list) -> Callable[[float], None]:
    return lambda t: samples.append({"t": t, **proc_status(pid)})


def health_prober(addr, probes: list) -> Callable[[float], None]:
    """GET /healthz on a fresh connection (what a load balancer's probe sees), from a raw socket: an HTTP
    client's own set-up (httpx builds an SSL context per call) would cost more than the answer."""
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"

    def probe(t):
        start = time.perf_counter()
        status = exchange(addr, [request], timeout=10)
        probes.append({"t": t, "ms": round((time.perf_counter() - start) * 1000, 2), "status": status})

    return probe


def start_server(args, log) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dalle2_rt.serve", "--host", "127.0.0.1", "--port", "0", "--log-level", "warning",
           "--max-connections", str(args.max_connections), *shlex.split(args.serve_args)]
    cmd += ["--engines", str(args.engines)] if args.engines else []
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line.strip()!r} (its log: {log.name})")
    return proc, line.split("listening on ")[1].split()[0]


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def summary(args, idle, ready, tally, latencies, failures, samples, probes, rss_before, died, log_name) -> dict:
    """Every figure of the run (and its samples), as --json writes them."""
    kinds = tally.table()
    health = [p["ms"] for p in probes if p["status"] == "200"]
    return {
        "engines": ready.get("engines"), "backend": ready.get("backend"), "limits": ready.get("limits"),
        "duration_s": args.duration, "good_clients": args.good, "steps": args.steps,
        "max_connections": args.max_connections, "idle_target": idle,
        "good": {"succeeded": kinds.get("good", {}).get("outcomes", {}).get("200", 0), "failed": len(failures),
                 "failures": dict(collections.Counter(failures).most_common()),
                 "p50_s": pct(latencies, 50), "p99_s": pct(latencies, 99)},
        "kinds": kinds,
        "rss_mb": {"start": rss_before / 1024, "peak_hwm": max([s.get("VmHWM", 0) for s in samples] + [0]) / 1024},
        "healthz_ms": {"probes": len(probes), "answered": len(health),
                       "failed": dict(collections.Counter(p["status"] for p in probes if p["status"] != "200")),
                       "p50": pct(health, 50), "p99": pct(health, 99), "max": max(health, default=float("nan"))},
        "server_died": died is not None, "server_exit": died, "server_log": log_name,
        "memory_samples": samples, "healthz_probes": probes,
    }


def report(f: dict, url: str, hostile_kinds: list[str]) -> None:
    print(f"dalle2-rt serve at {url}: engines {f['engines']} ({f['backend']}), {f['duration_s']:g} s, "
          f"--max-connections {f['max_connections']}, {f['good_clients']} good clients, {f['steps']} steps a stage")
    print("\n| kind | tried | answered |\n|---|---|---|")
    for kind in ["good", "slowloris", "stall", "idle", *hostile_kinds]:
        if kind in f["kinds"]:
            answers = ", ".join(f"{o} ×{n}" for o, n in f["kinds"][kind]["outcomes"].items())
            print(f"| {kind} | {f['kinds'][kind]['tried']} | {answers} |")
    g = f["good"]
    print(f"\ngood requests: {g['succeeded']} succeeded, {g['failed']} failed"
          + (f" (most often: {next(iter(g['failures']))})" if g["failures"] else "")
          + (f"; latency p50 {g['p50_s']:.2f} s, p99 {g['p99_s']:.2f} s" if g["succeeded"] else ""))
    print(f"server RSS: {f['rss_mb']['start']:.0f} MB at the start, peak (VmHWM) {f['rss_mb']['peak_hwm']:.0f} MB")
    h = f["healthz_ms"]
    print(f"/healthz every {SAMPLE_S:g} s: {h['answered']}/{h['probes']} answered 200, p50 {h['p50']:.1f} ms, "
          f"p99 {h['p99']:.1f} ms, max {h['max']:.1f} ms" + (f"; not 200: {h['failed']}" if h["failed"] else ""))
    if f["server_died"]:
        print(f"the server DIED during the run (exit status {f['server_exit']}); its log: {f['server_log']}")


def main(argv=None) -> int:
    import httpx

    from dalle2_rt.serve.cli import build_parser as serve_parser

    cap = serve_parser().get_default("max_connections")
    p = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    arg = p.add_argument
    arg("--engines", type=Path, metavar="DIR", help="engine folder (default: the one dalle2-rt serve finds itself)")
    arg("--duration", type=float, default=60.0, metavar="S", help="seconds of abuse (default 60)")
    arg("--good", type=int, default=2, metavar="N", help="good closed-loop clients (default 2)")
    arg("--steps", type=int, default=2, metavar="N",
        help="prior, decoder and SR steps of a good request and of a bomb's variation (default 2)")
    arg("--slow", type=int, default=32, metavar="N", help="slowloris connections (default 32)")
    arg("--stall", type=int, default=8, metavar="N", help="connections that stall their body (default 8)")
    arg("--idle", type=int, metavar="N", help=f"idle connections (default: --max-connections + 64 = {cap + 64})")
    arg("--hostile", type=int, default=2, metavar="N", help="threads sending the request-shaped abuse (default 2)")
    arg("--max-connections", type=int, default=cap, metavar="N", help=f"the server's cap (default {cap}, serve's)")
    arg("--skip", nargs="+", default=[], metavar="KIND", choices=KINDS,
        help="request-shaped kinds to leave out, to see what a figure comes from (e.g. --skip bomb)")
    arg("--serve-args", default="", metavar="FLAGS", help='more dalle2-rt serve flags, e.g. "--workers 2 --threads 1"')
    arg("--server-log", type=Path, metavar="PATH", help="the server's stderr (default: a temporary file)")
    arg("--json", type=Path, metavar="PATH", help="also write the figures (and every sample) here")
    args = p.parse_args(argv)
    idle = args.max_connections + 64 if args.idle is None else args.idle

    log = open(args.server_log, "w") if args.server_log else tempfile.NamedTemporaryFile(  # noqa: SIM115
        "w", prefix="abuse-serve-", suffix=".log", delete=False)
    proc, url = start_server(args, log)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    addr = (host, int(port))
    tally, stop, samples, probes = Tally(), threading.Event(), [], []
    latencies: list[float] = []
    failures: list[str] = []
    ready = httpx.get(f"{url}/readyz", timeout=30).json()
    rss_before = proc_status(proc.pid).get("VmRSS", 0)
    header = (b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n")
    threads = [threading.Thread(target=every, args=(SAMPLE_S, stop, memory_sampler(proc.pid, samples))),
               threading.Thread(target=every, args=(SAMPLE_S, stop, health_prober(addr, probes)))]
    threads += [threading.Thread(target=good_client, args=(url, args.steps, tally, latencies, failures, stop, w))
                for w in range(args.good)]
    held = [Held("slowloris", addr, args.slow, tally, trickle=header), Held("idle", addr, idle, tally),
            Held("stall", addr, args.stall, tally, opening=header + b'{"prompt":')]
    threads += [threading.Thread(target=h.run, args=(stop,)) for h in held]
    cases = [c for c in hostile_cases(args.steps) if c[0] not in args.skip]
    threads += [threading.Thread(target=hostile_client, args=(addr, cases, tally, stop, k), daemon=True)
                for k in range(args.hostile)]
    for t in threads:
        t.start()
    try:
        stop.wait(args.duration)
    except KeyboardInterrupt:
        pass
    stop.set()
    deadline = time.monotonic() + 200  # a good request in flight may take up to its 180 s timeout
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    died = proc.poll()
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()

    figures = summary(args, idle, ready, tally, latencies, failures, samples, probes, rss_before, died, log.name)
    report(figures, url, [c[0] for c in cases])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 1 if failures or died is not None or not figures["good"]["succeeded"] else 0


if __name__ == "__main__":
    sys.exit(main())
