"""A MONAI bundle (the Model Zoo format) or a TorchScript file read into the node's model spec,
or refused with every reason.

The bundle's own configuration is parsed and instantiated by MONAI (`monai.bundle.ConfigParser`:
its `@` references, `$` expressions and `_target_` names resolve as they would in the bundle's
own `inference.json`), and the resulting transform and inferer objects are read, not the JSON
text. Each one maps to a field of the node's spec, or is something the node does itself (loading,
inverting onto the source grid, saving), or the import is refused naming it: the node never runs a
model on an approximation of the preprocessing it was trained with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from inference.repository import sha256_of
from inference.spec import Code, Label, ModelSpec, Provenance

METADATA = "configs/metadata.json"
INFERENCE_CONFIGS = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
WEIGHTS = ("models/model.pt", "models/model.ts")
DEFAULT_COLORS = [(255, 80, 0), (0, 160, 255), (80, 220, 80), (230, 60, 200), (250, 220, 0), (0, 210, 190)]


class ImportRefused(ValueError):
    """What stops an import, every reason at once."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class Imported:
    """A model read for the repository: its spec (with provenance), its network, what was mapped."""

    spec: ModelSpec
    network: Any  # torch.nn.Module or torch.jit.ScriptModule, in eval mode
    report: list[str] = field(default_factory=list)


def _sha256_of_files(paths: list[Path]) -> str:
    """One digest of several files (name and content each): a bundle's metadata, its inference
    configuration and its weights, so a changed transform changes the source's checksum too."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\0{sha256_of(path)}\0".encode())
    return digest.hexdigest()


def _per_key(transform: Any, attribute: str, key: str) -> Any:
    """A dictionary transform's setting for `key` (MONAI keeps one value per key)."""
    values = getattr(transform, attribute)
    keys = list(getattr(transform, "keys", (key,)))
    if isinstance(values, (tuple, list)) and len(values) == len(keys):
        return values[keys.index(key)] if key in keys else values[0]
    return values


class _OneEach:
    """A second transform for the same spec field (a window, then z-score; two activations) is no
    single setting: refused, never overwritten."""

    def __init__(self, prefix: str, refused: list[str]):
        self.prefix, self.refused = prefix, refused
        self.mapped: dict[str, str] = {}  # spec field -> the transform that set it

    def __call__(self, field: str, name: str) -> bool:
        if field in self.mapped:
            self.refused.append(f"{name}: {self.mapped[field]} already set {self.prefix}{field}; the node applies one")
            return False
        self.mapped[field] = name
        return True


def _setting(transform: Any, name: str, default: Any) -> Any:
    """A transform's setting as MONAI keeps it (an array's first value), `default` if it has none."""
    value = getattr(transform, name, default)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and default is None:  # min/max_pixdim: NaN where unset
        value = [v for v in value if v is not None and v == v] or None
    return value


def _touches(transform: Any, key: str) -> bool:
    keys = getattr(transform, "keys", None)
    return keys is None or key in keys


