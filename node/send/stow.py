"""Result delivery to a DICOMweb service: STOW-RS as a client (PS3.18 10.5, Store Instances).

A result set goes as `multipart/related; type="application/dicom"` requests of at most
`dicomweb.max_request_mb`, each file streamed from disk (requests sends an iterable with a known
length as a Content-Length body, so no request is held in memory and no server has to take a
chunked upload). The response decides the outcome, as C-STORE statuses do (node/send/status.py):

- 200, 202 and 409 carry the Store Instances response data set (PS3.18 10.5.3.1): an instance in
  the Referenced SOP Sequence is stored (its Warning Reason a warning); one in the Failed SOP
  Sequence failed with its Failure Reason, a C-STORE status classified as for C-STORE (0xA7xx
  transient, 0x0111 duplicate counts as delivered, 0xA9xx/0xCxxx/0x0122/0xC122 permanent);
  an instance the response does not name is not known to be stored: transient.
- 408, 429 and 5xx (a busy or restarting service) and a lost connection: transient.
- 401 and 403: the credentials are refused; with OAuth2 the token is fetched again once, then
  it is permanent like every other 4xx (400, 404, 413, 415: the same request fails again).

Why not dicomweb-client: its store_instances builds the whole body in memory from decoded data
sets and raises on 409, losing the per-instance reasons this policy needs.
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests
from authlib.integrations.requests_client import OAuth2Session
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info

from node.config import DestinationConfig, DicomwebDestination
from node.send.delivery import Delivery, Permanent, Transient
from node.send.status import classify_status

CHUNK = 1 << 20
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
REFUSED_CREDENTIALS = frozenset({401, 403})
WITH_RESPONSE_DATASET = frozenset({200, 202, 409})


@dataclass(frozen=True)
class Instance:
    path: Path
    sop_instance_uid: str
    size: int


class MultipartBody:
    """The files of one request as a multipart/related body, read from disk as it is sent.
    `len()` is its exact size, so requests sends a Content-Length header, not a chunked body."""

    def __init__(self, instances: list[Instance]):
        self.boundary = secrets.token_hex(16)
        self.instances = instances
        self._heads = [f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() for _ in instances]
        self._tail = f"--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        return sum(len(h) + i.size + 2 for h, i in zip(self._heads, self.instances)) + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        for head, instance in zip(self._heads, self.instances):
            yield head
            with instance.path.open("rb") as f:
                sent = 0
                while chunk := f.read(CHUNK):
                    sent += len(chunk)
                    yield chunk
            if sent != instance.size:  # the Content-Length promised would be a lie
                raise OSError(f"{instance.path.name} changed while it was sent")
            yield b"\r\n"
        yield self._tail


class StowSender:
    """Sends result sets to DICOMweb destinations; keeps one OAuth2 session (its token) per
    destination so a token is fetched once and renewed by Authlib before it expires."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._oauth: dict[tuple[str, str, str], OAuth2Session] = {}

    def __call__(self, calling_ae: str, peer: DestinationConfig, files: list[Path], timeout: float) -> Delivery:
        web = peer.dicomweb
        assert web is not None
        instances = [_instance(path) for path in files]
        warnings: list[str] = []
        for batch in _batches(instances, int(web.max_request_mb * 1024 * 1024)):
            warnings += self._post(peer, web, batch, timeout)
        return Delivery(warnings)

    def probe(self, peer: DestinationConfig, timeout: float) -> tuple[bool, str]:
        """The console's and the CLI's "echo" for a DICOMweb destination: a QIDO-RS search for
        one study, with the destination's credentials (reachable, TLS and credentials good)."""
        web = peer.dicomweb
        assert web is not None
        try:
            response = self._request(peer, web, "GET", f"{web.url}/studies", timeout, params={"limit": "1"},
                                     headers={"Accept": "application/dicom+json"})
        except (requests.RequestException, OSError) as exc:
            return False, f"{web.url}: no answer ({_why(exc)})"
        ok = response.status_code in (200, 204)
        return ok, f"{web.url}: HTTP {response.status_code} {response.reason}" + ("" if ok else " to a QIDO-RS search")

    def _post(self, peer: DestinationConfig, web: DicomwebDestination, batch: list[Instance], timeout: float) -> list[str]:
        body = MultipartBody(batch)
        try:
            response = self._request(peer, web, "POST", f"{web.url}/studies", timeout, data=body,
                                     headers={"Content-Type": body.content_type, "Accept": "application/dicom+json"})
        except (requests.RequestException, OSError) as exc:
            raise Transient(f"STOW-RS to {web.url}: {_why(exc)}") from None
        status = response.status_code
        if status in TRANSIENT_HTTP:
            raise Transient(f"STOW-RS to {web.url}: HTTP {status} {response.reason}")
        if status in REFUSED_CREDENTIALS:
            raise Permanent(f"STOW-RS to {web.url}: HTTP {status} {response.reason} (credentials refused)")
        if status not in WITH_RESPONSE_DATASET:
            raise Permanent(f"STOW-RS to {web.url}: HTTP {status} {response.reason}")
        return _outcome(web.url, status, response, batch)

    def _request(self, peer: DestinationConfig, web: DicomwebDestination, method: str, url: str, timeout: float,
                 **kwargs: object) -> requests.Response:
        verify: str | bool = str(peer.tls.ca) if peer.tls.ca else True
        cert = (str(peer.tls.certificate), str(peer.tls.private_key)) if peer.tls.certificate and peer.tls.private_key else None
        auth = web.auth
        if auth.kind == "oauth2":
            session = self._oauth_session(web, verify, cert, timeout)
            response = session.request(method, url, timeout=timeout, verify=verify, cert=cert, **kwargs)
            if response.status_code in REFUSED_CREDENTIALS:  # revoked or rotated: one fresh token
                with self._lock:
                    self._oauth.pop(_oauth_key(web), None)
                session = self._oauth_session(web, verify, cert, timeout)
                response = session.request(method, url, timeout=timeout, verify=verify, cert=cert, **kwargs)
            return response
        headers = dict(kwargs.pop("headers", {}) or {})  # type: ignore[call-overload]
        basic = None
        if auth.kind == "bearer":
            headers["Authorization"] = f"Bearer {_secret(auth.token_file)}"
        elif auth.kind == "basic":
            basic = (auth.username or "", _secret(auth.password_file))
        return requests.request(method, url, timeout=timeout, verify=verify, cert=cert, auth=basic, headers=headers,
                                **kwargs)  # type: ignore[arg-type]

    def _oauth_session(self, web: DicomwebDestination, verify: str | bool, cert: tuple[str, str] | None,
                       timeout: float) -> OAuth2Session:
        key = _oauth_key(web)
        with self._lock:
            session = self._oauth.get(key)
            if session is None:
                auth = web.auth
                session = OAuth2Session(auth.client_id, _secret(auth.client_secret_file), scope=auth.scope,
                                        token_endpoint=auth.token_url, grant_type="client_credentials")
                session.verify, session.cert = verify, cert
                try:
                    session.fetch_token(auth.token_url, grant_type="client_credentials", timeout=timeout)
                except requests.RequestException as exc:
                    raise Transient(f"no token from {auth.token_url}: {_why(exc)}") from None
                except Exception as exc:  # Authlib's OAuthError: the provider refused the client
                    raise Permanent(f"{auth.token_url} gave no token: {type(exc).__name__}: {exc}") from None
                self._oauth[key] = session
            return session


