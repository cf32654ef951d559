"""SEG and SR: built from label volumes made here, checked by dciodvfy, dcmqi and a read-back."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom import filewriter
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.tag import Tag

from inference.findings import measure
from inference.pipeline import SegmentationResult
from inference.spec import ModelSpec
from inference.volume import load_series, read_series
from node.config import OutputOptions
from node.encode.keyimages import build_key_images
from node.encode.kos import build_key_object_selection
from node.encode.rtstruct import build_rtstruct
from node.encode.seg import build_seg
from node.encode.sr import build_sr
from node.encode.writing import dataset_bytes
from tests.identity import uids_for
from phantom.dicom import SeriesGeometry, SeriesIdentity, write_ct_series

LESION = {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"}
ALTERED = {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Altered Structure"}
SPEC = ModelSpec.model_validate({
    "name": "two-labels", "version": 3, "task": "segmentation", "description": "test model",
    "postprocessing": {"findings": "per_component"},
    "labels": [
        {"value": 1, "name": "Lesion", "category": ALTERED, "type": LESION, "color": [255, 0, 0],
         "region": {"scheme": "SCT", "value": "39607008", "meaning": "Lung"}},
        {"value": 2, "name": "Nodule", "category": ALTERED,
         "type": {"scheme": "SCT", "value": "27925004", "meaning": "Nodule"}, "color": [0, 0, 255]},
    ],
})


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> SegmentationResult:
    return phantom_result(tmp_path_factory.mktemp("ct"))


def phantom_result(folder: Path) -> SegmentationResult:
    """A CT phantom written to `folder` with two lesions (components) and one nodule labelled."""
    geometry = SeriesGeometry(spacing=(2.5, 0.8, 0.8), origin=(-20.0, -30.0, 40.0))
    files = write_ct_series(np.zeros((24, 48, 40)), folder, geometry, SeriesIdentity(patient_name="Doe^Jane"))
    volume = load_series(read_series(files))
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[5:9, 10:20, 8:16] = 1   # two lesions (components) and one nodule
    labels[14:16, 30:34, 20:30] = 1
    labels[18:21, 5:9, 30:36] = 2
    return SegmentationResult(SPEC, volume, labels, measure(labels, volume, SPEC))


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    return [l for l in lines if l.startswith("Error")], [l for l in lines if l.startswith("Warning")]


# Debian's dicom3tools (2022) predates the Label Map Segmentation SOP class (2024): it does not
# know the IOD and expects segment numbers from 1, where a label map's background is segment 0.
# These two lines, and only these, are expected for LABELMAP; its voxels are checked below.
LABELMAP_UNKNOWN_TO_DCIODVFY = [
    "Error - SegmentNumber not monotonically increasing from one by one - have SegmentSequence item number 1"
    " (from one) with SegmentNumber of 0",
    "Error - Information Object Not found",
]


@pytest.mark.parametrize("kind, omit", [("BINARY", False), ("BINARY", True), ("LABELMAP", False)])
def test_seg_is_valid_and_decodes_to_the_label_volume(result, tmp_path, kind, omit):
    options = OutputOptions(segmentation_type=kind, omit_empty_frames=omit)
    seg = build_seg(result, options, uids_for("job-1", SPEC.name))
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    errors, warnings = _dciodvfy(path)
    assert errors == (LABELMAP_UNKNOWN_TO_DCIODVFY if kind == "LABELMAP" else [])
    assert warnings == []

    ds = pydicom.dcmread(path)
    source = result.volume.datasets[0]
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.SeriesNumber == 9101 and ds.SeriesDescription == "AI two-labels SEG"
    assert str(ds.ContentCreatorName) == "DICOM^Node"
    referenced = {item.ReferencedSOPInstanceUID for item in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in result.volume.datasets}
    segments = [(s.SegmentNumber, s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                 s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName,
                 s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion)
                for s in ds.SegmentSequence if s.SegmentNumber > 0]  # a label map adds background 0
    assert segments == [(1, "Lesion", "52988006", "two-labels", "3"), (2, "Nodule", "27925004", "two-labels", "3")]
    assert all("RecommendedDisplayCIELabValue" in s for s in ds.SegmentSequence if s.SegmentNumber > 0)
    if kind == "BINARY":
        _check_with_dcmqi(path, result, tmp_path)
    else:
        back = hd.seg.segread(path).get_pixels_by_source_instance(
            [d.SOPInstanceUID for d in result.volume.datasets], combine_segments=True)
        np.testing.assert_array_equal(back, result.labels)


def _check_with_dcmqi(path: Path, result: SegmentationResult, tmp_path: Path) -> None:
    """dcmqi decodes each segment to an image; every voxel must equal our label volume."""
    out = tmp_path / "dcmqi"
    out.mkdir()
    tool = Path(sys.executable).parent / "segimage2itkimage"
    run = subprocess.run([str(tool), "--inputDICOM", str(path), "--outputDirectory", str(out), "-t", "nifti"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((out / "meta.json").read_text())
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    k, r, c = np.indices(result.labels.shape).reshape(3, -1)
    patient = result.volume.to_patient(np.stack([k, r, c], axis=1))
    for number, attributes in enumerate(meta["segmentAttributes"], start=1):
        image = nib.load(out / f"{number}.nii.gz")
        data = np.asarray(image.dataobj)
        to_index = np.linalg.inv(ras_to_lps @ image.affine)
        ijk = np.rint(np.c_[patient, np.ones(len(patient))] @ to_index.T)[:, :3].astype(int)
        inside = np.all((ijk >= 0) & (ijk < data.shape[:3]), axis=1)
        decoded = np.zeros(len(patient), dtype=bool)
        decoded[inside] = data[ijk[inside, 0], ijk[inside, 1], ijk[inside, 2]] > 0
        expected = (result.labels.reshape(-1) == attributes[0]["labelID"])
        np.testing.assert_array_equal(decoded, expected)


def test_sr_is_valid_and_reads_back_the_measurements(result, tmp_path):
    options = OutputOptions()
    uids = uids_for("job-1", SPEC.name)
    seg = build_seg(result, options, uids)
    sr = build_sr(result, options, uids, seg)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    errors, warnings = _dciodvfy(path)
    assert errors == []
    assert warnings == []
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == result.volume.datasets[0].StudyInstanceUID and ds.SeriesNumber == 9102
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    report = hd.sr.srread(path)
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Lesion 1", "Lesion 2", "Nodule 1"]
    for group, finding in zip(groups, result.findings):
        volume = group.get_measurements(name=codes.SCT.Volume)[0]
        assert volume.value == pytest.approx(finding.volume_mm3, abs=1e-3)
        assert volume.unit == codes.UCUM.CubicMillimeter
        diameter = group.get_measurements(name=codes.SCT.LongAxis)[0]
        assert diameter.value == pytest.approx(finding.longest_in_plane_diameter_mm, abs=1e-3)
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        image_point, centre = [item for item in group[0].ContentSequence if item.name == codes.DCM.CenterOfMass]
        np.testing.assert_allclose(centre.value[0], finding.centroid, atol=1e-3)
        # first, the nearest source image's pixel (column, row from its top left corner), for viewers
        index = np.linalg.inv(result.volume.affine) @ np.append(finding.centroid, 1.0)
        slice_ = result.volume.datasets[int(round(float(index[0])))]
        assert image_point.value_type == hd.sr.ValueTypeValues.SCOORD
        np.testing.assert_allclose(image_point.value[0], [index[2] + 0.5, index[1] + 0.5], atol=1e-3)
        assert image_point.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == slice_.SOPInstanceUID
        assert group.finding_type == hd.sr.CodedConcept(**{"value": finding.label.type.value, "scheme_designator": "SCT",
                                                            "meaning": finding.label.type.meaning})
    lesion_sizes = [g.get_measurements(name=codes.SCT.Volume)[0].value for g in groups[:2]]
    assert lesion_sizes == sorted(lesion_sizes, reverse=True)  # components numbered by size
    assert lesion_sizes[0] == pytest.approx(4 * 10 * 8 * 2.5 * 0.8 * 0.8, abs=1e-6)


def test_same_job_same_uids_other_job_other_uids(result):
    options = OutputOptions()
    a = build_seg(result, options, uids_for("job-1", SPEC.name))
    b = build_seg(result, options, uids_for("job-1", SPEC.name))
    c = build_seg(result, options, uids_for("job-2", SPEC.name))
    sparse = build_seg(result, OutputOptions(omit_empty_frames=True), uids_for("job-1", SPEC.name))
    assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert sparse.SOPInstanceUID != a.SOPInstanceUID


def test_no_findings_gives_no_seg_and_an_empty_report(result):
    empty = SegmentationResult(SPEC, result.volume, np.zeros_like(result.labels), [])
    assert build_seg(empty, OutputOptions(), uids_for("j", SPEC.name)) is None
    sr = build_sr(empty, OutputOptions(), uids_for("j", SPEC.name), None)
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    assert report.content.get_volumetric_roi_measurement_groups() == []
    items = [i for c in report.content[0].ContentSequence if c.name.value == "C0034375"  # Qualitative Evaluations
             for i in c.ContentSequence]
    absent = [(i.name.meaning, i.value.meaning) for i in items
              if i.value_type.value == "CODE" and i.value.value == codes.SCT.Absent.value]
    assert absent == [("Lesion", "Absent"), ("Nodule", "Absent")]


def test_result_objects_are_written_byte_for_byte_as_pydicom_writes_them(result, monkeypatch):
    """`dataset_bytes` encodes the sequences itself (pydicom spends ~24 µs an element): the same
    bytes as `save_as` for every object the node makes (an ambiguous VR at the top settled as pydicom
    settles it), the object left as it was; an item with a character set of its own (its ambiguous
    VR settled against the top level) or read from a file is written by pydicom, and an object with
    something the walk does not encode (an ambiguous VR or encapsulated pixel data inside an item, a
    raw value at the top level) by pydicom whole: the same bytes again; a value pydicom's writer
    refuses, the same error."""
    uids = uids_for("job-1", SPEC.name)
    seg = build_seg(result, OutputOptions(), uids)
    objects = [seg, build_seg(result, OutputOptions(omit_empty_frames=False), uids),
               build_seg(result, OutputOptions(segmentation_type="LABELMAP"), uids),
               build_sr(result, OutputOptions(), uids, seg), build_rtstruct(result, OutputOptions(), uids),
               build_key_object_selection(result, OutputOptions(), uids),
               *build_key_images(result, OutputOptions(), uids)]
    top = build_sr(result, OutputOptions(), uids, seg)
    top.PixelRepresentation = 1
    top.add_new(0x00280106, "US or SS", -1)  # Smallest Image Pixel Value: its VR settled as pydicom does
    top.SpecificCharacterSet = "ISO_IR 192"  # text in items in UTF-8; a retired group length left out
    top.CurrentRequestedProcedureEvidenceSequence[0].StudyDescription = "Étude à Zürich"
    top.CurrentRequestedProcedureEvidenceSequence[0].add_new(0x00080000, "UL", 0)
    nested = build_sr(result, OutputOptions(), uids, seg)  # the same inside an item: pydicom's way
    nested.CurrentRequestedProcedureEvidenceSequence[0].PixelRepresentation = 0
    nested.CurrentRequestedProcedureEvidenceSequence[0].add_new(0x00280106, "US or SS", 1)
    item_charset = build_seg(result, OutputOptions(), uids)  # that item written by pydicom, its ambiguous
    item_charset.PixelRepresentation = 1  # VR settled against the top level (SS)
    item_charset.PerFrameFunctionalGroupsSequence[1].SpecificCharacterSet = "ISO_IR 100"
    item_charset.PerFrameFunctionalGroupsSequence[1].add_new(0x00280106, "US or SS", 1)
    icon = build_sr(result, OutputOptions(), uids, seg)  # encapsulated pixel data inside an item: all pydicom's
    icon.IconImageSequence = [pydicom.Dataset()]
    icon.IconImageSequence[0].PixelData = encapsulate([b"\x00\x01"])
    pixels = icon.IconImageSequence[0]["PixelData"]
    pixels.VR, pixels.is_undefined_length = "OB", True
    copied = build_seg(result, OutputOptions(), uids)  # an item read from a source file (implicit VR,
    source = pydicom.Dataset()  # its value padded by two spaces): by pydicom, as save_as writes it
    source.ProcedureCodeSequence = [pydicom.Dataset()]
    source.ProcedureCodeSequence[0].CodeValue, source.ProcedureCodeSequence[0].CodeMeaning = "CT CH  ", "Chest"
    stream = BytesIO()
    pydicom.dcmwrite(stream, source, implicit_vr=True, little_endian=True)
    read = pydicom.dcmread(BytesIO(stream.getvalue()), force=True)
    copied.ProcedureCodeSequence = read.ProcedureCodeSequence
    raw_top = build_sr(result, OutputOptions(), uids, seg)  # a raw value at the top level: all pydicom's
    raw_top[0x00081030] = RawDataElement(Tag(0x00081030), "LO", 8, b"Chest   ", 0, False, True)  # as read

    def pydicom_bytes(dataset: pydicom.Dataset) -> bytes:
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    items_by_pydicom: list[int] = []
    write_item = filewriter.write_sequence_item
    monkeypatch.setattr(filewriter, "write_sequence_item",
                        lambda *args: (items_by_pydicom.append(1), write_item(*args)))
    for dataset in [*objects, top, nested, icon, raw_top, item_charset, copied]:
        sequences = [element for element in dataset.elements() if element.VR == "SQ"]  # (raw ones stay raw)
        items_by_pydicom.clear()
        expected = pydicom_bytes(copy.deepcopy(dataset))
        every_item = len(items_by_pydicom)
        items_by_pydicom.clear()
        encoding = (dataset.original_encoding, dataset.original_character_set)
        assert dataset_bytes(dataset) == expected, dataset.SOPClassUID
        assert (dataset.original_encoding, dataset.original_character_set) == encoding  # put back
        # encoded here; by pydicom an item (of its own character set, read from a file) or all
        by_pydicom = len(items_by_pydicom)
        if dataset is nested or dataset is icon or dataset is raw_top:
            assert by_pydicom == every_item
        else:
            assert (0 < by_pydicom < every_item) if dataset is item_charset or dataset is copied else not by_pydicom
        assert all(dataset[element.tag] is element for element in sequences)  # put back, the same objects
        assert pydicom_bytes(dataset) == expected
    assert len(seg.PerFrameFunctionalGroupsSequence) >= 9 and len(objects) >= 8
    refused = build_sr(result, OutputOptions(), uids, seg)  # a value pydicom's writer refuses: its error
    with pytest.warns(UserWarning, match="between 0 and 65535"):
        refused.CurrentRequestedProcedureEvidenceSequence[0].add_new(0x00280010, "US", 70000)
    with pytest.raises(Exception) as by_pydicom_whole:
        pydicom_bytes(copy.deepcopy(refused))
    with pytest.raises(type(by_pydicom_whole.value), match="ushort format requires"):
        dataset_bytes(refused)


def test_warm_up_builds_a_seg_and_an_sr_that_read_back():
    """The pipeline's warm-up (node.encode.warmup) exercises the same highdicom paths as a study."""
    from io import BytesIO

    from node.encode.warmup import warm_up

    seg, sr = warm_up()
    for obj in (seg, sr):
        buffer = BytesIO()
        obj.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        assert pydicom.dcmread(buffer).SOPInstanceUID == obj.SOPInstanceUID
    assert hd.seg.Segmentation.from_dataset(seg).number_of_segments == 1
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage


