"""De-identification (node/deid, PS3.15 Annex E): a PHI scanner over every element of the
output, sequences and private blocks included, against the source's identifying values and
values planted in descriptions, comments, nested items and private tags; consistent keyed
pseudonyms; the options; burned-in annotation refused; vendor files from pydicom's test data."""

from __future__ import annotations

import copy
import subprocess
from datetime import date, datetime, timedelta
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.sequence import Sequence

from node.deid.engine import BurnedInAnnotation, deidentify
from node.deid.profile import Option, Profile, ProfileError
from node.deid.pseudonyms import Pseudonyms
from tests.peers import make_study, storescu
from tests.test_encode import _dciodvfy

KEY = b"a project key of 32 bytes, test!"
PLANTED = ["Planted^Patient", "PLANTEDID123", "19700101", "Planted Street 5", "Planted^Referrer", "Planted General",
           "PLANTEDACC9", "Planted^Operator", "SN-PLANTED-7", "PLANTEDSTATION", "planted in a description",
           "planted in a comment", "planted history", "planted request", "PLANTEDSPS", "planted private",
           "planted nested private", "Planted^Performer", "PLANTEDOTHERID", "planted institution address"]


def _planted(path: Path, other_sop: str) -> Dataset:
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Planted^Patient", "PLANTEDID123", "19700101"
    ds.PatientSex, ds.PatientAge = "F", "054Y"
    ds.PatientAddress, ds.ReferringPhysicianName = "Planted Street 5", "Planted^Referrer"
    ds.InstitutionName, ds.InstitutionAddress = "Planted General", "planted institution address"
    ds.AccessionNumber, ds.OperatorsName, ds.PerformingPhysicianName = "PLANTEDACC9", "Planted^Operator", "Planted^Performer"
    ds.DeviceSerialNumber, ds.StationName = "SN-PLANTED-7", "PLANTEDSTATION"
    ds.StudyDescription = "CT head, planted in a description"
    ds.ImageComments, ds.AdditionalPatientHistory = "planted in a comment", "planted history"
    ds.StudyDate, ds.SeriesDate, ds.ContentDate = "20240315", "20240315", "20240315"
    other = Dataset()
    other.PatientID = "PLANTEDOTHERID"
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.RequestedProcedureDescription, request.ScheduledProcedureStepID = "planted request", "PLANTEDSPS"
    ds.RequestAttributesSequence = Sequence([request])
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = ds.SOPClassUID, other_sop
    ds.ReferencedImageSequence = Sequence([reference])
    block = ds.private_block(0x0029, "ACME PLANTED", create=True)
    block.add_new(0x10, "LO", "planted private")
    block.add_new(0x11, "LO", "kept when safe")
    nested = Dataset()
    nested.add_new(0x00291010, "LO", "ACME PLANTED")  # its own private creator, inside an item
    nested.add_new(0x00291020, "LO", "planted nested private")
    block.add_new(0x12, "SQ", Sequence([nested]))
    return ds


def _values(ds: Dataset) -> list[str]:
    """Every value in the data set, nested items and file meta included, as text."""
    out = []
    for elem in list(ds.iterall()) + list(getattr(ds, "file_meta", Dataset()).iterall()):
        if elem.VR == "SQ":
            continue
        value = elem.value
        out.append(value.decode("latin-1", "replace") if isinstance(value, bytes) else str(value))
    return out


def _leaks(ds: Dataset, secrets: list[str]) -> list[str]:
    """The secrets found in a value: anywhere in it, or (shorter than 8 characters, which
    occur inside harmless words) as a whole value or name component."""
    values = [v.lower() for v in _values(ds)]
    text = "\n".join(values)
    words = {w.strip() for v in values for w in v.replace("^", "\\").split("\\")}
    return [s for s in secrets if (s.lower() in text if len(s) >= 8 else s.lower() in words)]


def _written(ds: Dataset) -> Dataset:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    files = make_study(tmp_path_factory.mktemp("deid") / "ct", slices=2, size=16)
    first, second = (pydicom.dcmread(f) for f in files)
    return [_planted(files[0], str(second.SOPInstanceUID)), _planted(files[1], str(first.SOPInstanceUID))]


def test_no_planted_or_source_value_leaves_and_the_pseudonyms_are_consistent(sources):
    pseudonyms = Pseudonyms(KEY, "project-a")
    made = [deidentify(ds, Profile(), pseudonyms) for ds in sources]
    source_uids = {str(v) for ds in sources for e in ds.iterall() if e.VR == "UI" for v in
                   (e.value if e.VM > 1 else [e.value]) if str(v) not in pydicom.uid.UID_dictionary}
    for result in made:
        out = _written(result.dataset)
        assert _leaks(out, PLANTED + sorted(source_uids)) == []
        assert not [e.tag for e in out.iterall() if e.tag.is_private]
        assert out.PatientIdentityRemoved == "YES" and out.LongitudinalTemporalInformationModified == "REMOVED"
        assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100"]
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.StudyDate == "" and "PatientSex" in out and out.PatientSex == ""
        assert out.pixel_array.tolist() == sources[0 if result is made[0] else 1].pixel_array.tolist()
    a, b = (m.dataset for m in made)
    assert (a.StudyInstanceUID, a.SeriesInstanceUID, a.FrameOfReferenceUID, a.PatientID) == (
        b.StudyInstanceUID, b.SeriesInstanceUID, b.FrameOfReferenceUID, b.PatientID)
    assert a.ReferencedImageSequence[0].ReferencedSOPInstanceUID == b.SOPInstanceUID  # references follow
    assert a.ReferencedImageSequence[0].ReferencedSOPClassUID == sources[0].SOPClassUID  # classes stay
    assert made[0].uids[str(sources[0].StudyInstanceUID)] == a.StudyInstanceUID  # the mapping to keep
    assert all(len(u) <= 64 and u.startswith("2.25.") for u in made[0].uids.values())
    again = deidentify(sources[0], Profile(), Pseudonyms(KEY, "project-a")).dataset
    elsewhere = deidentify(sources[0], Profile(), Pseudonyms(KEY, "project-b")).dataset
    assert (again.StudyInstanceUID, again.SOPInstanceUID, again.PatientID) == (
        a.StudyInstanceUID, a.SOPInstanceUID, a.PatientID)
    assert elsewhere.StudyInstanceUID != a.StudyInstanceUID and elsewhere.PatientID != a.PatientID
    assert sources[0].PatientName == "Planted^Patient"  # the source is untouched