def _oauth_key(web: DicomwebDestination) -> tuple[str, str, str]:
    return (web.url, web.auth.token_url or "", web.auth.client_id or "")


def _secret(path: Path | None) -> str:
    """A secret from its file, read at each use (rotation without a restart)."""
    if path is None:
        return ""
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise Permanent(f"cannot read the secret file {path}: {exc.strerror}") from None


def _instance(path: Path) -> Instance:
    meta = read_file_meta_info(path)
    return Instance(path, str(meta.MediaStorageSOPInstanceUID), path.stat().st_size)


def _batches(instances: list[Instance], limit: int) -> Iterator[list[Instance]]:
    """Consecutive groups of at most `limit` bytes (a larger file alone)."""
    batch: list[Instance] = []
    size = 0
    for instance in instances:
        if batch and size + instance.size > limit:
            yield batch
            batch, size = [], 0
        batch.append(instance)
        size += instance.size
    if batch:
        yield batch


def _outcome(url: str, status: int, response: requests.Response, batch: list[Instance]) -> list[str]:
    """Warnings for a response that stored every instance; Transient or Permanent otherwise."""
    dataset = _response_dataset(response)
    if dataset is None:
        if status == 200:
            return []  # all stored, and the service says no more (an empty 200 is common)
        raise (Permanent if status == 409 else Transient)(
            f"STOW-RS to {url}: HTTP {status} {response.reason} with no readable response data set")
    stored = {str(getattr(item, "ReferencedSOPInstanceUID", "")): getattr(item, "WarningReason", None)
              for item in dataset.get("ReferencedSOPSequence", [])}
    failed = {str(getattr(item, "ReferencedSOPInstanceUID", "")): getattr(item, "FailureReason", None)
              for item in dataset.get("FailedSOPSequence", [])}
    warnings: list[str] = []
    transient: list[str] = []
    permanent: list[str] = []
    for instance in batch:
        uid = instance.sop_instance_uid
        if uid in failed:
            reason = failed[uid]
            kind = classify_status(int(reason)) if reason is not None else "permanent"
            text = f"{uid}: failure reason " + (f"0x{int(reason):04X}" if reason is not None else "not given")
            if kind == "warning":  # 0x0111: the service holds this very object already
                warnings.append(text)
            else:
                (transient if kind == "transient" else permanent).append(text)
        elif uid in stored:
            if stored[uid] is not None:
                warnings.append(f"{uid}: warning reason 0x{int(stored[uid]):04X}")
        elif status == 200 and not failed and not stored:
            continue  # a 200 with an empty data set: all stored
        else:
            transient.append(f"{uid}: not in the response")
    if permanent:
        raise Permanent(f"STOW-RS to {url}: {len(permanent)} of {len(batch)} refused: " + "; ".join(permanent[:5]))
    if transient:
        raise Transient(f"STOW-RS to {url}: {len(transient)} of {len(batch)} not stored: " + "; ".join(transient[:5]))
    return warnings


def _response_dataset(response: requests.Response) -> Dataset | None:
    """The response data set in its JSON form (PS3.18 F.2), or None (no body, or XML)."""
    if not response.content or "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        document = json.loads(response.content)
        if isinstance(document, list):  # some services wrap the one data set in an array
            document = document[0] if document else {}
        return Dataset.from_json(document)
    except (ValueError, TypeError, KeyError, IndexError):
        return None


def _why(exc: BaseException) -> str:
    """A short reason for a failed request, without the URL's query or any header."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS failed (certificate not trusted, or the wrong host)"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "connection refused or lost"
    return type(exc).__name__
