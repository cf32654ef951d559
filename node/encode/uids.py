"""Result UIDs: globally unique across nodes and installations, and the same on every re-run of a job.

A UID is `generate_uid(prefix=root, entropy_srcs=[...])` (a SHA-512 of what identifies the result):
- the installation's own identity (a random UID made on its first start and kept in its index),
  so two nodes, or one node whose data folder was recreated, never mint the same UID;
- the job (its id in this installation's index, and the rule) and the source study, series and
  instance UIDs (and which volume, for a series holding several),
  so results for different studies, or a new job after the study changed, differ;
- the model name and version, the object kind and its variant.
A crash re-run, a `jobs retry` or a delivery retry of the same job mints exactly the same UIDs,
so the PACS stores each result once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid


@dataclass(frozen=True)
class SourceIdentity:
    """What a result was made from: the study, the series, a digest of its instance UIDs and,
    when the series holds several volumes (echoes, b-values), which one."""

    study_uid: str
    series_uid: str
    instances_digest: str
    volume: str = ""

    @classmethod
    def of(cls, study_uid: str, series_uid: str, instance_uids: Iterable[str], volume: str = "") -> SourceIdentity:
        digest = hashlib.sha256("\n".join(sorted(instance_uids)).encode()).hexdigest()
        return cls(study_uid, series_uid, digest, volume)


@dataclass(frozen=True, kw_only=True)
class ResultUIDs:
    """UIDs for the results of one model run in one job.

    Keyword-only: seven fields of like types in a row are too easy to pass in the wrong order
    (a notice once passed the UID root as the rule and minted under pydicom's root)."""

    installation_uid: str
    job_id: int
    source: SourceIdentity
    model: str
    model_version: str
    rule: str = ""  # two rules of one job may run one model on one series with other outputs
    root: str | None = None  # output.uid_root; None: pydicom's root

    def __post_init__(self) -> None:
        if self.root is None:
            object.__setattr__(self, "root", PYDICOM_ROOT_UID)

    def _uid(self, *parts: object) -> str:
        # One JSON string: generate_uid joins its sources without separators, so ("ab", "c") and
        # ("a", "bc") would collide.
        key = json.dumps([self.installation_uid, self.job_id, self.rule, self.source.study_uid,
                          self.source.series_uid, self.source.instances_digest, self.source.volume, self.model,
                          self.model_version, *map(str, parts)])
        return str(generate_uid(prefix=self.root, entropy_srcs=[key]))

    def series(self, kind: str) -> str:
        return self._uid("series", kind)

    def instance(self, kind: str, variant: str = "") -> str:
        return self._uid("instance", kind, variant)

    def tracking(self, tracking_id: str) -> str:
        return self._uid("tracking", tracking_id)

    @property
    def device(self) -> str:
        """The node as the observer device: one UID per installation and model, not per job."""
        key = json.dumps([self.installation_uid, "device", self.model, self.model_version])
        return str(generate_uid(prefix=self.root, entropy_srcs=[key]))


def returned_result_uid(installation_uid: str, project: str, study_digest: str, external_uid: str,
                        root: str | None = None) -> str:
    """The node's UID for one a de-identification project's service made (node/jobs/returns.py):
    from the installation's identity, so two nodes never mint the same, and the round trip's
    study (a service reusing a UID for two patients' results gets two UIDs); the same external
    UID in the same study always gives the same one, so results sent twice are stored once and
    an SR's reference to a SEG stays true."""
    key = json.dumps([installation_uid, "returned", project, study_digest, external_uid])
    return str(generate_uid(prefix=root or PYDICOM_ROOT_UID, entropy_srcs=[key]))
