"""Outputs for PACS that cannot show SEG (RTSTRUCT, key-image Secondary Captures) and the
"AI ran" notices, checked with dciodvfy, by re-rasterising contours, and through a real node
delivering to Orthanc.
"""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest

from inference.findings import measure
from inference.pipeline import SegmentationResult
from inference.volume import load_series, read_series
from node.encode.keyimages import LEGEND, build_key_images, key_slices, scale_of
from node.encode.notice import build_failure_notice
from node.config import OutputOptions
from node.encode.rtstruct import build_rtstruct, rasterise
from tests.identity import uids_for
from tests.orthanc import Orthanc
from tests.peers import wait_for
from tests.test_encode import SPEC, _dciodvfy, phantom_result
from tests.test_jobs import jobs_of, send, sphere_study, wait_job
from phantom.dicom import SeriesGeometry, SeriesIdentity, write_ct_series

OPTIONS = OutputOptions()


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> SegmentationResult:
    """The encoder tests' phantom, plus a ring (a lesion with a hole) on slice 2."""
    base = phantom_result(tmp_path_factory.mktemp("ct"))
    labels = base.labels.copy()
    r, c = np.indices(labels.shape[1:])
    distance = np.hypot(r - 30, c - 12)
    labels[2][(distance <= 7) & (distance >= 3)] = 1
    return SegmentationResult(SPEC, base.volume, labels, measure(labels, base.volume, SPEC))


@pytest.fixture(scope="module")
def oblique(tmp_path_factory) -> SegmentationResult:
    """A series tilted 30 degrees about the patient's left-right axis, with one block labelled."""
    angle = np.radians(30)
    geometry = SeriesGeometry(spacing=(3.0, 0.9, 0.9), origin=(10.0, -20.0, 5.0),
                              orientation=(1.0, 0.0, 0.0, 0.0, float(np.cos(angle)), float(-np.sin(angle))))
    files = write_ct_series(np.zeros((12, 40, 36)), tmp_path_factory.mktemp("oblique"), geometry, SeriesIdentity())
    volume = load_series(read_series(files))
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[4:8, 10:22, 6:15] = 1
    return SegmentationResult(SPEC, volume, labels, measure(labels, volume, SPEC))


def contours_by_slice(rt: pydicom.Dataset, result: SegmentationResult, roi: int) -> dict[int, list[np.ndarray]]:
    """An RTSTRUCT's contours of one ROI back on the source grid: slice -> (column, row) points,
    located the way a reader does it: by the referenced image and the patient coordinates."""
    inverse = np.linalg.inv(result.volume.affine)
    by_uid = {str(ds.SOPInstanceUID): k for k, ds in enumerate(result.volume.datasets)}
    out: dict[int, list[np.ndarray]] = {}
    roi_contour = next(c for c in rt.ROIContourSequence if c.ReferencedROINumber == roi)
    for item in roi_contour.ContourSequence:
        points = np.asarray(item.ContourData, dtype=float).reshape(-1, 3)
        index = (inverse @ np.column_stack([points, np.ones(len(points))]).T).T[:, :3]  # (k, row, column)
        k = by_uid[item.ContourImageSequence[0].ReferencedSOPInstanceUID]
        assert np.allclose(index[:, 0], k, atol=1e-3)  # in the plane of the image it references
        out.setdefault(k, []).append(index[:, [2, 1]])
    return out


def assert_within_one_pixel(rt: pydicom.Dataset, result: SegmentationResult) -> int:
    """Every ROI re-rasterised equals its label mask except on the mask's one-pixel border;
    returns how many pixels differ in all."""
    differing = 0
    names = [roi.ROIName for roi in rt.StructureSetROISequence]
    for number, name in enumerate(names, start=1):
        value = next(l.value for l in SPEC.labels if l.name == name)
        contours = contours_by_slice(rt, result, number)
        for k in range(result.labels.shape[0]):
            mask = result.labels[k] == value
            drawn = rasterise(contours.get(k, []), mask.shape)
            kernel = np.ones((3, 3), np.uint8)
            inside = mask.astype(np.uint8)
            border = cv2.dilate(inside, kernel).astype(bool) & ~cv2.erode(inside, kernel).astype(bool)
            assert not ((drawn ^ mask) & ~border).any(), f"ROI {name} slice {k}: off by more than one pixel"
            differing += int((drawn ^ mask).sum())
    return differing


