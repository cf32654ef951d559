from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

from tests.peers import NodeProcess

if TYPE_CHECKING:
    from tests.triton_server import TritonCpuServer
    from tests.orthanc import Orthanc
    from tests.postgres import PostgresServer


@pytest.fixture(scope="session", autouse=True)
def _real_peers_installed() -> None:
    missing = [tool for tool in ("storescu", "echoscu", "storescp", "dciodvfy", "rsyslogd", "jing")
               if not shutil.which(tool)]
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


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Callable[..., "Orthanc"]]:
    """Start Orthanc PACS instances for a test; each is stopped at teardown."""
    from tests.orthanc import Orthanc

    started: list[Orthanc] = []

    def start(**kwargs: Any) -> Orthanc:
        pacs = Orthanc(tmp_path / f"orthanc{len(started)}", **kwargs).start()
        started.append(pacs)
        return pacs

    yield start
    for pacs in started:
        pacs.discard()


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with the test threshold model (and the committed demo model)."""
    from tests.models import build_test_repository

    return build_test_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator["TritonCpuServer"]:
    """The real Triton server (from the nvidia-pytriton wheel), once per test session."""
    from tests.triton_server import TritonCpuServer

    log = tmp_path_factory.mktemp("triton") / "triton.log"
    server = TritonCpuServer(model_repository, log)
    names = tuple(p.name for p in model_repository.iterdir() if (p / "node.yaml").exists())
    server.start(timeout=120, ready_models=names)
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def postgres() -> Iterator["PostgresServer"]:
    """A real PostgreSQL server (Debian's package), once per test session."""
    from tests.postgres import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()
