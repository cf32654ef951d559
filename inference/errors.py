"""Why a series cannot be read as a volume: kept apart from inference.volume so that the job
runner can tell failures apart without importing highdicom into every process."""

from __future__ import annotations


class SeriesError(ValueError):
    """The series cannot be made into one volume; the message says why."""


class SeriesChanged(SeriesError):
    """An instance's file was replaced (a resend) while the series was being read: reading it
    again gives a consistent volume."""
