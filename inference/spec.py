"""The node-side model spec (``<repo>/<model>/node.yaml``): what the node needs to run a model.

Triton's ``config.pbtxt`` says how the server runs the model; this file says what the data
must look like going in (orientation, spacing, intensities, patches), what comes out, and
what the labels mean in DICOM terms (coded concepts for SEG and SR).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.yamlfile import ConfigError, Problem, load_yaml, validate

TensorType = Literal["FP32", "FP16", "INT64", "INT32", "UINT8"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Code(_Strict):
    """A coded concept (scheme designator, code value, code meaning), e.g. SCT 52988006 Lesion."""

    scheme: str = Field(min_length=1, max_length=16)
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)


class Label(_Strict):
    value: int = Field(ge=1, description=(
        "label value in the model output (0 is background; a segmentation's at most 255: a byte per voxel)"))
    name: str = Field(min_length=1, max_length=64)
    category: Code
    type: Code
    region: Code | None = None
    color: tuple[int, int, int] = (255, 0, 0)

    @field_validator("color")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= c <= 255 for c in value):
            raise ValueError("colour components must be 0-255")
        return value


class Tensor(_Strict):
    name: str
    dtype: TensorType = "FP32"


class Output(Tensor):
    channels: int | None = Field(None, ge=2, le=256, description=(
        "segmentation: the network's output channels, background included, where it has more than the highest"
        " label value + 1 (a multi-organ network of which the spec names a few); null: that many"))


class Intensity(_Strict):
    """Map stored values (after rescale) to model input: a window, or z-score normalisation."""

    window: tuple[float, float] | None = Field(None, description="[lower, upper] in modality units (HU)")
    output_range: tuple[float, float] = (0.0, 1.0)
    normalize: Literal["none", "zscore"] = "none"

    @model_validator(mode="after")
    def _one_method(self) -> "Intensity":
        if self.window is not None and self.normalize != "none":
            raise ValueError("use either window or normalize, not both")
        if self.window is not None and self.window[0] >= self.window[1]:
            raise ValueError("window lower bound must be below the upper bound")
        return self


class Preprocessing(_Strict):
    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, value: str) -> str:
        axes = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}
        if len(value) != 3 or any(c not in axes for c in value) or len({axes[c] for c in value}) != 3:
            raise ValueError("must name one of L/R, A/P and S/I each, e.g. RAS")
        return value

    @field_validator("patch_size")
    @classmethod
    def _whole_voxels(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        # (MONAI reads a side under 1 as the image's whole side: a window the spec cannot name)
        if min(value) < 1:
            raise ValueError("each side is at least one voxel")
        return value

    orientation: str = Field("RAS", description="MONAI axcodes, e.g. RAS or LPS")
    spacing: tuple[float, float, float] | None = Field(None, description="mm; null keeps native")
    intensity: Intensity = Field(default_factory=Intensity)
    patch_size: tuple[int, int, int] = Field((64, 64, 64), description=(
        "voxels per window side (classification: the size the input is resized to)"))
    overlap: float = Field(0.25, ge=0, lt=1)
    batch_size: int = Field(1, ge=1)
    blend: Literal["gaussian", "constant"] = Field("gaussian", description="how overlapping patches are merged")


class Postprocessing(_Strict):
    mode: Literal["argmax", "threshold"] = "argmax"
    threshold: float = Field(0.5, gt=0, lt=1, description="detection: the operating point (score)")
    keep_largest_component: bool = False
    min_component_voxels: int = Field(0, ge=0)
    findings: Literal["per_label", "per_component"] = Field(
        "per_label", description="per_component: each connected component is a finding (lesions)"
    )
    nms_iou: float = Field(0.1, gt=0, lt=1, description="detection: boxes overlapping more are one finding")
    max_findings: int = Field(20, ge=1, le=100, description="detection: the most probable ones are kept")
    body_threshold: float | None = Field(None, description=(
        "detection: a finding outside the body (the largest region above this value on its slice, holes filled:"
        " not a skin marker, a pad or the table) is dropped; null: no check"))


class Provenance(_Strict):
    """Where a version came from (written by `dicom-node models import-bundle` / `import-torchscript`);
    it goes into every result (Contributing Equipment, algorithm parameters) and `models list`."""

    source: Literal["monai-bundle", "torchscript"]
    source_name: str = Field(min_length=1, max_length=64, description="the bundle's name, or the file's")
    source_version: str = Field("", max_length=64, description="the bundle's own version")
    source_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$", description=(
        "of what was imported: a bundle's metadata, inference configuration and weights; a TorchScript file"))
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of model.onnx: the node runs no other file")
    imported_at: str = ""
    manufacturer: str = Field("", max_length=64, description="the bundle's authors")
    model_card: dict[str, str] = Field(default_factory=dict, description=(
        "the bundle's description, intended use, data source, copyright, references and metrics, as text"))


class ModelSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64, description="AlgorithmName (LO) in results")
    version: int = Field(1, ge=1)
    task: Literal["segmentation", "classification", "detection"]
    description: str = ""
    # CID 7162 Algorithm Family (DCM 113037 is a KOS title: "Rejected for Patient Safety Reasons")
    algorithm_family: Code = Code(scheme="DCM", value="123110", meaning="Artificial Intelligence")
    input: Tensor = Tensor(name="image")
    output: Output = Output(name="logits")
    output_activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    postprocessing: Postprocessing = Field(default_factory=Postprocessing)
    labels: list[Label] = Field(min_length=1)
    provenance: Provenance | None = None

    @model_validator(mode="after")
    def _labels_unique(self) -> "ModelSpec":
        values = [label.value for label in self.labels]
        if len(set(values)) != len(values):
            raise ValueError("label values must be unique")
        if self.task == "segmentation" and max(values) > 255:  # (a classifier's and a detector's are columns)
            raise ValueError("a segmentation's label values are at most 255: its labels are a byte per voxel")
        return self

    @model_validator(mode="after")
    def _channels(self) -> "ModelSpec":
        given = self.output.channels
        if given is None:
            return self
        if self.task != "segmentation":
            raise ValueError("output.channels is a segmentation's: a classifier's and a detector's output columns"
                             " are its labels")
        highest = max(label.value for label in self.labels)
        if given <= highest:
            raise ValueError(f"output.channels ({given}) must exceed the highest label value ({highest}): channel 0"
                             " is the background, channel n label value n")
        return self

    @model_validator(mode="after")
    def _detector(self) -> "ModelSpec":
        if self.task != "detection":
            return self
        if [label.value for label in self.labels] != list(range(1, len(self.labels) + 1)):
            raise ValueError("a detector's labels are listed with values 1, 2, ... in order: its score columns")
        if self.output_activation != "none":
            raise ValueError("a detector's output_activation is none: its scores are probabilities already")
        return self

    @property
    def output_channels(self) -> int:
        """Segmentation: background + a channel per label value up to the highest, or as many as
        `output.channels` declares (channels the labels do not name are the network's other classes);
        classification: one per class; detection: the values per anchor, its box (x0, y0, z0, x1,
        y1, z1 in input voxels) and a score per label (inference.detection)."""
        if self.task == "segmentation":
            return self.output.channels or max(label.value for label in self.labels) + 1
        if self.task == "detection":
            return 6 + len(self.labels)
        return len(self.labels)

    def label(self, value: int) -> Label:
        return next(label for label in self.labels if label.value == value)


def load_spec(model_dir: str | Path, path: Path | None = None) -> ModelSpec:
    """Read and validate a model's spec (``node.yaml`` in its folder, or `path`, a version's own);
    the name must match the model folder."""
    model_dir = Path(model_dir)
    doc = load_yaml(path or model_dir / "node.yaml")
    spec = validate(doc, ModelSpec)
    if spec.name != model_dir.name:
        raise ConfigError([doc.problem(("name",), f"must match the model folder name {model_dir.name!r}")])
    return spec


def model_file(repository: str | Path, spec: ModelSpec) -> Path:
    path = Path(repository) / spec.name / str(spec.version) / "model.onnx"
    if not path.is_file():
        raise ConfigError([Problem(str(path), None, "", "model file not found")])
    return path
