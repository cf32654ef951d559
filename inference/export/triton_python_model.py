"""Triton python-backend model: runs the entry's ``model.onnx`` with ONNX Runtime on CPU.

Copied into ``<repo>/<model>/<version>/model.py`` by the exporter. It is the CPU variant
(``configs/cpu.pbtxt``) of the same model file that production serves with the onnxruntime
backend on GPU (``config.pbtxt``), for servers that only have the python backend.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        # idle threads sleep: by default each spins ~25 ms of CPU after every call, taken from the
        # node's own work between its calls when both run on the same cores (the node's
        # inference/backends/local.py, IDLE_THREADS_SLEEP, says how much)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input = config["input"][0]["name"]
        self.output = config["output"][0]["name"]
        # the type the config declares (the spec's output dtype), as the onnxruntime backend gives it
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            batch = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
            result = self.session.run([self.output], {self.input: batch})[0]
            tensor = pb_utils.Tensor(self.output, np.ascontiguousarray(result, dtype=self.output_dtype))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
