"""Routing rules: every operator, nesting, series selection, checks, explain, live reload."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from common.orientation import plane_of_normal

from node.config import NodeConfig
from node.liveconfig import LiveConfig
from node.route.live import LiveRules
from node.route.rules import RoutingFile, RuleSet, load_rules
from node.route.study import SeriesView, StudyView, orientation_class
from common.yamlfile import ConfigError
from tests.peers import make_study, storescu, wait_for

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "config" / "routing.examples.yaml"
EXAMPLE_MODELS = {"nodule-det": [1], "brain-mets": [1], "liver": [1], "chest-nodule-cls": [1]}
EXAMPLE_DESTINATIONS = {"pacs", "research"}
AXIAL = [1, 0, 0, 0, 1, 0]
CORONAL = [1, 0, 0, 0, 0, -1]
SAGITTAL = [0, 1, 0, 0, 0, -1]
OBLIQUE = [1, 0, 0, 0, 0.7071, 0.7071]


def series(uid: str, modality: str = "CT", count: int = 100, thickness: float | None = 1.0, orientation=AXIAL,
           description: str = "", body_part: str | None = None, number: int | None = 1,
           image_type: list[str] | None = None) -> SeriesView:
    return SeriesView(uid, {
        "Modality": modality, "SliceThickness": thickness, "ImageOrientationPatient": orientation,
        "SeriesDescription": description, "BodyPartExamined": body_part, "SeriesNumber": number,
        "ImageType": image_type or ["ORIGINAL", "PRIMARY", "AXIAL"], "Rows": 512, "Columns": 512,
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
    }, count)


def study(*items: SeriesView, calling: str = "CT1", called: str = "NODE", peer: str = "10.1.2.3") -> StudyView:
    return StudyView("1.2.3", calling, called, peer, list(items))


def ruleset(text: str) -> RuleSet:
    return RuleSet(RoutingFile.model_validate(yaml.safe_load(textwrap.dedent(text))), "test")


def matches(condition: dict, view: StudyView) -> bool:
    rules = RuleSet(RoutingFile.model_validate(
        {"rules": [{"name": "r", "match": condition, "actions": {"forward_to": ["x"]}}]}), "t")
    return bool(rules.evaluate(view).applied)


# -- operators -----------------------------------------------------------------------------

CT = study(series("1", description="Chest 1.0 CE", body_part="CHEST", thickness=1.0, count=300))


@pytest.mark.parametrize("condition, expected", [
    ({"tag": "Modality", "equals": "CT"}, True),
    ({"tag": "Modality", "equals": "ct"}, False),
    ({"tag": "Modality", "in": ["MR", "CT"]}, True),
    ({"tag": "Modality", "in": ["MR", "PT"]}, False),
    ({"tag": "SeriesDescription", "regex": "^chest"}, False),
    ({"tag": "SeriesDescription", "regex": "^chest", "ignore_case": True}, True),
    ({"tag": "SliceThickness", "lt": 1.5}, True),
    ({"tag": "SliceThickness", "le": 1.0}, True),
    ({"tag": "SliceThickness", "gt": 1.0}, False),
    ({"tag": "SliceThickness", "ge": 1.0}, True),
    ({"tag": "SliceThickness", "range": [0.5, 1.0]}, True),
    ({"tag": "SliceThickness", "range": [1.1, 3.0]}, False),
    ({"tag": "Rows", "ge": 512}, True),
    ({"tag": "InstanceCount", "range": [200, 400]}, True),
    ({"tag": "BodyPartExamined", "present": True}, True),
    ({"tag": "BodyPartExamined", "present": False}, False),
    ({"tag": "ImageType", "equals": "PRIMARY"}, True),  # multi-valued: any value
    ({"orientation": "axial"}, True),
    ({"orientation": ["sagittal", "coronal"]}, False),
    ({"calling_ae": {"equals": "CT1"}}, True),
    ({"calling_ae": {"regex": "^ct", "ignore_case": True}}, True),
    ({"called_ae": {"in": ["OTHER"]}}, False),
    ({"peer": "10.0.0.0/8"}, True),
    ({"peer": "10.1.2.3"}, True),
    ({"peer": "192.168.0.0/16"}, False),
    ({"all": [{"tag": "Modality", "equals": "CT"}, {"orientation": "axial"}]}, True),
    ({"all": [{"tag": "Modality", "equals": "CT"}, {"orientation": "sagittal"}]}, False),
    ({"any": [{"tag": "Modality", "equals": "MR"}, {"tag": "BodyPartExamined", "equals": "CHEST"}]}, True),
    ({"not": {"tag": "Modality", "equals": "MR"}}, True),
    ({"all": [{"any": [{"peer": "172.16.0.0/12"}, {"calling_ae": {"equals": "CT1"}}]},
              {"not": {"tag": "SliceThickness", "gt": 2}}]}, True),
])
def test_operator(condition, expected):
    assert matches(condition, CT) is expected


def test_orientation_classes():
    assert [orientation_class(o) for o in (AXIAL, CORONAL, SAGITTAL, OBLIQUE)] == ["axial", "coronal", "sagittal", "oblique"]
    assert orientation_class([1, 0, 0, 0, 0.996, 0.087]) == "axial"  # 5 degrees of gantry tilt


def _tilted(degrees: float, about: str = "x") -> list[float]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [1, 0, 0, 0, c, -s] if about == "x" else [c, 0, -s, 0, 1, 0]


@pytest.mark.parametrize("degrees, expected", [(0, "axial"), (20, "axial"), (-20, "axial"), (29.9, "axial"),
                                               (30, "oblique"), (45, "oblique"), (65, "coronal"), (90, "coronal")])
def test_orientation_rule_gantry_tilt_is_axial_below_30_degrees(degrees, expected):
    """One rule (common.orientation) for routing and the SR: the axis nearest the image normal,
    oblique from 30 degrees off. A 20-degree gantry-tilted CT was 'oblique' here (10 degrees) but
    axial for the SR's in-plane diameter."""
    assert orientation_class(_tilted(degrees)) == expected
    assert orientation_class(_tilted(degrees, about="y")) == expected.replace("coronal", "sagittal")
    assert plane_of_normal(np.cross(_tilted(degrees)[:3], _tilted(degrees)[3:])) == expected