@pytest.mark.parametrize("which", ["axial", "oblique"])
def test_rtstruct_is_valid_and_redraws_the_mask(result, oblique, which, tmp_path):
    source = result if which == "axial" else oblique
    uids = uids_for("rt", SPEC.name)
    rt = build_rtstruct(source, OPTIONS, uids)
    path = tmp_path / "rt.dcm"
    rt.save_as(path, enforce_file_format=True)
    errors, warnings = _dciodvfy(path)
    assert errors == [] and warnings == []
    read = pydicom.dcmread(path)
    assert read.Modality == "RTSTRUCT" and read.SeriesNumber == 9103
    assert read.SOPInstanceUID == uids.instance("RTSTRUCT") and read.SeriesInstanceUID == uids.series("RTSTRUCT")
    assert read.StudyInstanceUID == source.volume.datasets[0].StudyInstanceUID
    assert read.PatientName == source.volume.datasets[0].PatientName
    present = {l.value for l in SPEC.labels if (source.labels == l.value).any()}
    assert [r.ROIName for r in read.StructureSetROISequence] == [l.name for l in SPEC.labels if l.value in present]
    assert [list(c.ROIDisplayColor) for c in read.ROIContourSequence] == [list(l.color) for l in SPEC.labels
                                                                          if l.value in present]
    differing = assert_within_one_pixel(read, source)  # measured: 20 (the ring's inner edge) axial, 0 oblique
    assert differing <= 0.05 * int((source.labels > 0).sum())
    # the same inputs write the same object (a re-run delivers nothing new)
    assert build_rtstruct(source, OPTIONS, uids) == rt


def test_rtstruct_ring_keeps_its_hole(result):
    rt = build_rtstruct(result, OPTIONS, uids_for("rt", SPEC.name))
    ring = contours_by_slice(rt, result, 1)[2]
    assert len(ring) == 2  # outer outline and hole
    drawn = rasterise(ring, result.labels.shape[1:])
    assert not drawn[30, 12] and drawn[30, 17]  # centre empty, ring wall filled


