"""The model repository as the node sees it: specs by name, and a backend for each model."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from inference.backends.base import Backend
from inference.spec import ModelSpec, load_spec, model_file


class ModelRepository:
    def __init__(self, root: Path):
        self.root = Path(root)

    def names(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {p.name for p in self.root.iterdir() if (p / "node.yaml").is_file()}

    @lru_cache(maxsize=64)
    def spec(self, name: str) -> ModelSpec:
        return load_spec(self.root / name)

    def backend(self, name: str, triton_url: str | None = None, protocol: str = "grpc",
                shared_memory: str = "auto", timeout: float = 120.0, retries: int = 4) -> Backend:
        """Triton when a URL is configured, else ONNX Runtime in-process on the same model file.
        (Imported here: tritonclient and onnxruntime cost the CLI and the receivers 0.2 s to import.)"""
        spec = self.spec(name)
        if triton_url:
            from inference.backends.triton import TritonBackend

            return TritonBackend(triton_url, spec, protocol=protocol, shared_memory=shared_memory,  # type: ignore[arg-type]
                                 timeout=timeout, retries=retries)
        from inference.backends.local import LocalBackend

        return LocalBackend(model_file(self.root, spec), spec)
