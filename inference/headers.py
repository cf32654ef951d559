"""Headers of stored series parsed before their job needs them.

Parsing a series' headers is 0.2-0.5 s of a job for 300 CT images on this project's machine kind.
A study waits out its quiet period (60 s by default) before its job starts: the node parses the
headers of the series a rule will run a model on in that wait (node.assemble.read_ahead), and
the job takes them here (inference.volume.read_series) instead of parsing its files again.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from inference.volume import StoredFile, parse_header, read_whole

# A header longer than this in its file is not held, nor its series' (values up to DEFER_BYTES
# each are parsed into memory, about 15 times their bytes for a CT header; more for many small
# sequence items).
HEADER_MAX_BYTES = 64 << 10
HELD_MAX_BYTES = 8 << 20  # the held headers' bytes in their files, all together
CHECK_EVERY = 16  # headers parsed between asks whether to go on
# A value decoded ahead (read_ahead's `decode`) is at most this long in its file, in this many
# parts: a position or an orientation is 6 numbers in under 110 bytes.
DECODE_MAX_BYTES = 128
DECODE_MAX_VALUES = 8
STUDIES_KEPT = 10_000  # studies whose last take is remembered


@dataclass(frozen=True)
class _Held:
    """A parsed header, the study it was read ahead for, and its length in its file."""

    header: Dataset
    study_uid: str
    nbytes: int


class ParsedHeaders:
    """Headers parsed ahead, each given out once, and only while its file is still the one it was
    parsed from (a resend replaces the file: the job then parses the new one).

    Only headers whose Pixel Data stays in the file are held (a compressed, deflated or
    multi-frame series is read whole by its job), at most `limit` of them and HELD_MAX_BYTES of
    their files: reading ahead stops there. Nothing is added for a study after its job took its
    headers; a study's headers no job took (its job ran on another replica) are let go by
    `expire` once the study has stopped receiving for a while.
    """

    def __init__(self) -> None:
        self._held: dict[Path, _Held] = {}
        self._bytes = 0
        # The first file of a series read whole (or with too long a header), with its identity
        # then, so that it is not parsed again at each reading ahead.
        self._passed: OrderedDict[Path, StoredFile] = OrderedDict()
        self._takes: OrderedDict[str, int] = OrderedDict()  # study -> how many times its job took
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def read_ahead(self, study_uid: str, files: Sequence[Path], limit: int,
                   go_on: Callable[[], bool] = lambda: True, decode: Sequence[str] = ()) -> int:
        """Parse the headers of the study's `files` not held yet, within the limits, while
        `go_on()` (asked every CHECK_EVERY files) says so; the number parsed. The values named in
        `decode` (keywords) are decoded in each header held: the job reads them decoded. A file
        that cannot be read now is left to the job (which reads it again and says what is wrong)."""
        with self._lock:
            takes = self._takes.get(study_uid, 0)
        parsed = 0
        for n, f in enumerate(files):
            if n % CHECK_EVERY == 0 and not go_on():
                break
            try:
                identity = StoredFile.of(os.stat(f))
            except OSError:
                continue  # gone: the job says so
            with self._lock:
                held = self._held.get(f)
                if held is not None and held.header._stored_file == identity:
                    continue
                if self._passed.get(f) == identity or (held is None and len(self._held) >= limit):
                    break
            try:
                with open(f, "rb") as file:
                    ds = parse_header(file)
                nbytes = None if read_whole(ds) else _header_bytes(ds)
                if nbytes is not None and nbytes > HEADER_MAX_BYTES:
                    nbytes = None  # None: not worth holding
                if nbytes is not None:
                    _decode(ds, decode)
            except Exception:  # noqa: BLE001 - damaged or not DICOM: the job reports it
                continue
            with self._lock:
                if self._takes.get(study_uid, 0) != takes:
                    break  # its job has taken its headers meanwhile: it parses the rest itself
                if nbytes is None:  # its series is not worth reading ahead
                    self._passed[f] = ds._stored_file
                    while len(self._passed) > max(limit, 1):
                        self._passed.popitem(last=False)
                    break
                if self._bytes + nbytes > HELD_MAX_BYTES:
                    break
                replaced = self._held.pop(f, None)
                self._bytes += nbytes - (replaced.nbytes if replaced else 0)
                self._held[f] = _Held(ds, study_uid, nbytes)
            parsed += 1
        return parsed

    def take(self, study_uid: str, files: Sequence[Path]) -> dict[Path, Dataset]:
        """The held headers of `files` whose files are unchanged since; none of `files` stays
        held, and a reading ahead of the study under way adds nothing more."""
        with self._lock:
            self._takes[study_uid] = self._takes.pop(study_uid, 0) + 1
            while len(self._takes) > STUDIES_KEPT:
                self._takes.popitem(last=False)
            held = [(f, entry) for f in files if (entry := self._held.pop(f, None)) is not None]
            self._bytes -= sum(entry.nbytes for _, entry in held)
        return {f: entry.header for f, entry in held if _unchanged(f, entry.header)}

    def expire(self, stopped_at: Callable[[str], float | None], grace_s: float) -> int:
        """Let go of the headers of studies that stopped receiving (`stopped_at`: when, by the
        wall clock; None: still receiving) `grace_s` ago or more; how many."""
        with self._lock:
            studies = {entry.study_uid for entry in self._held.values()}
        now = time.time()
        done = {study_uid for study_uid in studies
                if (stopped := stopped_at(study_uid)) is not None and now - stopped >= grace_s}
        with self._lock:
            expired = [f for f, entry in self._held.items() if entry.study_uid in done]
            for f in expired:
                self._bytes -= self._held.pop(f).nbytes
        return len(expired)


def _decode(header: Dataset, keywords: Sequence[str]) -> None:
    """Decode the named values of `header` in place: pydicom parses a value from its bytes the first
    time it is read and keeps it decoded (the job's volume reads a dozen of each of its 300 headers:
    0.06 s of series to volume on this project's machine kind). Only short values with few parts:
    a decimal string takes some 500 bytes of memory per number once decoded (DSfloat), so a long
    one is left to the job, which decodes it as it would have: a header held takes at most
    DECODE_MAX_VALUES decoded parts per keyword."""
    for keyword in keywords:
        raw = header.get_item(keyword, keep_deferred=True)
        if (isinstance(raw, RawDataElement) and raw.value is not None and len(raw.value) <= DECODE_MAX_BYTES
                and raw.value.count(b"\\") < DECODE_MAX_VALUES):
            header[keyword]  # noqa: B018 - read for its side effect: the element is kept decoded


def _header_bytes(header: Dataset) -> int:
    """Where the header's Pixel Data starts in its file: the header's length there (Pixel Data
    is still as parsed, its position known, for any data set not read whole)."""
    return int(header.get_item("PixelData", keep_deferred=True).value_tell)


def _unchanged(path: Path, header: Dataset) -> bool:
    """Whether `path` is still the file `header` was parsed from (False: replaced, or gone)."""
    try:
        return StoredFile.of(os.stat(path)) == header._stored_file
    except OSError:
        return False