def test_highdicoms_iod_question_is_asked_once_per_sop_class_and_answered_as_highdicom_answers(result):
    """Pins the IOD answers of node/highdicom_internals.py. A SEG of single-frame sources asks,
    through the remembered form, once per source whether its SOP class allows frames: if
    highdicom stops routing that question through `_standard_utils.is_attribute_in_iod`, nothing
    is remembered and this fails. Every answer is highdicom's own: four attributes compared over
    every SOP class it knows."""
    from highdicom import _standard_utils

    from node import highdicom_internals as internals

    assert _standard_utils.is_attribute_in_iod is internals.is_attribute_in_iod, "put in place by node.encode.seg"
    asks = internals.highdicoms_answer
    assert asks.__module__ == "highdicom._standard_utils" and asks is not internals.is_attribute_in_iod
    internals.remembered_answer.cache_clear()
    build_seg(result, OutputOptions(), uids_for("iod-question", SPEC.name))
    asked = internals.remembered_answer.cache_info()
    assert asked.hits >= len(result.volume.datasets) - 1 and asked.misses <= 4, asked

    def outcome(question, *args, **kwargs):  # highdicom's tables have IODs naming modules they lack
        try:
            return question(*args, **kwargs)
        except KeyError as error:
            return repr(error)

    remembering = _standard_utils.is_attribute_in_iod
    for sop_class in _standard_utils.get_sop_class_iod_map():
        for keyword in ("NumberOfFrames", "PixelData", "PerFrameFunctionalGroupsSequence", "ContentDate"):
            expected = outcome(asks, keyword, sop_class)
            assert outcome(remembering, keyword, sop_class) == expected
            assert outcome(remembering, keyword, sop_class_uid=pydicom.uid.UID(sop_class)) == expected
    enhanced_mr = "1.2.840.10008.5.1.4.1.1.4.1"  # an exclusion is asked of highdicom each time, not kept:
    remembering("PixelSpacing", enhanced_mr)  # remembered as True (under the functional groups)
    groups = ["SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"]
    assert remembering("PixelSpacing", enhanced_mr, groups) is asks("PixelSpacing", enhanced_mr, groups) is False
    kept = internals.remembered_answer.cache_info().currsize
    for _ in range(2):  # an unknown SOP class is highdicom's error each time, never a remembered answer
        with pytest.raises(KeyError, match="No IOD found"):
            remembering("NumberOfFrames", "1.2.3.4")
    assert internals.remembered_answer.cache_info().currsize == kept


