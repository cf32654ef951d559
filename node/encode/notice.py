"""'AI ran' notice: a small SR that says the analysis did not complete, and why.

A radiologist who sees no result cannot tell "nothing found" from "never ran". A job that finds
nothing already sends its TID 1500 report (no measurement groups, every label "Absent"; see
node.jobs.stages.encode); a job that fails permanently sends this instead: a Comprehensive SR in
the source study whose one text item gives the rule, the models and the job's failure reason
(node.jobs.failures.describe writes those without any value from the source data).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset

from node.config import OutputOptions
from node.encode.uids import ResultUIDs

REPORT_TITLE = hd.sr.CodedConcept(value="18748-4", scheme_designator="LN", meaning="Diagnostic imaging report")
FINDING = hd.sr.CodedConcept(value="121071", scheme_designator="DCM", meaning="Finding")


def failure_text(rule: str, models: list[str], reason: str) -> str:
    return (f"AI analysis did not complete; there are no AI results for this study. "
            f"Rule: {rule}. Models: {', '.join(models)}. Reason: {reason}")[:1000]


def build_failure_notice(source: Dataset, rule: str, models: list[str], reason: str, options: OutputOptions,
                         uids: ResultUIDs) -> hd.sr.ComprehensiveSR:
    """The notice for a failed job, in `source`'s study (any instance of it: only its UIDs and
    patient/study attributes are used)."""
    content = hd.sr.ContainerContentItem(name=REPORT_TITLE, template_id=None)
    content.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=FINDING, value=failure_text(rule, models, reason),
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
    ])
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=content,
        series_instance_uid=uids.series("NOTICE"),
        series_number=options.notice_series_number,
        sop_instance_uid=uids.instance("NOTICE", "failed"),
        instance_number=1,
        manufacturer=options.manufacturer,
        is_complete=True,
        series_description=options.describe("+".join(models), "not completed"),
    )
