"""The model repository as the node sees it: models, their versions side by side, and a backend
for each version.

Layout (Triton's, so one folder serves both backends)::

    <repo>/<model>/config.pbtxt              how Triton runs it (inputs and outputs shared by every version)
    <repo>/<model>/<version>/model.onnx      one folder per version (an integer, as Triton wants)
    <repo>/<model>/<version>/node.yaml       that version's node-side spec (imported versions)
    <repo>/<model>/node.yaml                 or one spec for the model (its `version` names the folder)

A rule names a model (`lesion-seg`: the latest version, resolved at each job) or pins a version
(`lesion-seg@2`). A version whose spec records a checksum runs only while its model file still
has that checksum.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from common.yamlfile import ConfigError, Problem
from inference.backends.base import Backend
from inference.spec import ModelSpec, load_spec, model_file

REF_PATTERN = r"^[A-Za-z0-9_.-]+(@[0-9]+)?$"


@dataclass(frozen=True)
class ModelRef:
    """A model as a rule names it: `name` (the latest version) or `name@version` (pinned)."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        if not re.match(REF_PATTERN, text):
            raise ValueError(f"not a model reference (name or name@version): {text!r}")
        name, _, version = text.partition("@")
        return cls(name, int(version) if version else None)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelRepository:
    def __init__(self, root: Path):
        self.root = Path(root)
        # (spec file, its mtime and size) -> spec: a changed or replaced file is read again
        self._specs: dict[tuple[Path, int, int], ModelSpec] = {}
        self._checked: dict[tuple[Path, int, int], str] = {}  # model file (mtime, size) -> checksum

    def names(self) -> set[str]:
        """Models with at least one version the node can describe."""
        return {name for name in self._folders() if self.versions(name)}

    def catalog(self) -> dict[str, list[int]]:
        """Every model's versions, oldest first (what rules may name)."""
        return {name: self.versions(name) for name in sorted(self.names())}

    def _folders(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[int]:
        """The model's versions that have a spec: their own node.yaml, or the model's (its version)."""
        entry = self.root / name
        found = {int(p.parent.name) for p in entry.glob("*/node.yaml") if p.parent.name.isdigit()}
        shared = entry / "node.yaml"
        if shared.is_file():
            try:
                found.add(self._spec_file(shared, name, None).version)
            except ConfigError:
                pass  # reported when a rule or the console asks for it
        return sorted(found)

    def spec(self, ref: str | ModelRef) -> ModelSpec:
        """The spec of a pinned version, or of the latest one."""
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        version = ref.version
        if version is None:
            versions = self.versions(ref.name)
            if not versions:
                raise ConfigError([Problem(str(self.root / ref.name), None, "", "no model of this name (no node.yaml)")])
            version = versions[-1]
        own = self.root / ref.name / str(version) / "node.yaml"
        if own.is_file():
            return self._spec_file(own, ref.name, version)
        spec = self._spec_file(self.root / ref.name / "node.yaml", ref.name, None)
        if spec.version != version:
            raise ConfigError([Problem(str(self.root / ref.name), None, "",
                                       f"no version {version} (it has {self.versions(ref.name) or 'none'})")])
        return spec

    def _spec_file(self, path: Path, name: str, version: int | None) -> ModelSpec:
        try:
            st = path.stat()
        except OSError:
            raise ConfigError([Problem(str(path), None, "", "not found")]) from None
        key = (path, st.st_mtime_ns, st.st_size)
        spec = self._specs.get(key)
        if spec is None:
            spec = load_spec(path.parent if version is None else path.parent.parent, path)
            if version is not None and spec.version != version:
                raise ConfigError([Problem(str(path), None, "version",
                                           f"is {spec.version}, the folder says {version}")])
            self._specs[key] = spec
        return spec

    def verified_file(self, spec: ModelSpec) -> Path:
        """The version's model file, refused when it no longer has the checksum recorded at import."""
        path = model_file(self.root, spec)
        expected = spec.provenance.sha256 if spec.provenance else None
        if expected:
            st = path.stat()
            key = (path, st.st_mtime_ns, st.st_size)
            if key not in self._checked:
                self._checked[key] = sha256_of(path)
            if self._checked[key] != expected:
                raise ConfigError([Problem(str(path), None, "", "the model file's SHA-256 is not the one recorded"
                                           " at import: the file was changed or damaged; import it again")])
        return path

    def backend(self, ref: str | ModelRef, triton_url: str | None = None, protocol: str = "grpc",
                shared_memory: str = "auto", timeout: float = 120.0, retries: int = 4) -> Backend:
        """Triton when a URL is configured, else ONNX Runtime in-process on the same model file.
        (Imported here: tritonclient and onnxruntime cost the CLI and the receivers 0.2 s to import.)"""
        spec = self.spec(ref)
        if triton_url:
            from inference.backends.triton import TritonBackend

            if (self.root / spec.name / str(spec.version) / "model.onnx").is_file():
                # Triton reads this repository (or a copy of it): refuse a file that is not the imported one
                self.verified_file(spec)

            return TritonBackend(triton_url, spec, protocol=protocol, shared_memory=shared_memory,  # type: ignore[arg-type]
                                 timeout=timeout, retries=retries)
        from inference.backends.local import LocalBackend

        return LocalBackend(self.verified_file(spec), spec)
