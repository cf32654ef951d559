"""Results where radiologists look: the node's SEG, shown by the OHIF viewer in a real browser.

One Orthanc (the PACS), one node (threshold model) and one headless Chromium for the module.
Three phantom studies, each a bright cylinder (a lesion of the same cross-section on 16 slices)
off the image centre, go through the node: an axial one to a destination that gets BINARY SEG,
one to a destination that gets LABELMAP SEG, and an oblique one (tilted 30 degrees). OHIF
(npm @ohif/app, served by tests/viewer.py behind a same-origin proxy to Orthanc) opens each
study; the SEG is loaded from the study browser and the screenshot is sampled at the lesion's
projected position and away from it. Screenshots are kept in $TMPDIR/dicom-node-viewer.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.orthanc import Orthanc
from tests.peers import NodeProcess, storescu, wait_for
from tests.viewer import ViewerServer, ensure_ohif
from phantom.chest import make_chest_study
from phantom.dicom import SeriesGeometry, SeriesIdentity, write_ct_series

SHAPE = (32, 128, 128)
LESION = (40, 80, 12)  # row, column, radius (pixels); slices 8-23
COLOUR = (255, 64, 0)  # the threshold model's label colour (tests/models.py)
TILT = np.radians(30)
NODULES = "VIEW-DET"  # a chest phantom with three nodules, to the nodule detector
CASES = {
    "binary": ("VIEW-BIN", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
    "labelmap": ("VIEW-LM", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
    "oblique": ("VIEW-OBL", (1.0, 0.0, 0.0, 0.0, float(np.cos(TILT)), float(-np.sin(TILT)))),
}


@dataclass
class Viewer:
    url: str
    browser: Any
    studies: dict[str, str]
    shots: Path
    reports: dict[str, pydicom.Dataset]  # the SR the node sent, per case
    instance_numbers: dict[str, dict[str, int]]  # per case: SOP Instance UID -> Instance Number
    node_url: str  # the viewer reading the node's DICOMweb


def cylinder_study(folder: Path, patient_id: str, orientation: tuple[float, ...]) -> list[Path]:
    k, r, c = np.indices(SHAPE)
    hu = np.full(SHAPE, -1000.0)
    hu[(k >= 8) & (k < 24) & ((r - LESION[0]) ** 2 + (c - LESION[1]) ** 2 <= LESION[2] ** 2)] = 500.0
    geometry = SeriesGeometry(spacing=(2.0, 1.0, 1.0), origin=(-64.0, -64.0, 0.0), orientation=orientation)
    return write_ct_series(hu, folder, geometry, SeriesIdentity(patient_id=patient_id, series_description=patient_id))


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, model_repository) -> Iterator[Viewer]:
    from playwright.sync_api import sync_playwright

    work = tmp_path_factory.mktemp("viewer")
    pacs = Orthanc(work / "pacs").start()
    destination = {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
    rules = [{"name": f"view-{case}", "match": {"tag": "SeriesDescription", "equals": patient},
              "actions": {"run": ["threshold"], "send_to": ["labelmap" if case == "labelmap" else "binary"]}}
             for case, (patient, _) in CASES.items()]
    rules.append({"name": "view-nodules", "match": {"tag": "SeriesDescription", "equals": NODULES},
                  "actions": {"run": ["nodule-det"], "outputs": ["SR", "SEG"], "send_to": ["binary"]}})
    # Orthanc 1.10 (Debian) accepts no Label Map SEG over DIMSE: that destination is its DICOMweb
    # plugin, reached by STOW-RS.
    node = NodeProcess(work / "node", routing={"rules": rules}, completion={"quiet_period_s": 1.0},
                       destinations={"binary": destination,
                                     "labelmap": {"dicomweb": {"url": f"http://127.0.0.1:{pacs.http_port}/dicom-web"},
                                                  "segmentation_type": "LABELMAP"}},
                       sending={"retry_initial_s": 0.5, "retry_max_s": 1.0, "sweep_s": 0.5},
                       inference={"model_repository": str(model_repository)})
    server = direct = None
    playwright = None
    try:
        node.start()
        files, studies, numbers = [], {}, {}
        cases = {**{case: lambda case=case, patient=patient, orientation=orientation:
                    cylinder_study(work / case, patient, orientation)
                    for case, (patient, orientation) in CASES.items()},
                 "nodules": lambda: make_chest_study(work / "nodules", seed=5, identity=SeriesIdentity(
                     patient_id=NODULES, series_description=NODULES))[0]}
        for case, make in cases.items():
            series = make()
            files += series
            headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in series]
            studies[case] = str(headers[0].StudyInstanceUID)
            numbers[case] = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in headers}
        pacs.upload(files)  # the modality's study is in the PACS too: the node sends only its results
        sent = storescu(node.port, files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        for uid in studies.values():
            wait_for(lambda: {"SEG", "SR"} <= set(pacs.instances_by_modality(uid)), timeout=240, interval=0.5)
        reports = {}
        for row in node.query("SELECT files FROM outbox"):
            for sent in map(pydicom.dcmread, json.loads(row["files"])):
                if sent.Modality == "SR":
                    reports[next(c for c, uid in studies.items() if uid == sent.StudyInstanceUID)] = sent
        server = ViewerServer(ensure_ohif(), pacs.http_port).start()
        # the same viewer reading the node's own QIDO-RS/WADO-RS (no PACS in between)
        direct = ViewerServer(ensure_ohif(), node.http_port, dicomweb_root="/dicomweb",
                              authorization=f"Bearer {node.api_token('radiology-viewer', 'operator')}").start()
        playwright = sync_playwright().start()
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=["--no-sandbox", "--enable-unsafe-swiftshader"])
        shots = Path(tempfile.gettempdir()) / "dicom-node-viewer"  # kept after the run: the artifacts
        shots.mkdir(exist_ok=True)
        print(f"viewer screenshots: {shots}")
        yield Viewer(server.url, browser, studies, shots, reports, numbers, direct.url)
        browser.close()
    finally:
        if direct is not None:
            direct.stop()
        if playwright is not None:
            playwright.stop()
        if server is not None:
            server.stop()
        node.stop()
        pacs.discard()


def projected(box: dict[str, float], row: float, column: float,
              spacing: tuple[float, float] = (1.0, 1.0)) -> tuple[int, int]:
    """Where OHIF draws the centre of pixel (row, column): the image is fitted to the viewport
    (aspect kept) and centred."""
    height_mm, width_mm = SHAPE[1] * spacing[0], SHAPE[2] * spacing[1]
    scale = min(box["width"] / width_mm, box["height"] / height_mm)
    x = box["x"] + box["width"] / 2 + ((column + 0.5) * spacing[1] - width_mm / 2) * scale
    y = box["y"] + box["height"] / 2 + ((row + 0.5) * spacing[0] - height_mm / 2) * scale
    return int(round(x)), int(round(y))


def screenshot(page: Any) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(page.screenshot())).convert("RGB")).astype(int)


def tinted(pixel: np.ndarray) -> bool:
    """The label colour (255, 64, 0) blended over the white lesion: red well above green and blue."""
    r, g, b = (int(v) for v in pixel)
    return r >= 200 and r - g >= 40 and r - b >= 70


def dimmed(pixel: np.ndarray) -> bool:
    """What OHIF 3.13.2 draws for a Label Map SEG: it ignores the segments' recommended colours
    and fills with black at half opacity, so the white lesion turns an even grey."""
    r, g, b = (int(v) for v in pixel)
    return 60 <= r <= 200 and max(r, g, b) - min(r, g, b) <= 12


@pytest.mark.parametrize("case", list(CASES))
def test_ohif_draws_the_seg_on_the_lesion(viewer, case):
    draws_the_seg(viewer, case, viewer.url, case)


def test_ohif_reading_the_node_draws_the_seg_on_the_lesion(viewer):
    """OHIF with the node's DICOMweb root: the CT and the SEG come from the node (QIDO-RS, WADO-RS
    metadata, frames and the SEG instance), not from a PACS."""
    draws_the_seg(viewer, "oblique", viewer.node_url, "oblique-from-node")


def draws_the_seg(viewer: Viewer, case: str, url: str, shot: str) -> None:
    page = viewer.browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto(f"{url}/viewer?StudyInstanceUIDs={viewer.studies[case]}")
        seg = page.locator('[data-cy="study-browser-thumbnail-no-image"][data-series="9101"]')
        seg.wait_for(timeout=120_000)
        page.locator('[data-cy="study-browser-thumbnail-no-image"][data-series="9102"]', has_text="SR").wait_for()
        page.locator('[data-cy="viewport-overlay-bottom-right"]', has_text="/32").wait_for(timeout=120_000)
        tour = page.get_by_text("Skip all")
        if tour.is_visible():
            tour.click()
        seg.dblclick()
        box = page.locator('[data-cy="viewport-pane"]').bounding_box()
        lesion = projected(box, LESION[0], LESION[1])
        away = projected(box, LESION[0] + 60, LESION[1] - 60)  # 85 pixels from the centre: background
        inside = [projected(box, LESION[0] + dr, LESION[1] + dc)
                  for dr, dc in ((0, 0), (-6, 0), (6, 0), (0, -6), (0, 6))]

        overlaid = dimmed if case == "labelmap" else tinted

        def drawn() -> list[np.ndarray]:
            image = screenshot(page)
            return [image] if all(overlaid(image[y, x]) for x, y in inside) else []

        image = wait_for(drawn, timeout=120, interval=1.0)[0]
        page.screenshot(path=str(viewer.shots / f"{shot}.png"))
        print(f"{case}: lesion {lesion} RGB {image[lesion[1], lesion[0]].tolist()},"
              f" away {away} RGB {image[away[1], away[0]].tolist()}")
        assert overlaid(image[lesion[1], lesion[0]])
        assert image[away[1], away[0]].max() < 40  # black air, no overlay
        outside = projected(box, LESION[0], LESION[1] + LESION[2] + 8)  # just beside the lesion
        assert image[outside[1], outside[0]].max() < 40
    finally:
        page.screenshot(path=str(viewer.shots / f"{shot}-last.png"))
        page.close()



@pytest.mark.parametrize("case", ["binary", "oblique"])
def test_ohif_shows_the_sr_finding_on_its_slice_with_its_volume(viewer, case):
    """Opening the SR: OHIF's SR viewport goes to the slice of the finding's centre of mass and
    draws the finding there with the report's measurements (volume, long axis)."""
    from node.encode.sr import read_findings

    report = viewer.reports[case]
    (finding,) = read_findings(report)
    measurements = next(item for item in report.ContentSequence
                        if item.ConceptNameCodeSequence[0].CodeValue == "126010")  # Imaging Measurements
    group = next(item for item in measurements.ContentSequence if item.ValueType == "CONTAINER")
    point = next(item for item in group.ContentSequence if item.ValueType == "SCOORD")
    referenced = point.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    page = open_sr(viewer, case, SHAPE[0], "Volume:")
    try:
        volume = page.locator("svg text", has_text="Volume:").first
        page.screenshot(path=str(viewer.shots / f"{case}-sr.png"))
        assert f"Volume: {finding['volume_mm3']:.2f} mm3" in volume.text_content()
        if finding["long_axis_mm"] is not None:  # reported for axial series only (README, SR)
            long_axis = page.locator("svg text", has_text="Long axis:").first.text_content()
            assert f"Long axis: {finding['long_axis_mm']:.2f} mm" in long_axis
        shown = page.locator('[data-cy="viewport-overlay-bottom-right"]').inner_text()
        assert shown.startswith(f"I:{viewer.instance_numbers[case][referenced]} ")  # the centre of mass's slice
    finally:
        page.close()


