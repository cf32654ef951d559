"""Every object the node writes, checked by independent validators.

pixelmed (Debian `pixelmed-apps`, the validator used for IHE AI Results conformance testing):
`DicomInstanceValidator` on the SEG, `DicomSRValidator` on each kind of SR the node writes;
dicom3tools `dciodvfy` on all of them; dcmqi still decodes the SEG (test_encode). Debian's
pixelmed (2022-06) and dciodvfy (2022) predate parts of the current standard; the lines they
print because of that, and only those, are listed below with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from highdicom.seg import Segmentation
from pydicom.sr.codedict import codes

from inference.pipeline import ClassificationResult, SegmentationResult
from inference.spec import ModelSpec, Provenance
from node.config import OutputOptions
from node.encode.seg import build_seg
from node.encode.sr import build_sr
from tests.identity import uids_for
from tests.test_encode import LABELMAP_UNKNOWN_TO_DCIODVFY, SPEC, _check_with_dcmqi, _dciodvfy, phantom_result

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# Debian 12's Java caps XPath expressions far below what pixelmed's compiled rules need.
JAVA_XPATH_LIMITS = "-Djdk.xml.xpathExprGrpLimit=0 -Djdk.xml.xpathExprOpLimit=0 -Djdk.xml.xpathTotalOpLimit=0"

# pixelmed 2022's TID 1411/1501 predate the Finding category row that DICOM CP 2176 added to
# TID 1410/1411/1501 (highdicom writes it there); and no TID 1411 row takes a centre point: the
# Center of Mass (CID 219 "Geometry Graphical Representation") extends the extensible template.
# README, "IHE AI Results conformance".
KNOWN_SR_WARNINGS = [
    re.compile(r'CODE \(276214006,SCT,"Finding category"\): Content Item not in template$'),
    # the centre of mass (no TID 1411 row; README, SR): its 3D point and its point on the nearest image
    re.compile(r'SCOORD3D \(128138,DCM,"Center of Mass"\): Content Item not in template$'),
    re.compile(r'SCOORD \(128138,DCM,"Center of Mass"\)(/IMAGE \(260753009,SCT,"Source"\))?: Content Item not in template$'),
]

# An imported model version's provenance (README, "Bring your own model"): every object checked
# here carries it as Contributing Equipment and in its algorithm identification.
IMPORTED = Provenance(source="monai-bundle", source_name="Phantom lesion segmentation", source_version="0.1.0",
                      sha256="ab" * 32, source_sha256="cd" * 32, imported_at="2026-11-24T02:00:00+00:00",
                      manufacturer="dicom-node tests", model_card={
                          "description": "A 3-D UNet for phantom lesions", "intended_use": "Testing only",
                          "copyright": "Copyright (c) the dicom-node authors"})


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> SegmentationResult:
    found = phantom_result(tmp_path_factory.mktemp("ct"))
    return dataclasses.replace(found, spec=found.spec.model_copy(update={"provenance": IMPORTED}))


def test_results_name_the_model_file_that_made_them(result):
    """Contributing Equipment (PS3.3 C.7.5.1.1.1): the model version, its source bundle and the
    SHA-256 of the file the node ran; SEG's algorithm identification names the bundle."""
    options = OutputOptions()
    uids = uids_for("job-1", SPEC.name)
    seg = build_seg(result, options, uids)
    for obj in (seg, build_sr(result, options, uids, seg)):
        # highdicom adds itself and the source's acquisition equipment: the model is the entry with its checksum
        model = [e for e in obj.ContributingEquipmentSequence if e.get("DeviceSerialNumber") == "ab" * 32]
        assert len(model) == 1
        equipment = model[0]
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        assert equipment.DeviceSerialNumber == "ab" * 32
        assert equipment.ManufacturerModelName == "Phantom lesion segmentation"
        assert equipment.Manufacturer == "dicom-node tests"
        assert list(equipment.SoftwareVersions) == [f"{SPEC.name} version {SPEC.version}",
                                                    "Phantom lesion segmentation 0.1.0"]
        assert "intended use: Testing only" in equipment.ContributionDescription
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmSource == "MONAI bundle Phantom lesion segmentation 0.1.0"
    assert algorithm.AlgorithmVersion == str(SPEC.version)

    def texts(items) -> list[str]:
        return [t for item in items for t in ([str(item.get("TextValue", ""))] + texts(item.get("ContentSequence", [])))]

    # TID 4019 in the SR: the source and the file's checksum as algorithm parameters
    sr_texts = texts(build_sr(result, options, uids, seg).ContentSequence)
    assert f"model.onnx SHA-256 {'ab' * 32}" in sr_texts
    assert "MONAI bundle Phantom lesion segmentation 0.1.0" in sr_texts


