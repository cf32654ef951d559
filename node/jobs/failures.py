"""Why a job did not finish, in words safe to store, log and show: never a tag value.

Exceptions raised by the node's own code (and by the inference layer, whose messages name UIDs,
attribute keywords and tensor shapes) are shown as they are. Anything else (pydicom, highdicom,
numpy...) may quote a value from the source data, such as a malformed birth date, so only its
type and where it was raised are kept.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from sqlalchemy.exc import OperationalError, TimeoutError as PoolTimeout

from inference.backends.base import BackendError, BackendUnavailable
from inference.errors import MemoryTaken, NotEnoughMemory, SeriesChanged, SeriesError
from node.store.spool import OutOfSpace


class JobError(RuntimeError):
    """A job cannot be done as routed; the message (UIDs and names only) says why."""


class Superseded(Exception):
    """The study completed again while the job ran; `newer` is the job that processes it now."""

    def __init__(self, newer: int):
        super().__init__(f"superseded by job {newer}")
        self.newer = newer


# Failures that may go away by themselves: the job waits and tries again (OperationalError: the
# index busy or locked past its timeout; PoolTimeout: no connection, or the index's write lock
# held in this process, past the wait; SeriesChanged: an instance resent while it was read;
# MemoryTaken: a job's array, its series' volume or a model's input or output, fits in the node's
# memory, but not in what is free now).
TRANSIENT = (BackendUnavailable, OutOfSpace, OperationalError, PoolTimeout, SeriesChanged, MemoryTaken)
# Exceptions whose messages the node writes itself, without source values.
_OWN_MESSAGES = (JobError, BackendError, SeriesError, NotEnoughMemory)


def is_transient(exc: BaseException, beside_others: bool = False) -> bool:
    """Whether the job waits and tries again. `beside_others`: other jobs ran in the process as
    it failed; then a model's output that did not fit beside what the service holds (NotEnoughMemory)
    may fit later, as the service's memory counted their arrays too (their volumes, inputs), unless
    it is more than the limit itself."""
    return isinstance(exc, TRANSIENT) or (beside_others and isinstance(exc, NotEnoughMemory)
                                          and not exc.beyond_limit)


def waiting_reason(exc: BaseException, reason: str) -> str:
    """The reason a job waiting after `exc` shows: for memory refused beside other jobs
    (is_transient), that it waits for theirs, not that it cannot run."""
    if isinstance(exc, NotEnoughMemory) and not isinstance(exc, TRANSIENT):
        return (f"{reason}; counted beside other jobs running now, whose memory goes as they end: the job waits"
                " and tries again")
    return reason


def describe(exc: BaseException, stage: str | None) -> str:
    where = f"{stage}: " if stage else ""
    if isinstance(exc, _OWN_MESSAGES):
        return f"{where}{exc}"
    if isinstance(exc, OutOfSpace):
        return f"{where}no space left on the data folder's disk"
    frames = traceback.extract_tb(exc.__traceback__)
    origin = f" in {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{where}{type(exc).__name__}{origin} (message withheld: it may quote source data)"
