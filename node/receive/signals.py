"""Completion signal SCPs: MPPS (PS3.4 Annex F, N-CREATE and N-SET from modalities) and IAN
(PS3.4 Annex R, N-CREATE from a PACS).

Each request is checked, then committed to the index (node.store.signals) before the response,
so an acknowledged signal survives a crash. When a step ends (COMPLETED or DISCONTINUED) or a
notification arrives, the service is told at once (`on_signal(study_uid)`): the study completes
as soon as every instance the signal lists has arrived, without waiting for the quiet period.
Every refusal gets its status from PS3.4 F.7.2 / R.2 / PS3.7 Annex C and a log line with UIDs only.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    InstanceAvailabilityNotification,
    ModalityPerformedProcedureStep,
)
from sqlalchemy.exc import SQLAlchemyError

from common import logs
from node.store.index import Db
from node.store.signal_forwards import SignalForwards, encoded
from node.store.signals import CompletionSignals, DuplicateSignal, SignalKind, StepEnded, StepState, UnknownStep
from node.store.spool import InvalidUID, checked_uid

log = logging.getLogger("node.receive")

SUCCESS = 0x0000
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110  # for N-SET: "Performed Procedure Step object may no longer be updated"
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
NO_SUCH_SOP_CLASS = 0x0118
MISSING_ATTRIBUTE = 0x0120
RESOURCE_LIMITATION = 0x0213  # the index could not be written
SIGNAL_SOP_CLASSES = (ModalityPerformedProcedureStep, InstanceAvailabilityNotification)


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def _state(ds: Dataset, required: bool) -> StepState | None:
    value = str(ds.get("PerformedProcedureStepStatus", "") or "").strip()
    if not value and not required:
        return None
    try:
        return StepState(value)
    except ValueError:
        raise _Refused(INVALID_ATTRIBUTE_VALUE, "Performed Procedure Step Status is not IN PROGRESS,"
                                                " COMPLETED or DISCONTINUED") from None


def _uid(value: object, name: str, missing_status: int) -> str:
    """A UID from the request: `missing_status` when it is absent, 0x0106 when it is not a UID."""
    if not str(value or "").strip():
        raise _Refused(missing_status, f"{name} is missing")
    try:
        return checked_uid(value, name)
    except InvalidUID as exc:
        raise _Refused(INVALID_ATTRIBUTE_VALUE, str(exc)) from None


def _scheduled_studies(ds: Dataset) -> list[str]:
    items = ds.get("ScheduledStepAttributesSequence") or []
    if not items:
        raise _Refused(MISSING_ATTRIBUTE, "no Scheduled Step Attributes Sequence")
    return [_uid(item.get("StudyInstanceUID"), "StudyInstanceUID", MISSING_ATTRIBUTE) for item in items]


def _performed_instances(ds: Dataset) -> list[str] | None:
    """The SOP Instance UIDs an MPPS Performed Series Sequence lists (None: not in this request)."""
    if "PerformedSeriesSequence" not in ds:
        return None
    return [_uid(item.get("ReferencedSOPInstanceUID"), "ReferencedSOPInstanceUID", INVALID_ATTRIBUTE_VALUE)
            for series in ds.PerformedSeriesSequence
            for name in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence")
            for item in series.get(name) or []]


def _available_instances(ds: Dataset) -> list[str]:
    """The SOP Instance UIDs an IAN's Referenced Series Sequence lists as retrievable (an
    UNAVAILABLE one will never be sent: it is not waited for)."""
    return [_uid(item.get("ReferencedSOPInstanceUID"), "ReferencedSOPInstanceUID", INVALID_ATTRIBUTE_VALUE)
            for series in ds.get("ReferencedSeriesSequence") or []
            for item in series.get("ReferencedSOPSequence") or []
            if str(item.get("InstanceAvailability", "") or "").strip() != "UNAVAILABLE"]


class SignalScp:
    """Handlers for EVT_N_CREATE (MPPS, IAN) and EVT_N_SET (MPPS)."""

    def __init__(self, signals: CompletionSignals, on_signal: Callable[[str], None],
                 forward_to: list[str] | None = None):
        """`forward_to`: destinations that get every accepted MPPS request (completion.mpps_forward)."""
        self.signals = signals
        self.on_signal = on_signal
        self.forward_to = list(forward_to or [])

    def _forwards(self, uid: str, operation: str, ds: Dataset) -> Callable[[Db], None] | None:
        """Queue the request for the forward destinations, in the transaction that stores it."""
        if not self.forward_to:
            return None
        try:
            data = encoded(ds)
        except Exception as exc:  # noqa: BLE001 - an element pydicom cannot write: told, not hidden
            logs.event(log, "mpps_forward_not_queued", logging.WARNING, sop_instance_uid=uid, operation=operation,
                       reason=type(exc).__name__)
            return None
        return lambda db: SignalForwards.queue(db, uid, operation, self.forward_to, data, time.time())

    def handle_create(self, event: Event) -> tuple[int, Dataset | None]:
        request = event.request
        uid = request.AffectedSOPInstanceUID
        reply = None
        if uid is None:  # PS3.7 10.1.5.1.4: the SCP assigns one and returns it
            uid = generate_uid()
            reply = Dataset()
            reply.AffectedSOPInstanceUID = uid
        calling = event.assoc.requestor.ae_title
        try:
            ds = self._decoded(lambda: event.attribute_list)
            if request.AffectedSOPClassUID == ModalityPerformedProcedureStep:
                kind, studies, listed = SignalKind.MPPS, _scheduled_studies(ds), _performed_instances(ds)
                if _state(ds, required=True) is not StepState.IN_PROGRESS:
                    raise _Refused(INVALID_ATTRIBUTE_VALUE, "a step is created IN PROGRESS (PS3.4 F.7.2.1)")
            elif request.AffectedSOPClassUID == InstanceAvailabilityNotification:
                kind = SignalKind.IAN
                studies = [_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID", MISSING_ATTRIBUTE)]
                listed = _available_instances(ds)
            else:
                raise _Refused(NO_SUCH_SOP_CLASS, "N-CREATE is taken for MPPS and IAN only")
            self.signals.create(kind, str(uid), studies, calling, time.time(), listed,
                                also=self._forwards(str(uid), "n_create", ds) if kind is SignalKind.MPPS else None)
        except DuplicateSignal:
            return self._refuse("n_create", str(uid), DUPLICATE_SOP_INSTANCE, "it exists already")
        except _Refused as exc:
            return self._refuse("n_create", str(uid), exc.status, str(exc))
        except SQLAlchemyError as exc:
            return self._refuse("n_create", str(uid), RESOURCE_LIMITATION, f"index: {type(exc).__name__}")
        logs.event(log, f"{kind.value}_created", sop_instance_uid=str(uid), study_uids=studies,
                   instances=len(listed) if listed is not None else None)
        if kind is SignalKind.IAN:
            for study_uid in studies:
                self.on_signal(study_uid)
        return SUCCESS, reply

    def handle_set(self, event: Event) -> tuple[int, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID)
        try:
            ds = self._decoded(lambda: event.modification_list)
            state = _state(ds, required=False)
            studies = self.signals.update_step(uid, state, _performed_instances(ds), time.time(),
                                               also=self._forwards(uid, "n_set", ds))
        except UnknownStep:
            return self._refuse("n_set", uid, NO_SUCH_SOP_INSTANCE, "no such step")
        except StepEnded:
            return self._refuse("n_set", uid, PROCESSING_FAILURE, "the step has ended: it may no longer be updated")
        except _Refused as exc:
            return self._refuse("n_set", uid, exc.status, str(exc))
        except SQLAlchemyError as exc:
            return self._refuse("n_set", uid, RESOURCE_LIMITATION, f"index: {type(exc).__name__}")
        logs.event(log, "mpps_updated", sop_instance_uid=uid, state=(state.value if state else None))
        if state is not None and state is not StepState.IN_PROGRESS:
            for study_uid in studies:
                self.on_signal(study_uid)
        return SUCCESS, None

    @staticmethod
    def _decoded(read: Callable[[], Dataset]) -> Dataset:
        try:
            ds = read()
            for element in ds.iterall():  # decode every value now: a defect is the request's
                _ = element.value
            return ds
        except Exception:  # noqa: BLE001 - any decoding defect: the list is unusable
            raise _Refused(INVALID_ATTRIBUTE_VALUE, "the attribute list cannot be decoded") from None

    @staticmethod
    def _refuse(operation: str, uid: str, status: int, reason: str) -> tuple[int, None]:
        logs.event(log, "signal_refused", logging.WARNING, operation=operation, sop_instance_uid=uid,
                   status=f"0x{status:04X}", reason=reason)
        return status, None
