"""In-process backend: the same model.onnx that Triton serves, run with ONNX Runtime on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from common.cpus import cpus_below_machine
from inference.backends.base import BackendError
from inference.spec import ModelSpec


# ONNX Runtime's idle intra-op threads wait for the next call by sleeping, not by spinning. By
# default each spins about 25 ms of CPU after every call (measured), and a sliding window calls
# the model once per batch of windows, with its own work (gathering the windows, blending the
# outputs) between calls on the same cores: an organ model at native resolution on 2 cores,
# 49 calls, spent 2.7-2.9 s in the sliding window with spinning and 1.5-1.6 s without; the demo
# model on a 2 mm grid 0.99-1.32 s against 0.91-0.94 s. Calls back to back with nothing between
# them are what spinning is for: the demo model's 34.5-35 ms per call against 33-34 ms.
IDLE_THREADS_SLEEP = ("session.intra_op.allow_spinning", "0")


class LocalBackend:
    def __init__(self, model_path: Path, spec: ModelSpec, threads: int = 0):
        """`threads`: ONNX Runtime's intra-op threads; 0 for its default (the host's physical
        cores, whatever the affinity or a CPU quota allow), or the usable CPUs when those are
        fewer than the machine's (common.cpus): threads beyond them share the CPUs or are
        throttled in turns (the sliding window 2.54 s against 1.16 s under a 1-CPU quota on two
        CPUs, benchmarks.cpu_quota)."""
        options = ort.SessionOptions()
        threads = threads or cpus_below_machine() or 0
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry(*IDLE_THREADS_SLEEP)
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"cannot load {model_path}: {exc}") from None
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if spec.input.name not in inputs or spec.output.name not in outputs:
            raise BackendError(
                f"model {spec.name}: spec names input {spec.input.name!r} and output {spec.output.name!r},"
                f" the ONNX file has inputs {sorted(inputs)} and outputs {sorted(outputs)}"
            )
        self.spec = spec

    def infer(self, batch: np.ndarray) -> np.ndarray:
        try:
            return self.session.run([self.spec.output.name], {self.spec.input.name: batch})[0]
        except Exception as exc:
            raise BackendError(f"model {self.spec.name} failed on input {batch.shape}: {exc}") from None

    def close(self) -> None:
        pass
