"""``dalle2-rt serve``: the HTTP API, cross-request batching, limits, cancellation and shutdown.

Servers bind 127.0.0.1 on a free port, every request has a timeout, and each server is shut down by its
fixture. The tiny random-weight engines (conftest) keep it fast; the bundled engines, where built, check that
a served image equals the CLI's file pixel for pixel.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'dalle2-rt[serve]')")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from dalle2_rt.runtime.pipeline import DEFAULT_ENGINES, Pipeline  # noqa: E402
from dalle2_rt.serve.app import create_app  # noqa: E402
from dalle2_rt.serve.batch import Row, generate  # noqa: E402
from dalle2_rt.serve.service import Job, Limits, Service  # noqa: E402

BUNDLED = Path(__file__).resolve().parents[1] / "engines" / DEFAULT_ENGINES
FAST = {"prior_steps": 2, "decoder_steps": 2, "sr_steps": 1}
TIMEOUT = httpx.Timeout(60.0)


class LocalServer:
    """The app on uvicorn in a thread of this process, on 127.0.0.1 and a free port."""

    def __init__(self, service: Service):
        self.service = service
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=TIMEOUT)
        self.gates: list[threading.Event] = []

    def close(self):
        for release in self.gates:  # a failed test may have left the worker held
            release.set()
        self.client.close()
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


def metric(service: Service, name: str, **labels) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


def gate(srv: LocalServer, pipe) -> threading.Event:
    """Occupy the worker with a job that waits for the returned event (its progress listener blocks)."""
    service = srv.service
    started, release = threading.Event(), threading.Event()
    srv.gates.append(release)

    def hold(event):
        started.set()
        release.wait(60)

    job = Job("images", pipe.settings(**FAST), FAST, 0, 1, prompts=["gate"], listener=hold)
    service.submit(job)
    assert started.wait(30)
    return release


def decode(item: dict) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    image.load()
    return image


def wait_for(condition, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def served(tiny_pipe):
    """A fresh service (own queue and metrics) and server per test, the same loaded pipeline."""
    made = []

    def make(workers=1, **limits):
        server = LocalServer(Service(tiny_pipe, Limits(**{"batch_window_s": 0.005, **limits}), workers=workers))
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


# ------------------------------------------------------------------------------------------------- batching


def test_a_mixed_batch_equals_each_image_made_alone(tiny_pipe):
    for settings in [FAST, {**FAST, "sampler": "ddpm", "candidates": 3, "decoder_guidance": 1.0},
                     {**FAST, "decoder_candidates": 2},
                     {**FAST, "sampler": "dpm++", "prior_guidance": 2.5}]:
        rows = [Row("a red circle", 3, 2), Row("a blue star", 2**63 + 7, 0), Row("a red circle", 3, 0)]
        rows += [Row("a green square", s, 1) for s in range(14)]  # 17 images: more than one graph batch
        got = generate(tiny_pipe, rows, settings)
        for row, image in zip(rows, got):
            alone = tiny_pipe(row.prompt, seed=row.seed, num_images=row.index + 1, **settings)[-1]
            assert np.array_equal(np.asarray(image), np.asarray(alone)), (settings, row)
            assert image.info == alone.info


def test_concurrent_requests_share_one_pass_and_get_their_own_images(served, tiny_pipe):
    srv = served(max_batch=16)
    release = gate(srv, tiny_pipe)
    bodies = [{"prompt": "a red circle", "seed": 1, "n": 2, **FAST},
              {"prompt": ["a blue star", "a green square"], "seed": 9, **FAST},
              {"prompt": "a yellow cross", "seed": 1, **FAST}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(srv.client.post, "/v1/images", json=b) for b in bodies]
        wait_for(lambda: srv.service.queued_images() == 1 + 5)  # the gate's image + 5 queued
        release.set()
        replies = [f.result() for f in futures]
    assert [r.status_code for r in replies] == [200, 200, 200]
    # the three requests ran as one pass of 5 images (the gate's pass was the other)
    assert metric(srv.service, "dalle2rt_batch_requests_count") == 2
    assert metric(srv.service, "dalle2rt_batch_requests_bucket", le="2.0") == 1
    assert metric(srv.service, "dalle2rt_batch_images_sum") == 1 + 5
    for body, reply in zip(bodies, replies):
        data = reply.json()["data"]
        prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
        settings = {k: v for k, v in body.items() if k in FAST}
        alone = tiny_pipe(prompts, seed=body["seed"], num_images=body.get("n", 1), **settings)
        assert len(data) == len(alone)
        for item, image in zip(data, alone):
            assert np.array_equal(np.asarray(decode(item).convert("RGB")), np.asarray(image))
            assert (item["prompt"], item["seed"], item["index"]) == (image.info["prompt"], body["seed"],
                                                                     int(image.info["index"]))


def test_two_workers_run_a_second_pass_while_the_first_is_held(served, tiny_pipe):
    srv = served(workers=2, max_batch=4)
    release = gate(srv, tiny_pipe)  # worker 1 is inside a pass until released
    bodies = [{"prompt": "a blue star", "seed": 5, "n": 3, **FAST}, {"prompt": "a red circle", "seed": 2, **FAST}]
    replies = [srv.client.post("/v1/images", json=b) for b in bodies]  # answered by worker 2, one after the other
    assert [r.status_code for r in replies] == [200, 200]
    assert srv.service.queued_images() == 1  # only the held gate's image
    for body, reply in zip(bodies, replies):
        alone = tiny_pipe(body["prompt"], seed=body["seed"], num_images=body.get("n", 1), **FAST)
        got = [np.asarray(decode(item).convert("RGB")) for item in reply.json()["data"]]
        assert len(got) == len(alone) and all(np.array_equal(g, np.asarray(a)) for g, a in zip(got, alone))
    release.set()
    wait_for(lambda: srv.service.queued_images() == 0)
    assert metric(srv.service, "dalle2rt_batch_requests_count") == 3


def test_many_clients_on_two_workers_each_get_their_own_images(served, tiny_pipe):
    srv = served(workers=2, max_batch=3)
    bodies = [{"prompt": f"a {c} square", "seed": s, "n": 1 + s % 2, **FAST}
              for s, c in enumerate(["red", "green", "blue", "cyan", "pink", "orange", "purple", "yellow"] * 2)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: srv.client.post("/v1/images", json=b), bodies))
    assert all(r.status_code == 200 for r in replies)
    for body, reply in zip(bodies, replies):
        alone = tiny_pipe(body["prompt"], seed=body["seed"], num_images=body["n"], **FAST)
        got = [np.asarray(decode(item).convert("RGB")) for item in reply.json()["data"]]
        assert len(got) == len(alone) and all(np.array_equal(g, np.asarray(a)) for g, a in zip(got, alone))
    assert srv.service.queued_images() == 0
    assert metric(srv.service, "dalle2rt_images_total") == sum(b["n"] for b in bodies)


def test_workers_count_threads_and_zero_starts_none(tiny_pipe):
    """workers=0 is the Ray replica's service (Ray's batcher feeds run_pass): no queue thread; a negative count
    is refused."""
    with pytest.raises(ValueError, match="workers must be >= 0"):
        Service(tiny_pipe, workers=-1)
    for n in (0, 2):
        service = Service(tiny_pipe, workers=n)
        try:
            assert service.workers == n and len(service._threads) == n
            assert all(t.is_alive() for t in service._threads)
        finally:
            service.close(drain=False, timeout=5)
        assert not any(t.is_alive() for t in service._threads)


@pytest.mark.skipif(not (BUNDLED / "manifest.json").exists(), reason="engines/shapes-v2 not built (make engines)")
def test_served_png_equals_the_cli_file_pixels_and_metadata(tmp_path):
    from dalle2_rt import cli

    assert cli.main(["a yellow triangle above a purple cross", "-n", "2", "--seed", "11", "--decoder-steps", "4",
                     "-o", str(tmp_path), "-q", "--engines", str(BUNDLED)]) == 0
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 2
    srv = LocalServer(Service(Pipeline.load(BUNDLED, threads=1), Limits(batch_window_s=0.005)))
    try:
        other = srv.client.post("/v1/images", json={"prompt": "a green star", "seed": 4, "decoder_steps": 4})
        reply = srv.client.post("/v1/images", json={"prompt": "a yellow triangle above a purple cross", "n": 2,
                                                    "seed": 11, "decoder_steps": 4})
        single = srv.client.post("/v1/images", json={"prompt": "a yellow triangle above a purple cross",
                                                     "seed": 11, "decoder_steps": 4, "response_format": "png"})
    finally:
        srv.close()
    assert other.status_code == reply.status_code == single.status_code == 200
    assert single.headers["content-type"] == "image/png"
    for item, file in zip(reply.json()["data"], files):
        with Image.open(file) as cli_image:
            served_image = decode(item)
            assert np.array_equal(np.asarray(served_image), np.asarray(cli_image))
            assert served_image.text == cli_image.text  # prompt, seed, index, sampler, steps, … manifest sha256
    assert Image.open(io.BytesIO(single.content)).tobytes() == Image.open(files[0]).tobytes()


# ------------------------------------------------------------------------------------------------- the API


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"prompt": "   "}, 400, "prompt is empty"),
    ({"prompt": []}, 400, "no prompt"),
    ({}, 422, "prompt"),
    ({"prompt": "x", "n": 0}, 400, "n must be between 1 and 16"),
    ({"prompt": "x", "n": 17}, 400, "n must be between 1 and 16"),
    ({"prompt": ["x"] * 4, "n": 5}, 400, "at most 16 images per request"),
    ({"prompt": ["x"] * 17}, 400, "at most 16 prompts"),
    ({"prompt": "x" * 2001}, 400, "at most 2000 characters"),
    ({"prompt": "x", "n": "2"}, 422, "n: Input should be a valid integer"),
    ({"prompt": "x", "n": 1.5}, 422, "n: Input should be a valid integer"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "x", "seed": -1}, 400, "seed must be between 0 and 2^64-1"),
    ({"prompt": "x", "seed": 2**64}, 400, "seed must be between 0 and 2^64-1"),
    ({"prompt": "x", "sampler": "euler"}, 400, "unknown sampler 'euler'"),
    ({"prompt": "x", "decoder_guidance": -1.0}, 400, "decoder guidance must be a finite number >= 0"),
    ({"prompt": "x", "prior_steps": 0}, 400, "prior steps must be"),
    ({"prompt": "x", "candidates": 99}, 400, "candidates must be between 1 and 16"),
    ({"prompt": "x", "decoder_candidates": 0}, 400, "decoder candidates must be between 1 and 16"),
    ({"prompt": "x", "response_format": "jpeg"}, 422, "response_format"),
    ({"prompt": "x", "n": 2, "response_format": "png"}, 400, "png returns one image"),
    ({"prompt": "x", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
])
def test_bad_requests_get_a_one_line_json_4xx(served, body, status, words):
    srv = served()
    reply = srv.client.post("/v1/images", json=body)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert "\n" not in reply.text and "Traceback" not in reply.text
    assert words in reply.json()["error"]


def test_malformed_bodies_oversized_bodies_and_unknown_routes(served):
    srv = served(max_body_bytes=4096)
    c = srv.client
    cases = [
        (c.post("/v1/images", content=b"{not json", headers={"content-type": "application/json"}), 400,
         "not valid JSON"),
        (c.post("/v1/images", json=[1, 2]), 422, "must be a JSON object"),
        (c.post("/v1/images", json={"prompt": "x" * 5000}), 413, "over 4096 bytes"),
        (c.post("/v1/images", content=(b"x" for _ in range(10_000))), 413, "over 4096 bytes"),  # chunked, no length
        (c.get("/v1/nothing"), 404, "Not Found"),
        (c.get("/v1/images"), 405, "Method Not Allowed"),
        (c.post("/v1/variations", files={"image": ("a.png", b"not an image", "image/png")}), 400, "not an image"),
        (c.post("/v1/variations", data={"n": "2"}), 422, "image: Field required"),
        (c.post("/v1/variations", files={"image": ("a.png", b"", "image/png")}), 400, "empty"),
    ]
    for reply, status, words in cases:
        assert reply.status_code == status, reply.text
        assert "\n" not in reply.text and words in reply.json()["error"], reply.text
    assert c.get("/healthz").json() == {"status": "ok"}  # still alive


def test_health_readiness_metrics_docs_and_page(served):
    srv = served()
    c = srv.client
    ready = c.get("/readyz").json()
    assert ready["ready"] is True and ready["engines"] == "tiny"
    assert c.post("/v1/images", json={"prompt": "a red circle", "seed": 0, **FAST}).status_code == 200
    text = c.get("/metrics").text
    for name in ("dalle2rt_requests_total", "dalle2rt_queue_images", "dalle2rt_batch_images_bucket",
                 'dalle2rt_stage_seconds_count{stage="decoder"}', 'dalle2rt_stage_seconds_count{stage="sr0"}'):
        assert name in text
    assert 'dalle2rt_requests_total{code="200",endpoint="/v1/images"} 1.0' in text
    assert "/v1/images" in c.get("/openapi.json").json()["paths"]
    assert c.get("/docs").status_code == 200
    page = c.get("/")
    assert page.headers["content-type"].startswith("text/html") and 'id="prompt"' in page.text


def test_truncated_prompt_warns_and_stream_reports_progress(served, tiny_pipe):
    srv = served()
    long_prompt = " ".join(["red circle"] * 60)
    lines = []
    with srv.client.stream("POST", "/v1/images", json={"prompt": long_prompt, "n": 2, "seed": 5, "stream": True,
                                                       **FAST}) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in reply.iter_lines() if line]
    events = [e["event"] for e in lines]
    assert events[0] == "queued" and "truncated" in lines[0]["warnings"][0]
    stages = [e["stage"] for e in lines if e["event"] == "progress"]
    assert stages[0] == "text_encoder" and stages[-1] == "sr0" and "prior" in stages and "decoder" in stages
    assert events[-3:] == ["image", "image", "done"]
    alone = tiny_pipe(long_prompt, seed=5, num_images=2, **FAST)
    for event, image in zip(lines[-3:-1], alone):
        assert np.array_equal(np.asarray(decode(event).convert("RGB")), np.asarray(image))


def test_a_stream_sends_every_progress_event_even_when_the_result_came_first(served, monkeypatch):
    """A tiny model can finish before the stream reads its first event: every event the worker queued before the
    result must still be sent. Forced here: submit returns only once the job is done, so the stream starts with the
    result and all events already waiting (before the fix it sent one progress event and dropped the rest)."""
    srv = served()
    submit = srv.service.submit

    def submit_and_finish(job):
        submitted = submit(job)
        submitted.future.result(timeout=60)
        return submitted

    monkeypatch.setattr(srv.service, "submit", submit_and_finish)
    with srv.client.stream("POST", "/v1/images", json={"prompt": "a red circle", "n": 1, "seed": 5, "stream": True,
                                                       **FAST}) as reply:
        lines = [json.loads(line) for line in reply.iter_lines() if line]
    progress = [(e["stage"], e["step"], e["total"]) for e in lines if e["event"] == "progress"]
    finished = [stage for stage, step, total in progress if step == total]
    assert finished == ["text_encoder", "prior", "decoder", "sr0"], progress
    assert len(progress) == sum(total for _, step, total in progress if step == total)  # every step, once
    assert [e["event"] for e in lines][-2:] == ["image", "done"]


def test_every_sampling_option_reaches_the_pipeline(served, tiny_pipe):
    """The schema is read off ``Settings``: an option added there (early candidate choice) is served as the
    pipeline draws it, and the served run records it (without it the metadata differs: the check can fail)."""
    srv = served()
    body = {"prompt": "a red circle", "seed": 4, **FAST, "decoder_steps": 3, "decoder_candidates": 3,
            "decoder_choice_step": 1}
    reply = srv.client.post("/v1/images", json=body)
    assert reply.status_code == 200, reply.text
    options = {k: v for k, v in body.items() if k not in ("prompt", "seed")}
    alone = tiny_pipe("a red circle", seed=4, **options)[0]
    got = np.asarray(decode(reply.json()["data"][0]).convert("RGB"))
    assert np.array_equal(got, np.asarray(alone))
    assert reply.json()["data"][0]["metadata"]["decoder_choice_step"] == alone.info["decoder_choice_step"] == "1"
    late = tiny_pipe("a red circle", seed=4, **{**options, "decoder_choice_step": None})[0]
    assert "decoder_choice_step" not in late.info


def test_variations_equal_the_pipeline_s(served, tiny_pipe):
    srv = served()
    source = tiny_pipe("a red circle", seed=1, **FAST)[0]
    buf = io.BytesIO()
    source.save(buf, format="PNG")
    reply = srv.client.post("/v1/variations", files={"image": ("circle.png", buf.getvalue(), "image/png")},
                            data={"n": "2", "seed": "3", "decoder_steps": "2", "sr_steps": "1"})
    assert reply.status_code == 200, reply.text
    alone = tiny_pipe.variations(source, num_images=2, seed=3, decoder_steps=2, sr_steps=1)
    for item, image in zip(reply.json()["data"], alone):
        assert np.array_equal(np.asarray(decode(item).convert("RGB")), np.asarray(image))
        assert item["metadata"]["variation_of"] == "circle.png"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _upload_sized(pipe, image: Image.Image) -> Image.Image:
    """``image`` at the side the server reduces uploads to (the same pixels then reach the stages)."""
    from dalle2_rt.serve.app import _encoder_side

    side = max(_encoder_side(pipe) or 0, pipe.decoder_plan.x_shape[-1])
    return image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)


OPERATION = {"decoder_steps": 2, "refine": 0}


def test_edits_equal_the_pipeline_s(served, tiny_pipe):
    """A larger, non-square upload: the server keeps its centre square at the stages' side, so the pipeline
    given that square draws the same pixels."""
    srv = served()
    drawn = tiny_pipe("a red circle", seed=1, **FAST)[0].convert("RGB")
    wide = Image.new("RGB", (3 * drawn.width, 2 * drawn.width), (16, 16, 16))
    wide.paste(drawn.resize((2 * drawn.width,) * 2), (drawn.width // 2, 0))
    side = _upload_sized(tiny_pipe, drawn).width
    left = (wide.width - wide.height) // 2
    source = wide.crop((left, 0, left + wide.height, wide.height)).resize((side, side), Image.Resampling.BICUBIC)
    reply = srv.client.post("/v1/edits", files={"image": ("c" * 300 + ".png", _png(wide), "image/png")},
                            data={"source": "a red circle", "target": "a red star", "amount": ["0", "0.5"],
                                  "seed": "3", **{k: str(v) for k, v in OPERATION.items()}})
    assert reply.status_code == 200, reply.text
    alone = tiny_pipe.edit(source, "a red circle", "a red star", amount=[0.0, 0.5], seed=3, **OPERATION)
    data = reply.json()["data"]
    assert len(data) == 2 and reply.json()["seed"] == 3
    for item, image in zip(data, alone):
        assert np.array_equal(np.asarray(decode(item).convert("RGB")), np.asarray(image))
        meta = item["metadata"]
        assert (meta["operation"], meta["source"], meta["target"], meta["image"]) == (
            "edit", "a red circle", "a red star", "c" * 200)  # one line of at most 200 characters
    assert metric(srv.service, "dalle2rt_requests_total", endpoint="/v1/edits", code="200") == 1
    # the frames' guidance, given: the Pipeline's pixels at it; a bad one is a 400 before any work
    reply = srv.client.post("/v1/edits", files={"image": ("c.png", _png(wide), "image/png")},
                            data={"source": "a red circle", "target": "a red star", "amount": "0.5", "seed": "3",
                                  "edit_guidance": "1.5", **{k: str(v) for k, v in OPERATION.items()}})
    assert reply.status_code == 200, reply.text
    alone = tiny_pipe.edit(source, "a red circle", "a red star", amount=0.5, seed=3, edit_guidance=1.5, **OPERATION)
    assert np.array_equal(np.asarray(decode(reply.json()["data"][0]).convert("RGB")), np.asarray(alone[0]))
    reply = srv.client.post("/v1/edits", files={"image": ("c.png", _png(wide), "image/png")},
                            data={"source": "a red circle", "target": "a red star", "edit_guidance": "-2"})
    assert reply.status_code == 400 and "guidance" in reply.json()["error"]


def test_interpolations_from_an_image_and_a_prompt_equal_the_pipeline_s(served, tiny_pipe):
    from dalle2_rt.runtime import operations as ops

    srv = served()
    a = _upload_sized(tiny_pipe, tiny_pipe("a blue square", seed=2, **FAST)[0])
    reply = srv.client.post("/v1/interpolations", files={"image_a": ("sq.png", _png(a), "image/png")},
                            data={"prompt_b": "a green star", "frames": "3", "seed": "4",
                                  **{k: str(v) for k, v in OPERATION.items()}})
    assert reply.status_code == 200, reply.text
    b = ops.from_prompt(tiny_pipe, "a green star", seed=4, index=1, decoder_steps=2)
    alone = tiny_pipe.interpolate(a, b, frames=3, seed=4, **OPERATION)
    data = reply.json()["data"]
    assert len(data) == 3
    for item, image in zip(data, alone):
        assert np.array_equal(np.asarray(decode(item).convert("RGB")), np.asarray(image))
        assert (item["metadata"]["operation"], item["metadata"]["a"], item["metadata"]["b"]) == (
            "interpolate", "sq.png", "a green star")


def test_an_operation_stops_at_its_next_step_when_its_client_leaves(served, tiny_pipe):
    srv = served()
    png = _png(tiny_pipe("a red circle", seed=1, **FAST)[0])
    with pytest.raises(httpx.ReadTimeout):  # 900 inversion steps: the client gives up long before
        httpx.post(f"{srv.url}/v1/edits", files={"image": ("a.png", png, "image/png")},
                   data={"source": "a red circle", "target": "a red star", "decoder_steps": "900", "refine": "0"},
                   timeout=1.0)
    wait_for(lambda: srv.service.queued_images() == 0, 30)  # stopped: 900 steps would take minutes
    assert metric(srv.service, "dalle2rt_images_total") == 0
    assert metric(srv.service, "dalle2rt_stage_seconds_count", stage="decoder") == 0  # never reached decoding


def test_a_negative_prompt_over_http_equals_the_pipeline_s_and_never_shares_a_pass(served, tiny_pipe):
    srv = served(batch_window_s=0.5)
    bodies = [{"prompt": "a red circle", "seed": 2, "negative_prompt": neg, **FAST} for neg in ("green", "blue")]
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda b: srv.client.post("/v1/images", json=b), bodies))
    for body, reply in zip(bodies, replies):
        assert reply.status_code == 200, reply.text
        alone = tiny_pipe("a red circle", seed=2, negative_prompt=body["negative_prompt"], **FAST)[0]
        assert np.array_equal(np.asarray(decode(reply.json()["data"][0]).convert("RGB")), np.asarray(alone))
        assert reply.json()["data"][0]["metadata"]["negative_prompt"] == body["negative_prompt"]
    assert metric(srv.service, "dalle2rt_batch_requests_count") == 2  # two passes: different negatives
    long = srv.client.post("/v1/images", json={"prompt": "a red circle", "negative_prompt": "red " * 1000})
    assert long.status_code == 400 and "negative prompt may have at most" in long.json()["error"]


def test_operation_mistakes_are_one_line_4xx_and_queue_nothing(served, tiny_pipe):
    srv = served(max_images=4)
    png = _png(tiny_pipe("a red circle", seed=1, **FAST)[0])
    image = {"image": ("a.png", png, "image/png")}
    c = srv.client
    cases = [
        (c.post("/v1/edits", files=image, data={"source": "a red circle", "target": "a red star", "amount": "2"}),
         400, "amount must be a number in 0"),
        (c.post("/v1/edits", files=image, data={"source": " ", "target": "a red star"}), 400, "the prompt is empty"),
        (c.post("/v1/edits", data={"source": "a", "target": "b"}), 422, "image: Field required"),
        (c.post("/v1/edits", files=image, data={"source": "a", "target": "b", "amount": ["0.1"] * 5}), 400,
         "at most 4 amounts"),
        (c.post("/v1/edits", files={"image": ("a.png", b"not an image", "image/png")},
                data={"source": "a", "target": "b"}), 400, "not an image"),
        (c.post("/v1/edits", files=image, data={"source": "a", "target": "b", "refine": "99"}), 400, "refine"),
        (c.post("/v1/edits", files=image, data={"source": "a", "target": "b", "amount": ["0.1", "0.2"],
                                                "response_format": "png"}), 400, "returns one image"),
        (c.post("/v1/interpolations", data={"prompt_a": "a red circle", "frames": "3"}), 400, "end b as either"),
        (c.post("/v1/interpolations", files={"image_a": ("a.png", png, "image/png")},
                data={"prompt_a": "x", "prompt_b": "y", "frames": "3"}), 400, "not both"),
        (c.post("/v1/interpolations", data={"prompt_a": "a", "prompt_b": "b", "frames": "1"}), 400,
         "frames must be an integer between 2"),
        (c.post("/v1/interpolations", data={"prompt_a": "a", "prompt_b": "b", "frames": "5"}), 400,
         "at most 4 frames"),
        (c.post("/v1/interpolations", data={"prompt_a": "a", "prompt_b": "b", "latent": "cubic"}), 422, "latent"),
        (c.post("/v1/edits", files=image, data={"source": "a", "target": "b", "negative_prompt": "c"}), 400,
         "unknown form field 'negative_prompt'"),
        (c.post("/v1/variations", files=image, data={"negative_prompt": "c"}), 400, "unknown form field"),
        (c.post("/v1/interpolations", data={"prompt_a": "a", "prompt_b": "b", "frames": "3", "amount": "0.1"}),
         400, "unknown form field 'amount'"),
    ]
    for reply, status, words in cases:
        assert reply.status_code == status, (words, reply.text)
        body = reply.json()
        assert list(body) == ["error"] and words in body["error"], (words, body)
    assert metric(srv.service, "dalle2rt_batch_requests_count") == 0


# ------------------------------------------------------------------------------------------------- limits


def test_full_queue_is_429_with_retry_after_and_frees_up(served, tiny_pipe):
    srv = served(max_queue=3)
    release = gate(srv, tiny_pipe)  # 1 image running
    first = ThreadPoolExecutor(1).submit(srv.client.post, "/v1/images",
                                         json={"prompt": "a red circle", "n": 2, "seed": 0, **FAST})
    wait_for(lambda: srv.service.queued_images() == 3)
    refused = srv.client.post("/v1/images", json={"prompt": "a blue star", "seed": 0, **FAST})
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1 and "queue is full" in refused.json()["error"]
    release.set()
    assert first.result().status_code == 200
    assert srv.client.post("/v1/images", json={"prompt": "a blue star", "seed": 0, **FAST}).status_code == 200
    assert metric(srv.service, "dalle2rt_rejected_total", reason="queue_full") == 1


def test_request_timeout_is_504_and_its_work_is_dropped(served, tiny_pipe):
    srv = served(timeout_s=0.3)
    release = gate(srv, tiny_pipe)
    reply = srv.client.post("/v1/images", json={"prompt": "a red circle", "seed": 0, **FAST})
    assert reply.status_code == 504 and "timeout" in reply.json()["error"]
    assert srv.service.queued_images() == 1  # only the gate: the timed-out job left the queue's count
    release.set()
    wait_for(lambda: srv.service.queued_images() == 0)
    assert metric(srv.service, "dalle2rt_images_total") == 1  # the gate's image only


def test_a_client_that_disconnects_while_queued_is_never_run(served, tiny_pipe):
    srv = served()
    release = gate(srv, tiny_pipe)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(f"{srv.url}/v1/images", json={"prompt": "a red circle", "n": 4, "seed": 0, **FAST}, timeout=0.5)
    wait_for(lambda: metric(srv.service, "dalle2rt_rejected_total", reason="client_gone") == 1)
    release.set()
    wait_for(lambda: srv.service.queued_images() == 0)
    time.sleep(0.2)
    assert metric(srv.service, "dalle2rt_images_total") == 1  # the gate's image; the 4 were never made
    assert metric(srv.service, "dalle2rt_batch_requests_count") == 1  # no second pass ran


def test_a_client_that_disconnects_mid_pass_stops_the_pass(served):
    srv = served()
    body = {"prompt": "a red circle", "seed": 0, "stream": True, "prior_steps": 2, "decoder_steps": 900,
            "sr_steps": 900}
    with srv.client.stream("POST", "/v1/images", json=body) as reply:
        for line in reply.iter_lines():
            if '"decoder"' in line:  # the pass is in its decoder: leave
                break
    wait_for(lambda: srv.service.queued_images() == 0, 20)  # the pass stopped, long before 1,800 steps
    assert metric(srv.service, "dalle2rt_stage_seconds_count", stage="sr0") == 0
    assert metric(srv.service, "dalle2rt_images_total") == 0


# ------------------------------------------------------------------------------------------------- the process


def _start(engines, *extra) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "dalle2_rt.serve", "--engines", str(engines), "--port", "0",
                             "--threads", "1", "--log-level", "warning", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.split("listening on ")[1].split()[0]


def test_sigterm_answers_every_accepted_request_then_exits(tiny_engines):
    proc, url = _start(tiny_engines, "--batch-window-ms", "1500")
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c, ThreadPoolExecutor(4) as pool:
            assert c.get("/readyz").status_code == 200
            futures = [pool.submit(c.post, "/v1/images", json={"prompt": f"a red circle {i}", "seed": i, "n": 2,
                                                               **FAST}) for i in range(4)]
            time.sleep(0.6)  # accepted, waiting in the batch window (room for a loaded machine to connect all four)
            proc.send_signal(signal.SIGTERM)
            replies = [f.result() for f in futures]
        assert [r.status_code for r in replies] == [200] * 4
        assert all(len(r.json()["data"]) == 2 for r in replies)
        # uvicorn re-raises the signal once drained, so a supervisor sees "terminated by SIGTERM"
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigterm_grace_readyz_and_new_work_answer_503_then_the_listener_closes(tiny_engines):
    """During --drain-grace the listener stays open: /readyz is observably 503 (a load balancer stops sending)
    and new work is refused with 503 JSON; then the process exits and the port is closed."""
    proc, url = _start(tiny_engines, "--drain-grace", "3")
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            assert c.get("/readyz").status_code == 200
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            ready = c.get("/readyz")
            assert ready.status_code == 503 and "draining" in ready.json()["error"]
            refused = c.post("/v1/images", json={"prompt": "a red circle", "seed": 1, **FAST})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
            assert set(refused.json()) == {"error"}
            assert c.get("/healthz").status_code == 200  # alive while it drains
        assert proc.wait(30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_request_the_http_parser_cannot_read_is_answered_in_one_line_of_json(tiny_engines):
    proc, url = _start(tiny_engines, "--drain-grace", "0")
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        for raw in (b"NOT-HTTP \x00\x01\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                conn.sendall(raw)
                reply = b""
                while chunk := conn.recv(4096):
                    reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), reply
            assert list(json.loads(body)) == ["error"] and b"\n" not in body
    finally:
        proc.terminate()
        proc.wait(30)


def test_idle_and_slow_header_connections_are_closed_and_never_shut_out_the_probes(tiny_engines):
    """--header-timeout closes a connection without a whole request head (408 JSON); --max-requests caps requests
    in progress, but /healthz still answers while the cap is full."""
    proc, url = _start(tiny_engines, "--header-timeout", "1", "--max-requests", "1", "--batch-window-ms", "3000",
                       "--drain-grace", "0")
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(20)]
        slow = socket.create_connection((host, int(port)), timeout=10)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c, ThreadPoolExecutor(1) as pool:
            held = pool.submit(c.post, "/v1/images", json={"prompt": "a red circle", "seed": 1, **FAST})
            time.sleep(0.5)  # the request sits in its 3 s batch window: the one request slot is taken
            full = c.post("/v1/images", json={"prompt": "a blue star", "seed": 1, **FAST})
            assert full.status_code == 503 and "requests in progress" in full.json()["error"]
            assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
            assert held.result().status_code == 200
        for conn in idle + [slow]:
            reply = b""
            while chunk := conn.recv(4096):  # the server closes it after the 1 s header timeout
                reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408") and "no request head" in json.loads(body)["error"], reply
            conn.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_user_errors_are_one_line(tmp_path):
    cases = [(["--port", "-3"], "must be >= 0"), (["--max-batch", "zero"], "is not an integer"),
             (["--engines", str(tmp_path / "none"), "--port", "0"], str(tmp_path / "none")),
             (["--replicas", "2"], "--replicas needs --ray"), (["--timeout", "0"], "--timeout must be > 0"),
             (["--max-images", "32", "--max-queue", "20"], "could never be queued"),
             (["--workers", "0"], "must be >= 1"), (["--workers", "2", "--ray"], "with --ray, scale with --replicas"),
             (["--threads", "100000"], "must be at most"), (["--threads", "0"], "must be at least 1"),
             (["--drain-grace", "-1"], "must be between 0 and 1e6"), (["--header-timeout", "0"], "must be > 0"),
             (["--max-requests", "0"], "must be >= 1")]
    for argv, words in cases:
        proc = subprocess.run([sys.executable, "-c", "import sys; from dalle2_rt.cli import entry; sys.exit(entry())",
                               "serve", *argv], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "DALLE2_RT_ENGINES": str(tmp_path)})
        assert proc.returncode != 0 and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dalle2-rt serve: error:") and words in lines[0], lines


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from /proc")
def test_500_mixed_requests_good_ones_right_bad_ones_4xx_memory_flat(served, tiny_pipe):
    """500 requests from 16 clients, 10 % malformed, oversized or abandoned: every good one gets the right
    images, every bad one a 4xx, and the service stays up with flat memory."""
    srv = served(max_body_bytes=2048, max_queue=64)
    distinct = [("a red circle", 1), ("a blue star", 2), ("two green squares", 3), ("a yellow cross", 4)]
    reference = {(p, s): np.asarray(tiny_pipe(p, seed=s, **FAST)[0]) for p, s in distinct}
    rng = np.random.default_rng(0)

    def one(i: int):
        kind = ("malformed", "oversized", "abandoned")[i // 10 % 3] if i % 10 == 0 else "good"  # 10 % bad
        if kind == "malformed":
            return kind, srv.client.post("/v1/images", content=b'{"prompt": "a red', headers={"content-type":
                                                                                            "application/json"})
        if kind == "oversized":
            return kind, srv.client.post("/v1/images", json={"prompt": "red " * 1000, **FAST})
        prompt, seed = distinct[int(rng.integers(len(distinct)))]
        body = {"prompt": prompt, "seed": seed, **FAST}
        if kind == "abandoned":
            try:
                return kind, httpx.post(f"{srv.url}/v1/images", json=body, timeout=0.02)
            except httpx.TimeoutException:
                return kind, None
        for _ in range(50):  # a 429 is backpressure, not an error: honour Retry-After (capped for the test)
            reply = srv.client.post("/v1/images", json=body)
            if reply.status_code != 429:
                break
            time.sleep(0.05)
        return (kind, prompt, seed), reply

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(50)))  # warm-up: arenas, sessions, thread pools
        before = _rss_mb()
        results = list(pool.map(one, range(500)))
    after = _rss_mb()
    print(f"RSS before {before:.0f} MB, after 500 requests {after:.0f} MB")
    counts = {"good": 0, "malformed": 0, "oversized": 0, "abandoned": 0}
    for kind, reply in results:
        if isinstance(kind, tuple):
            _, prompt, seed = kind
            counts["good"] += 1
            assert reply.status_code == 200, reply.text
            assert np.array_equal(np.asarray(decode(reply.json()["data"][0]).convert("RGB")), reference[prompt, seed])
        else:
            counts[kind] += 1
            if kind == "abandoned":
                assert reply is None or reply.status_code == 200
            else:
                assert reply.status_code == {"malformed": 400, "oversized": 413}[kind], reply.text
    assert counts == {"good": 450, "malformed": 17, "oversized": 17, "abandoned": 16}
    assert srv.client.get("/healthz").status_code == 200 and srv.client.get("/readyz").status_code == 200
    wait_for(lambda: srv.service.queued_images() == 0)
    assert after - before < 64, f"RSS grew {after - before:.0f} MB over 500 requests"