def test_orientation_of_missing_or_degenerate_values():
    assert orientation_class(None) is None and orientation_class([]) is None and orientation_class([1, 0, 0]) is None
    assert orientation_class([1, 0, 0, 1, 0, 0]) is None  # parallel row and column: no plane
    assert plane_of_normal([0, 0, 0]) is None and plane_of_normal([0, 0, -3]) == "axial"


def test_study_matches_when_one_series_satisfies_the_whole_condition():
    # CT of the abdomen + MR of the chest: "CT and CHEST" must not match across series
    mixed = study(series("1", "CT", body_part="ABDOMEN"), series("2", "MR", body_part="CHEST"))
    assert not matches({"all": [{"tag": "Modality", "equals": "CT"}, {"tag": "BodyPartExamined", "equals": "CHEST"}]}, mixed)


# -- series selection ----------------------------------------------------------------------

SELECT = """
rules:
  - name: lung
    match: {tag: Modality, equals: CT}
    series:
      where: {all: [{orientation: axial}, {tag: SliceThickness, le: 2.5}]}
      prefer: %s
    actions: {run: [m], send_to: [pacs]}
"""
SERIES = [
    series("thick", thickness=5.0, count=80, number=2),
    series("thin", thickness=0.625, count=500, number=4),
    series("medium", thickness=1.25, count=600, number=3),
    series("sag", thickness=1.0, count=900, number=5, orientation=SAGITTAL),
]


@pytest.mark.parametrize("prefer, expected", [
    ("most_instances", "medium"), ("thinnest_slices", "thin"), ("lowest_series_number", "medium"),
    ("highest_series_number", "thin"),
])
def test_selector_tie_breaks(prefer, expected):
    decision = ruleset(SELECT % prefer).evaluate(study(*SERIES))
    assert [(rule.name, s.series_uid) for rule, s in decision.applied] == [("lung", expected)]


