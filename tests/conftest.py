from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.peers import NodeProcess


@pytest.fixture(scope="session", autouse=True)
def _real_peers_installed() -> None:
    missing = [tool for tool in ("storescu", "echoscu", "storescp", "dciodvfy") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"missing Debian tools {missing}: run `make test` (it installs them)")


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start `dicom-node serve` with config overrides; every node is stopped at teardown."""
    started: list[NodeProcess] = []

    def start(workdir: Path | None = None, **overrides: Any) -> NodeProcess:
        node = NodeProcess(workdir or tmp_path / f"node{len(started)}", **overrides)
        started.append(node)
        return node.start()

    yield start
    for node in started:
        node.stop()
