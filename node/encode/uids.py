"""Stable UIDs for result objects.

A result sent twice (a retry, a resend after a crash, a re-run of the same job) must carry the
same UIDs, so that the PACS stores it once. UIDs are therefore derived from what identifies
the result (job key, model, object kind, variant) rather than drawn at random.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid


@dataclass(frozen=True)
class ResultUIDs:
    """UIDs for one result set. `job_key` names the job (e.g. its id in the index)."""

    job_key: str
    model: str
    root: str = PYDICOM_ROOT_UID

    def _uid(self, *parts: object) -> str:
        return str(generate_uid(prefix=self.root, entropy_srcs=[self.job_key, self.model, *map(str, parts)]))

    def series(self, kind: str) -> str:
        return self._uid("series", kind)

    def instance(self, kind: str, variant: str = "") -> str:
        return self._uid("instance", kind, variant)

    def tracking(self, tracking_id: str) -> str:
        return self._uid("tracking", tracking_id)

    @property
    def device(self) -> str:
        return self._uid("device")
