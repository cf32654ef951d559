"""Training: data sources, a short run, export round trip, and the entry in both backends."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from inference.backends.local import LocalBackend
from inference.backends.triton import TritonBackend
from inference.spec import ModelSpec, load_spec
from tests.triton_server import TritonCpuServer
from inference.volume import load_series, read_series
from node.config import OutputOptions
from node.encode.seg import build_seg
from tests.identity import uids_for
from inference.findings import measure
from inference.pipeline import SegmentationResult
from training.data.dicom_seg import dicom_seg_to_msd
from training.data.msd import LPS_TO_RAS, DatasetError, load_msd
from phantom.study import make_dicom_study, truth_path
from training.data.synthetic import make_training_set
from inference.export.repository import export_onnx, write_entry
from training.train import TrainConfig, load_network, train

LESION = {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"}
TINY_SPEC = ModelSpec.model_validate({
    "name": "tiny", "task": "segmentation",
    "preprocessing": {"orientation": "RAS", "spacing": [4.0, 4.0, 4.0], "intensity": {"window": [-1000, 500]},
                      "patch_size": [32, 32, 32], "batch_size": 2},
    "labels": [{"value": 1, "name": "Lesion", "category": LESION, "type": LESION}],
})
FOV = (128.0, 128.0, 128.0)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_training_set(tmp_path_factory.mktemp("msd"), count=5, spacing=4.0, field_of_view=FOV)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    summary = train(TrainConfig(data=tiny_data, out=out, spec=TINY_SPEC, epochs=4, iterations_per_epoch=6,
                                batch_size=2, learning_rate=5e-3, val_fraction=0.2, seed=1))
    return out, summary


def test_msd_loader_reads_the_synthetic_set(tiny_data):
    pairs, labels = load_msd(tiny_data)
    assert len(pairs) == 5 and labels == {0: "background", 1: "lesion"}
    image = nib.load(pairs[0]["image"])
    label = np.asarray(nib.load(pairs[0]["label"]).dataobj)
    assert image.shape == label.shape == (32, 32, 32)
    assert set(np.unique(label)) == {0, 1}


def test_msd_loader_names_missing_files(tmp_path, tiny_data):
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/x.nii.gz",
                                                                     "label": "./labelsTr/x.nii.gz"}]}))
    with pytest.raises(DatasetError, match=r"imagesTr/x.nii.gz is listed in dataset.json but missing"):
        load_msd(tmp_path)


def test_short_training_lowers_the_loss_and_writes_metrics(trained):
    out, summary = trained
    losses = [row["loss"] for row in summary["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,") and "dice_Lesion" in csv_lines[0] and len(csv_lines) == 5
    assert json.loads((out / "metrics.json").read_text())[-1]["epoch"] == 4


def test_validation_scores_each_label_on_its_own_channel():
    """A spec naming one class of a three-class network (label value 2): its Dice is channel 2's,
    not the first channel's. A network that finds nothing scores 0 for it (channel 1's empty
    against empty would be 1), and so does one that finds the unnamed class 1 there; one that
    finds it, 1."""
    from training.train import validate

    spec = ModelSpec.model_validate({**TINY_SPEC.model_dump(), "output": {"name": "logits", "channels": 3},
                                     "labels": [{**TINY_SPEC.labels[0].model_dump(), "value": 2}]})
    truth = torch.zeros((1, 1, 32, 32, 32))
    truth[..., 8:16, 8:16, 8:16] = 2

    class Finding(torch.nn.Module):  # channel `found` wins where the truth has label 2 (0: nothing found)
        def __init__(self, found: int):
            super().__init__()
            self.found = found

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((x.shape[0], 3, *x.shape[2:]))
            out[:, 0] = 1.0
            out[:, self.found, 8:16, 8:16, 8:16] = 2.0
            return out

    batches = [{"image": torch.zeros((1, 1, 32, 32, 32)), "label": truth}]
    assert [validate(Finding(found), batches, spec) for found in (0, 1, 2)] == \
        [{"Lesion": 0.0}, {"Lesion": 0.0}, {"Lesion": 1.0}]


def test_training_resumes_from_a_checkpoint(trained, tiny_data, tmp_path):
    out, _ = trained
    summary = train(TrainConfig(data=tiny_data, out=tmp_path, spec=TINY_SPEC, epochs=5, iterations_per_epoch=2,
                                seed=1, resume=out / "last.pt"))
    assert [row["epoch"] for row in summary["history"]] == [1, 2, 3, 4, 5]


def test_export_round_trip_and_entry_in_both_backends(trained, tmp_path):
    out, _ = trained
    network, network_config = load_network(out / "best.pt", TINY_SPEC)
    onnx = tmp_path / "tiny.onnx"
    error = export_onnx(network, onnx, TINY_SPEC, divisor=network_config.divisor)
    assert error < 1e-4
    entry = write_entry(tmp_path / "repo", TINY_SPEC, onnx)
    assert load_spec(entry) == TINY_SPEC
    assert 'backend: "onnxruntime"' in (entry / "config.pbtxt").read_text()
    assert "KIND_GPU" in (entry / "config.pbtxt").read_text() and "dynamic_batching" in (entry / "config.pbtxt").read_text()
    assert 'backend: "python"' in (entry / "configs" / "cpu.pbtxt").read_text()
    batch = np.random.default_rng(3).random((2, 1, 40, 36, 44), dtype=np.float32)
    with torch.no_grad():
        expected = network(torch.from_numpy(batch)).numpy()
    local = LocalBackend(entry / "1" / "model.onnx", TINY_SPEC).infer(batch)
    np.testing.assert_allclose(local, expected, atol=1e-4)
    server = TritonCpuServer(tmp_path / "repo", tmp_path / "triton.log").start(timeout=120, ready_models=("tiny",))
    try:
        backend = TritonBackend(server.grpc_url, TINY_SPEC)
        np.testing.assert_allclose(backend.infer(batch), expected, atol=1e-4)
        backend.close()
    finally:
        server.cleanup()


def test_phantom_dicom_study_passes_dciodvfy_and_has_its_truth(tmp_path):
    files, phantom = make_dicom_study(tmp_path / "study", slices=12, size=64, pixel_spacing=6.0, slice_spacing=16.0)
    for path in (files[0], files[-1]):
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        assert [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")] == []
    truth = json.loads(truth_path(tmp_path / "study").read_text())
    assert len(truth["lesions"]) == len(phantom.lesions) >= 2
    assert truth["lesions"][0]["volume_mm3"] == pytest.approx(phantom.lesions[0].volume_mm3)


def test_dicom_seg_pairs_become_training_data(tmp_path):
    files, _ = make_dicom_study(tmp_path / "pacs" / "ct", slices=10, size=32, pixel_spacing=12.0, slice_spacing=19.2)
    volume = load_series(read_series(files))
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[2:5, 10:20, 12:22] = 1
    spec = TINY_SPEC
    result = SegmentationResult(spec, volume, labels, measure(labels, volume, spec))
    build_seg(result, OutputOptions(omit_empty_frames=True), uids_for("t", spec.name)).save_as(tmp_path / "pacs" / "seg.dcm")
    out = dicom_seg_to_msd(tmp_path / "pacs", tmp_path / "msd")
    pairs, names = load_msd(out)
    assert names == {0: "background", 1: "Lesion"}
    image = nib.load(pairs[0]["image"])
    np.testing.assert_array_equal(np.asarray(nib.load(pairs[0]["label"]).dataobj), labels)
    np.testing.assert_allclose(image.affine, LPS_TO_RAS @ volume.affine)
    np.testing.assert_allclose(np.asarray(image.dataobj), volume.array)


DETECTOR_SPEC = ModelSpec.model_validate({
    "name": "tiny-det", "task": "detection", "output": {"name": "detections"}, "output_activation": "none",
    "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "intensity": {"window": [-1000, 500]},
                      "patch_size": [64, 64, 64], "batch_size": 2},
    "labels": [{"value": 1, "name": "Nodule", "category": LESION, "type": LESION}],
})


def test_a_finding_box_is_its_components_extent_centred_on_its_voxels():
    from training.detection import finding_boxes

    label = np.zeros((40, 40, 40), dtype=np.uint8)
    k, r, c = np.indices(label.shape)
    label[(k - 10) ** 2 + (r - 20) ** 2 + (c - 25) ** 2 <= 9] = 1  # radius 3 around (10, 20, 25)
    label[30:33, 5:9, 5:7] = 1
    boxes, classes = finding_boxes(label, DETECTOR_SPEC)
    assert boxes.tolist() == [[6.5, 16.5, 21.5, 13.5, 23.5, 28.5], [29.5, 4.5, 4.5, 32.5, 8.5, 6.5]]
    assert classes.tolist() == [0, 0]


def test_a_short_detector_run_exports_a_model_the_node_runs_and_is_evaluated(tmp_path):
    """Training, export and evaluation glued together on two small phantoms: the export matches
    PyTorch (export_detector refuses otherwise), the node's detection code runs the file, and FROC
    and mAP come out as fractions."""
    from training.detection import evaluate_detector, export_detector, make_chest_set, train_detector

    data = make_chest_set(tmp_path / "data", 2, seed=3, field_of_view=(96.0, 96.0, 64.0))
    summary = train_detector(data, tmp_path / "run", DETECTOR_SPEC, iterations=8, batch_size=2, seed=1)
    assert summary["history"][-1]["iteration"] == 8 and np.isfinite(summary["history"][-1]["loss"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["volumes"] == 2
    onnx = tmp_path / "model.onnx"
    assert export_detector(tmp_path / "run" / "last.pt", onnx, DETECTOR_SPEC) < 1e-3
    out = LocalBackend(onnx, DETECTOR_SPEC).infer(np.zeros((3, 1, 64, 64, 64), dtype=np.float32))
    assert out.shape[0] == 3 and out.shape[2] == 7 and ((out[..., 6] >= 0) & (out[..., 6] <= 1)).all()
    result = evaluate_detector(onnx, data, DETECTOR_SPEC)
    assert result["volumes"] == 2 and set(result["froc"]) == {"0.125", "0.25", "0.5", "1", "2", "4", "8"}
    assert all(0.0 <= v <= 1.0 for v in result["froc"].values())
    entry = write_entry(tmp_path / "repo", DETECTOR_SPEC, onnx)
    assert f"dims: [ {out.shape[1]}, 7 ]" in (entry / "config.pbtxt").read_text()
    assert "dims: [ 1, 64, 64, 64 ]" in (entry / "configs" / "cpu.pbtxt").read_text()
