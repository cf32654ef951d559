"""Result delivery to a DICOM AE: every file over one association, every status checked
(node/send/status.py says what each status means for a sender)."""

from __future__ import annotations

from pathlib import Path

from node.config import DestinationConfig
from node.send.delivery import Delivery, Permanent, Transient
from node.send.scu import NotAccepted, associate, destination_ssl_context, rejection, send_file, storage_contexts
from node.send.status import classify_status


def send_cstore(calling_ae: str, peer: DestinationConfig, files: list[Path], timeout: float) -> Delivery:
    """C-STORE the files over one association; raises Transient or Permanent on the first failure."""
    assert peer.ae_title and peer.host and peer.port  # a DIMSE destination (DestinationConfig checks)
    assoc = associate(peer.host, peer.port, calling_ae, peer.ae_title, storage_contexts(files),
                      destination_ssl_context(peer.tls), timeout=timeout)
    refused = rejection(assoc)
    if not assoc.is_established and refused is not None and not refused.aborted:
        # from the PDU itself: pynetdicom may see the connection closed by a quick rejecter first
        # and call it an abort (is_rejected false)
        raise (Permanent if refused.permanent else Transient)(f"association rejected by {peer.where} ({refused.text})")
    if not assoc.is_established:
        raise Transient(f"no association with {peer.where} (refused, reset or timed out)")
    warnings: list[str] = []
    try:
        for number, path in enumerate(files):
            try:
                response = send_file(assoc, path)
            except NotAccepted as exc:  # the peer takes neither this syntax nor uncompressed
                raise Permanent(str(exc)) from None
            status = getattr(response, "Status", None)
            refused = rejection(assoc)
            if status is None and refused is not None and number == 0:
                # aborted on purpose before accepting anything: the peer refuses us
                raise Permanent(f"{peer.where} refused C-STORE: {refused.text}")
            if status is None:
                raise Transient(f"no response for {path.name} (connection lost, aborted or timed out)")
            kind = classify_status(int(status))
            if kind == "warning":
                warnings.append(f"{path.name}: status 0x{int(status):04X}")
            elif kind != "success":
                error = getattr(response, "ErrorComment", "") or ""
                message = f"{path.name}: status 0x{int(status):04X} {error}".strip()
                raise (Transient if kind == "transient" else Permanent)(message)
    finally:
        if assoc.is_established:
            assoc.release()
    return Delivery(warnings)
