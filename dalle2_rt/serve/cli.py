"""``dalle2-rt serve`` / ``python -m dalle2_rt.serve``: load the engines, then serve the HTTP API with uvicorn.

A user mistake (a bad flag, a missing engine folder, a port in use, the serve extra not installed) is one line,
``dalle2-rt serve: error: …``, and a non-zero exit. SIGTERM (or Ctrl-C) drains: /readyz turns 503 at once and new
work is refused with 503 for ``--drain-grace`` seconds while the listener stays open (a load balancer sees the
503 and stops sending), then the listening socket closes, every request already accepted is answered and the
process exits. A second signal skips the grace. A request the HTTP parser cannot read is answered with the API's
one-line JSON error (400), not the server library's plain text.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading

from ..runtime.backends import BACKENDS

PROG = "dalle2-rt serve"

EPILOG = """\
examples:
  dalle2-rt serve                                     # http://127.0.0.1:8000  (page at /, API docs at /docs)
  dalle2-rt serve --host 0.0.0.0 --port 8080 --threads 2 --max-batch 8 --batch-window-ms 10
  dalle2-rt serve --workers 2 --max-batch 2          # 2 passes at once, 1 thread each: more images/s on 2 cores
  dalle2-rt serve --ray --replicas 2                  # Ray Serve (pip install 'dalle2-rt[ray]')
  curl -s 127.0.0.1:8000/v1/images -H 'content-type: application/json' \\
       -d '{"prompt": "a red circle", "n": 2, "seed": 7}'

--host defaults to 127.0.0.1: the API has no authentication, so expose it on purpose (behind a proxy)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1e6:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1e6, got {text}")
    return value


DRAIN_GRACE_S = 2.0