PIXELMED_BATCH = Path(__file__).with_name("PixelmedBatch.java")
PIXELMED_BATCH_SEPARATOR = re.compile(r"^=== pixelmed-batch: file (\d+) ===\n", re.MULTILINE)
Verdict = tuple[list[str], list[str], str]  # pixelmed's errors, warnings and whole output


def _java(arguments: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    if not PIXELMED_JAR.exists() or not shutil.which("java"):
        pytest.fail("pixelmed-apps is missing: run `make test` (it installs it)")
    return subprocess.run(["java", "-cp", str(PIXELMED_JAR), *arguments], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "JAVA_TOOL_OPTIONS": JAVA_XPATH_LIMITS})


def _verdict(output: str) -> Verdict:
    lines = [line for line in output.splitlines() if not line.startswith("Picked up")]
    return ([l for l in lines if l.startswith("Error")], [l for l in lines if l.startswith("Warning")],
            "\n".join(lines))


def pixelmed(validator: str, path: Path) -> Verdict:
    """(errors, warnings, whole output) of a pixelmed validator; lines starting Error:/Warning:.
    One file in a JVM of its own runs best with the first JIT tier only (an SR: 9.4 -> 8.2 s wall,
    16.5 -> 8.2 s CPU; a batch is slower so: pixelmed_batch keeps the default)."""
    run = _java(["-XX:TieredStopAtLevel=1", f"com.pixelmed.validate.{validator}", str(path)], timeout=300)
    return _verdict(run.stdout + run.stderr)


def pixelmed_batch(validator: str, paths: list[Path]) -> dict[Path, Verdict]:
    """pixelmed(validator, path) for each path, all in one JVM (tests/PixelmedBatch.java): a JVM
    per file runs each cold (~10 s an SR); in one JVM the files after the first run warm, in about half that."""
    run = _java([str(PIXELMED_BATCH), f"com.pixelmed.validate.{validator}", *map(str, paths)],
                timeout=300 * len(paths))
    _, *sections = PIXELMED_BATCH_SEPARATOR.split(run.stdout)
    if run.returncode or sections[::2] != [str(n) for n in range(1, len(paths) + 1)]:
        pytest.fail(f"PixelmedBatch.java ran {len(sections) // 2} of {len(paths)} files "
                    f"(exit status {run.returncode}):\n{run.stdout}{run.stderr}")
    return {path: _verdict(output) for path, output in zip(paths, sections[1::2])}


def _unexpected(warnings: list[str]) -> list[str]:
    return [w for w in warnings if not any(p.search(w) for p in KNOWN_SR_WARNINGS)]


SEG_CASES = [("BINARY", False), ("BINARY", True), ("LABELMAP", False)]  # segmentation type, omit empty frames


@pytest.fixture(scope="module")
def segs(result: SegmentationResult,
         tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], tuple[Segmentation, Path, Verdict]]:
    """Each case's SEG, its file and pixelmed's verdict on it: all cases' files in one JVM (pixelmed_batch)."""
    folder = tmp_path_factory.mktemp("seg")
    saved = {}
    for kind, omit in SEG_CASES:
        seg = build_seg(result, OutputOptions(segmentation_type=kind, omit_empty_frames=omit),
                        uids_for("job-1", SPEC.name))
        saved[kind, omit] = seg, folder / f"{kind}-{omit}.dcm"
        seg.save_as(saved[kind, omit][1])
    verdicts = pixelmed_batch("DicomInstanceValidator", [path for _, path in saved.values()])
    return {case: (seg, path, verdicts[path]) for case, (seg, path) in saved.items()}


