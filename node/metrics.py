"""The node's own event metrics (prometheus-client objects), counted where the events happen.

One function per event, called by the code that logs the event (the outbox, the job runner),
so the logs and the metrics cannot disagree. The objects live in `REGISTRY`, which the console
adds to `/metrics` (node.console.metrics); counting never queries anything and never raises.
Like any in-process counter, these start from zero with the process. What the receiver
processes count is read from the index at scrape time instead (node.console.metrics.IndexCollector).

At the bottom of node (it imports only prometheus-client) so that node.send and node.jobs can use it
without importing the console.
"""

from __future__ import annotations

from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram

PREFIX = "dicom_node"
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

REGISTRY = CollectorRegistry(auto_describe=True)

DELIVERY_RETRIES = Counter(f"{PREFIX}_delivery_retries", "Delivery attempts that failed transiently and were "
                           "rescheduled, by destination", ["destination"], registry=REGISTRY)
DEAD_LETTERS = Counter(f"{PREFIX}_dead_letters", "Deliveries given up (dead letter), by destination",
                       ["destination"], registry=REGISTRY)
JOBS_FINISHED = Counter(f"{PREFIX}_jobs_finished", "Jobs that reached done or failed in this process",
                        ["state"], registry=REGISTRY)
STAGE_SECONDS = Histogram(f"{PREFIX}_stage_seconds", "Job stage durations (route, load, inference, encode, "
                          "enqueue)", ["stage"], buckets=STAGE_BUCKETS, registry=REGISTRY)
STUDIES_COMPLETED = Counter(f"{PREFIX}_studies_completed", "Studies completed in this process, by what "
                            "completed them (quiet_period, mpps, ian)", ["completed_by"], registry=REGISTRY)
INFERENCE_SECONDS = Histogram(f"{PREFIX}_inference_seconds", "Model inference latency per model run",
                              ["model"], buckets=STAGE_BUCKETS, registry=REGISTRY)


def delivery_retried(destination: Any) -> None:
    """A delivery failed transiently and was rescheduled (event `results_retry_scheduled`)."""
    _quietly(lambda: DELIVERY_RETRIES.labels(str(destination)).inc())


def dead_letter(destination: Any) -> None:
    """A delivery was given up (event `results_dead_letter`)."""
    _quietly(lambda: DEAD_LETTERS.labels(str(destination)).inc())


def study_completed(completed_by: str) -> None:
    """A study completed (event `study_complete`)."""
    _quietly(lambda: STUDIES_COMPLETED.labels(completed_by).inc())


def model_ran(model: Any, seconds: Mapping[str, float]) -> None:
    """One model run (event `model_ran`); `seconds` is the result's stage times, with "inference"."""
    if "inference" in seconds:
        _quietly(lambda: INFERENCE_SECONDS.labels(str(model)).observe(float(seconds["inference"])))


def job_finished(jobs: Any, job_id: int, state: str) -> None:
    """A job reached done or failed (events `job_done`, `job_failed`): counted, and its stage times
    observed (`jobs.get(job_id).stage_seconds()`: each stage from its first start to its last end).
    Called by the job runner after the transition, outside any lock; a failed read counts the job
    without its stages."""
    _quietly(lambda: JOBS_FINISHED.labels(state).inc())
    try:
        stages = jobs.get(job_id).stage_seconds()
    except Exception:  # an unknown job, the index busy: the runner must go on
        return
    for stage, seconds in stages.items():
        _quietly(lambda: STAGE_SECONDS.labels(stage).observe(float(seconds)))


def _quietly(update: Any) -> None:
    try:
        update()
    except (ValueError, TypeError, KeyError):  # a metric must never break the code that counts
        pass