def test_key_images_burn_in_the_finding_and_the_legend(result, tmp_path):
    uids = uids_for("sc", SPEC.name)
    images = build_key_images(result, OPTIONS.model_copy(update={"key_images": 3}), uids)
    area = (result.labels > 0).sum(axis=(1, 2))
    expected = sorted(np.argsort(-area, kind="stable")[:3].tolist())
    assert key_slices(result, 3) == expected and len(images) == 3
    scale = scale_of(result)
    for number, (k, image) in enumerate(zip(expected, images), start=1):
        path = tmp_path / f"sc{number}.dcm"
        image.save_as(path, enforce_file_format=True)
        errors, _ = _dciodvfy(path)
        assert errors == []
        read = pydicom.dcmread(path)
        assert read.SOPInstanceUID == uids.instance("SC", f"slice-{k}") and read.SeriesNumber == 9104
        assert read.SeriesInstanceUID == uids.series("SC") and read.BurnedInAnnotation == "YES"
        assert read.SourceImageSequence[0].ReferencedSOPInstanceUID == result.volume.datasets[k].SOPInstanceUID
        assert LEGEND in read.ImageComments and f"{SPEC.name} {SPEC.version}" in read.ImageComments
        pixels = read.pixel_array.astype(int)
        rows, columns = result.labels.shape[1:]
        assert pixels.shape == (rows * scale + 44, columns * scale, 3)
        # inside the finding (away from its outline): the label colour mixed into the grey image
        label = result.labels[k]
        value = label[label > 0].max()
        interior = np.argwhere(cv2.erode((label == value).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
        r, c = interior[len(interior) // 2]  # off the outline, which is drawn in the full colour
        colour = np.array(next(l.color for l in SPEC.labels if l.value == value))
        inside = pixels[r * scale + scale // 2, c * scale + scale // 2]
        rr, cc = np.argwhere(label == 0)[0]
        away = pixels[rr * scale + scale // 2, cc * scale + scale // 2]
        assert away[0] == away[1] == away[2]  # away from it: the windowed grey image, untouched
        assert np.abs(inside - (0.55 * away + 0.45 * colour)).max() <= 1  # the phantom is uniform: 45 % tint
        band = pixels[rows * scale:]
        assert (band == [255, 255, 0]).all(axis=2).sum() > 200  # the legend's yellow text is drawn


def test_failure_notice_is_a_valid_sr_without_source_values(result, tmp_path):
    source = result.volume.datasets[0]
    uids = uids_for("failed", SPEC.name)
    notice = build_failure_notice(source, "lungs", ["two-labels"], "load: images of different sizes", OPTIONS, uids)
    path = tmp_path / "notice.dcm"
    notice.save_as(path, enforce_file_format=True)
    errors, _ = _dciodvfy(path)
    assert errors == []
    read = pydicom.dcmread(path)
    assert read.StudyInstanceUID == source.StudyInstanceUID and read.SeriesNumber == 9105
    assert read.SOPInstanceUID == uids.instance("NOTICE", "failed")
    text = read.ContentSequence[0].TextValue
    assert "did not complete" in text and "images of different sizes" in text and "Rule: lungs" in text
    assert str(source.PatientName) not in text


# -- through a node, to Orthanc -------------------------------------------------------------------

SITE_ROOT = "1.2.826.0.1.3680043.10.999."  # a site's UID root (output.uid_root)


def objects_in(pacs: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    return {m: [pydicom.dcmread(io.BytesIO(pacs.instance_file(i["ID"]))) for i in found]
            for m, found in pacs.instances_by_modality(study_uid).items()}


def test_node_sends_fallbacks_and_notices(start_node, orthanc, model_repository, tmp_path):
    """One node, two destinations: the rule asks for SEG+SR; `legacy` (a PACS without SEG) lists
    its own outputs. A study with nothing to find and one that cannot be loaded get notices."""
    pacs, legacy = orthanc(), orthanc(aet="LEGACY")
    node = start_node(tmp_path / "node", routing={"rules": [{
        "name": "bright-regions", "match": {"tag": "Modality", "equals": "CT"},
        "actions": {"run": ["threshold"], "outputs": ["SEG"], "send_to": ["pacs", "legacy"]}}]},
        completion={"quiet_period_s": 1.0},
        destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port},
                      "legacy": {"ae_title": legacy.aet, "host": "127.0.0.1", "port": legacy.dicom_port,
                                 "outputs": ["RTSTRUCT", "SC", "SR"]}},
        sending={"retry_initial_s": 0.5, "retry_max_s": 1.0, "sweep_s": 0.5},
        output={"uid_root": SITE_ROOT},
        inference={"model_repository": str(model_repository)})
    files, study = sphere_study(tmp_path / "sphere", "PAT-F")
    empty = write_ct_series(np.full((12, 32, 32), -1000.0), tmp_path / "empty", SeriesGeometry(),
                            SeriesIdentity(patient_id="PAT-E"))
    empty_study = str(pydicom.dcmread(empty[0], stop_before_pixels=True).StudyInstanceUID)
    broken, broken_study = sphere_study(tmp_path / "broken", "PAT-X", slices=12, size=32, centre=(6, 16, 16))
    odd = pydicom.dcmread(broken[5])
    odd.Rows, odd.Columns = 16, 16
    odd.PixelData = odd.PixelData[: 16 * 16 * 2]
    odd.save_as(broken[5], enforce_file_format=True)
    send(node, files + empty + broken)

    def arrived(peer: Orthanc, uid: str, wanted: dict[str, int]) -> Any:
        found = {m: len(v) for m, v in peer.instances_by_modality(uid).items() if m != "CT"}
        return found == wanted and found

    # the sphere: SEG only to pacs (the rule); RTSTRUCT + 5 key images + SR to legacy (its own outputs)
    wait_for(lambda: arrived(pacs, study, {"SEG": 1}), timeout=180, interval=0.5)
    wait_for(lambda: arrived(legacy, study, {"RTSTRUCT": 1, "OT": 5, "SR": 1}), timeout=180, interval=0.5)
    # nothing found: the rule's SEG-only output still sends its report (no groups, labels Absent)
    wait_for(lambda: arrived(pacs, empty_study, {"SR": 1}), timeout=180, interval=0.5)
    report = objects_in(pacs, empty_study)["SR"][0]
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    measurements = next(i for i in report.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    assert not [i for i in measurements.ContentSequence if i.ValueType == "CONTAINER"]  # no measurement groups
    assert "Absent" in str(report.ContentSequence)
    # the broken study fails for good and both destinations get the notice, naming the reason
    failed = wait_job(node, broken_study, {"failed"})
    for peer in (pacs, legacy):
        wait_for(lambda: arrived(peer, broken_study, {"SR": 1}), timeout=120, interval=0.5)
        notice = objects_in(peer, broken_study)["SR"][0]
        assert "images of different sizes" in notice.ContentSequence[0].TextValue
        assert notice.SeriesNumber == 9105 and notice.PatientID == "PAT-X"
    assert failed.reason in notice.ContentSequence[0].TextValue

    legacy_objects = objects_in(legacy, study)
    rt = legacy_objects["RTSTRUCT"][0]
    job = jobs_of(node, study)[0]
    assert rt.SeriesNumber == 9103 and {s.SeriesNumber for s in legacy_objects["OT"]} == {9104}
    assert rt.StudyInstanceUID == study and all(s.StudyInstanceUID == study for s in legacy_objects["OT"])
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["Bright region"]
    # the sphere (radius 5 voxels): one outline on each of its 11 slices
    assert len(rt.ROIContourSequence[0].ContourSequence) == 11
    assert job.state.value == "done"
    # output.uid_root: every object the node made (SEG, SR, RTSTRUCT, key images, notices) is
    # under the site's root, series and instances alike
    made = [o for peer in (pacs, legacy) for uid in (study, empty_study, broken_study)
            for modality, objects in objects_in(peer, uid).items() if modality != "CT" for o in objects]
    assert {o.Modality for o in made} == {"SEG", "SR", "RTSTRUCT", "OT"}
    assert sum(o.StudyInstanceUID == broken_study for o in made) == 2  # the notices
    assert all(o.SOPInstanceUID.startswith(SITE_ROOT) and o.SeriesInstanceUID.startswith(SITE_ROOT)
               for o in made), sorted(o.SOPInstanceUID for o in made)
