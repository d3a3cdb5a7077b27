"""The work queue behind the HTTP API: a bounded queue, one worker thread, cross-request batches.

Requests become ``Job`` s. The worker takes the oldest job, waits up to ``batch_window`` for more, and runs
every queued job with the same settings (up to ``max_batch`` images) as one pass through each stage
(``batch.generate``); the seed contract keeps each image what it would be alone. Variations, edits and
interpolations run one job at a time (each has its own uploaded images; not batched across requests): a
variation through ``Pipeline.variations``, an operation through the ``work`` its job carries.

One worker by default: the graphs already use every core (intra-op threads). ``workers=N`` runs N passes
side by side, each on its own thread (onnxruntime releases the GIL while a graph runs); give the pipeline
cores / N threads then. On small CPUs that is where throughput comes from: a batch costs about what its images
cost one by one (the U-Nets' activations outgrow the cache), but two 1-thread passes on 2 cores serve 1.1-1.3x
the images of one 2-thread pass under load (bench/RESULTS.md F1). The queue is bounded in images (``max_queue``):
``submit`` raises ``QueueFull`` with a retry hint instead of queueing work the service cannot finish in time.

Cancellation: a job cancelled while queued (its client left, its timeout passed) is dropped unrun; a running
pass (an operation's inversion and decoding too) stops at its next sampling step once every job in it is
cancelled (a pass shared with live requests runs on, and the cancelled job's images are discarded).
"""
from __future__ import annotations

import collections
import io
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from PIL import Image

from ..runtime.errors import Dalle2RTError
from ..runtime.images import png_info
from ..runtime.settings import VARIATION_OPTIONS
from .batch import Row, generate
from .metrics import Metrics

log = logging.getLogger("dalle2_rt.serve")


@dataclass(frozen=True)
class Limits:
    max_batch: int = 8  # images per pass through the stages
    batch_window_s: float = 0.010  # how long the oldest job waits for company
    max_queue: int = 64  # images queued or running; beyond it: 429
    max_images: int = 16  # images per request (prompts × n)
    max_prompts: int = 16  # prompts per request
    max_prompt_chars: int = 2000  # longer is refused; within it, > 77 tokens is truncated with a warning
    timeout_s: float = 120.0  # per request, queueing included: 504 after it
    max_body_bytes: int = 8 * 2**20  # request bodies (an uploaded image for variations)
    max_json_bytes: int = 256 * 2**10  # JSON bodies: 16 prompts of 2000 characters fit, 700,000 keys do not
    max_image_pixels: int = 4096 * 4096  # decoded size of an uploaded image
    body_timeout_s: float = 30.0  # a request body not received within it: 408 (slow clients hold no slot)
    header_timeout_s: float = 10.0  # a connection without a whole request head by then: 408 and closed
    max_requests: int = 256  # requests in progress at once; beyond it 503 (/healthz, /readyz, /metrics exempt)
    max_decodes: int = 2  # uploads decoded at once (each up to max_image_pixels × 4 bytes while it lasts)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"the queue is full; retry in {retry_after} s")


class Draining(Exception):
    def __init__(self):
        super().__init__("the service is shutting down; retry elsewhere or later")


class Cancelled(Exception):
    """The job's client went away or its time ran out before it finished."""


@dataclass
class Result:
    """One generated image: the PNG bytes (with the CLI's text metadata) and that metadata."""

    png: bytes
    info: dict[str, str]
    image: Image.Image


