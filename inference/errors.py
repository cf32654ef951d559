"""Why a series cannot be read as a volume, or a model's output not be held: kept apart from
inference.volume so that the job runner can tell failures apart without importing highdicom into
every process."""

from __future__ import annotations


class SeriesError(ValueError):
    """The series cannot be made into one volume; the message says why."""


class SeriesChanged(SeriesError):
    """An instance's file was replaced (a resend) while the series was being read: reading it
    again gives a consistent volume."""


class NotEnoughMemory(RuntimeError):
    """A model's output would not fit in the memory the node may have at all (the machine's, or
    its container's limit): run, the job would be killed for memory, and the service with it.
    `beyond_limit`: more than the limit itself, however the memory were shared."""

    def __init__(self, message: str, beyond_limit: bool = False):
        super().__init__(message)
        self.beyond_limit = beyond_limit


class MemoryTaken(NotEnoughMemory):
    """A model's output would fit in the node's memory, but not in what is free now: trying
    again later may succeed."""
