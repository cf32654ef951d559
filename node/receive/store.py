"""Storing one received instance, whichever way it came (C-STORE, STOW-RS): the promises of
"Receiving" in one place.

What makes an acknowledgement safe: read the routing tags and check the whole data set is
well-formed (no pixel decoding), refuse a SOP Instance UID that is already held elsewhere, write
the bytes as received, fsync, rename, index. The caller answers with the status `store` returns
(a C-STORE response, a STOW-RS response's Referenced or Failed SOP Sequence item).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
)
import pydicom
from pydicom.uid import (
    BlendingSoftcopyPresentationStateStorage,
    ColorSoftcopyPresentationStateStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    PseudoColorSoftcopyPresentationStateStorage,
)

from common import logs
from node.config import NodeConfig
from node.receive.tags import RoutingTags, UnreadableDataset, read_routing_tags
from node.receive.validate import MalformedDataset, check_dataset, transfer_syntax_uid
from node.store.filemeta import encode_file_meta, presentation_address
from node.store.index import AlreadyIndexed, Index, InstanceConflict, InstanceRecord, Placement
from node.store.journal import FileIdentity, identify
from node.store.modelruns import ModelRuns, verdict_of
from node.store.signals import CompletionSignals
from node.store.spool import OutOfSpace, Spool, same_dataset

# A reader's notes on a study (PS3.3 A.35.4 Key Object Selection, A.33 Presentation States):
# stored when they arrive after completion, but they are no new images and never reprocess it.
READING_NOTES = frozenset({KeyObjectSelectionDocumentStorage, GrayscaleSoftcopyPresentationStateStorage,
                           ColorSoftcopyPresentationStateStorage, PseudoColorSoftcopyPresentationStateStorage,
                           BlendingSoftcopyPresentationStateStorage})
log = logging.getLogger("node.receive")
KNOWN_STUDIES_MAX = 4096  # study UIDs a receiver remembers having indexed

# What the node takes, over DIMSE (the presentation contexts it accepts) and STOW-RS alike.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]

# Statuses (PS3.4 B.2.3; 0xCxxx is "Error: Cannot understand", the xxx ours)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # disk below storage.min_free_mb, or the write failed
CANNOT_UNDERSTAND = 0xC210  # routing tags unreadable, UIDs missing or invalid
PROCESSING_FAILURE = 0xC211  # the data set does not match its envelope (SOP class/instance UID, STOW's study)
MALFORMED_DATASET = 0xC212  # not well-formed to its end (lengths, items, sequences, trailing bytes)
PIXEL_DATA_INVALID = 0xC213  # native Pixel Data of the wrong size, or a broken fragment sequence
SOP_INSTANCE_CONFLICT = 0xC214  # SOP Instance UID already held by another study/series/SOP class


def reopens_study(config: NodeConfig, sop_class_uid: str) -> bool:
    """Whether a new instance for a complete study reopens it (`completion.after_complete:
    reprocess`): a reader's notes (a KOS, a presentation state) are kept, they never do."""
    return config.completion.after_complete == "reprocess" and sop_class_uid not in READING_NOTES


@dataclass(frozen=True)
class Incoming:
    """One instance as it arrived: its data set's bytes (no file meta) in `transfer_syntax`, the
    SOP class and instance its envelope announced (a C-STORE request, a STOW part's file meta),
    who sent it, and its association's (or STOW request's) row."""

    payload: memoryview
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    calling: str
    called: str
    peer: str
    association_id: int | None
    announced_by: str = "request"  # what announced the UIDs, for a refusal's reason
    # a DIMSE association: the stored file names its calling and called AE titles and the peer's
    # presentation address (PS3.10 7.1; a STOW-RS request has none: node/store/filemeta.py)
    by_association: bool = True
    study_uid: str | None = None  # STOW-RS to /studies/{study}: the study it must belong to


@dataclass(frozen=True)
class Stored:
    status: int
    study_uid: str | None  # of a stored instance
    patient_id: str | None


