"""The HTTP service under hostile input (issue 31): no request can fail another's batch, uploads and bodies
are bounded off the event loop, slow clients are timed out. Fixtures and helpers are test_serve's."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'dalle2-rt[serve]')")

from dalle2_rt.runtime.pipeline import Pipeline  # noqa: E402
from dalle2_rt.serve import service as service_mod  # noqa: E402
from dalle2_rt.serve.service import Job, Limits, Service  # noqa: E402
from tests.test_serve import FAST, LocalServer, gate, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pipe(tiny_engines):
    return Pipeline.load(tiny_engines, threads=1)


@pytest.fixture
def served(tiny_pipe):
    made = []

    def make(workers=1, **limits):
        made.append(LocalServer(Service(tiny_pipe, Limits(**{"batch_window_s": 0.005, **limits}), workers=workers)))
        return made[-1]

    yield make
    for server in made:
        server.close()


def one_line_error(reply, status: int, words: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert "\n" not in reply.text and words in reply.json()["error"], reply.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_prompt_is_a_400_and_its_batch_mate_succeeds(served, tiny_pipe, stream):
    srv = served(max_batch=8, batch_window_s=0.2)
    release = gate(srv, tiny_pipe)
    good = {"prompt": "a red circle", "seed": 3, **FAST}
    bad = json.dumps({"prompt": "a red circle \ud800", "seed": 3, "stream": stream, **FAST})  # "\ud800" escaped
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(srv.client.post, "/v1/images", json=good)
        wait_for(lambda: srv.service.queued_images() == 2)
        reply = srv.client.post("/v1/images", content=bad, headers={"content-type": "application/json"})
        one_line_error(reply, 400, "the prompt is not valid Unicode text (a lone surrogate '\\ud800'")
        release.set()
        assert queued.result().status_code == 200
        assert queued.result().json()["data"][0]["prompt"] == "a red circle"


def test_a_job_whose_png_cannot_be_written_fails_alone(tiny_pipe, monkeypatch):
    real = service_mod.encode_png

    def encode(image, info):
        if info["prompt"] == "poison":
            raise ValueError("cannot encode")
        return real(image, info)

    monkeypatch.setattr(service_mod, "encode_png", encode)
    svc = Service(tiny_pipe, workers=0)
    run = tiny_pipe.settings(**FAST)
    jobs = [Job("images", run, FAST, 1, 1, prompts=[p]) for p in ("a blue star", "poison", "a green square")]
    svc.run_pass(jobs)
    assert [len(j.future.result()) for j in (jobs[0], jobs[2])] == [1, 1]
    with pytest.raises(ValueError, match="cannot encode"):
        jobs[1].future.result()