def test_most_instances_tie_goes_to_lowest_series_number():
    decision = ruleset(SELECT % "most_instances").evaluate(
        study(series("b", count=100, number=7), series("a", count=100, number=3)))
    assert decision.applied[0][1].series_uid == "a"


def test_rule_with_no_qualifying_series_does_not_match():
    decision = ruleset(SELECT % "most_instances").evaluate(study(series("t", thickness=5.0)))
    assert decision.applied == []
    assert "no series qualifies for the models" in decision.outcomes[0].reason
    assert "SliceThickness le 2.5 (is 5)" in decision.outcomes[0].reason


def test_first_match_all_matches_and_fallback():
    text = """
    mode: %s
    rules:
      - {name: a, match: {tag: Modality, equals: CT}, actions: {forward_to: [x]}}
      - {name: paused, enabled: false, actions: {forward_to: [x]}}
      - {name: b, match: {orientation: axial}, actions: {forward_to: [y]}}
    fallback: {name: rest, actions: {discard: true}}
    """
    first = ruleset(text % "first_match").evaluate(CT)
    assert [r.name for r, _ in first.applied] == ["a"]
    assert [o.reason for o in first.outcomes][1:] == ["disabled", "not evaluated (an earlier rule applied)"]
    every = ruleset(text % "all_matches").evaluate(CT)
    assert [r.name for r, _ in every.applied] == ["a", "b"]
    mr = ruleset(text % "first_match").evaluate(study(series("1", "MR", orientation=SAGITTAL)))
    assert [r.name for r, _ in mr.applied] == ["rest"]


# -- checks --------------------------------------------------------------------------------