@dataclass(eq=False)
class Job:
    kind: str  # "images" | "variations" | "edits" | "interpolations"
    run: dict  # checked settings (Pipeline.settings)
    options: dict  # the request's sampling arguments as Pipeline takes them (None = the folder's default)
    seed: int
    n: int  # images per prompt
    prompts: list[str] = field(default_factory=list)  # images: prompt-major, n each
    source: Image.Image | None = None  # variations: the uploaded image
    source_name: str = ""
    # an operation (runtime/operations.py), unbatched: its images from a progress callback that stops it when cancelled
    work: Callable[[Callable], list[Image.Image]] | None = None
    listener: Callable[[dict], None] | None = None  # progress events, called on the worker thread
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> list[Row]:
        """One row per image, in Pipeline's order: [p0 image 0, …, p0 image n-1, p1 image 0, …]."""
        return [Row(p, self.seed, j) for p in self.prompts for j in range(self.n)]

    @property
    def size(self) -> int:
        return self.n * max(1, len(self.prompts))

    @property
    def key(self) -> str:
        """Jobs with equal keys may share a pass."""
        return json.dumps({"kind": self.kind, "run": self.run}, sort_keys=True)

    def cancel(self) -> None:
        self.cancelled.set()
        self.future.cancel()  # never marked running: succeeds unless a result is already set

    def notify(self, event: dict) -> None:
        if self.listener is not None and not self.cancelled.is_set():
            try:
                self.listener(event)
            except Exception:  # a listener's failure (a closed event loop) must not stop the pass
                log.debug("progress listener failed", exc_info=True)


def settle(fut: Future, *, result=None, error: BaseException | None = None) -> None:
    try:
        fut.set_exception(error) if error is not None else fut.set_result(result)
    except InvalidStateError:  # cancelled meanwhile
        pass


def encode_png(image: Image.Image, info: dict) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(info))
    return buf.getvalue()


