"""Orthanc (Debian package) as the PACS in tests: own config, loopback ports, stopped by PID."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.peers import free_port, wait_for
from tests.processes import stop_process_group

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    def __init__(self, workdir: Path, aet: str = "ORTHANC", modalities: dict[str, tuple[str, str, int]] | None = None,
                 always_allow_store: bool = True, users: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config_path = self.workdir / "orthanc.json"
        self.modalities = dict(modalities or {})
        self.always_allow_store = always_allow_store
        self.users = dict(users or {})  # HTTP basic auth on its REST and DICOMweb APIs
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        config = {
            "Name": "test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": self.always_allow_store,
            "DicomModalities": {name: list(value) for name, value in self.modalities.items()},
            "DicomScuTimeout": 30,
            "StableAge": 1,
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self) -> "Orthanc":
        self.write_config()
        log = open(self.workdir / "orthanc.log", "ab")
        # TCP_NODELAY=1: Debian's dcmtk (inside Orthanc) otherwise waits ~40 ms per C-STORE.
        self.process = subprocess.Popen(["Orthanc", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, TCP_NODELAY="1"), start_new_session=True)
        log.close()
        wait_for(lambda: self._alive(), timeout=30)
        return self

    def _alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def stop(self) -> None:
        stop_process_group(self.process, 20)
        self.process = None

    def discard(self) -> None:
        """Stopped at once (SIGKILL), for a teardown that throws away what it holds: Orthanc 1.10
        takes about 3 s to stop cleanly (its web server alone 2 s), some forty times a suite."""
        stop_process_group(self.process, 0)
        self.process = None

    # -- REST ------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | dict | None = None, timeout: float = 120) -> Any:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=timeout) as response:
            payload = response.read()
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, files: list[Path]) -> None:
        for path in files:
            self.request("POST", "/instances", Path(path).read_bytes())

    def study_id(self, study_uid: str) -> str | None:
        found = self.request("POST", "/tools/lookup", study_uid.encode())
        return next((f["ID"] for f in found if f["Type"] == "Study"), None)

    def instances_by_modality(self, study_uid: str) -> dict[str, list[dict[str, Any]]]:
        """The study's instances (with their main tags), grouped by series Modality."""
        study = self.study_id(study_uid)
        if study is None:
            return {}
        out: dict[str, list[dict[str, Any]]] = {}
        for series in self.get(f"/studies/{study}/series"):
            modality = series["MainDicomTags"].get("Modality", "")
            for instance in self.get(f"/series/{series['ID']}/instances"):
                out.setdefault(modality, []).append(instance)
        return out

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.request("GET", f"/instances/{orthanc_id}/file")

    def forward_study(self, modality: str, study_uid: str) -> Any:
        study = self.study_id(study_uid)
        return self.request("POST", f"/modalities/{modality}/store", {"Resources": [study], "Synchronous": True})
