"""Bring your own model: a MONAI bundle made with MONAI's tooling, imported with
`dicom-node models import-bundle`, run by the node beside the shipped version (live and shadow),
its provenance in the results, its runs monitored (drift), a radiologist's rejection counted.

The bundle holds the demo UNet with the shipped model's trained weights (tests/bundles.py), so it
must find the phantom's lesions as the shipped model does: the end-to-end tolerances are
test_end_to_end's."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom.sr.codedict import codes

from inference.repository import ModelRepository, sha256_of
from phantom.dicom import SeriesIdentity
from phantom.study import make_dicom_study
from tests.bundles import LESION_CODES, demo_network, make_bundle
from tests.peers import REPO_ROOT, VENV_BIN, storescu, wait_for
from tests.test_end_to_end import _check_against_truth, _phantom


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "dicom-node"), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def network() -> Any:
    return demo_network()


@pytest.fixture(scope="module")
def codes_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("codes") / "codes.yaml"
    path.write_text(yaml.safe_dump(LESION_CODES))
    return path


def _repository_with_shipped_model(folder: Path) -> tuple[Path, Path]:
    """A model repository holding the shipped lesion-seg (version 1), and a node.yaml naming it."""
    repository = folder / "models"
    shutil.copytree(REPO_ROOT / "models" / "lesion-seg", repository / "lesion-seg")
    config = folder / "node.yaml"
    config.write_text(yaml.safe_dump({"inference": {"model_repository": str(repository)}}))
    return repository, config


def test_a_bundle_with_a_transform_the_node_cannot_run_is_refused_naming_it(network, codes_file, tmp_path):
    repository, config = _repository_with_shipped_model(tmp_path)
    cropping = make_bundle(tmp_path / "cropping", network, extra_preprocessing=[
        {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"}])
    refused = _cli("models", "import-bundle", str(cropping), "--name", "lesion-seg", "--codes", str(codes_file),
                   "--config", str(config))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "CropForegroundd: no equivalent in the node's preprocessing" in refused.stderr
    plain = make_bundle(tmp_path / "plain", network)
    uncoded = _cli("models", "import-bundle", str(plain), "--name", "lesion-seg", "--config", str(config))
    assert uncoded.returncode == 2
    assert "labels without a code: lesion (give each a category and type in --codes)" in uncoded.stderr
    assert "lesion: perhaps SCT 52988006 'Lesion'" in uncoded.stderr  # a hint from pydicom's SNOMED table
    assert ModelRepository(repository).versions("lesion-seg") == [1]  # nothing half-written
    assert sorted(p.name for p in (repository / "lesion-seg").iterdir()) == \
        sorted(p.name for p in (REPO_ROOT / "models" / "lesion-seg").iterdir())


def test_a_bundle_import_may_report_a_few_of_its_networks_classes(codes_file, tmp_path):
    """`--only lesion` imports one class of a three-class network: only it needs a code, and the
    spec and Triton's config declare the network's three channels (where the other class wins,
    background: tests/test_inference.py). A name that is no channel is refused naming those there
    are, with nothing written; without `--only` every channel needs a code, as before. A class that
    channel_def leaves out but num_channels counts is declared too. Imported as TorchScript, the
    settings declare the channels (`output.channels`)."""
    import torch
    from monai.networks.nets import UNet

    from tests.bundles import NETWORK_DEF

    repository, config = _repository_with_shipped_model(tmp_path)
    torch.manual_seed(0)
    network = UNet(**{**{k: v for k, v in NETWORK_DEF.items() if k != "_target_"}, "out_channels": 3})
    bundle = make_bundle(tmp_path / "bundle", network, channel_def={"0": "background", "1": "lesion", "2": "organ"})
    importing = ["models", "import-bundle", str(bundle), "--name", "tissues", "--codes", str(codes_file), "--config",
                 str(config)]
    every = _cli(*importing)
    assert every.returncode == 2 and "labels without a code: organ (give each a category and type" in every.stderr
    unknown = _cli(*importing, "--only", "lesion", "--only", "liver")
    assert unknown.returncode == 2
    assert "--only liver: no such channel in channel_def (it has 'background', 'lesion', 'organ')" in unknown.stderr
    assert not (repository / "tissues").exists()
    imported = _cli(*importing, "--only", "lesion")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    spec = ModelRepository(repository).spec("tissues")
    assert [(label.value, label.name) for label in spec.labels] == [(1, "lesion")]
    assert spec.output.channels == spec.output_channels == 3
    assert "dims: [ 3, 64, 64, 64 ]" in (repository / "tissues" / "config.pbtxt").read_text()  # (its patch)
    # a channel_def that leaves the last class out, counted by num_channels: declared all the same
    trailing = make_bundle(tmp_path / "trailing", network, channel_def={"0": "background", "1": "lesion"},
                           num_channels=3)
    imported = _cli("models", "import-bundle", str(trailing), "--name", "trailing", "--codes", str(codes_file),
                    "--config", str(config))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "outputs.pred: 3 channels, 1 of them reported -> output.channels 3" in imported.stdout
    assert ModelRepository(repository).spec("trailing").output.channels == 3
    # as TorchScript, its settings declare the channels: without them the network is refused at export
    file = tmp_path / "tissues.ts"
    torch.jit.save(torch.jit.trace(network.eval(), torch.rand(1, 1, 64, 64, 64)), str(file))
    settings = {"task": "segmentation", "labels": [{"value": 1, "name": "lesion", **LESION_CODES["lesion"]}],
                "preprocessing": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "patch_size": [64, 64, 64]}}
    for declared in ({}, {"output": {"name": "logits", "channels": 3}}):
        (tmp_path / "settings.yaml").write_text(yaml.safe_dump({**settings, **declared}))
        done = _cli("models", "import-torchscript", str(file), "--settings", str(tmp_path / "settings.yaml"),
                    "--name", "ts-tissues", "--config", str(config))
        if not declared:
            assert done.returncode == 2 and "its spec's labels imply 2 values on axis 1" in done.stderr, done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert ModelRepository(repository).spec("ts-tissues").output_channels == 3


def _metrics(node: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    with urllib.request.urlopen(node.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_an_imported_bundle_runs_live_beside_the_shipped_version_in_shadow(
        network, codes_file, start_node, orthanc, tmp_path):
    """Import as lesion-seg version 2; a rule runs it live and version 1 in shadow. The PACS gets
    version 2's SEG and SR only, at the phantom's lesions, naming the bundle and the model file's
    SHA-256; the comparison with version 1 is recorded and shown. Then a study with other slice
    spacing raises the drift alarm, and a radiologist's rejection (KOS) of the SEG is counted."""
    repository, config = _repository_with_shipped_model(tmp_path)
    bundle = make_bundle(tmp_path / "bundle", network)
    imported = _cli("models", "import-bundle", str(bundle), "--name", "lesion-seg", "--codes", str(codes_file),
                    "--findings", "per_component", "--min-component-voxels", "8", "--config", str(config))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "Spacingd(pixdim=[2.0, 2.0, 2.0]) -> preprocessing.spacing" in imported.stdout
    assert "imported lesion-seg version 2" in imported.stdout
    models = ModelRepository(repository)
    assert models.versions("lesion-seg") == [1, 2]
    spec = models.spec("lesion-seg")  # the latest
    assert spec.version == 2 and spec.provenance is not None
    assert spec.preprocessing.spacing == (2.0, 2.0, 2.0) and spec.preprocessing.patch_size == (64, 64, 64)
    sha = sha256_of(repository / "lesion-seg" / "2" / "model.onnx")
    assert spec.provenance.sha256 == sha and spec.provenance.source_name == "Phantom lesion segmentation"
    assert "versions: [ 1, 2 ]" in (repository / "lesion-seg" / "config.pbtxt").read_text()

    pacs = orthanc()
    node = start_node(
        routing={"rules": [{"name": "ct-lesions", "match": {"tag": "Modality", "equals": "CT"},
                            "actions": {"run": ["lesion-seg@2"], "shadow": ["lesion-seg@1"], "send_to": ["pacs"]}}]},
        completion={"quiet_period_s": 1.0},
        destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
        sending={"retry_initial_s": 0.5, "sweep_s": 0.5},
        inference={"model_repository": str(repository), "monitoring": {"baseline_runs": 1, "window_runs": 1}},
    )
    listed = json.loads(_cli("models", "list", "--json", "--config", str(node.config_path)).stdout)
    rows = {r["version"]: r for r in listed}
    assert rows[2]["rules"] == ["ct-lesions (live)"] and rows[1]["rules"] == ["ct-lesions (shadow)"]
    assert rows[2]["sha256"] == sha and rows[2]["status"] == "ok" and rows[2]["latest"]

    files, truth, study_uid = _phantom(tmp_path, seed=11)  # test_end_to_end's study: its tolerances hold there
    pacs.upload(files)  # the PACS has the study; the modality sends it to the node too
    assert storescu(node.port, files).returncode == 0
    _check_against_truth(pacs, study_uid, truth, files)
    found = pacs.instances_by_modality(study_uid)
    seg = pydicom.dcmread(io.BytesIO(pacs.instance_file(found["SEG"][0]["ID"])))
    sr = pydicom.dcmread(io.BytesIO(pacs.instance_file(found["SR"][0]["ID"])))
    for obj in (seg, sr):
        model = [e for e in obj.ContributingEquipmentSequence if e.get("DeviceSerialNumber") == sha]
        assert len(model) == 1 and model[0].ManufacturerModelName == "Phantom lesion segmentation"
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == "2" and algorithm.AlgorithmSource.startswith("MONAI bundle Phantom")

    runs = wait_for(lambda: len(rows := node.query("SELECT * FROM model_runs WHERE study_uid=? ORDER BY id",
                                                   (study_uid,))) == 2 and rows, timeout=120)
    live, shadow = ({r["role"]: r for r in runs}[k] for k in ("live", "shadow"))
    assert (live["version"], shadow["version"]) == (2, 1) and shadow["error"] is None
    assert live["findings"] == len(truth["lesions"]) and live["slices"] == 96
    # the same network and weights, exported twice: the shadow agrees with the live version
    assert shadow["dice"] > 0.95 and abs(shadow["volume_difference"]) < 0.05
    job = node.query("SELECT id FROM work_items WHERE study_uid=?", (study_uid,))[0]["id"]
    outbox = node.query("SELECT job_key FROM outbox WHERE study_uid=?", (study_uid,))
    assert outbox and all(":lesion-seg@2:" in r["job_key"] for r in outbox)  # nothing of version 1 was queued
    assert list((node.data_dir / "results").glob(f"{job}_ct-lesions_lesion-seg@1_shadow/**/*.dcm"))
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1

    overview = json.loads(_get(node, "/api/models"))
    comparison = overview["comparisons"][0]
    assert (comparison["live_version"], comparison["shadow_version"], comparison["study_uid"]) == (2, 1, study_uid)
    assert overview["drift"] == []

    # another protocol: 4 mm slices (the baseline run had 2 mm)
    thick, _ = make_dicom_study(tmp_path / "thick", slices=48, size=192, pixel_spacing=2.0, slice_spacing=4.0,
                                seed=32, identity=SeriesIdentity(patient_id="P32"))
    assert storescu(node.port, thick).returncode == 0
    alarm = wait_for(lambda: [d for d in json.loads(_get(node, "/api/models"))["drift"]
                              if d["figure"] == "spacing_slice"], timeout=180)
    assert alarm[0]["model"] == "lesion-seg" and alarm[0]["version"] == 2
    wait_for(lambda: len(node.query("SELECT id FROM model_runs WHERE role='shadow'")) == 2, timeout=120)
    metrics = _metrics(node)
    key = (("figure", "spacing_slice"), ("model", "lesion-seg"), ("version", "2"))
    assert metrics[("dicom_node_model_drift", key)] == 1
    assert metrics[("dicom_node_model_runs_total", (("model", "lesion-seg"), ("role", "shadow"), ("version", "1")))] == 2
    summary = json.loads(_get(node, "/api/summary"))
    assert any(a["kind"] == "model drift" and "spacing_slice" in a["reason"] for a in summary["attention"])

    # the radiologist rejects the SEG: a Key Object Selection from the PACS side
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=[seg], content=hd.ko.KeyObjectSelection(document_title=codes.DCM.RejectedForQualityReasons,
                                                         referenced_objects=[seg]),
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1)
    kos_path = tmp_path / "kos.dcm"
    kos.save_as(kos_path)
    assert storescu(node.port, [kos_path]).returncode == 0
    wait_for(lambda: node.query("SELECT verdict FROM model_runs WHERE study_uid=? AND role='live' AND verdict"
                                " IS NOT NULL", (study_uid,)), timeout=180)
    assert node.events("result_rejected")[0]["study_uid"] == study_uid
    # a reader's note is kept but reprocesses nothing: no second job, no second set of results
    assert node.query("SELECT COUNT(*) AS n FROM instances WHERE study_uid=? AND sop_instance_uid=?",
                      (study_uid, str(kos.SOPInstanceUID)))[0]["n"] == 1
    assert len(node.query("SELECT id FROM work_items WHERE study_uid=?", (study_uid,))) == 1
    assert _metrics(node)[("dicom_node_model_verdicts_total",
                           (("model", "lesion-seg"), ("verdict", "rejected"), ("version", "2")))] == 1
    page = _get(node, "/models")
    assert "1 rejected" in page and "Drift: lesion-seg version 2" in page
    assert "<td>spacing slice</td><td>4</td>" in page  # the latest window (1 run): the 4 mm study


