"""What every benchmark shares: the volume size flags and a scratch folder."""

from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def benchmark_run(description: str | None, slices: int = 300, size: int = 512
                  ) -> Iterator[tuple[argparse.Namespace, Path]]:
    """Parse --slices/--size (default 300 x 512 x 512) and give a scratch folder (BENCH_TMP or /tmp)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=slices)
    parser.add_argument("--size", type=int, default=size)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        yield args, Path(tmp)
