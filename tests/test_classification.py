"""Classification with explanations: training, the shipped classifier, its SR, its saliency maps,
and a DX with and without a nodule through the running node."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from inference.backends.base import BackendError
from inference.backends.local import LocalBackend
from inference.pipeline import ClassificationResult, classify
from inference.saliency import occlusion_saliency
from inference.spec import ModelSpec, load_spec
from inference.volume import load_series
from node.config import OutputOptions
from node.encode.saliency import MAX_TINT, build_saliency_maps
from node.encode.sr import build_sr
from tests.identity import uids_for
from tests.peers import storescu, wait_for
from tests.test_conformance import _unexpected, pixelmed
from tests.test_encode import _dciodvfy, phantom_result
from tests.test_geometry import _by_study, _StoreSCP
from training.classification import ClassifierConfig, build_classifier, metrics, roc_curve
from training.cli import CLASSIFIER_SPEC, app
from training.data.dicom_labels import load_labelled_dicom
from training.data.msd import DatasetError
from phantom.radiograph import Nodule, chest_radiograph, make_dx_dataset, write_dx
from phantom.dicom import SeriesIdentity

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
SHIPPED = REPO_MODELS / "chest-nodule-cls"
SMALL = 96  # pixels across the radiographs of the quick tests
# dicom3tools (2022) does not know the defined term QUANTITY (Image Type value 4 of a Parametric Map).
QUANTITY_UNKNOWN_TO_DCIODVFY = [
    "Warning - Unrecognized defined term <QUANTITY> for value 4 of attribute <Image Type>",
    "Warning - Unrecognized defined term <QUANTITY> for value 4 of attribute <Frame Type>",
]


def _small_spec(path: Path) -> Path:
    """The demo spec with a 48x48 input: the training test stays a few seconds."""
    spec = load_spec_file(CLASSIFIER_SPEC)
    small = spec.model_copy(update={"name": "small-cls",
                                    "preprocessing": spec.preprocessing.model_copy(update={"patch_size": (48, 48, 1)})})
    path.write_text(json.dumps(small.model_dump(mode="json")))
    return path


def load_spec_file(path: Path) -> ModelSpec:
    from common.yamlfile import load_yaml, validate

    return validate(load_yaml(path), ModelSpec)


def test_train_export_and_serve_a_classifier(tmp_path):
    """synth-dx -> train-classifier (2 epochs) -> export: per-epoch and held-out metrics in JSON and
    CSV, a ROC plot, a Triton entry with task: classification whose ONNX model the node runs."""
    runner = CliRunner()
    spec_path = _small_spec(tmp_path / "small.json")
    for name, count, seed in (("train", 24, 0), ("test", 12, 1)):
        done = runner.invoke(app, ["synth-dx", str(tmp_path / name), "--count", str(count), "--size", str(SMALL),
                                   "--seed", str(seed)])
        assert done.exit_code == 0, done.output
    run = tmp_path / "run"
    done = runner.invoke(app, ["train-classifier", str(tmp_path / "train"), str(run), "--spec", str(spec_path),
                               "--test-data", str(tmp_path / "test"), "--epochs", "2", "--batch-size", "8"])
    assert done.exit_code == 0, done.output
    history = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    for row in history:
        assert {"loss", "accuracy", "sensitivity", "specificity", "f1", "roc_auc", "tp", "fp", "tn", "fn"} <= set(row)
        assert row["tp"] + row["fp"] + row["tn"] + row["fn"] == 5  # 20% of 24 validate
    with open(run / "metrics.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    test = json.loads((run / "test_metrics.json").read_text())["Nodule"]
    assert sum(test["confusion_matrix"].values()) == 12 and 0 <= test["roc_auc"] <= 1
    assert (run / "test_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "test_roc.csv").exists() and (run / "best.pt").exists()

    done = runner.invoke(app, ["export", str(run / "best.pt"), "--repository", str(tmp_path / "repo"),
                               "--spec", str(spec_path)])
    assert done.exit_code == 0, done.output
    entry = tmp_path / "repo" / "small-cls"
    spec = load_spec(entry)
    assert spec.task == "classification"
    assert "dims: [ 1 ]" in (entry / "config.pbtxt").read_text()  # one output per label
    assert (entry / "configs" / "cpu.pbtxt").exists() and (entry / "1" / "model.py").exists()
    image = tmp_path / "test" / "dx_00001.dcm"
    result = classify(load_series([pydicom.dcmread(image)]), spec, LocalBackend(entry / "1" / "model.onnx", spec))
    assert 0.0 <= result.probabilities[1] <= 1.0


def test_train_a_3d_classifier_on_ct_series(tmp_path):
    """3D: CT series in a folder (a CSV row names any one file of its series) -> a 3D MONAI ResNet
    -> ONNX -> the node classifies a whole series with it."""
    from phantom.study import make_dicom_study

    data = tmp_path / "ct"
    rows = []
    for i in range(4):
        files, _ = make_dicom_study(data / f"study{i}", slices=12, size=32, pixel_spacing=4.0, slice_spacing=4.0, seed=i)
        rows.append(f"{files[0].relative_to(data)},{'Nodule' if i % 2 else ''}")
    (data / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    spec = load_spec_file(CLASSIFIER_SPEC)
    spec3d = spec.model_copy(update={"name": "ct-cls", "preprocessing": spec.preprocessing.model_copy(
        update={"patch_size": (16, 16, 16)})})
    spec_path = tmp_path / "ct-cls.json"
    spec_path.write_text(json.dumps(spec3d.model_dump(mode="json")))
    inputs, targets, _ = load_labelled_dicom(data, data / "labels.csv", spec3d)
    assert inputs.shape == (4, 1, 16, 16, 16) and targets[:, 0].tolist() == [0, 1, 0, 1]
    runner = CliRunner()
    done = runner.invoke(app, ["train-classifier", str(data), str(tmp_path / "run"), "--spec", str(spec_path),
                               "--architecture", "resnet", "--spatial-dims", "3", "--epochs", "1", "--batch-size", "2",
                               "--val-fraction", "0.5"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["export", str(tmp_path / "run" / "best.pt"), "--repository", str(tmp_path / "repo"),
                               "--spec", str(spec_path)])
    assert done.exit_code == 0, done.output
    model = load_spec(tmp_path / "repo" / "ct-cls")
    volume = load_series([pydicom.dcmread(p) for p in sorted((data / "study1").glob("*.dcm"))])
    result = classify(volume, model, LocalBackend(tmp_path / "repo" / "ct-cls" / "1" / "model.onnx", model))
    assert set(result.probabilities) == {1} and 0.0 <= result.probabilities[1] <= 1.0


@pytest.mark.parametrize("architecture", ["densenet", "resnet", "densenet121"])
def test_networks_2d_and_3d(architecture):
    """MONAI DenseNet/ResNet in 2D (behind the node's one-slice input) and 3D: one logit per label."""
    spec2d = load_spec_file(CLASSIFIER_SPEC)
    spec3d = spec2d.model_copy(update={"preprocessing": spec2d.preprocessing.model_copy(update={"patch_size": (32, 32, 32)})})
    with torch.no_grad():
        flat = build_classifier(spec2d, ClassifierConfig(architecture=architecture, spatial_dims=2)).eval()
        assert flat(torch.rand(2, 1, 64, 64, 1)).shape == (2, 1)
        deep = build_classifier(spec3d, ClassifierConfig(architecture=architecture, spatial_dims=3)).eval()
        assert deep(torch.rand(1, 1, 32, 32, 32)).shape == (1, 1)
    with pytest.raises(ValueError, match="patch_size"):
        build_classifier(spec3d, ClassifierConfig(spatial_dims=2))


def test_metrics_agree_with_hand_counts():
    spec = load_spec_file(CLASSIFIER_SPEC)  # sigmoid, threshold 0.5
    p = torch.tensor([[0.9], [0.8], [0.4], [0.7], [0.2], [0.1]])
    y = torch.tensor([[1.0], [1.0], [1.0], [0.0], [0.0], [0.0]])
    m = metrics(p, y, spec)["Nodule"]
    assert m["confusion_matrix"] == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    assert m["accuracy"] == pytest.approx(4 / 6) and m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["roc_auc"] == pytest.approx(8 / 9)  # 8 of the 9 (positive, negative) pairs ranked right
    curve = roc_curve(p[:, 0].numpy(), y[:, 0].numpy())
    fpr, tpr = np.array([c["fpr"] for c in curve]), np.array([c["tpr"] for c in curve])
    assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(8 / 9)


def test_site_loader_reads_a_folder_and_a_csv(tmp_path):
    make_dx_dataset(tmp_path, 4, seed=3, size=SMALL)
    spec = load_spec_file(CLASSIFIER_SPEC)
    inputs, targets, names = load_labelled_dicom(tmp_path, tmp_path / "labels.csv", spec)
    assert inputs.shape == (4, 1, 128, 128, 1) and targets[:, 0].tolist() == [0, 1, 0, 1]
    assert names == [f"dx_{i:05d}.dcm" for i in range(4)]
    (tmp_path / "bad.csv").write_text("file,label\ndx_00000.dcm,Pneumothorax\n")
    with pytest.raises(DatasetError, match="not in the model spec"):
        load_labelled_dicom(tmp_path, tmp_path / "bad.csv", spec)
    (tmp_path / "nocol.csv").write_text("path,finding\ndx_00000.dcm,Nodule\n")
    with pytest.raises(DatasetError, match="'file' and 'label'"):
        load_labelled_dicom(tmp_path, tmp_path / "nocol.csv", spec)


def test_shipped_classifier_on_fresh_synthetic_radiographs(tmp_path):
    """The committed model on radiographs it never saw (another seed): the README's claim holds."""
    spec = load_spec(SHIPPED)
    recorded = json.loads((SHIPPED / "training.json").read_text())
    assert recorded["command"].startswith("dicom-node-train demo-classifier")
    backend = LocalBackend(SHIPPED / "1" / "model.onnx", spec)
    rng = np.random.default_rng(2026)
    scores, truth = [], []
    for i in range(40):
        pixels, nodule = chest_radiograph(rng, nodule=bool(i % 2))
        volume = load_series([pydicom.dcmread(write_dx(tmp_path / f"{i}.dcm", pixels))])
        scores.append(classify(volume, spec, backend).probabilities[1])
        truth.append(nodule is not None)
    m = metrics(torch.tensor(scores)[:, None], torch.tensor(truth, dtype=torch.float32)[:, None], spec)["Nodule"]
    print({k: m[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")})
    assert m["roc_auc"] >= 0.9 and m["accuracy"] >= 0.8


def test_a_classifier_whose_output_is_not_a_score_per_class_fails_saying_so(tmp_path):
    """The probabilities are read a class at a time from the model's output: an output with a
    column more (or fewer) is the model's error, named, never scores given to the wrong classes;
    and so is a NaN score, or an infinite one under a softmax."""
    spec = load_spec(SHIPPED)
    backend = LocalBackend(SHIPPED / "1" / "model.onnx", spec)
    pixels, _ = chest_radiograph(np.random.default_rng(5), nodule=False)
    volume = load_series([pydicom.dcmread(write_dx(tmp_path / "dx.dcm", pixels))])
    assert spec.output_channels == len(spec.labels) == 1

    class OneMore:  # the real model's scores and a column more
        def infer(self, batch):
            scores = backend.infer(batch)
            return np.concatenate([scores, scores[:, :1]], axis=1)

    with pytest.raises(BackendError, match=r"model chest-nodule-cls answered an input of shape \(1, 1, 128, 128, 1\)"
                                           r" with an output of shape \(1, 2\): a classifier's output is \(1, 1\)"):
        classify(volume, spec, OneMore())

    class NotANumber:  # the real model's scores, made NaN (an FP16 overflow): no probability, never "absent"
        def infer(self, batch):
            return backend.infer(batch) * np.nan

    with pytest.raises(BackendError, match=r"model chest-nodule-cls answered NaN \(not a number\)"):
        classify(volume, spec, NotANumber())

    class Infinite:  # a softmax's score overflowing (FP16): its probabilities are NaN, never "the most probable"
        def infer(self, batch):
            return np.array([[np.inf, 0.0]], np.float32)

    labels = [spec.labels[0], spec.labels[0].model_copy(update={"value": 2, "name": "Mass"})]
    softmax = spec.model_copy(update={"output_activation": "softmax", "labels": labels})
    with pytest.raises(BackendError, match=r"model chest-nodule-cls answered NaN \(not a number\), infinities of both"
                                           r" signs, or an infinity under its softmax"):
        classify(volume, softmax, Infinite())


# -- SR and saliency objects -------------------------------------------------------------------


def _nodule_case(tmp_path: Path, seed: int, nodule: bool) -> tuple[Path, Nodule | None]:
    """A radiograph at the demo size; with a nodule, one of at least 5 pixels radius."""
    rng = np.random.default_rng(seed)
    while True:
        pixels, found = chest_radiograph(rng, nodule=nodule)
        if found is None or found.radius >= 5:
            break
    path = write_dx(tmp_path / f"dx-{seed}-{int(nodule)}.dcm", pixels,
                    SeriesIdentity(patient_id=f"CLS{seed}{int(nodule)}", series_description="Chest PA"))
    return path, found


def _decision(sr: Dataset) -> dict[str, object]:
    """Finding -> Present/Absent, and the probability, read from the SR's content tree."""
    root = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
    evaluations = {i.ConceptNameCodeSequence[0].CodeMeaning: i.ConceptCodeSequence[0].CodeMeaning
                   for i in root["Qualitative Evaluations"].ContentSequence}
    group = next(i for i in root["Imaging Measurements"].ContentSequence if i.ValueType == "CONTAINER")
    num = next(i for i in group.ContentSequence if i.ValueType == "NUM")
    value = num.MeasuredValueSequence[0]
    sources = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in num.ContentSequence
               if i.ValueType == "IMAGE"]
    return {"evaluations": evaluations, "probability": float(value.NumericValue),
            "unit": value.MeasurementUnitsCodeSequence[0].CodeValue, "sources": sources}


def _saliency_peak(sc: Dataset) -> tuple[int, int]:
    """(row, column) of the strongest tint (node.encode.saliency.tint)."""
    alpha = _opacity(sc)
    return tuple(int(v) for v in np.unravel_index(np.argmax(alpha), alpha.shape))  # type: ignore[return-value]


def _opacity(sc: Dataset) -> np.ndarray:
    """The tint's opacity per pixel: R - G = 255 a (node.encode.saliency.tint)."""
    rgb = sc.pixel_array.astype(float)
    return (rgb[..., 0] - rgb[..., 1]) / 255.0


def test_sr_and_heat_map_of_a_radiograph_pass_the_validators(tmp_path):
    """The shipped classifier on a DX with a nodule: SR (TID 1500: the decision per class, the
    probability in {probability}, algorithm, source image) with 0 pixelmed errors and a clean
    dciodvfy; the heat-map SC is valid for dciodvfy and its peak is on the nodule."""
    spec = load_spec(SHIPPED)
    backend = LocalBackend(SHIPPED / "1" / "model.onnx", spec)
    path, nodule = _nodule_case(tmp_path, 7, True)
    source = pydicom.dcmread(path)
    result = classify(load_series([source]), spec, backend)
    occlusion_saliency(result, backend)
    uids = uids_for("job-1", spec.name)
    sr = build_sr(result, OutputOptions(), uids)
    sr.save_as(tmp_path / "sr.dcm")
    errors, warnings, output = pixelmed("DicomSRValidator", tmp_path / "sr.dcm")
    assert "Found Root Template TID_1500 (MeasurementReport)" in output, output
    assert errors == [] and _unexpected(warnings) == [], output
    assert _dciodvfy(tmp_path / "sr.dcm") == ([], [])
    decision = _decision(sr)
    assert decision == {"evaluations": {"Nodule": "Present"}, "probability": pytest.approx(result.probabilities[1], abs=1e-6),
                        "unit": "{probability}", "sources": [source.SOPInstanceUID]}
    assert decision["probability"] > 0.5

    [sc] = build_saliency_maps(result, OutputOptions(), uids)
    sc.save_as(tmp_path / "sc.dcm")
    assert _dciodvfy(tmp_path / "sc.dcm") == ([], [])
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)
    row, column = _saliency_peak(sc)
    assert nodule is not None and nodule.contains(row, column), (row, column, nodule)
    assert _opacity(sc).max() == pytest.approx(MAX_TINT, abs=0.01)


def test_classification_and_occlusion_through_triton(triton, model_repository, tmp_path):
    """The same classifier and saliency on the real Triton server (python backend running the same
    ONNX file): the probability and the saliency map match ONNX Runtime in-process."""
    from inference.backends.triton import TritonBackend

    spec = load_spec(SHIPPED)
    path, nodule = _nodule_case(tmp_path, 7, True)
    volume = load_series([pydicom.dcmread(path)])
    local = LocalBackend(SHIPPED / "1" / "model.onnx", spec)
    expected = classify(volume, spec, local)
    backend = TritonBackend(triton.grpc_url, spec)
    try:
        result = classify(volume, spec, backend)
        saliency = occlusion_saliency(result, backend)[1]
    finally:
        backend.close()
    assert result.probabilities[1] == pytest.approx(expected.probabilities[1], abs=1e-4)
    np.testing.assert_allclose(saliency, occlusion_saliency(expected, local)[1], atol=1e-4)
    # a spec with a class more than Triton's config: refused when its backend starts, over either protocol
    more = spec.model_copy(update={"labels": [*spec.labels, spec.labels[0].model_copy(update={"value": 2})]})
    for url, protocol in ((triton.grpc_url, "grpc"), (triton.http_url, "http")):
        with pytest.raises(BackendError, match=r"model chest-nodule-cls: output 'logits' has 1 channels on Triton"
                                               r" \(shape \[-1, 1\]\), its spec 2"):
            TritonBackend(url, more, protocol=protocol)


def test_parametric_map_of_a_ct_classification_is_valid(tmp_path):
    """A series with patient geometry gets a float Parametric Map on its own frames: same frame of
    reference, one frame per slice, values and real-world mapping as computed; dciodvfy clean but
    for its unknown QUANTITY term; pixelmed (2022) does not know the IOD."""
    volume = phantom_result(tmp_path / "ct").volume
    spec = load_spec(SHIPPED)
    saliency = np.random.default_rng(0).normal(size=volume.array.shape).astype(np.float32)
    result = ClassificationResult(spec, volume, {1: 0.8}, saliency={1: saliency})
    [pm] = build_saliency_maps(result, OutputOptions(), uids_for("job-1", spec.name))
    pm.save_as(tmp_path / "pm.dcm")
    errors, warnings = _dciodvfy(tmp_path / "pm.dcm")
    assert errors == [] and warnings == QUANTITY_UNKNOWN_TO_DCIODVFY
    assert "IOD (SOP Class) unrecognized" in pixelmed("DicomInstanceValidator", tmp_path / "pm.dcm")[2]
    back = pydicom.dcmread(tmp_path / "pm.dcm")
    assert back.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert back.NumberOfFrames == volume.array.shape[0]
    mapping = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"  # log-odds: no unit
    assert float(mapping.DoubleFloatRealWorldValueLastValueMapped) == pytest.approx(float(saliency.max()))
    frames = {str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID): k
              for k, item in enumerate(back.PerFrameFunctionalGroupsSequence)}
    for k, ds in enumerate(volume.datasets):
        np.testing.assert_allclose(back.pixel_array[frames[str(ds.SOPInstanceUID)]], saliency[k])


def test_softmax_classes_are_each_present_or_absent(tmp_path):
    """Softmax: exactly the most probable class is Present, the others Absent."""
    volume = phantom_result(tmp_path / "ct").volume
    spec = load_spec(SHIPPED)
    labels = [spec.labels[0], spec.labels[0].model_copy(update={
        "value": 2, "name": "Mass", "type": spec.labels[0].type.model_copy(update={"value": "4147007", "meaning": "Mass"})})]
    softmax = spec.model_copy(update={"output_activation": "softmax", "labels": labels})
    sr = build_sr(ClassificationResult(softmax, volume, {1: 0.3, 2: 0.7}), OutputOptions(), uids_for("job-1", "x"))
    assert _decision(sr)["evaluations"] == {"Nodule": "Absent", "Mass": "Present"}


# -- through the running node ------------------------------------------------------------------


def test_dx_with_and_without_a_nodule_through_the_running_node(start_node, model_repository, tmp_path):
    """storescu sends a DX with a nodule and one without -> node (rule: DX -> classifier, outputs SR +
    SALIENCY) -> dcmtk storescp: the SR says Present (p > 0.5) and Absent; the heat map's peak
    lies on the nodule."""
    pacs = _StoreSCP(tmp_path / "pacs")
    with_nodule, nodule = _nodule_case(tmp_path, 11, True)
    without, _ = _nodule_case(tmp_path, 12, False)
    studies = {name: str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
               for name, path in (("with", with_nodule), ("without", without))}
    try:
        node = start_node(
            routing={"rules": [{
                "name": "chest", "match": {"tag": "Modality", "in": ["DX", "CR"]},
                "actions": {"run": ["chest-nodule-cls"], "outputs": ["SR", "SALIENCY"], "send_to": ["results"]}}]},
            completion={"quiet_period_s": 1.0},
            destinations={"results": {"ae_title": "RESULTS", "host": "127.0.0.1", "port": pacs.port}},
            sending={"retry_initial_s": 0.5, "sweep_s": 0.5},
            inference={"model_repository": str(model_repository)},
        )
        wait_for(lambda: subprocess.run(["/usr/bin/echoscu", "-aec", "TESTNODE", "127.0.0.1", str(node.port)],
                                        capture_output=True, timeout=30).returncode == 0, timeout=60, interval=0.5)
        for path in (with_nodule, without):
            sent = storescu(node.port, [path])
            assert sent.returncode == 0, sent.stdout + sent.stderr
        found = _by_study(pacs.received(node, lambda ds: all({"SR", "OT"} <= set(_by_study(ds).get(uid, {}))
                                                             for uid in studies.values())))
    finally:
        pacs.stop()
    present = _decision(found[studies["with"]]["SR"])
    absent = _decision(found[studies["without"]]["SR"])
    assert present["evaluations"] == {"Nodule": "Present"} and present["probability"] > 0.5
    assert absent["evaluations"] == {"Nodule": "Absent"} and absent["probability"] < 0.5
    row, column = _saliency_peak(found[studies["with"]]["OT"])
    assert nodule is not None and nodule.contains(row, column), (row, column, nodule)