def _get(node: Any, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(node.url + path, timeout=30) as response:
        return response.read().decode()


def test_a_torchscript_file_with_its_settings_becomes_a_version_that_runs_as_torch_does(network, tmp_path):
    """`import-torchscript`: the file and a small settings YAML; the exported ONNX answers as the
    TorchScript module does (checked by the import, and again here through the node's backend)."""
    import numpy as np
    import torch

    repository, config = _repository_with_shipped_model(tmp_path)
    scripted = torch.jit.trace(network, torch.rand(1, 1, 64, 64, 64))
    file = tmp_path / "lesions.ts"
    torch.jit.save(scripted, str(file))
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({
        "task": "segmentation",
        "preprocessing": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "intensity": {"window": [-1000, 500]},
                          "patch_size": [64, 64, 64]},
        "postprocessing": {"findings": "per_component", "min_component_voxels": 8},
        "labels": [{"value": 1, "name": "lesion", **LESION_CODES["lesion"]}],
    }))
    imported = _cli("models", "import-torchscript", str(file), "--settings", str(settings), "--name", "ts-lesions",
                    "--config", str(config))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    models = ModelRepository(repository)
    assert models.versions("ts-lesions") == [1]
    spec = models.spec("ts-lesions@1")
    assert spec.provenance.source == "torchscript" and spec.provenance.source_sha256 == sha256_of(file)
    patch = np.random.default_rng(1).random((2, 1, 64, 64, 64), dtype=np.float32)
    with torch.no_grad():
        expected = scripted(torch.from_numpy(patch)).numpy()
    assert np.abs(models.backend("ts-lesions").infer(patch) - expected).max() < 1e-3

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"task": "segmentation", "labels": [], "speed": "fast"}))
    refused = _cli("models", "import-torchscript", str(file), "--settings", str(bad), "--name", "ts-lesions",
                   "--config", str(config))
    assert refused.returncode == 2 and "settings: unknown keys speed" in refused.stderr
    assert models.versions("ts-lesions") == [1]

    # a damaged model file is refused by checksum, not run
    onnx = repository / "ts-lesions" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(Exception, match="SHA-256 is not the one recorded at import"):
        ModelRepository(repository).backend("ts-lesions")