def map_preprocessing(transforms: list[Any], key: str = "image") -> tuple[dict[str, Any], list[str], list[str]]:
    """(spec preprocessing fields, report lines, refusals) for the bundle's preprocessing."""
    from monai import transforms as mt

    fields: dict[str, Any] = {}
    report: list[str] = []
    refused: list[str] = []
    done_by_node = (mt.LoadImage, mt.LoadImaged, mt.EnsureChannelFirst, mt.EnsureChannelFirstd, mt.EnsureType,
                    mt.EnsureTyped, mt.ToTensor, mt.ToTensord, mt.Identity, mt.Identityd)
    once = _OneEach("preprocessing.", refused)

    if transforms and not any(_touches(t, key) for t in transforms):
        refused.append(f"preprocessing: no transform is applied to the input {key!r} (metadata.json's"
                       " network_data_format.inputs): the keys do not match")
    for t in transforms:
        name = type(t).__name__
        if not _touches(t, key):
            report.append(f"{name}: not applied to {key!r}, ignored")
        elif isinstance(t, done_by_node):
            report.append(f"{name}: the node reads the DICOM series itself (channel first, float32)")
        elif isinstance(t, (mt.CastToType, mt.CastToTyped)):
            dtype = str(_per_key(t, "dtype", key) if isinstance(t, mt.CastToTyped) else t.dtype)
            if "float32" in dtype:
                report.append(f"{name}({dtype}): the node's input is float32")
            else:
                refused.append(f"{name}: casts to {dtype}; the node feeds float32")
        elif isinstance(t, (mt.Orientation, mt.Orientationd)):
            axcodes = (t.ornt_transform if isinstance(t, mt.Orientationd) else t).axcodes
            if not isinstance(axcodes, str) or len(axcodes) != 3:
                refused.append(f"{name}: no 3-letter axcodes (as_closest_canonical); the node needs a fixed one")
            elif once("orientation", name):
                fields["orientation"] = axcodes
                report.append(f"{name}(axcodes={axcodes}) -> preprocessing.orientation")
        elif isinstance(t, (mt.Spacing, mt.Spacingd)):
            spacing = t.spacing_transform if isinstance(t, mt.Spacingd) else t
            mode = str(_per_key(t, "mode", key) if isinstance(t, mt.Spacingd) else spacing.mode)
            pixdim = [float(v) for v in spacing.pixdim]
            unusual = [k for k, default in (("diagonal", False), ("scale_extent", False), ("min_pixdim", None),
                                            ("max_pixdim", None), ("recompute_affine", False))
                       if _setting(spacing, k, default) != default]
            if len(pixdim) != 3 or min(pixdim) <= 0 or mode not in ("bilinear", "GridSampleMode.BILINEAR") or unusual:
                refused.append(f"{name}: pixdim {pixdim} mode {mode}{' ' + ', '.join(unusual) if unusual else ''};"
                               " the node resamples 3-D images linearly to a positive spacing")
            elif once("spacing", name):
                fields["spacing"] = pixdim
                report.append(f"{name}(pixdim={pixdim}) -> preprocessing.spacing")
        elif isinstance(t, (mt.ScaleIntensityRange, mt.ScaleIntensityRanged)):
            s = t.scaler if isinstance(t, mt.ScaleIntensityRanged) else t
            if not s.clip or s.b_min is None or s.b_max is None or not s.a_min < s.a_max:
                refused.append(f"{name}: clip={s.clip}, a_min={s.a_min}, a_max={s.a_max}, b_min={s.b_min},"
                               f" b_max={s.b_max}; the node maps a window (a_min < a_max) onto a range and clips")
            elif once("intensity", name):
                fields["intensity"] = {"window": [float(s.a_min), float(s.a_max)],
                                       "output_range": [float(s.b_min), float(s.b_max)]}
                report.append(f"{name}(a_min={s.a_min}, a_max={s.a_max}, b_min={s.b_min}, b_max={s.b_max}, clip)"
                              " -> preprocessing.intensity.window/output_range")
        elif isinstance(t, (mt.NormalizeIntensity, mt.NormalizeIntensityd)):
            n = t.normalizer if isinstance(t, mt.NormalizeIntensityd) else t
            if n.subtrahend is not None or n.divisor is not None or n.nonzero:
                refused.append(f"{name}: subtrahend/divisor/nonzero set; the node normalises over the whole image")
            elif once("intensity", name):
                fields["intensity"] = {"normalize": "zscore"}
                report.append(f"{name}() -> preprocessing.intensity.normalize zscore")
        else:
            refused.append(f"{name}: no equivalent in the node's preprocessing")
    return fields, report, refused


