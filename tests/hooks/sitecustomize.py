"""Fault and measurement hooks for the node's processes, never part of the product.

A test (or benchmark) that needs one puts this folder first on PYTHONPATH and sets its variable
before starting `dicom-node serve`; Python imports this module at start-up in the service and
its receiver processes, and the hook patches the one receiver method it concerns:

- DICOM_NODE_TEST_CRASH_AFTER_PLACE=N: a receiver process exits (os._exit) right after its Nth
  rename of an instance into studies/, before the index transaction that holds the rename commits
  (the crash-between-rename-and-commit test).
- DICOM_NODE_TEST_FAIL_AFTER_PLACE=N: the index transaction holding a receiver's Nth rename
  fails (an OperationalError): right after the rename, or with DICOM_NODE_TEST_FAIL_AT=commit at
  its COMMIT (raised in place of the SQLite index's COMMIT statement, so the database never
  commits it).
- DICOM_NODE_TEST_JOURNAL_HOLD=1: the intake journal's checkpoints wait an hour instead of half a
  second, so its records are still there when a test kills the node (node/store/journal.py).
- DICOM_NODE_TEST_SLOW_LOOKUP_S=T: a receiver's look-up of an indexed SOP Instance UID takes T
  seconds longer (a slow index), which widens the window in which two associations race with
  one SOP Instance UID.
"""

from __future__ import annotations

import os

HOOKS = os.path.dirname(os.path.abspath(__file__))
_CRASH_AFTER = int(os.environ.get("DICOM_NODE_TEST_CRASH_AFTER_PLACE") or 0)
_FAIL_AFTER = int(os.environ.get("DICOM_NODE_TEST_FAIL_AFTER_PLACE") or 0)
_FAIL_AT_COMMIT = os.environ.get("DICOM_NODE_TEST_FAIL_AT") == "commit"
_SLOW_LOOKUP = float(os.environ.get("DICOM_NODE_TEST_SLOW_LOOKUP_S") or 0)
_JOURNAL_HOLD = os.environ.get("DICOM_NODE_TEST_JOURNAL_HOLD") == "1"

if _JOURNAL_HOLD:
    from node.store import journal

    _journal_init = journal.IntakeJournal.__init__

    def _holding_init(self, root, segment_bytes, quarantine, checkpoint_s=0.5):  # type: ignore[no-untyped-def]
        _journal_init(self, root, segment_bytes, quarantine, checkpoint_s=3600.0)

    journal.IntakeJournal.__init__ = _holding_init  # type: ignore[method-assign]

if _SLOW_LOOKUP:
    import time

    from node.store import index

    _find = index.Index.find_instance

    def _slow_find(self, sop_instance_uid):  # type: ignore[no-untyped-def]
        found = _find(self, sop_instance_uid)
        time.sleep(_SLOW_LOOKUP)
        return found

    index.Index.find_instance = _slow_find  # type: ignore[method-assign]

if _CRASH_AFTER or _FAIL_AFTER:
    from sqlalchemy.exc import OperationalError

    from node.receive import scp
    from node.store import index

    _init = scp.StorageSCP.__init__
    _places = [0]
    _fail_commit = [False]
    _execute = index._Statements.execute

    def _failing_commit(self, sql, params=()):  # type: ignore[no-untyped-def]
        if sql == "COMMIT" and _fail_commit[0]:
            _fail_commit[0] = False
            raise OperationalError("COMMIT", {}, Exception("disk I/O error (test hook)"))
        return _execute(self, sql, params)

    index._Statements.execute = _failing_commit  # type: ignore[method-assign]

    def _faulty_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _init(self, *args, **kwargs)
        place = self.spool.place

        def fault_after_place(*args, **kwargs):  # type: ignore[no-untyped-def]
            place(*args, **kwargs)
            _places[0] += 1
            if _places[0] == _CRASH_AFTER:
                os._exit(70)
            if _places[0] == _FAIL_AFTER and _FAIL_AT_COMMIT:
                _fail_commit[0] = True
            elif _places[0] == _FAIL_AFTER:
                raise OperationalError("INSERT", {}, Exception("disk I/O error (test hook)"))

        self.spool.place = fault_after_place

    scp.StorageSCP.__init__ = _faulty_init  # type: ignore[method-assign]
