"""The orchestrator's request dispatch (``dalle2_rt/triton/orchestrator_ops.py``) without a server: each
operation a request can name gives the Pipeline's own images, and every bad request is one ``InputError`` line.
The same requests through a real tritonserver: ``tests/test_triton_server.py``."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dalle2_rt.runtime import operations as ops
from dalle2_rt.runtime.errors import InputError
from dalle2_rt.triton import orchestrator_io
from dalle2_rt.triton.orchestrator_ops import OPERATION_INPUTS, OPERATION_ONLY, run

FAST = {"decoder_steps": 2, "refine": 1}


pytestmark = pytest.mark.usefixtures("private_hash_cache")


@pytest.fixture(scope="module")
def picture(tiny_pipe) -> np.ndarray:
    return np.asarray(tiny_pipe("a red circle", seed=1, prior_steps=2, decoder_steps=2, sr_steps=1)[0])


def text(*values) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_every_operation_input_is_declared_for_the_config():
    declared = {name: (dtype, dims) for name, dtype, dims, _, _ in orchestrator_io.INPUTS}
    for names in OPERATION_INPUTS.values():
        assert set(names) <= set(declared)
    assert set(OPERATION_ONLY) <= set(declared)
    assert declared["operation"] == ("TYPE_STRING", [1]) and declared["image"] == ("TYPE_UINT8", [-1, -1, 3])


def test_a_request_without_operation_generates_as_before(tiny_pipe):
    got = run(tiny_pipe, {"prompt": text("a blue square")}, options={"seed": 3, "decoder_steps": 2, "sr_steps": 1})
    want = tiny_pipe("a blue square", seed=3, decoder_steps=2, sr_steps=1)
    assert np.array_equal(pixels(got), pixels(want))


def test_an_edit_request_gives_the_pipelines_edit(tiny_pipe, picture):
    got = run(tiny_pipe, {"operation": text("edit"), "image": picture, "source": text("a red circle"),
                     "target": text("a red star"), "amount": np.array([0.0, 0.6]), "seed": np.array([2], np.uint64),
                     "decoder_steps": np.array([2], np.int32), "refine": np.array([1], np.int32)})
    want = tiny_pipe.edit(Image.fromarray(picture), "a red circle", "a red star", amount=[0.0, 0.6], seed=2, **FAST)
    assert len(got) == 2 and np.array_equal(pixels(got), pixels(want))
    assert [im.info["amount"] for im in got] == [im.info["amount"] for im in want]


def test_an_interpolation_request_takes_each_end_as_an_image_or_a_prompt(tiny_pipe, picture):
    arrays = {"operation": text("interpolate"), "image_b": picture, "prompt": text("a green star"),
              "frames": np.array([3], np.int32), "seed": np.array([5], np.uint64),
              "decoder_steps": np.array([2], np.int32), "refine": np.array([1], np.int32)}
    got = run(tiny_pipe, arrays)
    a = ops.from_prompt(tiny_pipe, "a green star", seed=5, index=0, decoder_steps=2)
    want = tiny_pipe.interpolate(a, Image.fromarray(picture), frames=3, seed=5, **FAST)
    assert len(got) == 3 and np.array_equal(pixels(got), pixels(want))


@pytest.mark.parametrize("arrays, message", [
    ({"operation": text("blur")}, "unknown operation 'blur'"),
    ({}, "generation needs a prompt"),
    ({"prompt": text("a red circle"), "amount": np.array([0.5])}, "amount: inputs of the operations"),
    ({"operation": text("edit"), "source": text("a red circle")}, "edit needs image, target"),
    ({"operation": text("edit"), "image": np.zeros((8, 8, 3), np.float32), "source": text("a"),
      "target": text("b")}, "image must be .height, width, 3. uint8"),
    ({"operation": text("edit"), "image": np.zeros((8, 5000, 3), np.uint8), "source": text("a"),
      "target": text("b")}, "1 … 4096 pixels a side"),
    ({"operation": text("edit"), "image": np.zeros((8, 8, 3), np.uint8), "source": text("a"),
      "target": text("b"), "amount": np.array([1.5])}, "edit amount must be a number in 0 … 1"),
    ({"operation": text("edit"), "image": np.zeros((8, 8, 3), np.uint8), "source": text("a"),
      "target": text("b"), "prior_steps": np.array([3], np.int32)}, "edit does not take prior_steps"),
    ({"operation": text("edit"), "image": np.zeros((8, 8, 3), np.uint8), "source": text("a"),
      "target": text("b"), "decoder_steps": np.array([0], np.int32)}, "decoder steps must be at least 1"),
    ({"operation": text("interpolate"), "prompt": text("a red circle")}, "interpolate needs two ends"),
    ({"operation": text("interpolate"), "prompt": text("a", "b"), "frames": np.array([1], np.int32)},
     "frames must be an integer between 2"),
    ({"operation": text("interpolate"), "prompt": text("a", "b"), "latent": text("linear")},
     "latent must be one of slerp, fixed"),
    ({"operation": np.array([b"\xff"], dtype=object)}, "not valid UTF-8"),
])
def test_a_bad_request_is_one_line(tiny_pipe, arrays, message):
    with pytest.raises(InputError, match=message) as info:
        run(tiny_pipe, arrays)
    assert "\n" not in str(info.value)