class Service:
    """A loaded ``Pipeline`` behind a bounded queue and ``workers`` batching worker threads."""

    def __init__(self, pipe, limits: Limits | None = None, metrics: Metrics | None = None, *, workers: int = 1):
        """workers: passes that may run at once (threads sharing ``pipe``; each pass is one thread's); 0 starts no
        queue thread, for a subclass that feeds ``run_pass`` itself (ray_app.py: Ray's @serve.batch)."""
        if workers < 0:
            raise ValueError(f"workers must be >= 0, not {workers}")
        self.pipe, self.limits = pipe, limits or Limits()
        self.metrics = metrics or Metrics()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running = 0  # images in the passes now running
        self._stopping = False
        self.draining = False  # set on SIGTERM: /readyz says 503, new work is refused
        self._rate = 0.0  # images/s of one worker's recent passes (exponential average), for Retry-After
        self.workers = workers
        self._threads = [threading.Thread(target=self._loop, name=f"dalle2-rt-worker-{i}", daemon=True)
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    # ---------------------------------------------------------------- submitting

    def admit(self, size: int) -> None:
        """Raise ``Draining`` or ``QueueFull`` now if a job of ``size`` images could not be queued (checked again
        by ``submit``): an upload is not decoded for a request that would be refused."""
        with self._cond:
            self._admit(size)

    def _admit(self, size: int) -> None:
        if self._stopping or self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise Draining()
        waiting = self._waiting()
        if waiting + size > self.limits.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise QueueFull(self._retry_after(waiting))

    def submit(self, job: Job) -> Job:
        with self._cond:
            self._admit(job.size)
            self._queue.append(job)
            self._update_depth()
            self._cond.notify_all()
        return job

    def _retry_after(self, waiting: int) -> int:
        rate = (self._rate or 1.0) * max(1, self.workers)
        return max(1, min(60, math.ceil(waiting / rate)))

    def _waiting(self) -> int:
        """Images queued (not cancelled) or in the running passes."""
        return sum(j.size for j in self._queue if not j.cancelled.is_set()) + self._running

    def _update_depth(self) -> None:
        self.metrics.queue_images.set(sum(j.size for j in self._queue if not j.cancelled.is_set()))
        self.metrics.queue_requests.set(sum(not j.cancelled.is_set() for j in self._queue))

    def queued_images(self) -> int:
        """Images queued or running now (cancelled jobs not counted)."""
        with self._cond:
            return self._waiting()

    # ---------------------------------------------------------------- stopping

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the worker: after the queue is empty (drain) or at once, cancelling what is queued."""
        with self._cond:
            self._stopping = True
            if not drain:
                for job in self._queue:
                    job.cancel()
                self._queue.clear()
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # ---------------------------------------------------------------- the worker

    def _take(self) -> list[Job] | None:
        """The next pass's jobs (blocking), or None when stopping with nothing left."""
        with self._cond:
            while True:
                while self._queue and self._queue[0].cancelled.is_set():
                    self._drop(self._queue.popleft())
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                first = self._queue[0]
                shareable = first.kind == "images"
                deadline = first.enqueued + self.limits.batch_window_s
                while shareable and not self._stopping and not first.cancelled.is_set():
                    room = sum(j.size for j in self._queue if j.key == first.key and not j.cancelled.is_set())
                    left = deadline - time.monotonic()
                    if room >= self.limits.max_batch or left <= 0:
                        break
                    self._cond.wait(left)
                if first.cancelled.is_set() or not self._queue or self._queue[0] is not first:
                    continue  # dropped at the top, or another worker took it while this one waited; look again
                jobs, size = [], 0
                for job in list(self._queue):
                    if job.cancelled.is_set():
                        self._queue.remove(job)
                        self._drop(job)
                    elif not jobs or (shareable and job.key == first.key
                                      and size + job.size <= self.limits.max_batch):
                        self._queue.remove(job)
                        jobs.append(job)
                        size += job.size
                self._running += size
                self._update_depth()
                return jobs

    def _drop(self, job: Job) -> None:
        self.metrics.rejected.labels("cancelled").inc()
        settle(job.future, error=Cancelled())

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                self.run_pass(jobs)
            finally:
                with self._cond:
                    self._running -= sum(j.size for j in jobs)

    def run_pass(self, jobs: list[Job]) -> None:
        """Run jobs of one key as one pass and settle their futures (any error too: it never escapes)."""
        try:
            self._run(jobs)
        except Exception as e:  # noqa: BLE001 - settled into the jobs' futures, never kills the worker
            if not isinstance(e, Dalle2RTError | Cancelled):
                log.exception("pass failed")
            for job in jobs:
                settle(job.future, error=e)

    def _run(self, jobs: list[Job]) -> None:
        size = sum(j.size for j in jobs)
        self.metrics.batch_images.observe(size)
        self.metrics.batch_requests.observe(len(jobs))
        clock = {"stage": None, "t": time.perf_counter()}
        start = clock["t"]

        def progress(stage, step, total, x0=None):
            if all(j.cancelled.is_set() for j in jobs):
                raise Cancelled()
            now = time.perf_counter()
            if stage != clock["stage"]:
                clock["stage"], clock["since"] = stage, clock["t"]
            if step == total:  # a stage's last step: its time since the previous stage ended
                self.metrics.stage_seconds.labels(stage).observe(now - clock["since"])
            clock["t"] = now
            event = {"event": "progress", "stage": stage, "step": step, "total": total}
            for job in jobs:
                job.notify(event)

        head = jobs[0]
        if head.work is not None:  # an operation: inversion and decoding steps report through progress
            per_job = [head.work(progress)]
        elif head.kind == "variations":
            opts = {o.name: head.options.get(o.name) for o in VARIATION_OPTIONS}
            images = self.pipe.variations(head.source, num_images=head.n, seed=head.seed, callback=progress, **opts)
            for im in images:
                im.info["variation_of"] = head.source_name
            per_job = [images]
        else:
            images = generate(self.pipe, [r for j in jobs for r in j.rows], head.options, callback=progress)
            per_job, at = [], 0
            for job in jobs:
                per_job.append(images[at:at + job.size])
                at += job.size
        elapsed = time.perf_counter() - start
        if head.work is None:  # images per second of generation passes (Retry-After); an operation's cost differs
            self._rate = size / elapsed if not self._rate else 0.7 * self._rate + 0.3 * size / elapsed
        for job, images in zip(jobs, per_job):
            if job.cancelled.is_set():
                continue
            try:  # one job's metadata that PNG cannot carry fails that job alone, never its batch-mates
                results = [Result(encode_png(im, im.info), dict(im.info), im) for im in images]
            except Exception as e:  # noqa: BLE001 - settled into this job's future
                log.exception("encoding a PNG failed")
                settle(job.future, error=e)
                continue
            self.metrics.images.inc(len(results))
            settle(job.future, result=results)
