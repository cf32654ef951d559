"""What every benchmark shares: the volume size flags, a scratch folder, a study sent again as a new one."""

from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pydicom
from pydicom.uid import generate_uid


@contextmanager
def benchmark_run(description: str | None, slices: int = 300, size: int = 512,
                  arguments: Callable[[argparse.ArgumentParser], None] | None = None
                  ) -> Iterator[tuple[argparse.Namespace, Path]]:
    """Parse --slices/--size (default 300 x 512 x 512) and what `arguments` adds; give a scratch
    folder (BENCH_TMP or /tmp). The machine's load average is printed before and after: a
    shared machine's figures mean little without it."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=slices)
    parser.add_argument("--size", type=int, default=size)
    if arguments is not None:
        arguments(parser)
    args = parser.parse_args()
    print(f"load average at the start: {_load_average()}", flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        yield args, Path(tmp)
    print(f"load average at the end: {_load_average()}", flush=True)


def _load_average() -> str:
    """1, 5 and 15 minutes, with this machine's core count."""
    return " / ".join(f"{load:.2f}" for load in os.getloadavg()) + f" ({os.cpu_count()} cores)"


def relabel(files: list[Path], folder: Path, n: int) -> list[Path]:
    """The same images as a new study (new UIDs), so that every send is a new study to process."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = f"MEM-{n:03d}"
        target = folder / path.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out