def test_demographics_that_would_not_convert_are_emptied_and_each_distinct_value_is_checked_once(tmp_path,
                                                                                                 monkeypatch):
    """A copied value that would not convert (node.encode.demographics) is emptied in every header
    that holds it and nowhere else; the others stay as they are. Headers sharing a value's bytes
    have it checked once, the rest taking its verdict: two checks of the birth date and two of the
    sex for five headers, and a good value after its first is not even decoded."""
    from pydicom.dataelem import RawDataElement

    from node.encode import demographics

    files = write_ct_series(np.zeros((5, 8, 8)), tmp_path / "s", SeriesGeometry())
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = "1970-01-01XQZ" if k in (1, 3) else "19700101"
        ds.PatientSex = "Q" if k == 4 else "F"
        ds.save_as(path, enforce_file_format=True)
    datasets = read_series(files)
    checked: list[str] = []
    for keyword in ("PatientBirthDate", "PatientSex"):
        check = demographics._CHECKS[keyword]
        monkeypatch.setitem(demographics._CHECKS, keyword,
                            lambda value, keyword=keyword, check=check: checked.append(keyword) or check(value))
    assert demographics.tolerate_demographics(datasets) == ["PatientBirthDate", "PatientSex"]
    assert sorted(checked) == ["PatientBirthDate"] * 2 + ["PatientSex"] * 2
    decoded = [not isinstance(ds.get_item("PatientBirthDate", keep_deferred=True), RawDataElement) for ds in datasets]
    assert decoded == [True, True, False, True, False]  # the first of each value, and the second bad one, emptied
    assert [ds.PatientBirthDate for ds in datasets] == ["19700101", "", "19700101", "", "19700101"]
    assert [ds.PatientSex for ds in datasets] == ["F", "F", "F", "F", ""]