def test_config_check_reports_every_problem_with_line_and_path(tmp_path):
    bad = tmp_path / "routing.yaml"
    bad.write_text(textwrap.dedent("""\
        rules:
          - name: one
            match:
              tag: SliceThicknes
              lt: 2
            actions: {run: [lesion-seg], send_to: [pacs]}
          - name: two
            match: {tag: SeriesDescription, regex: "([a-z"}
            actions: {run: [nosuchmodel], send_to: [nowhere]}
          - name: three
            match: {tag: SliceThickness, lt: thin}
            actions: {forward_to: [demo-viewer]}
          - name: four
            match: {tag: SeriesDescription, gt: 3}
            actions: {forward_to: [demo-viewer]}
          - name: five
            match: {bogus: 1}
            actions: {forward_to: [demo-viewer]}
        """))
    exe = str(Path(sys.executable).parent / "dicom-node")
    result = subprocess.run([exe, "config", "check", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    err = result.stderr
    assert f"{bad}:4: rules[0].match.tag.tag: Value error, unknown tag keyword 'SliceThicknes'" in err
    assert f"{bad}:8: rules[1].match.tag.regex: Value error, bad regular expression" in err
    assert f"{bad}:11: rules[2].match.tag.lt: Input should be a valid number" in err
    assert f"{bad}:14: rules[3].match.tag: Value error, gt needs a numeric tag; SeriesDescription is text" in err
    assert f"{bad}:17: rules[4].match: a condition needs one of the keys" in err
    # references are checked once the file is well-formed
    bad.write_text(textwrap.dedent("""\
        rules:
          - name: two
            actions: {run: [nosuchmodel], send_to: [nowhere]}
        """))
    result = subprocess.run([exe, "config", "check", str(bad)], capture_output=True, text=True, timeout=60)
    assert f"{bad}:3: rules[0].actions.run[0]: unknown model 'nosuchmodel' (repository has: chest-nodule-cls, lesion-seg, nodule-det)" in result.stderr
    assert f"{bad}:3: rules[0].actions.send_to[0]: unknown destination 'nowhere' (configured: demo-viewer)" in result.stderr
    assert "2 problem(s)" in result.stderr


def test_shipped_rules_and_examples_are_valid():
    load_rules(REPO / "config" / "routing.yaml", {"lesion-seg": [1]}, {"demo-viewer"})
    assert len(load_rules(EXAMPLES, EXAMPLE_MODELS, EXAMPLE_DESTINATIONS).file.rules) == 5


# -- the routing table ---------------------------------------------------------------------

TABLE = [
    # (study, expected applied rules with the series the models get)
    (study(series("ax-thin", body_part="CHEST", thickness=1.0, count=300),
           series("ax-thick", body_part="CHEST", thickness=5.0, count=60)), [("ct-chest-thin-to-nodules", "ax-thin")]),
    (study(series("a", body_part=None, description="CT THORAX 0.625", thickness=0.625),
           series("b", body_part=None, description="CT THORAX 1.25", thickness=1.25, count=400)),
     [("ct-chest-thin-to-nodules", "a")]),
    (study(series("loc", body_part="CHEST", thickness=1.0, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], count=3),
           series("ax", body_part="CHEST", thickness=1.5, count=200)), [("ct-chest-thin-to-nodules", "ax")]),
    (study(series("cor", body_part="CHEST", thickness=1.0, orientation=CORONAL)), [("forward-everything-else", None)]),
    (study(series("thick", body_part="LUNG", thickness=3.0)), [("forward-everything-else", None)]),
    (study(series("t1", "MR", body_part="BRAIN", description="AX T1 MPRAGE", count=176),
           series("t2", "MR", body_part="BRAIN", description="AX T2", count=200), peer="10.20.5.5"),
     [("mr-brain-t1", "t1")]),
    (study(series("t1", "MR", body_part="HEAD", description="ax t1 post", count=176, orientation=OBLIQUE),
           peer="10.20.5.5"), [("forward-everything-else", None)]),
    (study(series("t1", "MR", body_part="BRAIN", description="AX T1", count=176), peer="10.99.0.1"),
     [("forward-everything-else", None)]),
    (study(series("s", body_part="CHEST"), calling="TEACHING"), [("ct-chest-thin-to-nodules", "s")]),
    (study(series("x", "US", body_part="ABDOMEN", thickness=None), calling="TEACHING"), [("ignore-teaching-files", None)]),
    (study(series("liver", body_part="ABDOMEN", thickness=1.0)), [("forward-everything-else", None)]),
    (study(series("pt", "PT", body_part="WHOLEBODY", thickness=3.0), series("ct", "CT", body_part="WHOLEBODY")),
     [("forward-everything-else", None)]),
]


@pytest.mark.parametrize("view, expected", TABLE)
def test_routing_table_against_the_example_rules(view, expected):
    decision = load_rules(EXAMPLES, EXAMPLE_MODELS, EXAMPLE_DESTINATIONS).evaluate(view)
    assert [(rule.name, s.series_uid if s else None) for rule, s in decision.applied] == expected


def test_explain_text():
    decision = load_rules(EXAMPLES, EXAMPLE_MODELS, EXAMPLE_DESTINATIONS).evaluate(TABLE[5][0])
    text = decision.explain()
    assert "[no match] ct-chest-thin-to-nodules: no series matches (series 1 'AX T1 MPRAGE' (t1): Modality equals 'CT' (is 'MR')" in text
    assert "[APPLIED ] mr-brain-t1: series 1 'AX T1 MPRAGE' (t1) matches:" in text
    assert "=> mr-brain-t1: run brain-mets on series 1 'AX T1 MPRAGE' (t1), SR to pacs, research" in text
    assert "[skipped ] ct-abdomen-liver: disabled" in text


# -- live reload ---------------------------------------------------------------------------

GOOD = "rules:\n  - name: fwd\n    actions: {forward_to: [demo-viewer]}\n"


def test_live_rules_reload_valid_and_refuse_invalid(tmp_path):
    """The rule file is watched and reloaded by the one reload path (LiveConfig), as in the node."""
    path = tmp_path / "routing.yaml"
    path.write_text(GOOD)
    config = NodeConfig.model_validate({"storage": {"data_dir": str(tmp_path)}, "pipeline": {"routing_file": str(path)},
                                        "destinations": {"demo-viewer": {"ae_title": "VIEWER", "host": "127.0.0.1",
                                                                         "port": 11113}}})
    rules = LiveRules(path, lambda: {"lesion-seg": [1]}, {"demo-viewer"})
    live = LiveConfig(config, rules)
    first = rules.current.version
    path.write_text(GOOD.replace("fwd", "forward-all"))
    live.check_for_changes()
    assert rules.current.version != first and rules.current.file.rules[0].name == "forward-all"
    assert live.last_reload is not None and live.last_reload["applied"]
    second = rules.current.version
    path.write_text("rules:\n  - name: broken\n    match: {tag: Nope, equals: 1}\n    actions: {discard: true}\n")
    live.check_for_changes()
    assert rules.current.version == second  # the previous rules stay in force
    assert not live.last_reload["applied"] and "unknown tag keyword 'Nope'" in " ".join(live.last_reload["problems"])
    outcome = live.reload()  # SIGHUP and the console: the same path, the same outcome
    assert not outcome.applied and rules.current.version == second
    assert not hasattr(rules, "check_for_changes") and not hasattr(rules, "reload")  # one watcher
    with pytest.raises(ConfigError):
        load_rules(path)


def test_running_node_reloads_on_change_and_sighup_and_records_rules_version(start_node, tmp_path):
    node = start_node(completion={"quiet_period_s": 0.5})
    node.write_routing(GOOD.replace("[demo-viewer]", '["@sender"]'))
    wait_for(lambda: node.events("routing_reloaded"), timeout=20)
    version = node.events("routing_reloaded")[-1]["version"]
    node.write_routing("rules: [{name: x, match: {tag: Nope, equals: 1}, actions: {discard: true}}]\n")
    node.process.send_signal(signal.SIGHUP)
    refused = wait_for(lambda: node.events("routing_reload_refused"), timeout=20)[-1]
    assert refused["version_in_force"] == version and "unknown tag keyword 'Nope'" in " ".join(refused["problems"])
    files = make_study(tmp_path / "ct", slices=3, size=16)
    assert storescu(node.port, files, "NOBODY").returncode == 0
    job = wait_for(lambda: node.query("SELECT * FROM work_items WHERE state != 'queued'"), timeout=30)[0]
    assert job["rules_version"] == version
    assert "fwd" in job["explanation"]


def test_explained_files_are_read_deflated_and_a_deflate_bomb_is_never_inflated_whole(tmp_path):
    """`route explain` and the console's rule tester read files from outside: a deflated file is
    routed on its tags (as pydicom reads it: also without its file meta group length, or with a
    wrong one), and a deflate bomb (1 GiB of zeros in about 1 MiB) is skipped without
    inflating past the node's bound (zlib's output buffer may take twice the bound on its way;
    pydicom alone inflates the whole GiB)."""
    import tracemalloc
    import zlib

    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from node.deflate import MAX_INFLATED_BYTES
    from node.route.study import study_from_folder
    from node.store.spool import dataset_offset

    (source,) = make_study(tmp_path / "source", slices=1, size=16, series_description="DEFLATED")
    ds = pydicom.dcmread(source)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    upload = tmp_path / "upload"
    upload.mkdir()
    ds.save_as(upload / "deflated.dcm", enforce_file_format=True)
    deflated = (upload / "deflated.dcm").read_bytes()
    assert deflated[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) File Meta Information Group Length
    (upload / "no-group-length.dcm").write_bytes(deflated[:132] + deflated[144:])
    wrong = int.from_bytes(deflated[140:144], "little") + 2
    (upload / "wrong-group-length.dcm").write_bytes(deflated[:140] + wrong.to_bytes(4, "little") + deflated[144:])
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb = b"".join(packer.compress(zeros) for _ in range(1024)) + packer.flush()
    assert len(bomb) < 2 << 20
    (upload / "bomb.dcm").write_bytes(deflated[:dataset_offset(deflated)] + bomb)
    tracemalloc.start()
    try:
        [study] = study_from_folder(upload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    [read] = study.series
    assert (read.series_uid, read.instance_count) == (str(ds.SeriesInstanceUID), 3)
    assert read.files == [upload / name for name in ("deflated.dcm", "no-group-length.dcm", "wrong-group-length.dcm")]
    assert read.tags["SeriesDescription"] == "DEFLATED" and read.tags["Modality"] == "CT"
    assert peak < 2 * MAX_INFLATED_BYTES + (64 << 20), f"peak {peak >> 20} MiB"
