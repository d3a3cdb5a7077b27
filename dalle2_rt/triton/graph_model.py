"""Triton Python-backend model that runs one ONNX graph with onnxruntime: the stand-in for ``onnxruntime_onnx``.

``python -m export.triton ENGINES --out REPO --platform python`` copies this file to ``<graph>/1/model.py``
beside ``model.onnx`` (the folder's plain graph, the one Triton's onnxruntime backend would load; with
``--int8`` the graph's int8 variant where the folder has one); the model
config is the one the ``onnxruntime_onnx`` model gets, with ``backend: "python"`` instead of the platform.
It exists so that a server with only the Python backend (pytriton's bundled tritonserver, the tests on a CPU
machine) serves the same graphs under the same names, dtypes and dims as a full Triton would.

Config parameters read: ``dalle2_rt.threads`` (onnxruntime intra-op threads, default 1: the server runs one
stub process per model, and they share the machine's cores).
Requests that the dynamic batcher hands over together are run one by one (each is a whole batch already).
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("dalle2_rt.threads") or 1)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(os.path.join(folder, "model.onnx"), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        # (name, rank the graph takes): an input declared dims [1] + reshape [] may arrive as (B, 1)
        self.inputs = [(i.name, len(i.shape)) for i in self.session.get_inputs()]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = {}
                for name, rank in self.inputs:
                    array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                    feeds[name] = array.reshape(array.shape[:rank]) if array.ndim > rank else array
                outs = self.session.run(self.outputs, feeds)
                tensors = [pb_utils.Tensor(n, np.ascontiguousarray(o)) for n, o in zip(self.outputs, outs)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as e:  # noqa: BLE001 - the client gets the message, the model stays up
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(e).__name__}: {e}")))
        return responses
