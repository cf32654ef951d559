"""The OHIF viewer, served from 127.0.0.1 in front of an Orthanc, for tests and `make viewer`.

OHIF (npm `@ohif/app`, its prebuilt `dist`) is fetched once with `npm pack` into build/ohif
(ignored by git, kept between runs). A small threaded HTTP server serves it and proxies
`/dicom-web` and `/wado` to Orthanc on the same origin: Orthanc sends no CORS headers, so the
viewer cannot talk to it directly. Orthanc 1.10 ignores `includefield` lists whose commas
arrive as `%2C`, so the proxy decodes them.

    python -m tests.viewer fetch            # download OHIF (what `make test` does)
    python -m tests.viewer up --demo        # `make viewer`: Orthanc + OHIF wired to the running node
    python -m tests.viewer serve --orthanc http://127.0.0.1:8042 [--port 3000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import mimetypes
import shutil
import signal
import subprocess
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

OHIF_VERSION = "3.13.2"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "ohif"
PROXIED = ("/dicom-web", "/wado")

APP_CONFIG = """window.config = %s;"""
CONFIG = {
    "routerBasename": "/",
    "showStudyList": True,
    "showWarningMessageForCrossOrigin": False,
    "showCPUFallbackMessage": False,
    "showLoadingIndicator": True,
    "disableConfirmationPrompts": True,
    "measurementTrackingMode": "simplified",
    "extensions": [],
    "modes": [],
    "maxNumberOfWebWorkers": 1,
    "investigationalUseDialog": {"option": "never"},
    "defaultDataSourceName": "orthanc",
    "dataSources": [{
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc", "name": "orthanc",
            "wadoUriRoot": "/wado", "qidoRoot": "/dicom-web", "wadoRoot": "/dicom-web",
            "qidoSupportsIncludeField": False, "imageRendering": "wadors", "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True, "supportsFuzzyMatching": False, "supportsWildcard": True,
            "bulkDataURI": {"enabled": True},
        },
    }],
}


def ensure_ohif(cache: Path = CACHE) -> Path:
    """The OHIF dist folder, fetched with npm the first time (about 50 MB download)."""
    dist = cache / "package" / "dist"
    if (dist / "index.html").is_file() and (cache / f"{OHIF_VERSION}.ok").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to fetch the OHIF viewer: run `make test` (it installs nodejs/npm)")
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob("ohif-app-*.tgz"):
        old.unlink()
    subprocess.run([npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--silent"], cwd=cache, check=True,
                   stdout=subprocess.DEVNULL, timeout=900)
    shutil.rmtree(cache / "package", ignore_errors=True)
    with tarfile.open(next(cache.glob("ohif-app-*.tgz"))) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
        archive.extractall(cache, members=members, filter="data")
    (cache / f"{OHIF_VERSION}.ok").touch()
    return dist


class ViewerServer:
    """OHIF plus a same-origin proxy to one DICOMweb server on 127.0.0.1: an Orthanc (its
    `/dicom-web`), or the node itself (`dicomweb_root="/dicomweb"`, with the API token the proxy
    adds, as a site's reverse proxy in front of the viewer would)."""

    def __init__(self, dist: Path, orthanc_http_port: int, port: int = 0, host: str = "127.0.0.1",
                 dicomweb_root: str = "/dicom-web", authorization: str | None = None):
        self.dist = dist
        self.orthanc_port = orthanc_http_port
        self.dicomweb_root = dicomweb_root
        self.authorization = authorization
        handler = type("Handler", (_Handler,), {"server_ref": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ohif", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "ViewerServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


class _Handler(BaseHTTPRequestHandler):
    server_ref: ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *_: object) -> None:  # quiet: URLs carry study UIDs
        pass

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith(PROXIED):
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, (APP_CONFIG % json.dumps(CONFIG)).encode(), "application/javascript")
        else:
            self._static(path)

    do_POST = do_GET

    def _static(self, path: str) -> None:
        dist = self.server_ref.dist
        target = (dist / path.lstrip("/")).resolve()
        if not target.is_relative_to(dist.resolve()) or not target.is_file():
            target = dist / "index.html"  # the viewer's own routes (/viewer, /segmentation, ...)
        kind = "application/wasm" if target.suffix == ".wasm" else mimetypes.guess_type(target.name)[0]
        self._send(200, target.read_bytes(), kind or "application/octet-stream")

    def _proxy(self) -> None:
        # Orthanc 1.10 splits includefield only on a literal comma.
        path = self.path.replace("%2C", ",").replace("%2c", ",")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "content-type")}
        if path.startswith("/dicom-web"):
            path = self.server_ref.dicomweb_root + path[len("/dicom-web"):]
        if self.server_ref.authorization:
            headers["Authorization"] = self.server_ref.authorization
        connection = http.client.HTTPConnection("127.0.0.1", self.server_ref.orthanc_port, timeout=120)
        try:
            connection.request(self.command, path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            self._send(response.status, payload, response.getheader("Content-Type") or "application/octet-stream")
        finally:
            connection.close()

    def _send(self, status: int, payload: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def up(config_path: Path, http_port: int, viewer_port: int, demo: bool) -> None:
    """`make viewer`: Orthanc in the place of the node's `demo-viewer` destination, OHIF in front
    of it, and (with --demo) a phantom study sent through the running node; serves until Ctrl-C."""
    import pydicom

    from node.config import load_config
    from node.send.scu import associate, storage_contexts
    from tests.orthanc import Orthanc
    from tests.peers import wait_for
    from phantom.study import make_dicom_study

    # SIGTERM (not only Ctrl-C) stops Orthanc too: it runs in its own process group.
    signal.signal(signal.SIGTERM, _interrupt)
    config = load_config(config_path)
    destination = config.destinations["demo-viewer"]
    work = ROOT / "build" / "viewer"
    pacs = Orthanc(work / "orthanc", aet=destination.ae_title)
    pacs.http_port, pacs.dicom_port = http_port, destination.port
    server = ViewerServer(ensure_ohif(), http_port, port=viewer_port)
    pacs.start()
    server.start()
    try:
        print(f"Orthanc (AE {destination.ae_title}, DICOM port {destination.port}): http://127.0.0.1:{http_port}")
        print(f"OHIF: {server.url}", flush=True)
        if demo:
            files, _ = make_dicom_study(work / "study", slices=64, size=128, seed=7)
            study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            pacs.upload(files)  # the modality's images are in the PACS too
            assoc = associate("127.0.0.1", config.scp.port, destination.ae_title, config.scp.ae_title,
                              storage_contexts(files))
            if not assoc.is_established:
                raise SystemExit(f"cannot reach the node on port {config.scp.port}: start it first (make run)")
            for path in files:
                assoc.send_c_store(path)
            assoc.release()
            print("sent the phantom study to the node; waiting for its SEG and SR ...", flush=True)
            wait_for(lambda: {"SEG", "SR"} <= set(pacs.instances_by_modality(study_uid)), timeout=600, interval=1)
            print(f"open {server.url}/viewer?StudyInstanceUIDs={study_uid}", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        pacs.discard()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download the OHIF viewer into build/ohif")
    serve = sub.add_parser("serve", help="serve OHIF in front of an Orthanc")
    serve.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's HTTP address")
    serve.add_argument("--port", type=int, default=3000)
    start = sub.add_parser("up", help="Orthanc as the node's demo-viewer destination, OHIF in front of it")
    start.add_argument("--config", type=Path, default=ROOT / "config" / "node.yaml")
    start.add_argument("--orthanc-port", type=int, default=8042, help="Orthanc's HTTP port")
    start.add_argument("--port", type=int, default=3000, help="OHIF's port")
    start.add_argument("--demo", action="store_true", help="also send a phantom study through the node")
    args = parser.parse_args()
    dist = ensure_ohif()
    if args.command == "up":
        up(args.config, args.orthanc_port, args.port, args.demo)
    elif args.command == "serve":
        server = ViewerServer(dist, urlsplit(args.orthanc).port or 80, port=args.port)
        print(f"OHIF: {server.url}  (Orthanc {args.orthanc})", flush=True)
        try:
            server.httpd.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
