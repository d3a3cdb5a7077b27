"""Triton Python-backend model running the unCLIP loop: the runtime's own ``Pipeline`` on the ``triton``
backend with ``url="bls"``, so each graph call is a BLS request to the graph models of the same server.

``python -m export.triton`` copies this file to ``<orchestrator>/1/model.py`` with ``engine/`` (the folder's
``manifest.json`` and ``tokenizer.json``) and ``dalle2_rt/`` (this package and the runtime, vendored: the
server's Python needs only numpy, pillow, regex and ftfy) beside it. Inputs and outputs: ``orchestrator_io.py``.

On load the manifest's sha256 must be the one recorded in the config (``dalle2_rt.manifest_sha256``) and
the tokenizer's its own; the graph models are those the writer put next to this one. A request with a bad
value (empty prompt, unknown sampler, steps out of range, ...) gets the runtime's one-line ``InputError``
message as its error; the model stays up. The ``operation`` input selects an edit or an interpolation instead
of generation (``orchestrator_ops.py``).
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        # the vendored dalle2_rt first: the backend appends the version folder to sys.path after the server's
        # working directory and site-packages, where another dalle2_rt may be found
        sys.path[:] = [folder, *(p for p in sys.path if p != folder)]
        from dalle2_rt.runtime.errors import Dalle2RTError
        from dalle2_rt.runtime.pipeline import Pipeline
        from dalle2_rt.triton import orchestrator_ops
        from dalle2_rt.triton.orchestrator_io import INPUTS

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        engines = os.path.join(folder, params.get("dalle2_rt.engine_dir") or "engine")
        self.pipe = Pipeline.load(engines, backend="triton", url="bls", verify=False)
        recorded = params.get("dalle2_rt.manifest_sha256")
        if recorded and recorded != self.pipe.manifest.sha256:
            raise RuntimeError(f"{engines}/manifest.json has sha256 {self.pipe.manifest.sha256}, the config "
                               f"records {recorded}: rewrite the repository with python -m export.triton")
        self.inputs, self.error_types, self.ops = INPUTS, (Dalle2RTError,), orchestrator_ops

    def _arguments(self, request) -> tuple[dict, dict]:
        """(every input the request carries as a numpy array, generation's keyword arguments)"""
        arrays, kwargs = {}, {}
        for name, _, _, _, keyword in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                continue
            arrays[name] = tensor.as_numpy()
            if keyword:
                value = arrays[name].reshape(-1)[0]
                kwargs[keyword] = value.decode("utf-8") if isinstance(value, bytes) else value.item()
        return arrays, kwargs

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                arrays, kwargs = self._arguments(request)
                images = self.ops.run(self.pipe, arrays, options=kwargs)
                pixels = np.stack([np.asarray(im) for im in images])  # (N, S, S, 3) uint8
                meta = np.array([json.dumps(im.info).encode("utf-8") for im in images], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("images", pixels), pb_utils.Tensor("metadata", meta)]))
            except self.error_types as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
            except Exception as e:  # noqa: BLE001 - reported to the client; the model stays up
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(e).__name__}: {e}")))
        return responses