@pytest.mark.parametrize("kind, omit", SEG_CASES)
def test_seg_passes_pixelmed_and_dciodvfy(result, segs, tmp_path, kind, omit):
    seg, path, (errors, warnings, output) = segs[kind, omit]
    if kind == "BINARY":
        assert "Found Segmentation IOD" in output and "IOD validation complete" in output, output
        assert errors == [] and warnings == [], output
        _check_with_dcmqi(path, result, tmp_path)
    else:  # pixelmed 2022 does not know the Label Map Segmentation SOP class (2024)
        assert "IOD (SOP Class) unrecognized" in output, output
    dciodvfy_errors, dciodvfy_warnings = _dciodvfy(path)
    assert dciodvfy_errors == (LABELMAP_UNKNOWN_TO_DCIODVFY if kind == "LABELMAP" else [])
    assert dciodvfy_warnings == []
    assert seg.ImageLaterality == "U"  # the CT phantom records no laterality: an unpaired body part


def _reports(result: SegmentationResult) -> dict[str, object]:
    """Each kind of SR the node writes, for the same source series."""
    options = OutputOptions()
    uids = uids_for("job-1", SPEC.name)
    seg = build_seg(result, options, uids)
    nodule_missing = SegmentationResult(result.spec, result.volume, np.where(result.labels == 2, 0, result.labels),
                                        [f for f in result.findings if f.label.value != 2])
    classifier = ModelSpec.model_validate({**result.spec.model_dump(mode="json"), "name": "classes",
                                           "task": "classification"})
    return {
        "findings": build_sr(result, options, uids, seg),
        "findings and an absent label": build_sr(nodule_missing, options, uids,
                                                 build_seg(nodule_missing, options, uids)),
        "no findings": build_sr(SegmentationResult(result.spec, result.volume, np.zeros_like(result.labels), []),
                                options, uids, None),
        "classification": build_sr(ClassificationResult(classifier, result.volume, {1: 0.8, 2: 0.2}),
                                   options, uids_for("job-1", "classes")),
    }


def test_every_sr_passes_pixelmed_and_dciodvfy(result, tmp_path):
    paths = {}
    for name, sr in _reports(result).items():
        paths[name] = tmp_path / f"{name}.dcm"
        sr.save_as(paths[name])
    verdicts = pixelmed_batch("DicomSRValidator", list(paths.values()))
    failures = {}
    for name, path in paths.items():
        errors, warnings, output = verdicts[path]
        assert "Found Root Template TID_1500 (MeasurementReport)" in output, output
        dciodvfy_errors, dciodvfy_warnings = _dciodvfy(path)
        if errors or _unexpected(warnings) or dciodvfy_errors or dciodvfy_warnings:
            failures[name] = errors + _unexpected(warnings) + dciodvfy_errors + dciodvfy_warnings
    assert failures == {}


def test_sr_carries_what_ihe_air_asks_for(result):
    """TID 1500 root, algorithm identification, tracking identifier and UID per finding, a
    reference to the SEG segment and the source series, the observer device."""
    uids = uids_for("job-1", SPEC.name)
    seg = build_seg(result, OutputOptions(), uids)
    sr = build_sr(result, OutputOptions(), uids, seg)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    root = sr.ContentSequence
    measurements = next(i for i in root if i.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value)
    algorithm = {i.ConceptNameCodeSequence[0].CodeMeaning: getattr(i, "TextValue", None)
                 for i in measurements.ContentSequence if i.ValueType in ("TEXT", "CODE")}
    assert algorithm["Algorithm Name"] == SPEC.name and algorithm["Algorithm Version"] == str(SPEC.version)
    groups = [i for i in measurements.ContentSequence if i.ValueType == "CONTAINER"]
    assert len(groups) == len(result.findings)
    series_uid = result.volume.datasets[0].SeriesInstanceUID
    for group in groups:
        names = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in group.ContentSequence}
        assert names["Tracking Identifier"].TextValue and names["Tracking Unique Identifier"].UID
        assert names["Referenced Segment"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert names["Source series for segmentation"].UID == series_uid
        volume = next(i for i in group.ContentSequence if i.ValueType == "NUM")
        assert {i.ConceptNameCodeSequence[0].CodeMeaning for i in volume.ContentSequence} >= {"Algorithm Name"}
    observer = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in root}
    assert observer["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Device"
