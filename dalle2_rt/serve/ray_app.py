"""The same HTTP API on Ray Serve: replicas of the pipeline behind Ray's HTTP proxy, batched by ``@serve.batch``.

    serve run dalle2_rt.serve.ray_app:app                                # Ray's CLI, default engines, 1 replica
    serve run dalle2_rt.serve.ray_app:build engines=engines/shapes-v2 replicas=2 threads=1
    dalle2-rt serve --ray --replicas 2 --port 8000                       # the same, started by our CLI

Each replica loads the engine folder and serves ``app.create_app`` (every route, limit and error of the
single-process service) over a ``RayBatchedService``: requests that reach a replica within
``--batch-window-ms`` are grouped by Ray's ``@serve.batch`` (up to ``--max-batch`` images, counted by
``batch_size_fn``) and run as one pass per settings group (``batch.generate``). Ray's proxy spreads requests
over the replicas; adding nodes to the Ray cluster (``ray start --address=HEAD:6379`` on each) adds room for
replicas, no scheduler of our own.

What binds where: our CLI starts a local Ray instance with ``_node_ip_address="127.0.0.1"`` and no dashboard,
and Serve's HTTP proxy on ``--host`` (default 127.0.0.1). Ray itself still opens its internal ports (GCS,
raylet, object manager, metrics agent, workers); see the README ("Serving", Ray) for what it listens on and how
to restrict it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading

from ray import serve

from .. import Pipeline
from .app import create_app
from .service import Cancelled, Draining, Job, Limits, QueueFull, Service, settle

log = logging.getLogger("dalle2_rt.serve")


class RayBatchedService(Service):
    """``Service`` whose queue is Ray Serve's ``@serve.batch`` on the replica's event loop (no worker thread).

    ``submit`` bounds the images in flight (429 beyond ``max_queue``) and hands the job to ``_batched``; Ray
    calls that with the jobs gathered in the window, and each settings group runs as one pass in a thread.
    """

    def __init__(self, pipe, limits: Limits):
        super().__init__(pipe, limits, workers=0)
        self._in_flight = 0
        self._batched.set_max_batch_size(limits.max_batch)
        self._batched.set_batch_wait_timeout_s(limits.batch_window_s)

    def submit(self, job: Job) -> Job:
        if self.draining:
            raise Draining()
        if self._in_flight + job.size > self.limits.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise QueueFull(self._retry_after(self._in_flight))
        self._in_flight += job.size
        self.metrics.queue_images.set(self._in_flight)
        task = asyncio.get_running_loop().create_task(self._batched(job))

        def done(t: asyncio.Task, size=job.size):
            self._in_flight -= size
            self.metrics.queue_images.set(self._in_flight)
            if not t.cancelled() and t.exception() is not None:
                settle(job.future, error=t.exception())

        task.add_done_callback(done)
        return job

    def queued_images(self) -> int:
        return self._in_flight

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, batch_size_fn=lambda jobs: sum(j.size for j in jobs))
    async def _batched(self, jobs: list[Job]) -> list[None]:
        live = []
        for job in jobs:
            if job.cancelled.is_set():
                self.metrics.rejected.labels("cancelled").inc()
                settle(job.future, error=Cancelled())
            else:
                live.append(job)
        groups: dict[str, list[Job]] = {}
        for job in live:  # one pass per settings; variations one job a pass
            groups.setdefault(job.key if job.kind == "images" else str(id(job)), []).append(job)
        for group in groups.values():
            await asyncio.to_thread(self.run_pass, group)
        return [None] * len(jobs)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress()
class Dalle2RT:
    """One replica: the engine folder loaded, the HTTP API served over a ``RayBatchedService``."""

    def __init__(self, engines: str | None = None, threads: int | None = None, limits: dict | None = None,
                 int8: bool | None = None):
        pipe = Pipeline.load(engines, threads=threads, int8=int8)
        self.service = RayBatchedService(pipe, Limits(**(limits or {})))

    def __serve_build_asgi_app__(self):
        return create_app(self.service)


def build(args: dict):
    """``serve run dalle2_rt.serve.ray_app:build engines=DIR replicas=N threads=N max_batch=N fp32=1 …``
    (``fp32=1``: the fp32 graphs only; ``int8=1``: the folder's int8 variants even on a CPU without int8 dot
    products; neither: the CPU decides)"""
    known = {"engines", "replicas", "threads", "max_batch", "batch_window_ms", "max_queue", "max_images", "timeout",
             "fp32", "int8"}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; known: {sorted(known)}")
    limits = {}
    for key, field, kind in (("max_batch", "max_batch", int), ("max_queue", "max_queue", int),
                             ("max_images", "max_images", int), ("timeout", "timeout_s", float)):
        if key in args:
            limits[field] = kind(args[key])
    if "batch_window_ms" in args:
        limits["batch_window_s"] = float(args["batch_window_ms"]) / 1000
    threads = int(args["threads"]) if "threads" in args else None
    for flag in ("fp32", "int8"):
        if str(args.get(flag, "0")) not in ("0", "1"):
            raise ValueError(f"{flag} must be 0 or 1, got {args[flag]!r}")
    fp32, forced = str(args.get("fp32", "0")) == "1", str(args.get("int8", "0")) == "1"
    if fp32 and forced:
        raise ValueError("fp32=1 and int8=1 contradict each other; give one")
    int8 = False if fp32 else True if forced else None
    return Dalle2RT.options(num_replicas=int(args.get("replicas", 1))).bind(args.get("engines"), threads, limits, int8)


app = Dalle2RT.bind()  # serve run dalle2_rt.serve.ray_app:app


def start(engines, *, replicas: int, threads: int | None, limits: Limits, host: str, port: int,
          int8: bool | None = None):
    """A local Ray instance on loopback (unless $RAY_ADDRESS names a cluster) with the app deployed on it."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:  # Ray's own services on 127.0.0.1, no dashboard (see the module docstring for what still binds)
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    limits_dict = {f: getattr(limits, f) for f in ("max_batch", "batch_window_s", "max_queue", "max_images",
                                                    "timeout_s")}
    deployment = Dalle2RT.options(num_replicas=replicas).bind(str(engines) if engines else None, threads, limits_dict,
                                                              int8)
    serve.run(deployment, name="dalle2-rt", route_prefix="/", blocking=False)


def run_ray(args, limits: Limits) -> int:
    """``dalle2-rt serve --ray``: deploy, print the address, wait for SIGTERM / Ctrl-C, shut Serve and Ray down."""
    import ray

    from ..cli import int8_option

    try:
        start(args.engines, replicas=args.replicas, threads=args.threads, limits=limits, host=args.host,
              port=args.port or 8000, int8=int8_option(args))
    except Exception as e:  # noqa: BLE001 - Ray's errors (a replica that cannot load the engines, a port in use)
        sys.stderr.write(f"dalle2-rt serve: error: Ray Serve did not start: {' '.join(str(e).split())[:400]}\n")
        if ray.is_initialized():
            ray.shutdown()
        return 1
    print(f"dalle2-rt serve: listening on http://{args.host}:{args.port or 8000} (Ray Serve, {args.replicas} "
          f"replica{'s' if args.replicas > 1 else ''})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # replicas finish their in-flight requests (Serve's graceful_shutdown_timeout_s)
    ray.shutdown()
    return 0
