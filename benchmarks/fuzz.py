"""A fuzzing campaign: every coverage-guided target under atheris, then the stateful protocol
fuzzer against a live node, for N minutes in all (README, "Fuzzing").

    python -m benchmarks.fuzz --minutes 30 [--out DIR] [--targets pdu_stream,deflate]

Three quarters of the time goes to the parser targets in equal shares, the rest to the protocol
fuzzer (new random sequences each batch). Printed: per target its executions, executions per
second, coverage (edges of the instrumented modules, libFuzzer's cov and ft), corpus size and
findings; for the protocol fuzzer its sequences, steps (each followed by a C-ECHO), instances
acknowledged on the good associations between them, and the first broken invariant if any. The
grown corpora and any findings stay in --out: a finding goes into tests/fuzz/findings/<target>/
with its fix (tests/test_fuzz.py replays it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.fuzz.campaign import fuzz
from tests.fuzz.protocol import LiveNode, node_for_fuzzing, run
from tests.fuzz.targets import TARGETS
from tests.peers import make_study

PROTOCOL_SHARE = 0.25


def protocol_campaign(seconds: float, workdir: Path) -> str:
    node = node_for_fuzzing(workdir / "node").start()
    batches, outcome = 0, "no invariant broken"
    try:
        live = LiveNode(node, make_study(workdir / "study", slices=1, size=16)[0])
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                run(live, workdir, examples=10, steps=25)
            except Exception as exc:  # hypothesis raised the shrunk failing sequence
                outcome = f"FINDING: {type(exc).__name__}: {str(exc)[:2000]}"
                break
            batches += 1
        return (f"protocol: {batches * 10} sequences, {live.steps} steps ({live.steps / seconds:.1f}/s), "
                f"{len(live.acknowledged)} instances acknowledged and checked; {outcome}")
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--out", type=Path, default=None, help="keep grown corpora and findings here")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated parser targets")
    args = parser.parse_args()
    names = [n for n in args.targets.split(",") if n]
    total = args.minutes * 60
    share = int(total * (1 - PROTOCOL_SHARE) / max(len(names), 1))
    workdir = args.out or Path(tempfile.mkdtemp(prefix="fuzz-campaign-"))
    print(f"{'target':16} {'seconds':>7} {'executions':>11} {'per s':>7} {'cov':>5} {'ft':>6} {'corpus':>6}  findings",
          flush=True)
    for name in names:
        result = fuzz(name, share, workdir)
        print(f"{name:16} {share:7d} {result.executions:11d} {result.per_second:7d} {result.coverage:5d} "
              f"{result.features:6d} {result.corpus:6d}  {[f.name for f in result.findings] or 'none'}"
              f"{'' if result.returncode == 0 or result.findings else f' (exit {result.returncode})'}", flush=True)
    print(protocol_campaign(total * PROTOCOL_SHARE, workdir), flush=True)
    print(f"corpora and findings: {workdir}")


if __name__ == "__main__":
    main()