def open_sr(viewer: Viewer, case: str, slices: int, drawn: str) -> Any:
    """A page with the case's SR opened in OHIF's SR viewport, once OHIF drew the text `drawn`.

    OHIF 3.13.2's SR viewport races with itself: it tells its SR display tool which findings to
    draw (`setTrackingUniqueIdentifiersForElement`, in an effect once the element is enabled) but
    does not render again afterwards, so when the first render of the referenced image came
    first, the finding appears only at the next render (any interaction, for a radiologist). Until
    it is drawn, the test makes that next render happen every 5 s by making the page one pixel
    wider or narrower again (OHIF's ResizeObserver re-renders and keeps the view, slice included)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page = viewer.browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto(f"{viewer.url}/viewer?StudyInstanceUIDs={viewer.studies[case]}")
        sr = page.locator('[data-cy="study-browser-thumbnail-no-image"][data-series="9102"]', has_text="SR")
        sr.wait_for(timeout=120_000)
        page.locator('[data-cy="viewport-overlay-bottom-right"]', has_text=f"/{slices}").wait_for(timeout=120_000)
        tour = page.get_by_text("Skip all")
        if tour.is_visible():
            tour.click()
        sr.dblclick()
        text = page.locator("svg text", has_text=drawn).first
        for attempt in range(18):  # 90 s in all
            try:
                text.wait_for(timeout=5_000)
                break
            except PlaywrightTimeout:  # a width other than the one laid out last: the observer sees a change
                print(f"{case}: OHIF has not drawn the SR finding (wait {attempt + 1}); resizing the page to render again")
                page.set_viewport_size({"width": 1401 if attempt % 2 == 0 else 1400, "height": 900})
        text.wait_for(timeout=5_000)
        return page
    except BaseException:
        page.screenshot(path=str(viewer.shots / f"{case}-sr-timeout.png"))
        print(f"{case}: viewport texts {page.locator('[data-cy=viewport-pane]').all_inner_texts()}, "
              f"svg texts {page.locator('svg text').all_text_contents()}")
        page.close()
        raise


def test_ohif_steps_through_the_detected_nodules_each_on_its_slice_with_its_axes_and_score(viewer):
    """The detector's SR in OHIF: each nodule's group is drawn on the slice through its centre
    with its long and short axis and the detector's score; the viewport's arrows step from one to
    the next."""
    from node.encode.sr import read_findings

    report = viewer.reports["nodules"]
    findings = read_findings(report)
    assert len(findings) == 3
    measurements = next(item for item in report.ContentSequence
                        if item.ConceptNameCodeSequence[0].CodeValue == "126010")  # Imaging Measurements
    groups = [item for item in measurements.ContentSequence if item.ValueType == "CONTAINER"]
    slices = [next(i for i in g.ContentSequence if i.ValueType == "SCOORD").ContentSequence[0]
              .ReferencedSOPSequence[0].ReferencedSOPInstanceUID for g in groups]
    numbers = viewer.instance_numbers["nodules"]
    page = open_sr(viewer, "nodules", 80, "Certainty of Finding:")
    try:
        for step, (finding, referenced) in enumerate(zip(findings, slices)):
            if step:
                page.locator('[data-cy="viewport-action-arrows-right"] svg').click()
            overlay = page.locator('[data-cy="viewport-overlay-bottom-right"]')
            wait_for(lambda: overlay.inner_text().startswith(f"I:{numbers[referenced]} "), timeout=60, interval=0.5)
            # OHIF may move to the slice before it draws the slice's annotations
            long_axis = f"Long axis: {finding['long_axis_mm']:.2f} mm"
            page.locator("svg text", has_text=long_axis).first.wait_for(timeout=60_000)
            drawn = " ".join(page.locator("svg text").all_text_contents())
            page.screenshot(path=str(viewer.shots / f"nodules-sr-{step + 1}.png"))
            assert long_axis in drawn, drawn
            assert f"Short axis: {finding['short_axis_mm']:.2f} mm" in drawn, drawn
            assert f"Certainty of Finding: {100 * finding['probability']:.2f} %" in drawn, drawn
    finally:
        page.close()
