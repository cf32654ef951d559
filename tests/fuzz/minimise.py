"""Shrink a finding to the smallest input that still breaks its harness the same way:

    python -m tests.fuzz.minimise TARGET FILE [--out FILE]

By hand because libFuzzer's -minimize_crash re-runs argv[0] as a program, which atheris's module
entry is not. Greedy delta debugging: cut chunks (halves, quarters, ... single bytes) while the
harness still fails with the same exception type and message (digits aside: sizes and offsets
change as the input shrinks), then lower each remaining byte to 0 where that keeps it failing.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from tests.fuzz.targets import TARGETS, quiet

MAX_TRIES = 20_000  # harness runs, at most


def failure(target: str, data: bytes) -> str | None:
    """How the harness fails on `data` (type and message without digits), or None."""
    try:
        TARGETS[target].harness(data)
    except Exception as exc:  # noqa: BLE001 - any exception is the finding being kept
        return f"{type(exc).__name__}: {re.sub(r'[0-9]+', '#', str(exc))[:200]}"
    return None


def minimise(target: str, data: bytes) -> bytes:
    """The smallest input found that fails as `data` does (ValueError if `data` does not fail)."""
    wanted = failure(target, data)
    if wanted is None:
        raise ValueError("the input does not break the harness")
    tries = 0
    chunk = max(len(data) // 2, 1)
    while chunk >= 1 and tries < MAX_TRIES:
        start = 0
        while start < len(data) and tries < MAX_TRIES:
            candidate = data[:start] + data[start + chunk:]
            tries += 1
            if candidate and failure(target, candidate) == wanted:
                data = candidate  # the same start now names the next chunk
            else:
                start += chunk
        chunk //= 2
    for i in range(len(data)):
        if tries >= MAX_TRIES:
            break
        if data[i]:
            candidate = data[:i] + b"\0" + data[i + 1:]
            tries += 1
            if failure(target, candidate) == wanted:
                data = candidate
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("file", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: FILE.min")
    args = parser.parse_args()
    quiet()
    data = args.file.read_bytes()
    smaller = minimise(args.target, data)
    out = args.out or args.file.with_name(args.file.name + ".min")
    out.write_bytes(smaller)
    print(f"{len(data)} -> {len(smaller)} bytes, {failure(args.target, smaller)}: {out}")


if __name__ == "__main__":
    main()
