"""Ask the sending PACS how many instances a study has (C-FIND, Study Root, STUDY level).

A PACS that forwards a study to the node knows its size: NumberOfStudyRelatedInstances
(PS3.4 C.6.2.1.2, a return key every Study Root SCP computes). The node completes the study when
that many are here (completion.signals.source_count), instead of waiting for the quiet period.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from node.config import DestinationConfig
from node.send.scu import associate, destination_ssl_context, rejection

PENDING = (0xFF00, 0xFF01)


class SourceCountError(Exception):
    """The source gave no count: one line saying why (no PHI)."""


def study_instance_count(source: DestinationConfig, calling_ae: str, study_uid: str, timeout: float = 10.0) -> int:
    """NumberOfStudyRelatedInstances of the study at `source`; 0 when it does not hold it."""
    where = source.where
    assoc = associate(source.host, source.port, calling_ae, source.ae_title,
                      [build_context(StudyRootQueryRetrieveInformationModelFind)],
                      destination_ssl_context(source.tls), timeout=timeout)
    if not assoc.is_established:
        refused = rejection(assoc)
        raise SourceCountError(f"no association with {where}" + (f" ({refused.text})" if refused else ""))
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.NumberOfStudyRelatedInstances = ""
    counts: list[int] = []
    final = None
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code in PENDING and identifier is not None:
                value = identifier.get("NumberOfStudyRelatedInstances")
                if value in (None, ""):
                    raise SourceCountError(f"{where} did not return NumberOfStudyRelatedInstances")
                counts.append(int(value))
            else:
                final = code
    finally:
        if assoc.is_established:
            assoc.release()
    if final is None:
        raise SourceCountError(f"{where} sent no final C-FIND response (connection lost or timed out)")
    if final != 0:
        raise SourceCountError(f"{where} answered C-FIND with status 0x{int(final):04X}")
    return max(counts, default=0)
