"""What every benchmark shares: the volume size flags, a scratch folder, a study sent again as a new one."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pydicom
from pydicom.uid import generate_uid

from common.cpus import cpus_below_machine


@contextmanager
def benchmark_run(description: str | None, slices: int = 300, size: int = 512,
                  arguments: Callable[[argparse.ArgumentParser], None] | None = None
                  ) -> Iterator[tuple[argparse.Namespace, Path]]:
    """Parse --slices/--size (default 300 x 512 x 512) and what `arguments` adds; give a scratch
    folder (BENCH_TMP or /tmp). The machine's load average and speed are printed before and
    after: a shared machine's figures mean little without them."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=slices)
    parser.add_argument("--size", type=int, default=size)
    if arguments is not None:
        arguments(parser)
    args = parser.parse_args()
    print(f"load average at the start: {_load_average()}; {machine_speed()}", flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        yield args, Path(tmp)
    print(f"load average at the end: {_load_average()}; {machine_speed()}", flush=True)


def timed(fn: Callable[[], object], repeat: int = 3) -> tuple[float, object]:
    """The best of `repeat` runs' seconds, and the last run's result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _load_average() -> str:
    """1, 5 and 15 minutes, with this machine's core count (and the CPUs this run may use, when
    an affinity or a CPU quota allows fewer: common.cpus)."""
    fewer = f", {usable} usable" if (usable := cpus_below_machine()) else ""
    return " / ".join(f"{load:.2f}" for load in os.getloadavg()) + f" ({os.cpu_count()} cores{fewer})"


# Run in a fresh interpreter, at module level, as the figures quoted in the README were taken
# (`python -c`): a loop's speed depends on it (globals, not a function's locals), and so does the
# fresh memory (pages this process never had).
_SPEED_PROBE = """
import time
import numpy
started = time.perf_counter()
total = 0
for number in range(10**7):
    total += number
loop = time.perf_counter() - started
started = time.perf_counter()
numpy.empty(157 << 20, dtype=numpy.uint8).fill(1)
print(f"{loop:.2f} {time.perf_counter() - started:.2f}")
"""


def machine_speed() -> str:
    """How fast this hour's machine is, in the two measures its runs move with (README,
    Performance): Python on one core (a loop of 10^7 additions: 0.86-1.68 s seen on this machine
    kind) and fresh memory (157 MiB written into pages the process never had: 0.01-0.63 s seen,
    nearly all of it the kernel's; much less just after another process freed as much)."""
    try:
        probe = subprocess.run([sys.executable, "-c", _SPEED_PROBE], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "machine speed: not measured (the probe took over 120 s)"
    figures = probe.stdout.split()
    if probe.returncode != 0 or len(figures) != 2:
        return f"machine speed: not measured (the probe ended with status {probe.returncode})"
    return f"machine speed: a loop of 10^7 additions {figures[0]} s, 157 MiB of fresh memory written {figures[1]} s"


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