def map_inferer(inferer: Any) -> tuple[dict[str, Any], list[str], list[str]]:
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    name = type(inferer).__name__
    if isinstance(inferer, SlidingWindowInferer):
        mode = str(getattr(inferer.mode, "value", inferer.mode))
        overlap = inferer.overlap
        overlaps = set(overlap) if isinstance(overlap, (tuple, list)) else {overlap}
        problems = []
        if mode not in ("constant", "gaussian"):
            problems.append(f"{name}: blend mode {mode}")
        if len(overlaps) != 1:
            problems.append(f"{name}: overlap differs per axis {overlap}")
        if str(getattr(inferer.padding_mode, "value", inferer.padding_mode)) != "constant" or inferer.cval != 0 \
                or inferer.sigma_scale != 0.125:
            problems.append(f"{name}: padding_mode/cval/sigma_scale not MONAI's defaults")
        roi = [int(v) for v in inferer.roi_size]
        if len(roi) != 3 or min(roi) < 1:
            problems.append(f"{name}: roi_size {roi} is not a 3-D patch")
        if problems:
            return {}, [], problems
        fields = {"patch_size": roi, "overlap": float(next(iter(overlaps))), "batch_size": int(inferer.sw_batch_size),
                  "blend": mode}
        return fields, [f"{name}(roi_size={roi}, sw_batch_size={inferer.sw_batch_size}, overlap={overlap},"
                        f" mode={mode}) -> preprocessing.patch_size/batch_size/overlap/blend"], []
    if isinstance(inferer, SimpleInferer):
        return {}, [], [f"{name}: the whole image at once; the node runs 3-D models in sliding windows"
                        " (SlidingWindowInferer with the patch the network was trained on)"]
    return {}, [], [f"{name}: the node runs sliding windows (SlidingWindowInferer)"]


def map_postprocessing(transforms: list[Any], key: str = "pred") -> tuple[dict[str, Any], list[str], list[str]]:
    """(activation and postprocessing fields, report lines, refusals)."""
    from monai import transforms as mt

    fields: dict[str, Any] = {"output_activation": "none", "postprocessing": {}}
    report: list[str] = []
    refused: list[str] = []
    done_by_node = (mt.Invertd, mt.Invert, mt.SaveImage, mt.SaveImaged, mt.EnsureType, mt.EnsureTyped,
                    mt.ToTensor, mt.ToTensord, mt.CopyItemsd, mt.Identity, mt.Identityd)
    once = _OneEach("", refused)

    touched = [t for t in transforms if not isinstance(t, done_by_node) and _touches(t, key)]
    if transforms and not touched and any(not isinstance(t, done_by_node) for t in transforms):
        refused.append(f"postprocessing: no transform is applied to the output {key!r} (metadata.json's"
                       " network_data_format.outputs): the keys do not match")
    for t in transforms:
        name = type(t).__name__
        if isinstance(t, done_by_node):
            report.append(f"{name}: the node maps results onto the source grid and writes DICOM itself")
        elif not _touches(t, key):
            report.append(f"{name}: not applied to {key!r}, ignored")
        elif isinstance(t, (mt.Activations, mt.Activationsd)):
            d = isinstance(t, mt.Activationsd)
            softmax = _per_key(t, "softmax", key) if d else t.softmax
            sigmoid = _per_key(t, "sigmoid", key) if d else t.sigmoid
            other = _per_key(t, "other", key) if d else t.other
            if other is not None or (softmax and sigmoid):
                refused.append(f"{name}: a custom activation")
            elif once("output_activation", name):
                fields["output_activation"] = "softmax" if softmax else "sigmoid" if sigmoid else "none"
                report.append(f"{name} -> output_activation {fields['output_activation']}")
        elif isinstance(t, (mt.AsDiscrete, mt.AsDiscreted)):
            d = isinstance(t, mt.AsDiscreted)
            argmax = _per_key(t, "argmax", key) if d else t.argmax
            threshold = _per_key(t, "threshold", key) if d else t.threshold
            if (argmax and threshold is None or threshold is not None and not argmax) and not once("mode", name):
                pass
            elif argmax and threshold is None:
                fields["postprocessing"]["mode"] = "argmax"
                report.append(f"{name}(argmax) -> postprocessing.mode argmax")
            elif threshold is not None and not argmax and 0 < float(threshold) < 1:
                fields["postprocessing"].update(mode="threshold", threshold=float(threshold))
                report.append(f"{name}(threshold={threshold}) -> postprocessing.mode threshold")
            else:
                refused.append(f"{name}: neither argmax nor one threshold in (0, 1)")
        elif isinstance(t, (mt.KeepLargestConnectedComponent, mt.KeepLargestConnectedComponentd)):
            c = t.converter if isinstance(t, mt.KeepLargestConnectedComponentd) else t
            if c.applied_labels is not None or c.num_components != 1 or not c.independent or c.connectivity != 1:
                refused.append(f"{name}: applied_labels={c.applied_labels}, num_components={c.num_components},"
                               f" independent={c.independent}, connectivity={c.connectivity}; the node keeps the"
                               " largest component of each label, neighbours by faces (connectivity=1)")
            elif once("keep_largest_component", name):
                fields["postprocessing"]["keep_largest_component"] = True
                report.append(f"{name} -> postprocessing.keep_largest_component")
        else:
            refused.append(f"{name}: no equivalent in the node's postprocessing")
    return fields, report, refused