def test_a_demographic_value_under_a_vendors_vr_is_checked_in_each_header():
    """The same bytes under another VR than the attribute's decode by each header's character set
    or byte order: a birth date as LO in full-width digits converts under ISO_IR 192 and not under
    the default character set; one as UL converts little-endian and not big-endian. Each header is
    judged on its own value (a shared verdict would keep the second of each)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from node.encode.demographics import tolerate_demographics

    def header(vr: str, value: bytes, charset: str | None = None, little_endian: bool = True) -> pydicom.Dataset:
        ds = pydicom.Dataset()
        if charset:
            ds.SpecificCharacterSet = charset
        tag = Tag("PatientBirthDate")
        ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, little_endian)
        return ds

    wide = "\uff11\uff19\uff17\uff10\uff10\uff11\uff10\uff11".encode()  # 19700101 in full-width digits
    by_charset = [header("LO", wide, "ISO_IR 192"), header("LO", wide)]
    assert tolerate_demographics(by_charset) == ["PatientBirthDate"]
    assert [ds.PatientBirthDate != "" for ds in by_charset] == [True, False]
    number = (19700101).to_bytes(4, "little")
    by_order = [header("UL", number), header("UL", number, little_endian=False)]
    assert tolerate_demographics(by_order) == ["PatientBirthDate"]
    assert [ds.PatientBirthDate != "" for ds in by_order] == [True, False]