def test_unlisted_attributes_holding_text_or_dates_go_and_what_a_model_needs_stays(sources):
    """Table E.1-1 does not list every attribute that can hold a name: public text, names, dates
    and unknown elements it does not list are removed; codes and how the image was made stay."""
    ds = copy.deepcopy(sources[0])
    ds.RetrieveURL = f"https://pacs.example/wado/studies/{ds.StudyInstanceUID}"
    ds.add_new(0x00142006, "PN", "Yamada^Tarou=山田^太郎")  # Evaluator Name (not in the table)
    ds.DocumentTitle = "Report PLANTED^NAME"
    ds.add_new(0x0040E001, "ST", "PLANTEDHL7ID")
    step = Dataset()
    step.add_new(0x00400400, "LT", "PLANTEDMRN allergic")
    ds.ScheduledProcedureStepSequence = Sequence([step])
    note = Dataset()
    note.UnformattedTextValue = "Pt PLANTED^NAME, PLANTEDMRN"
    ds.WaveformAnnotationSequence = Sequence([note])
    ds.add_new(0x00101111, "UN", b"PLANTED^UNKNOWN")
    ds.StudyUpdateDateTime = "20240316101010"
    ds.DateOfLastCalibration = "20240315"
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "T-D3000", "SRT", "Chest"
    ds.AnatomicRegionSequence = Sequence([region])
    ds.Manufacturer, ds.ConvolutionKernel = "ACME", "B30f"
    stray = Dataset()
    stray.add_new(0x00020016, "AE", "PLANTEDAE")  # file meta elements inside an item
    ds.ReferencedStudySequence = Sequence([stray])
    ds.preamble = b"PLANTED^PREAMBLE".ljust(128, b"\0")
    out = deidentify(ds, Profile(), Pseudonyms(KEY, "project-a")).dataset
    written = _written(out)
    assert _leaks(written, ["Yamada", "PLANTED^NAME", "PLANTEDHL7ID", "PLANTEDMRN", "PLANTED^UNKNOWN", "PLANTEDAE",
                            str(ds.StudyInstanceUID), "20240316"]) == []
    assert out.preamble == b"\0" * 128 and "RetrieveURL" not in out and 0x00101111 not in out
    assert "StudyUpdateDateTime" not in out and "DateOfLastCalibration" not in out  # no dates option: gone
    assert (out.Manufacturer, out.ConvolutionKernel) == ("ACME", "B30f")
    assert out.AnatomicRegionSequence[0].CodeMeaning == "Chest"
    dated = deidentify(ds, Profile(frozenset({Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,
                                              Option.RETAIN_DEVICE_IDENTITY})), Pseudonyms(KEY, "project-a")).dataset
    # every date moves by the one shift, whichever option also names it (device identity keeps
    # calibration dates unshifted otherwise) and whether or not the table lists it
    assert dated.StudyDate == dated.DateOfLastCalibration != "20240315"
    assert dated.StudyUpdateDateTime[:8] != "20240316" and dated.StudyUpdateDateTime[8:] == "101010"


def test_inputs_that_broke_it_or_slipped_through_are_refused_or_handled(sources):
    pseudonyms = Pseudonyms(KEY, "project-a")
    pdf = copy.deepcopy(sources[0])
    del pdf.PixelData
    pdf.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage
    with pytest.raises(BurnedInAnnotation, match="an encapsulated document"):
        deidentify(pdf, Profile(), pseudonyms, allow_burned_in=False)
    for sop_class, modality in (("1.2.840.10008.5.1.4.1.1.6.1", ""), ("1.2.840.10008.5.1.4.1.1.2", [" US", "OT"])):
        scan = copy.deepcopy(sources[0])
        scan.SOPClassUID, scan.Modality = sop_class, modality
        with pytest.raises(BurnedInAnnotation):
            deidentify(scan, Profile(), pseudonyms)
    overlaid = copy.deepcopy(sources[0])
    overlaid.add_new(0x60000102, "US", 15)  # Overlay Bit Position: the overlay is in the pixels
    with pytest.raises(BurnedInAnnotation, match="unused bits"):
        deidentify(overlaid, Profile(), pseudonyms)
    ancient = copy.deepcopy(sources[0])
    ancient.StudyDate, ancient.ContentDate = "00010101", "10000101"
    ancient.add_new(0x00000000, "UL", 4)  # a command group element stored by mistake
    out = _written(deidentify(ancient, Profile(frozenset({Option.RETAIN_LONGITUDINAL_MODIFIED_DATES})),
                              pseudonyms).dataset)
    assert out.StudyDate == "" and len(out.ContentDate) == 8
    anonymous = [copy.deepcopy(sources[0]) for _ in range(2)]
    for number, ds in enumerate(anonymous):
        ds.PatientID, ds.StudyInstanceUID = "", f"1.2.3.{number}"
    assert len({deidentify(ds, Profile(), pseudonyms).patient_id for ds in anonymous}) == 2
    nameless = copy.deepcopy(sources[0])
    del nameless.SOPInstanceUID
    with pytest.raises(ValueError, match="no SOP Class or SOP Instance UID"):
        deidentify(nameless, Profile(), pseudonyms)


