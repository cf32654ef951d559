"""Real-world DICOM through a running node: the PyPI package pydicom-data (68 files from many
vendors) and pydicom's own test files (pydicom/data/test_files), odd encodings and all.

Every file is sent by C-STORE, each in its own transfer syntax, never re-encoded. The outcome
that must hold for each one (README, "Receiving real-world data"): stored byte-identical, or
refused with a failure status and a quarantine reason. The receiver must survive all of them:
afterwards it still answers C-ECHO and stores a good instance. The test then prints which
stored series the pipeline can make into volumes (inference.volume) and why the others are
refused. The refusals are not a fixed list: the receiver's checks decide them.
"""

from __future__ import annotations

import io
import tracemalloc
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from inference.volume import (SeriesError, load_need, load_series, load_volumes, parse_header, read_series,
                              read_volumes)
from node.send.status import classify_status
from node.send.scu import NotAccepted, associate, send_file, storage_contexts
from tests.peers import dataset_bytes, make_study
from tests.test_jobs import sphere_study

data_store = pytest.importorskip("data_store", reason="pydicom-data is a test dependency (pip install -e '.[test]')")

CORPUS_ROOTS = {
    "pydicom-data": Path(data_store.__file__).parent / "data",
    "pydicom": Path(pydicom.__file__).parent / "data" / "test_files",
}


@dataclass
class Sample:
    """One corpus file as a part-10 file to send, with the data set bytes it must arrive as."""

    name: str
    sop_class: str
    sop_instance: str
    syntax: str
    payload: bytes
    part10: Path


@dataclass
class Outcome:
    sample: Sample
    kind: str  # stored | stored altered | refused | not negotiated | not sent
    status: int | None = None
    reason: str = ""


def corpus_files() -> list[tuple[str, Path]]:
    """Every file of pydicom-data, and the files (not the subfolders) of pydicom's test_files."""
    files = [("pydicom-data", p) for p in sorted(CORPUS_ROOTS["pydicom-data"].iterdir()) if p.is_file()]
    files += [("pydicom", p) for p in sorted(CORPUS_ROOTS["pydicom"].iterdir()) if p.is_file()]
    return files