def test_triton_serves_each_version_side_by_side(triton, model_repository):
    """Triton's version folders: `thresholds` 1 (270 HU) and 2 (0 HU) are both loaded; a backend
    for each version asks Triton for that version, and answers as the in-process one does."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from inference.backends.triton import TritonBackend

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    wait_for(lambda: client.is_model_ready("thresholds", "1") and client.is_model_ready("thresholds", "2"),
             timeout=120)
    client.close()
    models = ModelRepository(model_repository)
    window = np.linspace(0.3, 0.8, 2 * 32 * 32 * 32, dtype=np.float32).reshape(2, 1, 32, 32, 32)  # -400 to 600 HU
    answers = {}
    for version in (1, 2):
        spec = models.spec(f"thresholds@{version}")
        remote = TritonBackend(triton.grpc_url, spec, shared_memory="none")
        try:
            answers[version] = remote.infer(window)
        finally:
            remote.close()
        assert np.allclose(answers[version], models.backend(f"thresholds@{version}").infer(window), atol=1e-4)
    bright = {v: int((a[:, 1] > a[:, 0]).sum()) for v, a in answers.items()}
    assert 0 < bright[1] < bright[2]  # more voxels are above 0 HU than above 270 HU


def test_the_mapping_takes_the_bundles_own_key_and_refuses_every_approximation():
    """Each case is a MONAI object as a bundle's config instantiates it: mapped exactly, or refused
    with its name; never a default silently kept."""
    from monai import transforms as mt
    from monai.inferers import SimpleInferer

    from inference.bundle import (ImportRefused, _channels, labels_from, map_inferer, map_postprocessing,
                                  map_preprocessing)

    fields, _, refused = map_preprocessing([mt.LoadImaged(keys="img"), mt.Orientationd(keys="img", axcodes="LPS"),
                                            mt.Spacingd(keys="img", pixdim=[1.5, 1.5, 3.0]),
                                            mt.NormalizeIntensityd(keys="img")], key="img")
    assert refused == [] and fields == {"orientation": "LPS", "spacing": [1.5, 1.5, 3.0],
                                        "intensity": {"normalize": "zscore"}}
    _, _, refused = map_preprocessing([mt.ScaleIntensityRanged(keys="image", a_min=-100, a_max=200, b_min=0,
                                                               b_max=1, clip=True),
                                       mt.NormalizeIntensityd(keys="image")])
    assert refused == ["NormalizeIntensityd: ScaleIntensityRanged already set preprocessing.intensity; the node"
                       " applies one"]
    _, _, refused = map_preprocessing([mt.Orientationd(keys="image", axcodes=None, as_closest_canonical=True),
                                       mt.CropForegroundd(keys="image", source_key="image")])
    assert [r.split(":")[0] for r in refused] == ["Orientationd", "CropForegroundd"]
    assert map_inferer(SimpleInferer())[2][0].startswith("SimpleInferer: the whole image at once")
    post, _, refused = map_postprocessing([mt.Activations(softmax=True), mt.AsDiscrete(argmax=True)], "pred")
    assert refused == [] and post == {"output_activation": "softmax", "postprocessing": {"mode": "argmax"}}
    _, _, refused = map_postprocessing([mt.KeepLargestConnectedComponentd(keys="pred")], "pred")
    assert "connectivity=None" in refused[0]  # MONAI's default (26 neighbours) is not the node's (6)
    with pytest.raises(ImportRefused, match="channel 0 is 'nuclei'"):
        labels_from({0: "nuclei"}, {}, "segmentation")
    with pytest.raises(ImportRefused, match="--only background: channel 0 is the background, never a label"):
        labels_from({0: "background", 1: "liver"}, {}, "segmentation", ["background"])

    def described(channel_def: dict[str, str], **more: Any) -> dict[str, Any]:
        return {"network_data_format": {"outputs": {"pred": {"channel_def": channel_def, **more}}}}

    with pytest.raises(ImportRefused, match="outputs.pred.channel_def names 'kidney' more than once"):
        _channels(described({"0": "background", "1": "kidney", "2": "kidney"}))
    two = {"0": "background", "1": "liver"}
    counts = ({}, {"num_channels": 3}, {"num_channels": 1}, {"num_channels": "3"}, {"num_channels": 3.0},
              {"num_channels": 2.5}, {"num_channels": "three"})
    assert [_channels(described(two, **more))[2] for more in counts] == [2, 3, 2, 3, 3, 2, 2]


def test_a_model_named_without_version_is_pinned_when_routed_and_a_shadow_of_that_version_dropped():
    """`run: [x]` runs the version that was the latest when the study was routed (a crash re-run
    or a later import does not change it); `shadow: [x@2]` beside it is dropped once x@2 is that
    version, instead of failing the route."""
    from node.route.decision import _pinned
    from node.route.rules import Actions

    actions = Actions.model_validate({"run": ["x"], "shadow": ["x@2"], "send_to": ["pacs"]})
    assert _pinned(actions, {"x": [1]}).run == ["x@1"] and _pinned(actions, {"x": [1]}).shadow == ["x@2"]
    latest = _pinned(actions, {"x": [1, 2]})
    assert latest.run == ["x@2"] and latest.shadow == []
    assert _pinned(actions, {}) is actions  # nothing to pin (the repository has no such model yet)