def test_a_safe_private_element_read_without_its_vr_is_not_kept(sources):
    """In implicit VR a private element of a creator pydicom does not know reads as UN bytes (a
    sequence among them cannot be walked): none is kept."""
    ds = copy.deepcopy(sources[0])
    buffer = BytesIO()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(buffer, enforce_file_format=True)
    implicit = pydicom.dcmread(BytesIO(buffer.getvalue()))
    assert implicit.private_block(0x0029, "ACME PLANTED")[0x12].VR == "UN"
    profile = Profile(frozenset({Option.RETAIN_SAFE_PRIVATE}), frozenset({("ACME PLANTED", 0x12), ("ACME PLANTED", 0x11)}))
    out = _written(deidentify(implicit, profile, Pseudonyms(KEY, "project-a")).dataset)
    assert _leaks(out, ["planted nested private", "kept when safe"]) == []
    assert not [e.tag for e in out.iterall() if e.tag.is_private]  # an unknown creator's: all UN here


def test_options_keep_what_they_name_and_nothing_else(sources):
    pseudonyms = Pseudonyms(KEY, "project-a")
    options = frozenset({Option.RETAIN_LONGITUDINAL_MODIFIED_DATES, Option.RETAIN_PATIENT_CHARACTERISTICS,
                         Option.RETAIN_DEVICE_IDENTITY, Option.RETAIN_SAFE_PRIVATE})
    profile = Profile(options, safe_private=frozenset({("ACME PLANTED", 0x11)}))
    made = [_written(deidentify(ds, profile, pseudonyms).dataset) for ds in sources]
    shifted = {out.StudyDate for out in made} | {out.SeriesDate for out in made}
    assert len(shifted) == 1  # one shift for the patient
    moved = date(2024, 3, 15) - datetime.strptime(shifted.pop(), "%Y%m%d").date()
    assert timedelta(days=1) <= moved <= timedelta(days=3650)
    for out in made:
        assert out.LongitudinalTemporalInformationModified == "MODIFIED"
        assert (out.PatientSex, out.PatientAge) == ("F", "054Y")
        assert out.DeviceSerialNumber == "SN-PLANTED-7"
        block = out.private_block(0x0029, "ACME PLANTED")
        assert block[0x11].value == "kept when safe"
        assert [e.tag for e in out.iterall() if e.tag.is_private] == [0x00290010, 0x00291011]
        assert out.StationName == "PLANTEDSTATION"  # device identity too
        assert _leaks(out, [p for p in PLANTED if p not in ("SN-PLANTED-7", "PLANTEDSTATION")]) == []
        assert sorted(c.CodeValue for c in out.DeidentificationMethodCodeSequence) == sorted(
            ["113100", "113107", "113108", "113109", "113111"])
    full = _written(deidentify(sources[0], Profile(frozenset({Option.RETAIN_LONGITUDINAL_FULL_DATES})),
                               pseudonyms).dataset)
    assert full.StudyDate == "20240315" and full.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert full.PatientBirthDate == ""  # a birth date is not a longitudinal date
    uids = _written(deidentify(sources[0], Profile(frozenset({Option.RETAIN_UIDS})), pseudonyms).dataset)
    assert (uids.StudyInstanceUID, uids.SOPInstanceUID) == (sources[0].StudyInstanceUID, sources[0].SOPInstanceUID)


@pytest.mark.parametrize("options, says", [
    ({Option.CLEAN_DESCRIPTORS}, "clean_descriptors: no cleaner can promise"),
    ({Option.RETAIN_LONGITUDINAL_FULL_DATES, Option.RETAIN_LONGITUDINAL_MODIFIED_DATES}, "exclude each other"),
])
def test_options_the_node_does_not_offer_or_that_conflict_are_refused(options, says):
    with pytest.raises(ProfileError, match=says):
        Profile(frozenset(options))
    with pytest.raises(ProfileError, match="needs the retain_safe_private option"):
        Profile(safe_private=frozenset({("ACME", 0x10)}))


def test_the_configuration_offers_exactly_the_options_the_profile_applies():
    from typing import get_args

    from node.config import DeidOptionName
    from node.deid.profile import NOT_OFFERED

    assert set(get_args(DeidOptionName)) == {o.value for o in Option} - {o.value for o in NOT_OFFERED}


def test_burned_in_annotation_is_refused_unless_the_rule_allows_it(sources):
    pseudonyms = Pseudonyms(KEY, "project-a")
    said = copy.deepcopy(sources[0])
    said.BurnedInAnnotation = "YES"
    with pytest.raises(BurnedInAnnotation, match="BurnedInAnnotation is YES"):
        deidentify(said, Profile(), pseudonyms)
    screen = copy.deepcopy(sources[0])
    screen.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    with pytest.raises(BurnedInAnnotation, match="secondary capture"):
        deidentify(screen, Profile(), pseudonyms)
    ultrasound = copy.deepcopy(sources[0])
    ultrasound.Modality = "US"
    with pytest.raises(BurnedInAnnotation, match="modality US"):
        deidentify(ultrasound, Profile(), pseudonyms)
    ultrasound.BurnedInAnnotation = "NO"  # the modality says it has none
    assert deidentify(ultrasound, Profile(), pseudonyms).dataset.BurnedInAnnotation == "NO"
    assert deidentify(said, Profile(), pseudonyms, allow_burned_in=True).dataset.PatientIdentityRemoved == "YES"


VENDOR_FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "emri_small.dcm", "JPEG2000.dcm",
                "SC_rgb.dcm", "US1_J2KR.dcm", "test-SR.dcm", "reportsi.dcm", "waveform_ecg.dcm", "image_dfl.dcm",
                "MR-SIEMENS-DICOM-WithOverlays.dcm", "liver.dcm", "eCT_Supplemental.dcm", "MR2_J2KI.dcm",
                "RG1_J2KI.dcm", "ExplVR_BigEnd.dcm"]