def as_sample(source: Path, name: str, folder: Path) -> Sample | str:
    """The file as sent by a sender that forwards it untouched, or why it is not a DICOM data set.

    Part-10 files are sent as they are (their data set bytes after the meta group); a bare data
    set (no preamble, as some old archives keep them) gets a meta group and keeps its bytes.
    """
    raw = source.read_bytes()
    try:
        if raw[128:132] == b"DICM":
            meta, offset = split_dataset(source)
            payload = raw[offset:]
        else:
            meta, payload = FileMetaDataset(), raw
        dataset = pydicom.dcmread(io.BytesIO(payload) if "TransferSyntaxUID" in meta else source, force=True,
                                  stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except Exception as exc:  # not DICOM at all
        return f"not DICOM ({type(exc).__name__})"
    # The request carries the data set's own UIDs, as dcmtk storescu sends them (some files'
    # meta groups disagree with their data sets); the meta group's where the data set has none.
    sop_class = str(dataset.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
    sop_instance = str(dataset.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or "")
    if not sop_class or not sop_instance:
        return "no SOP Class/Instance UID: not something C-STORE can carry"
    syntax = str(meta.get("TransferSyntaxUID") or _syntax_of(dataset))
    header = FileMetaDataset()
    header.MediaStorageSOPClassUID = sop_class
    header.MediaStorageSOPInstanceUID = sop_instance
    header.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(DicomFileLike(buffer), header, enforce_standard=True)
    part10 = folder / f"{name.replace('/', '_')}.dcm"
    part10.write_bytes(buffer.getvalue() + payload)
    return Sample(name, sop_class, sop_instance, syntax, payload, part10)


def _syntax_of(dataset: pydicom.Dataset) -> str:
    """A bare data set's transfer syntax, as pydicom detected it while reading."""
    implicit, little = dataset.original_encoding
    if implicit:
        return pydicom.uid.ImplicitVRLittleEndian
    return pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian


def batches(samples: list[Sample]) -> list[list[Sample]]:
    """Consecutive runs of samples (sorted by SOP class) whose contexts fit one association."""
    out: list[list[Sample]] = [[]]
    for sample in sorted(samples, key=lambda s: (s.sop_class, s.syntax, s.name)):
        try:
            storage_contexts([s.part10 for s in out[-1] + [sample]])
            out[-1].append(sample)
        except ValueError:
            out.append([sample])
    return [b for b in out if b]


class Receiver:
    """The node under test, seen from a sender: stores, index lookups, quarantine."""

    def __init__(self, node):
        self.node = node
        self.quarantine = node.data_dir / "quarantine"
        self.seen: set[Path] = set(self.quarantine.glob("*.dcm")) if self.quarantine.exists() else set()

    def stored_bytes(self, sop_instance: str) -> bytes | None:
        rows = self.node.query("SELECT path FROM instances WHERE sop_instance_uid=?", (sop_instance,))
        return dataset_bytes(self.node.data_dir / rows[0]["path"]) if rows else None

    def quarantine_reason(self, payload: bytes) -> str:
        """The reason written next to the quarantined copy of exactly these data set bytes."""
        new = set(self.quarantine.glob("*.dcm")) - self.seen
        self.seen |= new
        for path in new:
            if dataset_bytes(path) == payload:
                reason = path.with_name(path.name[: -len(".dcm")] + ".reason.txt")
                return reason.read_text().strip() if reason.exists() else ""
        return ""

    def send(self, batch: list[Sample]) -> list[Outcome]:
        assoc = associate("127.0.0.1", self.node.port, "CORPUS", "TESTNODE",
                          storage_contexts([s.part10 for s in batch]), timeout=60)
        assert assoc.is_established, "the node refused the association"
        outcomes = []
        try:
            for sample in batch:
                outcomes.append(self._send_one(assoc, sample))
                assert assoc.is_established, f"association lost after {sample.name}"
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes

    def _send_one(self, assoc, sample: Sample) -> Outcome:
        try:
            response = send_file(assoc, sample.part10, allow_transcoding=False)
        except NotAccepted as exc:
            return Outcome(sample, "not negotiated", reason=str(exc).split(": ", 1)[1])
        except (ValueError, AttributeError) as exc:  # pynetdicom will not send it (e.g. a malformed UID)
            return Outcome(sample, "not sent", reason=f"sender: {type(exc).__name__}: {exc}"[:120])
        status = getattr(response, "Status", None)
        assert status is not None, f"no C-STORE response for {sample.name}: the receiver died or aborted"
        if classify_status(int(status)) in ("success", "warning"):
            # checked at once: a later file may carry the same SOP Instance UID
            stored = self.stored_bytes(sample.sop_instance)
            return Outcome(sample, "stored" if stored == sample.payload else "stored altered", int(status))
        return Outcome(sample, "refused", int(status), self.quarantine_reason(sample.payload))


@pytest.mark.slow
def test_real_world_files_are_stored_exactly_or_refused_with_a_reason(tmp_path, start_node):
    folder = tmp_path / "corpus"
    folder.mkdir()
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    for origin, path in corpus_files():
        name = f"{origin}/{path.name}"
        made = as_sample(path, name, folder)
        if isinstance(made, str):
            skipped.append((name, made))
        else:
            samples.append(made)
    assert len(samples) >= 140, f"corpus incomplete: {len(samples)} files"

    node = start_node()
    receiver = Receiver(node)
    outcomes: list[Outcome] = []
    for batch in batches(samples):
        outcomes += receiver.send(batch)

    _print_receive_table(outcomes, skipped)
    for outcome in outcomes:
        if outcome.kind == "refused":
            assert classify_status(outcome.status) in ("transient", "permanent"), outcome
            assert outcome.reason, f"{outcome.sample.name}: refused 0x{outcome.status:04X} without a quarantine reason"
    assert not [o for o in outcomes if o.kind == "stored altered"], "acknowledged but not stored as sent (see table)"
    assert not [o for o in outcomes if o.kind == "not sent"], "pynetdicom could not send some files (see table)"

    # The receiver survived: it answers C-ECHO and stores a good instance.
    assert node.process is not None and node.process.poll() is None, node.log()[-2000:]
    echo = associate("127.0.0.1", node.port, "CORPUS", "TESTNODE", [build_context(Verification)])
    assert echo.is_established
    assert echo.send_c_echo().Status == 0x0000
    echo.release()
    good = make_study(tmp_path / "good", slices=1, size=16)[0]
    [after] = receiver.send([as_sample(good, "good", folder)])  # type: ignore[list-item]
    assert after.kind == "stored" and after.status == 0x0000

    _print_volume_table(node, outcomes)


def _print_receive_table(outcomes: list[Outcome], skipped: list[tuple[str, str]]) -> None:
    print(f"\n{'file':<48} {'outcome':<15} {'status':<7} reason")
    for o in sorted(outcomes, key=lambda o: o.sample.name):
        status = f"0x{o.status:04X}" if o.status is not None else ""
        print(f"{o.sample.name:<48} {o.kind:<15} {status:<7} {o.reason}")
    for name, why in skipped:
        print(f"{name:<48} {'skipped':<15} {'':<7} {why}")
    kinds = Counter(o.kind if o.kind != "refused" else f"refused 0x{o.status:04X}" for o in outcomes)
    print(f"summary: {len(outcomes)} sent, {dict(sorted(kinds.items()))}, {len(skipped)} skipped (not DICOM or no SOP UIDs)")


def _print_volume_table(node, outcomes: list[Outcome]) -> None:
    """Each stored series through series-to-volume, as the pipeline would load it."""
    names = {o.sample.sop_instance: o.sample.name for o in outcomes if o.kind == "stored"}
    series: dict[str, list[str]] = {}
    for row in node.query("SELECT series_uid, sop_instance_uid, path FROM instances ORDER BY path"):
        if row["sop_instance_uid"] in names:
            series.setdefault(row["series_uid"], []).append(row["path"])
    verdicts: Counter[str] = Counter()
    print(f"\n{'series (first file)':<48} {'files':>5}  volume")
    for uid, paths in sorted(series.items(), key=lambda kv: kv[1][0]):
        files = [node.data_dir / p for p in paths]
        first = names[pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID]
        try:
            volume = load_series(read_series(files))
            verdict = f"accepted {tuple(volume.array.shape)}"
            verdicts["accepted"] += 1
        except SeriesError as exc:
            verdict = f"refused: {exc}"
            verdicts["refused"] += 1
        except Exception as exc:  # not a refusal with a reason: shown so it can be fixed
            verdict = f"ERROR {type(exc).__name__}: {exc}"[:160]
            verdicts["error"] += 1
        print(f"{first:<48} {len(files):>5}  {verdict}")
    print(f"volumes: {dict(verdicts)} of {len(series)} stored series")


def test_routing_tags_read_from_the_whole_data_set_check_equal_pydicoms_reading(tmp_path, monkeypatch):
    """The receiver takes the routing tags' values from where the whole-data-set check found
    them (node/receive/tags.py) instead of reading the header again with pydicom: for every
    corpus file, in its own transfer syntax (implicit, big endian, deflated, vendor character
    sets), the result is what pydicom's reader gives, or the same refusal."""
    from node.receive import tags as tags_module
    from node.receive.validate import MalformedDataset

    def outcome(sample: Sample) -> object:
        try:
            return tags_module.read_routing_tags(sample.payload, sample.syntax)
        except (tags_module.UnreadableDataset, MalformedDataset) as exc:
            return (type(exc).__name__, str(exc))

    samples = [s for origin, path in corpus_files()
               if isinstance(s := as_sample(path, f"{origin}/{path.name}", tmp_path), Sample)]
    walked = [outcome(s) for s in samples]
    with monkeypatch.context() as patched:  # pydicom's reader for every file, as for one not whole
        patched.setattr(tags_module, "check_dataset", _never_whole)
        read = [outcome(s) for s in samples]
    differ = [s.name for s, a, b in zip(samples, walked, read) if a != b]
    assert not differ, differ
    # the corpus reaches the new path in every encoding, with text in other character sets
    whole = [(s, t) for s, t in zip(samples, walked) if isinstance(t, tags_module.RoutingTags) and _whole(s)]
    assert len(whole) >= 120 and {s.syntax for s, _ in whole} >= {
        pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian}
    # text in other character sets: the routing tags of the corpus's files are all ASCII
    explicit = next(s for s, _ in whole if s.syntax == pydicom.uid.ExplicitVRLittleEndian)
    for charset, text in (("ISO_IR 100", "Thorax sans contraste, côté gauche"), ("ISO_IR 192", "Лёгкие 肺"),
                          ("\\ISO 2022 IR 87", "胸部^単純")):
        ds = pydicom.dcmread(io.BytesIO(explicit.payload), force=True)
        ds.SpecificCharacterSet, ds.SeriesDescription, ds.BodyPartExamined = charset, text, "CHEST"
        buffer = io.BytesIO()
        ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=False)
        recoded = Sample(charset, explicit.sop_class, explicit.sop_instance, explicit.syntax, buffer.getvalue(),
                         explicit.part10)
        assert _whole(recoded) and outcome(recoded).series["description"] == text
        with monkeypatch.context() as patched:
            patched.setattr(tags_module, "check_dataset", _never_whole)
            assert outcome(recoded).series["description"] == text
    # the corpus's one deflated file is refused (bytes after its stream): a whole one, made here
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = compressor.compress(explicit.payload) + compressor.flush()
    assert tags_module.read_routing_tags(deflated, pydicom.uid.DeflatedExplicitVRLittleEndian) == outcome(explicit)


def test_a_series_memory_is_foreseen_from_its_first_header_before_any_is_taken(tmp_path):
    """The job checks a series' memory before it reads it (inference.room, node.jobs.stages.load),
    from `load_need` of its first header: for every corpus file that loads as volumes (each in its
    own encoding: native, JPEG 2000, JPEG-LS, RLE, multi-frame, 8 to 32 bits) and for CT series kept
    as int16 and with float32 values, the arrays the volumes keep and the peak of what reading and
    loading them took (tracemalloc: numpy's arrays and Python's objects) are within it."""
    int16, _ = sphere_study(tmp_path / "int16", "PAT-I", slices=20, size=256)
    scaled, _ = sphere_study(tmp_path / "scaled", "PAT-S", slices=20, size=256)
    for file in scaled:
        ds = pydicom.dcmread(file)
        ds.RescaleSlope = 0.5
        ds.save_as(file)
    rle, _ = sphere_study(tmp_path / "rle", "PAT-R", slices=100, size=128, centre=(50, 64, 64))
    _compress(rle)
    series = [(f"{origin}/{path.name}", [path]) for origin, path in corpus_files()]
    series += [("CT int16", int16), ("CT scaled", scaled), ("CT RLE", rle)]
    needs, kinds = {}, Counter()
    tracemalloc.start()
    try:
        for name, files in series:
            try:
                with open(files[0], "rb") as file:
                    header = parse_header(file)
                volumes = load_volumes(read_series(files))  # once first: a decoder's first use imports it
            except SeriesError:
                continue
            except Exception:  # not a data set pydicom reads: the receive test's business
                continue
            needs[name] = need, detail = load_need(header, len(files), sum(f.stat().st_size for f in files))
            del volumes
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            volumes = load_volumes(read_series(files))
            peak = tracemalloc.get_traced_memory()[1] - before
            kept = sum(v.array.nbytes for v in volumes)
            assert kept <= need and peak <= need + (128 << 10), (name, detail, need, kept, peak)
            kinds[detail.rpartition(", ")[2]] += 1
            del volumes
    finally:
        tracemalloc.stop()
    assert len(needs) >= 25 and {"kept as int16", "with float32 values", "decoded to float32"} <= set(kinds), kinds
    arrays = 20 * 256 * 256 * 2
    assert needs["CT int16"][1] == "20 images of 256x256, 16-bit stored values, kept as int16"
    assert needs["CT scaled"][1] == "20 images of 256x256, 16-bit stored values, with float32 values"
    assert arrays < needs["CT int16"][0] < 1.5 * arrays and 3 * arrays < needs["CT scaled"][0] < 3.5 * arrays
    # decoded into the volume frame by frame: 4 bytes a voxel beside the files and what each instance
    # keeps, not a list of frames and their stack
    assert needs["CT RLE"][1] == "100 images of 128x128, decoded to float32"
    assert needs["CT RLE"][0] < 100 * (6 * 128 * 128 + (88 << 10)) + sum(f.stat().st_size for f in rle)


def _compress(files: list[Path]) -> None:
    for file in files:
        ds = pydicom.dcmread(file)
        ds.compress(pydicom.uid.RLELossless, encoding_plugin="pydicom")
        ds.save_as(file)


def test_a_series_whose_instances_differ_in_encoding_or_rescale_is_foreseen_again_before_its_volume_is_built(
        tmp_path):
    """The first header cannot tell that the instances after it are stored otherwise: once the
    series' headers are read, and before its volume is built, the room is told again (mixed_need),
    with the files read whole by then as taken. The first instance uncompressed and the others RLE
    (highdicom decodes them all: the float32 volume and the files), or the intercepts differing
    (float32 values, not int16): what reading took at its peak is within the second need, and
    beyond the first. Images of different sizes (a projection series, volumes loaded apart) are
    foreseen from the largest. Told once: a series stored alike, and one whose instances each give
    their own Largest Image Pixel Value or Rescale Slope (every PET series: float32 anyway)."""
    mixed, _ = sphere_study(tmp_path / "mixed", "PAT-M", slices=20, size=256)
    _compress(mixed[1:])
    shifted, _ = sphere_study(tmp_path / "shifted", "PAT-I", slices=20, size=256)
    for k, file in enumerate(shifted):
        ds = pydicom.dcmread(file)
        ds.RescaleIntercept = -1024 + k % 2
        ds.save_as(file)
    alike, _ = sphere_study(tmp_path / "alike", "PAT-A", slices=20, size=256)
    largest, _ = sphere_study(tmp_path / "largest", "PAT-L", slices=20, size=256)
    pet, _ = sphere_study(tmp_path / "pet", "PAT-P", slices=20, size=256)
    sizes, _ = sphere_study(tmp_path / "sizes", "PAT-Z", slices=20, size=256)
    for k, (a, b, c) in enumerate(zip(largest, pet, sizes)):
        ds = pydicom.dcmread(a)  # unsigned 12-bit values (the same bytes: none negative), within int16
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
        ds.add_new("LargestImagePixelValue", "US", 1524 + k)
        ds.save_as(a)
        ds = pydicom.dcmread(b)
        ds.RescaleSlope = 1.01 + k / 100
        ds.save_as(b)
        if k == 3:
            ds = pydicom.dcmread(c)
            ds.Rows = ds.Columns = 128
            ds.PixelData = ds.PixelData[:128 * 128 * 2]
            ds.save_as(c)
    read_volumes(alike)  # once first: a decoder's first use imports it
    read_volumes(mixed)
    peaks: dict[str, int] = {}
    told: dict[str, list[tuple[int, str, int]]] = {}
    tracemalloc.start()
    try:
        for name, files in (("mixed", mixed), ("shifted", shifted), ("alike", alike), ("largest", largest),
                            ("pet", pet), ("sizes", sizes)):
            told[name] = []
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            try:
                read_volumes(files, room=lambda *said, name=name: told[name].append(said))
            except SeriesError as exc:
                assert name == "sizes", exc
                assert str(exc) == "images of different sizes in one series: [(128, 128), (256, 256)]"
            peaks[name] = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    first = "20 images of 256x256, 16-bit stored values, kept as int16"
    floats = "20 images of 256x256, 16-bit stored values, with float32 values"
    assert {name: [d for _, d, _ in said] for name, said in told.items()} == {
        "mixed": [first, "20 images of 256x256, decoded to float32"], "shifted": [first, floats],
        "alike": [first], "largest": [first], "pet": [floats],
        "sizes": [first, "20 images of 256x256, decoded to float32"]}, told
    assert told["mixed"][1][2] == sum(f.stat().st_size for f in mixed[1:]) and told["shifted"][1][2] == 0
    for name in ("mixed", "shifted"):
        (first_need, _, _), (need, _, _) = told[name]
        assert first_need < peaks[name] <= need + (128 << 10), (name, told[name], peaks[name])


def test_a_series_memory_foresight_takes_the_files_sizes_and_the_stored_bits_into_account(tmp_path):
    """What the first header cannot tell: uncompressed, the files' bytes bound the stored values
    (a first instance smaller than the others); unsigned 16-bit values whose Bits Stored reach past
    int16 (unless Largest Image Pixel Value says they do not) are foreseen as float32. A header the
    foresight cannot read is left to the checks that name what is wrong, the room never told."""
    files, _ = sphere_study(tmp_path / "ct", "PAT-F", slices=4, size=64)
    with open(files[0], "rb") as file:
        header = parse_header(file)
    assert load_need(header, 4, 400 << 20)[0] >= 400 << 20  # (the others 100 MB each)
    header.PixelRepresentation, header.BitsStored, header.RescaleIntercept = 0, 16, 0
    assert load_need(header, 4, 0)[1].endswith("with float32 values")
    header.LargestImagePixelValue = 4095
    assert load_need(header, 4, 0)[1].endswith("kept as int16")
    odd = pydicom.dcmread(files[0])
    odd.RescaleSlope = [1, 2]
    del odd.ImagePositionPatient
    odd.save_as(files[0])
    told: list[tuple[int, str, int]] = []
    with pytest.raises(SeriesError, match="an image has no ImagePositionPatient/ImageOrientationPatient"):
        read_volumes(files, room=lambda *said: told.append(said))
    assert told == []


def _whole(sample: Sample) -> bool:
    from node.receive.validate import MalformedDataset, check_dataset

    try:
        check_dataset(sample.payload, sample.syntax)
        return True
    except MalformedDataset:
        return False


def _never_whole(*_args: object, **_kwargs: object) -> None:
    from node.receive.validate import MalformedDataset

    raise MalformedDataset("forced: read with pydicom")