def _code(value: Any, where: str) -> Code:
    try:
        return Code.model_validate(value)
    except Exception as exc:
        raise ImportRefused([f"{where}: not a code (scheme, value, meaning): {exc}"]) from None


def labels_from(channels: dict[int, str], codes: dict[str, Any], task: str,
                only: list[str] | None = None) -> tuple[list[Label], list[str]]:
    """The spec's labels for the output channels {index: name}, coded by the operator's mapping;
    (labels, names that need a code). `only`: the names of the channels to report (a few organs of
    a multi-organ network), the others left unnamed; None: every channel."""
    if only is not None:
        unknown = [name for name in only if name not in channels.values()]
        if unknown:
            raise ImportRefused([f"--only {name}: no such channel in channel_def (it has"
                                 f" {', '.join(repr(n) for _, n in sorted(channels.items()))})" for name in unknown])
        if task == "segmentation" and channels.get(0) in only:
            raise ImportRefused([f"--only {channels[0]}: channel 0 is the background, never a label"])
    labels, uncoded = [], []
    for index, name in sorted(channels.items()):
        if task == "segmentation" and index == 0:
            if name.strip().lower() not in ("background", "bg", "_background_", "0"):
                raise ImportRefused([f"channel 0 is {name!r}: the node's label values are channel numbers from 1,"
                                     " channel 0 is the background (a sigmoid model whose channel 0 is a class needs"
                                     " a background channel first)"])
            continue
        if only is not None and name not in only:
            continue
        entry = codes.get(name)
        if entry is None:
            uncoded.append(name)
            continue
        color = entry.get("color") or DEFAULT_COLORS[len(labels) % len(DEFAULT_COLORS)]
        labels.append(Label(value=index if task == "segmentation" else index + 1, name=name[:64],
                            category=_code(entry.get("category"), f"codes: {name}.category"),
                            type=_code(entry.get("type"), f"codes: {name}.type"),
                            region=_code(entry["region"], f"codes: {name}.region") if entry.get("region") else None,
                            color=tuple(color)))
    return labels, uncoded


def code_hints(names: list[str]) -> list[str]:
    """SNOMED CT concepts whose keyword is the label's name (pydicom's table), as suggestions only:
    whether a label is that concept is the operator's call."""
    from pydicom.sr.codedict import codes

    hints = []
    for name in names:
        keyword = "".join(part.capitalize() for part in name.replace("_", " ").replace("-", " ").split())
        try:
            code = getattr(codes.SCT, keyword)
        except AttributeError:
            continue
        hints.append(f"{name}: perhaps SCT {code.value} {code.meaning!r}")
    return hints


def _channels(metadata: dict[str, Any]) -> tuple[str, dict[int, str], int]:
    """The first output's key, its channels {number: name}, and how many it has: its num_channels,
    which may count classes channel_def leaves out, or at least the highest named one's number + 1."""
    outputs = (metadata.get("network_data_format") or {}).get("outputs") or {}
    if not outputs:
        raise ImportRefused(["configs/metadata.json: no network_data_format.outputs (the labels come from its"
                             " channel_def)"])
    key, output = next(iter(outputs.items()))
    channel_def = output.get("channel_def") or {}
    try:
        channels = {int(k): str(v) for k, v in channel_def.items()}
    except ValueError:
        raise ImportRefused([f"configs/metadata.json: outputs.{key}.channel_def keys must be channel numbers"]) from None
    if not channels:
        raise ImportRefused([f"configs/metadata.json: outputs.{key} has no channel_def (which channel is what)"])
    named = sorted(channels.values())
    twice = sorted({name for name in named if named.count(name) > 1})
    if twice:  # (codes, --only and the labels go by name)
        raise ImportRefused([f"configs/metadata.json: outputs.{key}.channel_def names {name!r} more than once"
                             for name in twice])
    # num_channels may count classes past channel_def's; one under it is the metadata's slip (the
    # network's real channels are checked against the count at export either way)
    return key, channels, max(_whole_number(output.get("num_channels")), max(channels) + 1)


