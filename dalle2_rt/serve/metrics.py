"""Prometheus metrics of one service, on a registry of its own (several services may live in one process).

    dalle2rt_requests_total{endpoint, code}      answered requests
    dalle2rt_request_seconds{endpoint}           request latency, queueing included
    dalle2rt_images_total                        images delivered
    dalle2rt_rejected_total{reason}              queue_full | timeout | cancelled (client gone) | draining
    dalle2rt_queue_images / _queue_requests      waiting now (gauges)
    dalle2rt_batch_images / _batch_requests      images and requests per pass through the stages
    dalle2rt_stage_seconds{stage}                time of each stage in a pass (text_encoder, prior, decoder, sr0, …)
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_SIZES = (1, 2, 4, 8, 16, 32, 64)
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dalle2rt_requests", "Answered requests", ["endpoint", "code"], registry=r)
        self.request_seconds = Histogram("dalle2rt_request_seconds", "Request latency, queueing included",
                                         ["endpoint"], buckets=_SECONDS, registry=r)
        self.images = Counter("dalle2rt_images", "Images delivered", registry=r)
        self.rejected = Counter("dalle2rt_rejected", "Requests refused or abandoned", ["reason"], registry=r)
        self.queue_images = Gauge("dalle2rt_queue_images", "Images waiting in the queue", registry=r)
        self.queue_requests = Gauge("dalle2rt_queue_requests", "Requests waiting in the queue", registry=r)
        self.batch_images = Histogram("dalle2rt_batch_images", "Images per pass", buckets=_SIZES, registry=r)
        self.batch_requests = Histogram("dalle2rt_batch_requests", "Requests per pass", buckets=_SIZES, registry=r)
        self.stage_seconds = Histogram("dalle2rt_stage_seconds", "Time of a stage in one pass", ["stage"],
                                       buckets=_SECONDS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