class InstanceStore:
    """Stores instances into the spool and the index. `on_study_opened(study_uid, deadline)`:
    a study began (or began again) receiving: the service arms its completion."""

    def __init__(self, config: NodeConfig, index: Index, spool: Spool, on_study_opened: Callable[[str, float], None]):
        self.config = config
        self.index = index
        self.spool = spool
        self.on_study_opened = on_study_opened
        # Studies this process has indexed: an arrival for another one commits durably at once
        # (Index.record_instance would roll a lazy attempt back and try again). Bounded; a
        # study removed since only costs that retry.
        self._indexed_studies: set[str] = set()
        # Whether the next instance is taken for a new one: filed without the look-up that comes
        # first for a resend or a replacement (see _file). A guess, per receiver, by the last one.
        self._expect_new = True

    def store(self, incoming: Incoming) -> Stored:
        """Store one instance, or refuse it with the status that says why (nothing of it kept
        but in quarantine); the status is the acknowledgement's: SUCCESS only once the file is
        durable and its index row committed (a new instance's row lazily: see
        Index.record_instance)."""
        held = ExitStack()  # the staged file's descriptor, until its settle (Spool.stage_held)
        try:
            status, tags = self._store(incoming, held)
        finally:
            try:  # a copy not placed (refused, kept aside): its close's error changes no answer
                held.close()
            except OSError as exc:
                logs.event(log, "staged_close_failed", logging.WARNING, error=exc.strerror)
        return Stored(status, tags.study_uid if tags else None, tags.patient_id if tags else None)

    def _store(self, incoming: Incoming, held: ExitStack) -> tuple[int, RoutingTags | None]:
        payload = incoming.payload
        if not self.spool.has_room(len(payload)):
            logs.event(log, "store_refused_disk_low", logging.ERROR, sop_instance_uid=incoming.sop_instance_uid)
            return OUT_OF_RESOURCES, None
        transfer_syntax = transfer_syntax_uid(incoming.transfer_syntax)
        calling = incoming.calling
        try:
            header = encode_file_meta(incoming.sop_class_uid, incoming.sop_instance_uid, str(transfer_syntax),
                                      calling if _is_ae_title(calling) else None,
                                      *_association_origin(incoming))
        except ValueError as exc:  # not ASCII (UnicodeEncodeError), or over 64 characters
            reason = "a UID that is not ASCII" if isinstance(exc, UnicodeEncodeError) else "a UID longer than 64 characters"
            # kept for inspection as any refused data set, under a file meta without the UIDs
            where = self.spool.quarantine((encode_file_meta("", "", str(transfer_syntax)), payload),
                                          f"{reason} in the {incoming.announced_by} (transfer syntax {transfer_syntax})")
            logs.event(log, "instance_refused", logging.WARNING, reason=reason, status="0xC210", file=where.name)
            return CANNOT_UNDERSTAND, None
        chunks = (header, payload)
        try:
            tags = read_routing_tags(payload, transfer_syntax)
            if tags.sop_instance_uid != incoming.sop_instance_uid:
                raise _Mismatch(f"SOPInstanceUID differs from the {incoming.announced_by}'s SOP Instance UID")
            if tags.sop_class_uid != incoming.sop_class_uid:
                raise _Mismatch(f"SOPClassUID differs from the {incoming.announced_by}'s SOP Class UID")
            if incoming.study_uid is not None and tags.study_uid != incoming.study_uid:
                raise _Mismatch("StudyInstanceUID differs from the study the STOW-RS request was sent to")
            if not tags.whole:  # (read_routing_tags walks it whole on the way when it can)
                check_dataset(payload, transfer_syntax)
        except (UnreadableDataset, _Mismatch, MalformedDataset) as exc:
            if isinstance(exc, MalformedDataset):
                status = PIXEL_DATA_INVALID if exc.pixel else MALFORMED_DATASET
            else:
                status = CANNOT_UNDERSTAND if isinstance(exc, UnreadableDataset) else PROCESSING_FAILURE
            where = self.spool.quarantine(chunks, f"{exc} (transfer syntax {transfer_syntax})")
            logs.event(
                log,
                "instance_quarantined",
                logging.WARNING,
                reason=str(exc),
                status=f"0x{status:04X}",
                file=where.name,
                sop_instance_uid=incoming.sop_instance_uid if isinstance(exc, MalformedDataset) else None,
                calling_ae=calling,
            )
            return status, None

        return self._file(incoming, held, tags, chunks, transfer_syntax, new_only=self._expect_new)

    def _file(self, incoming: Incoming, held: ExitStack, tags: RoutingTags, chunks: tuple[bytes, memoryview],
              transfer_syntax: str, new_only: bool) -> tuple[int, RoutingTags | None]:
        """Place and index a checked instance, and make it durable. `new_only`: taken for a new
        instance, it is staged and indexed without a look-up first; if the index holds its SOP
        Instance UID after all (a resend, a replacement, a conflict), nothing was placed or written
        but the staged copy, which goes, and it is filed again the careful way: looked up first,
        compared, and refused before anything is written when it conflicts. The look-up is a
        read of its own (about 0.1 ms of a receiver's ~1.8 ms per instance), and under the
        index's write lock the same check is made again anyway."""
        header, payload = chunks
        calling = incoming.calling
        name = self.spool.instance_name(tags.study_uid, tags.series_uid, tags.sop_instance_uid)
        target = self.spool.located(name)
        record = InstanceRecord(
            sop_instance_uid=tags.sop_instance_uid,
            sop_class_uid=tags.sop_class_uid,
            series_uid=tags.series_uid,
            study_uid=tags.study_uid,
            patient_id=tags.patient_id,
            transfer_syntax=str(transfer_syntax),
            path=name,
            size=len(header) + payload.nbytes,
            calling_ae=calling,
            called_ae=incoming.called,
            peer=incoming.peer,
            series=tags.series,
            association_id=incoming.association_id,
        )
        # The SOP Instance UID rule (README, "Receiving"): never move or replace an instance
        # indexed under another study, series or SOP class; in the same series compare bytes
        # before writing anything to the study, so an identical resend touches nothing there. The
        # rule is checked again under the index's write lock, where the staged file is renamed
        # into place (and where an instance taken for new is found indexed: AlreadyIndexed).
        existing = None if new_only else self.index.find_instance(tags.sop_instance_uid)
        if not new_only:
            self._expect_new = existing is None
        try:
            InstanceConflict.check(record, existing)
        except InstanceConflict as exc:
            return self._conflict(exc, chunks, record, None), None
        identical = (
            existing is not None
            and existing["path"] == record.path
            and existing["transfer_syntax"] == record.transfer_syntax
            and same_dataset(target, payload)
        )
        staged: str | None = None
        # A new instance is made durable once placed (Spool.settle: by the intake journal, or
        # fsynced); a replacement's copy is fsynced before it is renamed over the acknowledged one.
        synced = existing is not None
        previous: str | None = None  # the copy a replacement renames over, until the index commits
        placed = False
        staged_file: FileIdentity | None = None  # the staged file's: the journal records it once placed
        staged_fd = -1  # the descriptor it was written through, open until `held` closes

        def place() -> None:  # under the index's write lock: the rename only, its fsyncs after
            nonlocal staged, staged_file, staged_fd, placed, previous, synced
            if staged is None:  # it was identical, and the indexed copy went meanwhile (retention)
                (staged, staged_file, staged_fd), synced = self.spool.stage_held(chunks, held), True
            previous = self.spool.keep_previous(target)
            if previous is not None and not synced:  # another association placed it first: a replacement
                self.spool.sync(staged)
                synced = True
            placed = True  # from here the file at `target` may be the newcomer's
            self.spool.place(staged, target, durable=False)
            staged = None

        def unplace() -> None:  # the transaction failed after place(): still under the write lock
            nonlocal placed, previous
            if placed and previous is not None:  # the acknowledged copy it replaced goes back
                self.spool.restore(previous, target)
            elif placed:  # a new instance: its row is never committed
                self.spool.discard(target)
            elif previous is not None:
                self.spool.discard(previous)
            placed, previous = False, None

        completion = self.config.completion
        now = 0.0
        staging = held  # what closes the staged copy's descriptor (Spool.stage_held)
        if new_only:  # this pass's own, closed at once if the copy goes (AlreadyIndexed, below)
            staging = ExitStack()
            held.callback(staging.close)
        try:
            if not identical:
                staged, staged_file, staged_fd = self.spool.stage_held(chunks, staging, durable=synced)
            now = time.time()
            arrival = self.index.record_instance(
                record,
                now=now,
                quiet_period=completion.quiet_period_for(calling),
                reopen=reopens_study(self.config, tags.sop_class_uid),
                identical=identical,
                place=place,
                unplace=unplace,
                also=lambda db: CompletionSignals.note_instance(db, tags.study_uid, tags.sop_instance_uid,
                                                                tags.accession_number, tags.count),
                # the file is durable before the acknowledgement (journalled, or fsynced with its
                # folder): a row a power cut takes is indexed again from it at start-up (a
                # replacement's commits durably)
                lazy_commit=(existing is None or identical) and tags.study_uid in self._indexed_studies,
                new_only=new_only,
            )
        except AlreadyIndexed:  # not new after all: nothing was placed; filed again, looked up first
            self._drop_first_pass(staged, staging)
            return self._file(incoming, held, tags, chunks, transfer_syntax, new_only=False)
        except InstanceConflict as exc:  # the same UID committed elsewhere since find_instance
            return self._conflict(exc, chunks, record, staged), None
        except OSError as exc:
            if new_only and not placed:  # staging failed (the disk full?): an identical resend, which
                # writes nothing, is still acknowledged: looked up first
                self._drop_first_pass(staged, staging)
                return self._file(incoming, held, tags, chunks, transfer_syntax, new_only=False)
            self._discard(staged)
            if placed:
                self._undo_failed_commit(record, now, target, staged_file, previous)
            logs.event(log, "store_refused_disk_full" if isinstance(exc, OutOfSpace) else "store_failed",
                       logging.ERROR, sop_instance_uid=tags.sop_instance_uid, error=exc.strerror)
            return OUT_OF_RESOURCES, None
        except BaseException:  # the index failed: nothing was acknowledged, nothing stays behind
            self._discard(staged)  # (a failure before the COMMIT was undone under the lock: unplace)
            if placed:
                self._undo_failed_commit(record, now, target, staged_file, previous)
            raise
        if len(self._indexed_studies) >= KNOWN_STUDIES_MAX:
            self._indexed_studies.clear()
        self._indexed_studies.add(tags.study_uid)
        if previous is not None:
            self.spool.discard(previous)
        # the same bytes as the indexed copy (compared before, or kept aside and found the same: a
        # racing association placed it first), which may still be on its way to the disk (that
        # association between its commit and its settle): this acknowledgement promises it too
        same_bytes = arrival.placement is Placement.KEPT_ASIDE and staged is not None and same_dataset(target, payload)
        try:  # before the acknowledgement (a crash before it: reconcile marks the row missing)
            if placed:
                assert staged_file is not None  # set before `placed`
                self.spool.settle(name, staged_file, chunks, synced, staged_fd)
                held.close()  # NFS reports a delayed write error at close(2): answered as a failed fsync
            elif arrival.identical or same_bytes:
                self.spool.sync_placed(target)
        except OSError as exc:  # indexed, but the file may not survive a power cut
            if not (placed and previous is None and staged_file is not None
                    and self._write_again(target, chunks, staged_file, tags.sop_instance_uid)):  # not acknowledged
                self._discard(staged)  # (a copy kept aside; nothing once placed)
                logs.event(log, "store_failed", logging.ERROR, sop_instance_uid=tags.sop_instance_uid,
                           error=exc.strerror)
                return OUT_OF_RESOURCES, None
            logs.event(log, "store_written_again", logging.WARNING, sop_instance_uid=tags.sop_instance_uid,
                       error=exc.strerror)
        if same_bytes:  # nothing to keep aside
            self._discard(staged)
            logs.event(log, "instance_identical_resend", study_uid=tags.study_uid,
                       sop_instance_uid=tags.sop_instance_uid)
        elif arrival.placement is Placement.KEPT_ASIDE and staged is not None:
            where = self.spool.quarantine_file(staged, (
                f"a different copy of instance {tags.sop_instance_uid} arrived after study {tags.study_uid} "
                "completed; completion.after_complete is 'ignore', so the copy its results were made from stays"))
            logs.event(log, "instance_after_completion_kept_aside", logging.WARNING, study_uid=tags.study_uid,
                       sop_instance_uid=tags.sop_instance_uid, file=where.name)
        elif arrival.duplicate and arrival.placement is Placement.PLACED:
            logs.event(log, "instance_replaced", study_uid=tags.study_uid, sop_instance_uid=tags.sop_instance_uid)
        if arrival.identical and not arrival.opened:
            logs.event(log, "instance_identical_resend", study_uid=tags.study_uid,
                       sop_instance_uid=tags.sop_instance_uid)
        if arrival.ignored_after_complete:
            logs.event(log, "instance_after_completion_ignored", study_uid=tags.study_uid,
                       sop_instance_uid=tags.sop_instance_uid)
        if arrival.opened:
            logs.event(log, "study_reopened" if arrival.reopened else "study_receiving",
                       study_uid=tags.study_uid, calling_ae=calling)
            self.on_study_opened(tags.study_uid, arrival.deadline)
        if tags.sop_class_uid == KeyObjectSelectionDocumentStorage:  # a resend too: recording is idempotent,
            self._verdict(target, tags.study_uid)  # and a verdict lost to a crash or a busy index comes again
        return SUCCESS, tags

    def _verdict(self, path: str, study_uid: str) -> None:
        """A radiologist's rejection of the node's results (node/store/modelruns.py): counted
        against the model runs that made them. Never fails the C-STORE: it was stored."""
        try:
            verdict = verdict_of(pydicom.dcmread(path, stop_before_pixels=True))
            if verdict is not None:
                runs = ModelRuns(self.index).record_verdict(verdict[1], verdict[0], time.time())
                if runs:
                    logs.event(log, "result_rejected", study_uid=study_uid, runs=runs)
        except Exception as exc:  # an unreadable document or a busy index: the verdict is lost, not the KOS
            logs.event(log, "verdict_not_recorded", logging.WARNING, study_uid=study_uid, error=type(exc).__name__)

    def _discard(self, staged: str | None) -> None:
        if staged is not None:
            self.spool.discard(staged)

    def _drop_first_pass(self, staged: str | None, staging: ExitStack) -> None:
        """A copy staged for a new instance that was not (see _file): it goes, and its descriptor is
        closed now (its blocks freed before the second pass stages again; an error at its close
        concerns no file that stays). The next instance is looked up first."""
        self._expect_new = False
        self._discard(staged)
        try:
            staging.close()
        except OSError:
            pass

    def _undo_failed_commit(self, record: InstanceRecord, now: float, target: str, placed: FileIdentity | None,
                            previous: str | None) -> None:
        """The COMMIT itself failed after the file was placed. Under the write lock again: if the
        row did commit after all (a connection lost during COMMIT) or another copy was placed
        since, nothing is undone; else the placement is. If the index cannot be reached, the next
        start's reconcile decides."""
        try:
            with self.index.transaction():
                row = self.index.find_instance(record.sop_instance_uid)
                there = identify(target)  # None: gone; an error: the next start's reconcile decides
                ours_in_place = placed is not None and there is not None and there.unchanged(placed)
                if ours_in_place and (row is None or row["received_at"] < now):
                    if previous is not None:
                        self.spool.restore(previous, target)
                    else:
                        self.spool.discard(target)
                elif previous is not None:
                    self.spool.discard(previous)
        except Exception as exc:  # noqa: BLE001 - the failure being handled is re-raised by the caller
            logs.event(log, "store_undo_deferred", logging.WARNING, sop_instance_uid=record.sop_instance_uid,
                       error=type(exc).__name__)

    def _write_again(self, target: str, chunks: tuple[bytes, memoryview], placed: FileIdentity,
                     sop_instance_uid: str) -> bool:
        """A new instance's file could not be made durable after its row committed. Linux reports
        a write-back error once (to each descriptor open when it happened, and to one opened after
        while nobody saw it) and leaves the pages clean in memory but not on the disk, so no later
        fsync of that file can be trusted (nor a resend compared equal to it):
        the bytes are written once more to a new file, fsynced, and renamed over it under the
        write lock if it is still this one (not replaced meanwhile), keeping its modification
        time (retention and reconcile compare it with the row's), then its folder fsynced. True:
        the instance is durable now and its row stands; False: not acknowledged, as before."""
        fresh: str | None = None
        try:
            with ExitStack() as own:  # its fsync through the descriptor it was written through, too
                fresh, _, fd = self.spool.stage_held(chunks, own, durable=False)
                os.utime(fd, ns=(placed.mtime_ns, placed.mtime_ns))
                os.fsync(fd)
            with self.index.transaction():
                there = identify(target)
                if there is None or not there.unchanged(placed):
                    return False
                self.spool.place(fresh, target, durable=False)
                fresh = None
            self.spool.make_durable(target)
            return True
        except Exception as exc:  # noqa: BLE001 - the store's own failure is answered by the caller
            logs.event(log, "store_write_again_failed", logging.ERROR, sop_instance_uid=sop_instance_uid,
                       error=type(exc).__name__)
            return False
        finally:
            self._discard(fresh)

    def _conflict(self, exc: InstanceConflict, chunks: tuple[bytes, memoryview], record: InstanceRecord,
                  staged: str | None) -> int:
        """Refuse an instance whose SOP Instance UID is held elsewhere; the held one stays (the
        newcomer was only staged: it never reached the held instance's path)."""
        reason = f"{exc}; refused: this one is in study {record.study_uid}, series {record.series_uid}"
        if staged is not None:
            where = self.spool.quarantine_file(staged, reason)
        else:
            where = self.spool.quarantine(chunks, reason)
        logs.event(
            log,
            "instance_uid_conflict",
            logging.WARNING,
            integrity=True,
            status=f"0x{SOP_INSTANCE_CONFLICT:04X}",
            sop_instance_uid=exc.sop_instance_uid,
            study_uid=record.study_uid,
            series_uid=record.series_uid,
            sop_class_uid=record.sop_class_uid,
            held_by_study=exc.study_uid,
            held_by_series=exc.series_uid,
            held_sop_class_uid=exc.sop_class_uid,
            calling_ae=record.calling_ae,
            file=where.name,
        )
        return SOP_INSTANCE_CONFLICT


class _Mismatch(ValueError):
    pass


def _association_origin(incoming: Incoming) -> tuple[str | None, str | None, str | None]:
    """(0002,0017) Sending AE Title, (0002,0018) Receiving AE Title and (0002,0027) Sending
    Presentation Address of a C-STORE's file: what reconcile gives back to a row a power cut
    took (node/receive/reconcile.py)."""
    if not incoming.by_association:
        return None, None, None
    return (incoming.calling if _is_ae_title(incoming.calling) else None,
            incoming.called if _is_ae_title(incoming.called) else None, presentation_address(incoming.peer))


def _is_ae_title(value: str) -> bool:
    """Whether `value` fits an AE element of the file meta ((0002,0016)-(0002,0018): 16 ASCII characters,
    no backslash or control characters): a STOW-RS account name may not."""
    return 0 < len(value) <= 16 and value.isascii() and value.isprintable() and "\\" not in value