def build_parser() -> argparse.ArgumentParser:
    from ..cli import _typed, check_threads  # the CLI's own --threads check and argparse type
    from .service import Limits

    d = Limits()
    p = _Parser(prog=PROG, description="Serve the unCLIP engines over HTTP (JSON API, web page, metrics).",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_int_at_least(0), default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--engines", metavar="DIR", help="engine folder (default: $DALLE2_RT_ENGINES, else a clone's "
                                                    "engines/shapes-v2, else the package's; dalle2-rt info)")
    p.add_argument("--backend", default="onnxruntime", choices=list(BACKENDS),
                   help="graph backend (default onnxruntime; triton needs --url)")
    p.add_argument("--url", metavar="URL", help="the Triton server for --backend triton: http://HOST:PORT or grpc://HOST:PORT")
    p.add_argument("--threads", type=_typed(check_threads), metavar="N",
                   help="CPU threads per graph, at most 4 × the cores (default: one per core, shared among the "
                        "--workers)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp32", action="store_true",
                           help="run the fp32 graphs only (default: a graph's int8 variant on the CPU where the "
                                "folder has one and the CPU has int8 dot products: AMX, VNNI or Arm dot product)")
    precision.add_argument("--int8", action="store_true",
                           help="run the folder's int8 variants even on a CPU without int8 dot products")
    p.add_argument("--workers", type=_int_at_least(1), default=1, metavar="N",
                   help="passes through the stages that run at once, each on cores/N threads (default 1: the "
                        "lowest latency; 2 on a 2-core CPU: 1.1-1.3x the images/s under load, bench/RESULTS.md F1)")
    p.add_argument("--max-batch", type=_int_at_least(1), default=d.max_batch, metavar="N",
                   help=f"images per pass through the stages, across requests (default {d.max_batch})")
    p.add_argument("--batch-window-ms", type=_seconds, default=d.batch_window_s * 1000, metavar="MS",
                   help=f"how long a request waits for others to share its pass (default {d.batch_window_s * 1000:g})")
    p.add_argument("--max-queue", type=_int_at_least(1), default=d.max_queue, metavar="N",
                   help=f"images queued or running before new requests get 429 (default {d.max_queue})")
    p.add_argument("--max-images", type=_int_at_least(1), default=d.max_images, metavar="N",
                   help=f"images per request, prompts × n (default {d.max_images}; at most 64)")
    p.add_argument("--timeout", type=_seconds, default=d.timeout_s, metavar="S",
                   help=f"per-request time limit, queueing included; 504 after it (default {d.timeout_s:g})")
    p.add_argument("--max-requests", type=_int_at_least(1), default=d.max_requests, metavar="N",
                   help=f"requests in progress at once; beyond it 503 (default {d.max_requests}; /healthz, "
                        "/readyz and /metrics always answer)")
    p.add_argument("--max-connections", type=_int_at_least(1), default=1024, metavar="N",
                   help="open connections at once, idle ones included; beyond it new ones get 503 (default 1024)")
    p.add_argument("--header-timeout", type=_seconds, default=d.header_timeout_s, metavar="S",
                   help=f"a connection that has not sent a whole request head within S seconds is answered 408 "
                        f"and closed (default {d.header_timeout_s:g}: idle and slow-header clients hold nothing)")
    p.add_argument("--drain-grace", type=_seconds, default=DRAIN_GRACE_S, metavar="S",
                   help=f"after SIGTERM, how long /readyz and new requests answer 503 before the listener closes "
                        f"(default {DRAIN_GRACE_S:g}; 0 closes at once)")
    p.add_argument("--ray", action="store_true", help="run on Ray Serve instead (see --replicas)")
    p.add_argument("--replicas", type=_int_at_least(1), default=1, metavar="N", help="Ray Serve replicas (with --ray)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"{PROG}: error: {' '.join(str(message).split())}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_images > 64:
        return _fail("--max-images is at most 64 (the pipeline's limit per prompt)", 2)
    if args.max_images > args.max_queue:
        return _fail(f"--max-images {args.max_images} exceeds --max-queue {args.max_queue}: such requests could "
                     "never be queued", 2)
    if args.timeout <= 0:
        return _fail("--timeout must be > 0 seconds", 2)
    if args.replicas > 1 and not args.ray:
        return _fail("--replicas needs --ray (one process serves one pipeline)", 2)
    if args.workers > 1 and args.ray:
        return _fail("--workers is for one process; with --ray, scale with --replicas", 2)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        return _fail(f"the serve extra is not installed ({e.name} is missing): pip install 'dalle2-rt[serve]'")
    from ..runtime.errors import Dalle2RTError
    from .service import Limits

    if args.header_timeout <= 0:
        return _fail("--header-timeout must be > 0 seconds", 2)
    limits = Limits(max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000, max_queue=args.max_queue,
                    max_images=args.max_images, timeout_s=args.timeout, max_requests=args.max_requests,
                    header_timeout_s=args.header_timeout)
    if args.ray:
        from .ray_app import run_ray

        return run_ray(args, limits)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        return _fail(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})")
    from .. import Pipeline
    from ..cli import int8_option
    from .app import create_app
    from .service import Service

    threads = args.threads
    if threads is None and args.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    try:  # the process is ours: one shared onnxruntime thread pool, as the CLI does
        pipe = Pipeline.load(args.engines, backend=args.backend, threads=threads,
                             shared_threads=args.backend == "onnxruntime", url=args.url,
                             int8=int8_option(args))
    except Dalle2RTError as e:
        sock.close()
        return _fail(str(e))
    service = Service(pipe, limits, workers=args.workers)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # limit_concurrency caps connections (503 beyond); an idle keep-alive connection is closed after 5 s
    config = uvicorn.Config(create_app(service), log_level=args.log_level, limit_concurrency=args.max_connections,
                            timeout_keep_alive=5, timeout_graceful_shutdown=int(limits.timeout_s) + 5,
                            http=guarded_protocol(limits.header_timeout_s))
    server = draining_server(config, service, grace_s=args.drain_grace)
    host, port = sock.getsockname()[:2]
    sock.listen(2048)  # uvicorn's backlog; once the engines are loaded, before "listening on" is printed
    print(f"{PROG}: listening on http://{host if ':' not in host else f'[{host}]'}:{port} "
          f"(engines {pipe.manifest.name}, up to {limits.max_batch} images a pass, "
          f"{args.workers} pass{'es' if args.workers > 1 else ''} at once)", flush=True)
    server.run(sockets=[sock])
    return 0


def draining_server(config, service, *, grace_s: float = 0.0):
    """uvicorn's Server, telling the service to drain when a stop signal arrives: /readyz and new work answer
    503 at once; the listener closes ``grace_s`` later (at once on a second signal), then accepted requests are
    answered and the process exits."""
    import uvicorn

    class Server(uvicorn.Server):
        timer: threading.Timer | None = None

        def handle_exit(self, sig, frame):
            first = not service.draining
            service.draining = True
            if not first or grace_s <= 0:
                if self.timer is not None:  # a second signal: no grace left to wait for
                    self.timer.cancel()
                return super().handle_exit(sig, frame)
            logging.getLogger("dalle2_rt.serve").info("draining: listener closes in %g s", grace_s)

            def close():
                if not self.should_exit:  # a second signal already began the shutdown: never force it
                    uvicorn.Server.handle_exit(self, sig, frame)

            self.timer = threading.Timer(grace_s, close)
            self.timer.daemon = True
            self.timer.start()

    return Server(config)


def _json_reply(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def guarded_protocol(header_timeout_s: float):
    """uvicorn's HTTP protocol class (httptools or h11, as uvicorn picks) with two guards: a request its parser
    cannot read is answered with the API's ``{"error": …}`` line instead of plain text, and a connection that
    has not sent a whole request head within ``header_timeout_s`` of opening (an idle socket, headers trickled a
    byte at a time) is answered 408 and closed, so such clients cannot hold connections. (After a first request
    uvicorn's keep-alive timeout closes an idle connection.)"""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Guarded(AutoHTTPProtocol):
        header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.header_timer = self.loop.call_later(header_timeout_s, self._no_request_head)

        def _no_request_head(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.write(_json_reply("408 Request Timeout", f"no request head within "
                                                                        f"{header_timeout_s:g} s"))
                self.transport.close()

        def connection_lost(self, exc) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self.transport.write(_json_reply("400 Bad Request", "the request is not valid HTTP/1.1"))
            self.transport.close()

    return Guarded