REFUSED = {"SC_rgb.dcm", "US1_J2KR.dcm", "JPEG2000.dcm", "image_dfl.dcm", "ExplVR_BigEnd.dcm"}  # SC, US


@pytest.mark.parametrize("name", VENDOR_FILES)
def test_vendor_files_leave_without_their_identity(name):
    """Real files (pydicom's test data: GE, Siemens, Philips and others): each is de-identified
    and written, or refused for burned-in annotation; none of its identifying values remain."""
    path = get_testdata_file(name)
    assert path is not None
    source = pydicom.dcmread(path)
    secrets = [str(source.get(k, "") or "") for k in ("PatientName", "PatientID", "PatientBirthDate",
                                                     "InstitutionName", "ReferringPhysicianName",
                                                     "AccessionNumber", "OperatorsName", "StationName")]
    secrets = [s for s in secrets if len(s) >= 4 and s not in ("DEIDENTIFIED", "ANONYMOUS")]
    secrets += [str(source[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if k in source]
    try:
        made = deidentify(source, Profile(), Pseudonyms(KEY, "vendors"))
    except BurnedInAnnotation as refused:
        assert name in REFUSED, str(refused)
        return
    assert name not in REFUSED
    out = _written(made.dataset)
    assert _leaks(out, secrets) == []
    assert not [e.tag for e in out.iterall() if e.tag.is_private]
    assert not [e.tag for e in out if 0x6000 <= e.tag.group <= 0x60FF]  # overlays gone
    assert out.SOPInstanceUID == made.uids[str(source.SOPInstanceUID)]


def test_a_rule_sends_a_de_identified_copy_to_an_external_service_and_keeps_the_mapping_sealed(
        start_node, orthanc, tmp_path):
    """The deidentify action end to end: a planted study in by C-STORE (dcmtk), its chosen series
    out de-identified to Orthanc standing in for the external AI; the PHI scanner finds nothing
    there; the mapping is in the index, sealed (no source UID in it), and opens with the project's
    key. A study with burned-in annotation is not sent, and its job says why."""
    from node.store.index import Index
    from node.store.pseudonyms import PseudonymMap
    from tests.peers import wait_for

    files = make_study(tmp_path / "ct", slices=3, size=16)
    sops = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    planted = []
    for number, path in enumerate(files):
        ds = _planted(path, sops[(number + 1) % len(sops)])
        ds.save_as(path, enforce_file_format=True)
        planted.append(ds)
    key = tmp_path / "ai-vendor.key"
    key.write_text("5f0e" * 16 + "\n")
    ai = orthanc()
    node = start_node(
        routing={"rules": [{"name": "to-ai", "match": {"tag": "Modality", "equals": "CT"},
                            "actions": {"deidentify": {"project": "ai-vendor", "send_to": ["ai"]}}}]},
        completion={"quiet_period_s": 1.0}, sending={"retry_initial_s": 0.5, "sweep_s": 0.5},
        destinations={"ai": {"ae_title": ai.aet, "host": "127.0.0.1", "port": ai.dicom_port}},
        deidentification={"ai-vendor": {"key_file": str(key), "options": ["retain_longitudinal_modified_dates"]}})
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    ids = wait_for(lambda: len(found := ai.get("/instances")) == 3 and found, timeout=120, interval=0.5)
    received = [pydicom.dcmread(BytesIO(ai.instance_file(i))) for i in ids]
    source_uids = sorted({str(v) for ds in planted for e in ds.iterall() if e.VR == "UI"
                          for v in (e.value if e.VM > 1 else [e.value]) if str(v) not in pydicom.uid.UID_dictionary})
    for ds in received:
        assert _leaks(ds, PLANTED + source_uids) == []
        assert not [e.tag for e in ds.iterall() if e.tag.is_private]
        assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert len({ds.StudyInstanceUID for ds in received}) == 1
    study_pseudonym = str(received[0].StudyInstanceUID)
    (tmp_path / "received.dcm").write_bytes(ai.instance_file(ids[0]))
    assert _dciodvfy(tmp_path / "received.dcm")[0] == []  # still a valid CT image

    project = Pseudonyms(key.read_bytes().strip(), "ai-vendor")
    rows = node.query("SELECT * FROM pseudonym_map")
    assert {r["project"] for r in rows} == {"ai-vendor"}
    assert {project.lookup(str(ds.SOPInstanceUID)) for ds in received} <= {r["digest"] for r in rows}
    # neither a source UID nor a pseudonym in clear: the index alone links nothing to the copy
    pseudonymous = sorted({str(v) for ds in received for e in ds.iterall() if e.VR == "UI"
                           for v in (e.value if e.VM > 1 else [e.value]) if str(v) not in pydicom.uid.UID_dictionary})
    assert not [u for u in source_uids + pseudonymous if any(u in str(r[column]) for r in rows for column in r.keys())]
    index = Index(node.data_dir / "index.sqlite", migrate=False)
    try:
        mapping = PseudonymMap(index)
        study = str(planted[0].StudyInstanceUID)
        assert mapping.source_of("ai-vendor", project.mapping_key(), project.lookup(study_pseudonym)) == \
            f"{study}\n{study}"  # the source UID with the study it was sent with
        assert mapping.source_of("ai-vendor", project.mapping_key(), project.lookup("2.25.1")) is None
    finally:
        index.close()
    job = wait_for(lambda: [j for j in node.query("SELECT state, stages FROM work_items") if j["state"] == "done"],
                   timeout=60)[0]
    assert "deidentify" in job["stages"]

    burned = make_study(tmp_path / "burned", slices=2, size=16, patient_id="BURNED-1")
    for path in burned:
        ds = pydicom.dcmread(path)
        ds.BurnedInAnnotation = "YES"
        ds.save_as(path, enforce_file_format=True)
    assert storescu(node.port, burned).returncode == 0
    burned_study = str(pydicom.dcmread(burned[0]).StudyInstanceUID)
    failed = wait_for(lambda: node.query("SELECT state, reason FROM work_items WHERE study_uid=? AND state='failed'",
                                         (burned_study,)), timeout=60)[0]
    assert "may not go to project ai-vendor: BurnedInAnnotation is YES" in failed["reason"]
    assert len(ai.get("/instances")) == 3


def test_rules_and_projects_are_checked_when_loaded(tmp_path):
    """A rule naming an unknown project, or sending a de-identified copy back to the sender,
    and a project with conflicting or unoffered options are refused with where and why."""
    from pydantic import ValidationError

    from common.yamlfile import ConfigError
    from node.config import NodeConfig
    from node.route.rules import load_rules

    path = tmp_path / "routing.yaml"
    path.write_text("rules:\n  - name: out\n    match: {tag: Modality, equals: CT}\n"
                    "    actions: {deidentify: {project: nope, send_to: [ai, '@sender']}}\n")
    with pytest.raises(ConfigError) as refused:
        load_rules(path, {}, {"ai"}, {"ai-vendor"})
    text = str(refused.value)
    assert "unknown de-identification project 'nope'" in text and "unknown destination '@sender'" in text
    assert "routing.yaml:4: rules[0].actions.deidentify.project" in text
    key = tmp_path / "k"
    key.write_text("x" * 40)
    both = ["retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"]
    with pytest.raises(ValidationError, match="exclude each other"):
        NodeConfig.model_validate({"deidentification": {"p": {"key_file": str(key), "options": both}}})
    with pytest.raises(ValidationError, match="clean_descriptors"):
        NodeConfig.model_validate({"deidentification": {"p": {"key_file": str(key), "options": ["clean_descriptors"]}}})
    short = tmp_path / "short"
    short.write_text("too short")
    project = NodeConfig.model_validate({"deidentification": {"p": {"key_file": str(short)}}}).deidentification["p"]
    with pytest.raises(ValueError, match="has 9 bytes; it needs 32 or more"):
        project.key()


def test_the_mapping_opens_only_with_its_key_and_project_and_expires(tmp_path):
    """Sealed rows: another project's key, or a row moved to another pseudonym, do not open
    (AES-GCM's associated data); a row past mapping_days is pruned, unless the UID was sent again."""
    from node.store.index import Index
    from node.store.pseudonyms import MappingError, PseudonymMap

    index = Index(tmp_path / "index.sqlite")
    try:
        mine, other = Pseudonyms(KEY, "project-a"), Pseudonyms(KEY, "project-b")
        source = "1.2.826.0.1.3680043.8.498.42"
        digest = mine.lookup(mine.uid(source))
        assert digest != other.lookup(mine.uid(source))
        with index.transaction() as db:
            PseudonymMap.record(db, "project-a", mine.mapping_key(), {digest: source}, 1000.0, 60.0)
        mapping = PseudonymMap(index)
        assert mapping.source_of("project-a", mine.mapping_key(), digest) == source
        with pytest.raises(MappingError, match="a sealed row of project project-a does not open with its key"):
            mapping.source_of("project-a", other.mapping_key(), digest)
        [row] = index.query("SELECT sealed FROM pseudonym_map")
        assert source not in row["sealed"]
        with index.transaction() as db:  # a sealed value copied onto another pseudonym
            db.execute("INSERT INTO pseudonym_map (project, digest, sealed, created_at, expires_at)"
                       " VALUES ('project-a', 'ab12', ?, 1000, 1060)", (row["sealed"],))
        with pytest.raises(MappingError):
            mapping.source_of("project-a", mine.mapping_key(), "ab12")
        with index.transaction() as db:  # sent again later: kept longer, still one row
            PseudonymMap.record(db, "project-a", mine.mapping_key(), {digest: source}, 1030.0, 60.0)
        assert mapping.prune(1059.0) == 0 and mapping.prune(1061.0) == 1  # the copied row only
        assert mapping.source_of("project-a", mine.mapping_key(), digest) == source
        assert mapping.prune(1091.0) == 1
        assert mapping.source_of("project-a", mine.mapping_key(), digest) is None
    finally:
        index.close()


def _returning_node(start_node, tmp_path: Path, key: Path, port: int, rule: dict, destinations: dict):
    """The hospital's node: its rule sends a de-identified copy out; AI-RETURN is where the
    project's results come back."""
    return start_node(
        tmp_path / "hospital", routing={"rules": [rule]},
        scp={"port": port, "ae_titles": ["TESTNODE", "AI-RETURN"]},
        completion={"quiet_period_s": 1.0}, sending={"retry_initial_s": 0.5, "sweep_s": 0.5},
        destinations=destinations,
        deidentification={"ai-vendor": {"key_file": str(key), "return_ae_title": "AI-RETURN",
                                        "options": ["retain_longitudinal_modified_dates"]}})


def _store(port: int, files: list[Path], called: str) -> None:
    sent = subprocess.run(["storescu", "-R", "-aet", "EXTERNAL-AI", "-aec", called, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def test_results_of_an_external_ai_come_back_re_identified_into_the_original_study(start_node, orthanc, tmp_path):
    """The round trip: a phantom study in by C-STORE; its CT series out de-identified to an
    external AI (a second node running the demo model on what it gets, its SEG and SR sent to
    the return AE title); the results re-identified and in Orthanc (the PACS) in the original
    study, for the original patient, referring to the original series and instances, with
    the lesions where the phantom has them, valid for dciodvfy. What the AI saw had no PHI.
    Results that match no round trip are quarantined with the reason."""
    from node.encode.sr import read_findings
    from phantom.dicom import SeriesIdentity
    from phantom.study import make_dicom_study
    from tests.peers import free_port, wait_for

    files, phantom = make_dicom_study(tmp_path / "study", slices=96, size=192, pixel_spacing=2.0, slice_spacing=2.0,
                                      seed=11, identity=SeriesIdentity(patient_id="RT-PATIENT-77"))
    truth = phantom.truth()
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, series_uid = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    key = tmp_path / "ai-vendor.key"
    key.write_text("5f0e" * 16 + "\n")
    pacs = orthanc()
    hospital_port = free_port()
    ai = start_node(tmp_path / "external-ai", scp={"ae_title": "EXTERNAL-AI"},
                    routing={"rules": [{"name": "vendor-model", "match": {"tag": "Modality", "equals": "CT"},
                                        "actions": {"run": ["lesion-seg"], "send_to": ["back"]}}]},
                    completion={"quiet_period_s": 1.0}, sending={"retry_initial_s": 0.5, "sweep_s": 0.5},
                    destinations={"back": {"ae_title": "AI-RETURN", "host": "127.0.0.1", "port": hospital_port}})
    node = _returning_node(
        start_node, tmp_path, key, hospital_port,
        {"name": "to-ai", "match": {"tag": "Modality", "equals": "CT"},
         "actions": {"deidentify": {"project": "ai-vendor", "send_to": ["ai"], "results_to": ["pacs"]}}},
        {"ai": {"ae_title": "EXTERNAL-AI", "host": "127.0.0.1", "port": ai.port},
         "pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}})
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    found = wait_for(lambda: (f := pacs.instances_by_modality(study_uid)) and "SEG" in f and "SR" in f and f,
                     timeout=300, interval=0.5)
    assert set(found) == {"SEG", "SR"} and len(found["SEG"]) == len(found["SR"]) == 1  # results only
    seg = pydicom.dcmread(BytesIO(pacs.instance_file(found["SEG"][0]["ID"])))
    sr = pydicom.dcmread(BytesIO(pacs.instance_file(found["SR"][0]["ID"])))
    for result in (seg, sr):
        assert (result.StudyInstanceUID, result.PatientID) == (study_uid, "RT-PATIENT-77")
        assert (result.PatientName, result.StudyDate, result.AccessionNumber) == \
            (source.PatientName, source.StudyDate, source.AccessionNumber)
        assert "PatientIdentityRemoved" not in result and "LongitudinalTemporalInformationModified" not in result
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} <= sops
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    evidence = {str(i.ReferencedSOPInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert str(seg.SOPInstanceUID) in evidence and evidence - {str(seg.SOPInstanceUID)} <= sops
    assert {str(s.StudyInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence} == {study_uid}
    findings = read_findings(sr)  # the lesions in patient space, where the phantom has them
    assert len(findings) == len(truth["lesions"]), findings
    for lesion in truth["lesions"]:
        assert min(float(np.linalg.norm(np.subtract(f["centroid"], lesion["centre_mm"]))) for f in findings) <= 2.0
    from tests.test_conformance import _unexpected, pixelmed

    for name, result, validator in (("seg", seg, "DicomInstanceValidator"), ("sr", sr, "DicomSRValidator")):
        path = tmp_path / f"{name}.dcm"
        result.save_as(path)
        assert _dciodvfy(path) == ([], []), name
        errors, warnings, output = pixelmed(validator, path)
        assert errors == [] and _unexpected(warnings) == [], output

    # the AI made its own UIDs and saw only pseudonyms: no source UID, no patient ID reached it
    [made] = ai.query("SELECT * FROM instances WHERE sop_instance_uid=?", (str(seg.SOPInstanceUID),)) or [None]
    assert made is None
    ai_studies = {r["study_uid"] for r in ai.query("SELECT study_uid FROM studies")}
    assert len(ai_studies) == 1 and study_uid not in ai_studies
    assert "RT-PATIENT-77" not in (ai.workdir / "node.log").read_text()
    assert "RT-PATIENT-77" not in {r["patient_id"] for r in ai.query("SELECT patient_id FROM studies")}
    trip = wait_for(lambda: [t for t in node.query("SELECT * FROM round_trips") if t["state"] == "delivered"],
                    timeout=60)[0]
    assert (trip["study_uid"], trip["project"], trip["rule"]) == (study_uid, "ai-vendor", "to-ai")
    assert trip["reason"] is None and trip["return_job"] is not None

    # a result for a study the project was never sent: quarantined, never routed, never delivered
    stray = tmp_path / "stray.dcm"
    seg.StudyInstanceUID = "2.25.1234567890"
    seg.save_as(stray)
    _store(node.port, [stray], "AI-RETURN")
    failed = wait_for(lambda: node.query("SELECT reason FROM work_items WHERE study_uid='2.25.1234567890'"
                                         " AND state='failed'"), timeout=60)[0]
    assert "match none of its round trips (study 2.25.1234567890): quarantined" in failed["reason"]
    reasons = [p.read_text() for p in (node.data_dir / "quarantine").glob("*.reason.txt")]
    assert any("match none of its round trips" in r for r in reasons)
    assert pacs.instances_by_modality("2.25.1234567890") == {}


def test_a_round_trip_past_its_deadline_times_out_with_an_ai_ran_notice(start_node, orthanc, tmp_path):
    """No results within the rule's deadline: the round trip is timed out and the PACS gets the
    'AI ran: failed' notice in the original study; a result that then comes late is still
    re-identified and delivered; one that refers to an instance never sent is quarantined."""
    from node.encode.notice import FINDING
    from tests.peers import free_port, wait_for

    files = make_study(tmp_path / "ct", slices=3, size=16, patient_id="LATE-1")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    key = tmp_path / "ai-vendor.key"
    key.write_text("77ab" * 16)
    pacs = orthanc()
    node = _returning_node(
        start_node, tmp_path, key, free_port(),
        {"name": "to-ai", "match": {"tag": "Modality", "equals": "CT"},
         "actions": {"deidentify": {"project": "ai-vendor", "send_to": ["pacs"], "results_to": ["pacs"],
                                    "results_within_minutes": 0.02}}},
        {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}})
    assert storescu(node.port, files).returncode == 0
    trip = wait_for(lambda: [t for t in node.query("SELECT * FROM round_trips") if t["state"] == "timed_out"],
                    timeout=60)[0]
    assert trip["reason"] == "the external AI service of project ai-vendor sent no results within the rule's 0.02 minutes"
    notice = wait_for(lambda: pacs.instances_by_modality(study_uid).get("SR"), timeout=60)
    report = pydicom.dcmread(BytesIO(pacs.instance_file(notice[0]["ID"])))
    [item] = report.ContentSequence
    assert item.ConceptNameCodeSequence[0].CodeValue == FINDING.value
    assert "AI analysis did not complete" in item.TextValue and "sent no results within" in item.TextValue
    assert report.PatientID == "LATE-1"
    [shown] = _console(node, f"/api/studies/{study_uid}")["round_trips"]
    assert (shown["phase"], shown["ai_ran_failed"], shown["results_to"]) == ("timed_out", True, ["pacs"])
    assert "AI ran: failed" in _console(node, f"/studies/{study_uid}")

    # late: a key-image-like result made from the de-identified copy (an SC in its study)
    copies = [s for s in pacs.get("/studies?expand") if s["MainDicomTags"]["StudyInstanceUID"] != study_uid]
    [pseudonymous] = copies
    [series] = pacs.get(f"/studies/{pseudonymous['ID']}/series")
    sent = pydicom.dcmread(BytesIO(pacs.instance_file(series["Instances"][0])))
    late = copy.deepcopy(sent)
    late.SOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    late.file_meta.MediaStorageSOPClassUID = late.SOPClassUID
    late.SOPInstanceUID, late.SeriesInstanceUID = "2.25.41", "2.25.42"
    late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
    late.Modality = "OT"
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = sent.SOPClassUID, sent.SOPInstanceUID
    late.SourceImageSequence = Sequence([reference])
    stray = copy.deepcopy(late)
    stray.SOPInstanceUID = stray.file_meta.MediaStorageSOPInstanceUID = "2.25.43"
    stray.SourceImageSequence[0].ReferencedSOPInstanceUID = "2.25.999"  # never sent
    late.save_as(tmp_path / "late.dcm", enforce_file_format=True)
    stray.save_as(tmp_path / "stray.dcm", enforce_file_format=True)
    _store(node.port, [tmp_path / "late.dcm", tmp_path / "stray.dcm"], "AI-RETURN")
    trip = wait_for(lambda: [t for t in node.query("SELECT * FROM round_trips") if t["state"] == "delivered"],
                    timeout=60)[0]
    assert "1 instance(s) quarantined" in trip["reason"] and "refers to instance 2.25.999" in trip["reason"]
    delivered = wait_for(lambda: pacs.instances_by_modality(study_uid).get("OT"), timeout=60)
    assert len(delivered) == 1
    back = pydicom.dcmread(BytesIO(pacs.instance_file(delivered[0]["ID"])))
    source_sops = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    assert str(back.SourceImageSequence[0].ReferencedSOPInstanceUID) in source_sops
    assert back.SOPInstanceUID not in ("2.25.41",) and back.StudyInstanceUID == study_uid
    assert back.PatientID == "LATE-1" and "PatientIdentityRemoved" not in back
    [shown] = _console(node, f"/api/studies/{study_uid}")["round_trips"]
    assert shown["phase"] == "delivered" and not shown["ai_ran_failed"] and shown["return_job"] is not None
    assert _console(node, "/api/summary")["round_trips_by_state"] == {"delivered": 1}

    # another patient's copy: a result in this study that refers to it is refused, not re-identified
    other = make_study(tmp_path / "other", slices=2, size=16, patient_id="OTHER-2")
    other_uid = str(pydicom.dcmread(other[0]).StudyInstanceUID)
    assert storescu(node.port, other).returncode == 0
    known = {study_uid, other_uid, str(sent.StudyInstanceUID)}
    [second] = wait_for(lambda: [s for s in pacs.get("/studies?expand")
                                 if s["MainDicomTags"]["StudyInstanceUID"] not in known], timeout=60)
    [other_series] = pacs.get(f"/studies/{second['ID']}/series")
    theirs = pydicom.dcmread(BytesIO(pacs.instance_file(other_series["Instances"][0])))
    crossed = copy.deepcopy(late)
    crossed.SOPInstanceUID = crossed.file_meta.MediaStorageSOPInstanceUID = "2.25.44"
    crossed.SourceImageSequence[0].ReferencedSOPInstanceUID = theirs.SOPInstanceUID
    crossed.save_as(tmp_path / "crossed.dcm", enforce_file_format=True)
    _store(node.port, [tmp_path / "crossed.dcm"], "AI-RETURN")
    wait_for(lambda: any("which was sent with another study" in p.read_text()
                         for p in (node.data_dir / "quarantine").glob("*.reason.txt")), timeout=60)
    trip = wait_for(lambda: [t for t in node.query("SELECT * FROM round_trips WHERE study_uid=?", (study_uid,))
                             if t["state"] == "delivered" and t["reason"].startswith("2 instance(s)")], timeout=60)[0]
    assert len(pacs.instances_by_modality(study_uid)["OT"]) == 1  # still only the one good result
    assert "OTHER-2" not in {str(pydicom.dcmread(BytesIO(pacs.instance_file(i["ID"]))).PatientID)
                             for i in pacs.instances_by_modality(study_uid)["OT"]}


def _console(node, path: str):
    import json
    import urllib.request

    with urllib.request.urlopen(node.url + path, timeout=30) as response:
        data = response.read()
    return json.loads(data) if path.startswith("/api") else data.decode()


def test_returned_results_are_re_identified_or_refused_with_the_reason(sources):
    """node/deid/reidentify.py alone: every UID mapped back (nested, private, multi-valued) or
    minted; patient and study from the source; and refused: an instance that was sent, a result
    claiming a sent series, a reference to an instance neither sent nor returned."""
    from node.deid.reidentify import Refused, patient_and_study, patient_and_study_keywords, reidentify

    # highdicom's tables of the standard, read through its private module (pinned here)
    assert {"PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber", "PatientAge",
            "ClinicalTrialSubjectID", "OtherPatientIDsSequence"} <= set(patient_and_study_keywords())
    pseudonyms = Pseudonyms(KEY, "project-a")
    made = deidentify(sources[0], Profile(), pseudonyms)
    mapping = {pseudonym: source for source, pseudonym in made.uids.items()}
    study = patient_and_study(sources[0])
    sent = made.dataset
    result = copy.deepcopy(sent)
    result.SOPInstanceUID, result.SeriesInstanceUID = "2.25.100", "2.25.101"
    result.PatientName, result.PatientID = "PSEUDO^X", made.patient_id
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = sent.SOPClassUID, sent.SOPInstanceUID
    result.SourceImageSequence = Sequence([reference])
    block = result.private_block(0x0031, "VENDOR AI", create=True)
    block.add_new(0x01, "UI", [str(sent.StudyInstanceUID), "2.25.102"])  # multi-valued: mapped, minted
    minted: list[str] = []

    def mint(uid: str) -> str:
        minted.append(uid)
        return "1.2.3." + uid.rsplit(".", 1)[-1]

    back = reidentify(result, source_of=mapping.get, study=study, mint=mint, returned={"2.25.100"})
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID and back.PatientID == "PLANTEDID123"
    assert back.PatientName == "Planted^Patient" and "PatientIdentityRemoved" not in back
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    assert (back.SOPInstanceUID, back.SeriesInstanceUID) == ("1.2.3.100", "1.2.3.101")
    assert list(back[0x00311001].value) == [str(sources[0].StudyInstanceUID), "1.2.3.102"]
    assert back.FrameOfReferenceUID == sources[0].FrameOfReferenceUID and back.SOPClassUID == sent.SOPClassUID
    assert sorted(minted) == ["2.25.100", "2.25.101", "2.25.102"]

    with pytest.raises(Refused, match=f"instance {sent.SOPInstanceUID} is one that was sent, not a result"):
        reidentify(sent, source_of=mapping.get, study=study, mint=mint, returned=set())
    claims = copy.deepcopy(result)
    claims.SeriesInstanceUID = sent.SeriesInstanceUID
    with pytest.raises(Refused, match=f"claims series {sent.SeriesInstanceUID}, which was sent"):
        reidentify(claims, source_of=mapping.get, study=study, mint=mint, returned=set())
    dangling = copy.deepcopy(result)
    dangling.SourceImageSequence[0].ReferencedSOPInstanceUID = "2.25.555"
    with pytest.raises(Refused, match="refers to instance 2.25.555, which was neither sent nor returned with it"):
        reidentify(dangling, source_of=mapping.get, study=study, mint=mint, returned={"2.25.100"})
    dangling.SourceImageSequence[0].ReferencedSOPInstanceUID = "2.25.100"  # one that came back with it: fine
    assert reidentify(dangling, source_of=mapping.get, study=study, mint=mint, returned={"2.25.100"})
    registered = copy.deepcopy(result)
    registered.SOPInstanceUID = pydicom.uid.CTImageStorage
    with pytest.raises(Refused, match="names itself or its series with a registered UID"):
        reidentify(registered, source_of=mapping.get, study=study, mint=mint, returned=set())
    nested = copy.deepcopy(result)
    series = Dataset()
    series.SeriesInstanceUID = "2.25.556"
    nested.ReferencedSeriesSequence = Sequence([series])
    with pytest.raises(Refused, match="refers to series 2.25.556"):
        reidentify(nested, source_of=mapping.get, study=study, mint=mint, returned={"2.25.100"})

    # a source name outside ASCII comes back in the source's character set, not as '?'
    japanese = copy.deepcopy(sources[0])
    japanese.SpecificCharacterSet, japanese.PatientName = "ISO_IR 192", "山田^太郎"
    back = _written(reidentify(result, source_of=mapping.get, study=patient_and_study(japanese), mint=mint,
                               returned={"2.25.100"}))
    assert (back.SpecificCharacterSet, str(back.PatientName)) == ("ISO_IR 192", "山田^太郎")


def test_a_return_ae_title_must_be_one_of_ours_and_one_projects(tmp_path):
    from pydantic import ValidationError

    from node.config import NodeConfig

    key = tmp_path / "k"
    key.write_text("x" * 40)
    project = {"key_file": str(key), "return_ae_title": "AI-RETURN"}
    with pytest.raises(ValidationError, match="'AI-RETURN' is not one of scp.ae_titles"):
        NodeConfig.model_validate({"deidentification": {"p": project}})
    scp = {"ae_titles": ["DICOM-NODE", "AI-RETURN"]}
    with pytest.raises(ValidationError, match="'AI-RETURN' is project p's"):
        NodeConfig.model_validate({"scp": scp, "deidentification": {"p": project, "q": project}})
    config = NodeConfig.model_validate({"scp": scp, "deidentification": {"p": project}})
    assert config.project_returning_to("AI-RETURN") == "p" and config.project_returning_to("DICOM-NODE") is None