def _whole_number(value: Any) -> int:
    """A metadata count as a number (3, 3.0 or "3"), or 0 where it is none."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return int(number) if number.is_integer() and number > 0 else 0


def _task(output: dict[str, Any]) -> str:
    """An output that is an image (with a spatial shape) is a segmentation, whatever its format
    says ("segmentation", "labels"); anything else (probabilities, a class) a classification."""
    if str(output.get("type") or "").lower() == "image" or output.get("spatial_shape"):
        return "segmentation"
    return "classification"


def _input(metadata: dict[str, Any]) -> str:
    """The image key (the bundle's own, e.g. `img`), refused unless it is one channel."""
    inputs = (metadata.get("network_data_format") or {}).get("inputs") or {}
    if not inputs:
        raise ImportRefused(["configs/metadata.json: no network_data_format.inputs (which key is the image)"])
    if len(inputs) != 1:
        raise ImportRefused([f"configs/metadata.json: {len(inputs)} inputs ({', '.join(inputs)}); the node feeds one"
                             " image"])
    key, spec = next(iter(inputs.items()))
    channels = spec.get("num_channels", 1)
    if channels != 1:
        raise ImportRefused([f"configs/metadata.json: input {key!r} has {channels} channels; the node feeds one"
                             " series (1 channel)"])
    return str(key)


def _model_card(metadata: dict[str, Any]) -> dict[str, str]:
    card = {}
    for key in ("description", "intended_use", "data_source", "copyright", "authors", "references", "eval_metrics",
                "task", "monai_version"):
        value = metadata.get(key)
        if value:
            card[key] = (value if isinstance(value, str) else json.dumps(value, sort_keys=True))[:1024]
    return card


def read_bundle(folder: Path, name: str, version: int, codes: dict[str, Any],
                findings: dict[str, Any] | None = None, only: list[str] | None = None) -> Imported:
    """Read a MONAI bundle into a spec (with provenance) and its network, or refuse with every
    reason. `findings`: how the node reports findings (postprocessing.findings and
    min_component_voxels), which a bundle cannot say: each connected component a finding
    (lesions), or one finding per label (organs). `only`: the channels to report, by their
    channel_def names (the spec then declares the network's channels: `output.channels`)."""
    import torch
    from monai.bundle import ConfigParser

    folder = Path(folder)
    meta_path = folder / METADATA
    config_path = next((folder / c for c in INFERENCE_CONFIGS if (folder / c).is_file()), None)
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    missing = [p for p, ok in ((METADATA, meta_path.is_file()), ("configs/inference.json", config_path),
                               ("models/model.pt or models/model.ts", weights)) if not ok]
    if missing:
        raise ImportRefused([f"{folder}: not a MONAI bundle, missing {', '.join(missing)}"])
    metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    parser = ConfigParser()
    parser.read_meta(str(meta_path))
    parser.read_config(str(config_path))
    parser["bundle_root"] = str(folder)

    def parsed(key: str) -> Any:
        if key not in parser:
            raise ImportRefused([f"{config_path.name}: no {key!r}"])
        try:
            return parser.get_parsed_content(key, instantiate=True)
        except Exception as exc:  # the bundle's own expression or class failed
            raise ImportRefused([f"{config_path.name}: {key!r} could not be instantiated: {type(exc).__name__}: "
                                 f"{str(exc)[:300]}"]) from None

    pre = parsed("preprocessing")
    inferer = parsed("inferer")
    post = parsed("postprocessing") if "postprocessing" in parser else None
    pre_fields, report, refused = map_preprocessing(list(getattr(pre, "transforms", [pre])), _input(metadata))
    inferer_fields, more, problems = map_inferer(inferer)
    report += more
    refused += problems
    output_key, channels, channel_count = _channels(metadata)
    post_fields, more, problems = map_postprocessing(list(getattr(post, "transforms", [])) if post else [], output_key)
    report += more
    refused += problems
    task = _task(metadata["network_data_format"]["outputs"][output_key])
    if task == "classification":
        refused.append("a classification bundle: the node imports segmentation bundles; import a classifier as"
                       " TorchScript with its settings (import-torchscript)")
    try:
        labels, uncoded = labels_from(channels, codes, task, only)
    except ImportRefused as exc:
        labels, uncoded = [], []
        refused += exc.problems
    if not labels and not uncoded and task == "segmentation" and not refused:
        refused.append("no label channels besides the background in channel_def")
    if task == "segmentation" and channel_count > 256:
        refused.append(f"outputs.{output_key}: {channel_count} channels; a segmentation's labels are a byte per voxel"
                       " (256 channels at most)")
    if uncoded:
        hints = code_hints(uncoded)
        refused.append(f"labels without a code: {', '.join(uncoded)} (give each a category and type in --codes)"
                       + (f"; {'; '.join(hints)}" if hints else ""))
    if refused:
        raise ImportRefused(refused)

    if weights.suffix == ".ts":
        network = torch.jit.load(str(weights), map_location="cpu")
    else:
        network = parsed("network_def")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        for wrapper in ("model", "state_dict", "network"):
            if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
                state = state[wrapper]
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            raise ImportRefused([f"{weights.name} does not fit network_def: {str(exc)[:400]}"]) from None
    activation = post_fields["output_activation"] if post else "softmax"
    if activation == "none" and post_fields["postprocessing"].get("mode", "argmax") == "argmax":
        activation = "softmax"  # the argmax of the logits is the argmax of their softmax: exact
    preprocessing = {**pre_fields, **inferer_fields}
    # channels past the highest one reported are declared (a spec names none past it otherwise)
    unnamed_after = channel_count > max(label.value for label in labels) + 1
    if unnamed_after:
        report.append(f"outputs.{output_key}: {channel_count} channels, {len(labels)} of them reported ->"
                      f" output.channels {channel_count}")
    spec = ModelSpec.model_validate({
        "name": name, "version": version, "task": task,
        **({"output": {"name": "logits", "channels": channel_count}} if unnamed_after else {}),
        "description": str(metadata.get("description") or metadata.get("name") or name)[:1024],
        "output_activation": activation,
        "preprocessing": preprocessing, "postprocessing": {**post_fields["postprocessing"], **(findings or {})},
        "labels": labels,
        "provenance": Provenance(
            source="monai-bundle", source_name=str(metadata.get("name") or folder.name)[:64],
            source_version=str(metadata.get("version") or "")[:64],
            source_sha256=_sha256_of_files([meta_path, config_path, weights]),
            sha256="0" * 64,  # set once model.onnx is written
            imported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            manufacturer=str(metadata.get("authors") or "")[:64], model_card=_model_card(metadata)),
    })
    return Imported(spec, network.eval(), report)


def read_torchscript(file: Path, settings: dict[str, Any], name: str, version: int) -> Imported:
    """A TorchScript file with a small YAML (the node spec's task, preprocessing, postprocessing and
    labels: what a TorchScript file cannot say about itself)."""
    import torch

    file = Path(file)
    unknown = sorted(set(settings) - {"task", "description", "output_activation", "preprocessing", "postprocessing",
                                      "labels", "input", "output", "algorithm_family"})
    if unknown:
        raise ImportRefused([f"settings: unknown keys {', '.join(unknown)}"])
    try:
        network = torch.jit.load(str(file), map_location="cpu")
    except Exception as exc:  # not TorchScript, or saved by a newer torch
        raise ImportRefused([f"{file.name}: not a TorchScript file torch {torch.__version__} loads: "
                             f"{type(exc).__name__}"]) from None
    try:
        spec = ModelSpec.model_validate({
            **settings, "name": name, "version": version,
            "provenance": Provenance(source="torchscript", source_name=file.name[:64], source_sha256=sha256_of(file),
                                     sha256="0" * 64,
                                     imported_at=datetime.now(timezone.utc).isoformat(timespec="seconds")),
        })
    except Exception as exc:
        raise ImportRefused([f"settings: {exc}"]) from None
    return Imported(spec, network.eval(), [f"{file.name}: TorchScript, spec from the settings file"])
