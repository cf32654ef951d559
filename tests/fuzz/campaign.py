"""Run a fuzz target under atheris for a while and read what libFuzzer printed: executions,
their rate, the coverage reached and the inputs that broke an invariant (findings)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.seeds import CORPUS

REPO_ROOT = Path(__file__).resolve().parents[2]
RSS_LIMIT_MB = 2048  # libFuzzer's ceiling for the whole process (the harnesses bound each input far lower)
INPUT_TIMEOUT_S = 10  # one input taking longer is a finding (libFuzzer's -timeout)


@dataclass(frozen=True)
class Run:
    target: str
    seconds: float
    executions: int
    per_second: int
    coverage: int  # edges of the instrumented modules reached (libFuzzer's "cov")
    features: int  # libFuzzer's "ft": edges and their hit counts
    corpus: int  # inputs kept for the coverage they add, seeds included
    findings: list[Path]
    returncode: int
    output: str

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and not self.findings


_STATUS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")
_STAT = re.compile(r"stat::(\w+):\s+(\d+)")


def fuzz(target: str, seconds: int, workdir: Path, seed: int | None = None) -> Run:
    """Fuzz `target` for `seconds` from its committed corpus; new interesting inputs go to
    workdir/corpus/<target>, findings to workdir/findings/. libFuzzer stops at a finding: the
    run goes on from the grown corpus for the time left. `seed`: libFuzzer's random seed (a
    fixed one makes a short run repeat itself)."""
    grown = workdir / "corpus" / target
    findings = workdir / "findings"
    grown.mkdir(parents=True, exist_ok=True)
    findings.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    executions, outputs, cov, ft, corp, returncode = 0, [], 0, 0, 0, 0
    while (left := int(seconds - (time.monotonic() - started))) > 0:
        command = [sys.executable, "-m", "tests.fuzz.run", target, f"-max_total_time={left}",
                   f"-timeout={INPUT_TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}", "-print_final_stats=1",
                   f"-artifact_prefix={findings}/{target}-", *([f"-seed={seed}"] if seed is not None else []),
                   str(grown), str(CORPUS / target)]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, errors="replace",
                              timeout=left + 120)
        output = done.stdout + done.stderr
        outputs.append(output)
        statuses = _STATUS.findall(output)
        stats = dict(_STAT.findall(output))
        executions += int(stats.get("number_of_executed_units", statuses[-1][0] if statuses else 0))
        if statuses:
            cov, ft, corp = (int(v) for v in statuses[-1][1:])
        returncode = returncode or done.returncode
        if done.returncode == 0 or seed is not None:  # ran its time out (a seeded run stops at its finding)
            break
    elapsed = max(time.monotonic() - started, 1e-9)
    return Run(target, seconds, executions, int(executions / elapsed), cov, ft, corp,
               sorted(findings.glob(f"{target}-*")), returncode, "\n".join(outputs))
