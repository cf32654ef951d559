"""Prometheus metrics (`/metrics`), from two sources, so that no process has to share counters.

- **The index, read at scrape time** (`IndexCollector`): what the receiver processes do
  (instances, bytes, C-STORE failures, associations, completed studies) is already committed
  there before each C-STORE is answered, so a custom collector reads it instead of running
  prometheus-client's multiprocess mode across receiver processes. Jobs, outbox and disk
  figures come from the same place. These survive a restart; instances and bytes removed by
  retention are added back from `retention_log`, so counters never go down.
- **The node's own events, in the service process** (node.metrics, prometheus-client objects
  counted by the code where each event happens: the outbox, the job runner): delivery retries
  and dead letters per destination, jobs finished, job stage durations and inference latency per
  model. These start from zero with the process, like any counter. Nothing here queries the
  index from inside a logging handler.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node import metrics as events
from node.console.context import ConsoleContext
from node.console.summary import disk
from node.receive.counts import Counted, ReceiveCounts
from node.store.modelruns import ModelRuns
from node.store.signal_forwards import SignalForwards

PREFIX = events.PREFIX


class IndexCollector(Collector):
    def __init__(self, ctx: ConsoleContext):
        self.ctx = ctx
        self.counts = ReceiveCounts(ctx.index)

    def collect(self) -> Iterable[Metric]:
        index = self.ctx.index
        deleted = self.ctx.retention.deleted_totals()
        # COUNT(CASE ...) and CAST(SUM ...): integers on SQLite and PostgreSQL alike (a bigint SUM
        # is numeric there)
        assoc = index.query(
            "SELECT CAST(COALESCE(SUM(instances), 0) AS BIGINT) AS instances,"
            " CAST(COALESCE(SUM(failures), 0) AS BIGINT) AS failures,"
            " COUNT(CASE WHEN ended_at IS NOT NULL AND failures=0 THEN 1 END) AS clean,"
            " COUNT(CASE WHEN ended_at IS NOT NULL AND failures>0 THEN 1 END) AS with_failures,"
            " COUNT(CASE WHEN ended_at IS NULL THEN 1 END) AS open FROM associations")[0]
        stored = index.query("SELECT COUNT(*) AS n, CAST(COALESCE(SUM(size), 0) AS BIGINT) AS bytes FROM instances")[0]
        yield _counter("instances_received", "Instances stored and acknowledged (C-STORE success), "
                       "counted when their association ends", assoc["instances"])
        yield _counter("received_bytes", "Bytes of stored instances (as written, with file meta)",
                       stored["bytes"] + deleted["bytes"])
        yield _counter("cstore_failures", "C-STORE requests answered with a failure status, "
                       "counted when their association ends", assoc["failures"])
        outcomes = CounterMetricFamily(f"{PREFIX}_associations", "Ended associations by outcome "
                                       "(clean: every C-STORE succeeded)", labels=["outcome"])
        outcomes.add_metric(["clean"], assoc["clean"])
        outcomes.add_metric(["with_failures"], assoc["with_failures"])
        yield outcomes
        yield _gauge("associations_open", "Associations in progress", assoc["open"])
        by_status = CounterMetricFamily(f"{PREFIX}_cstore_failures_by_status", "C-STORE requests answered with "
                                        "a failure status, by status, counted as they are answered", labels=["status"])
        for status, n in sorted(self.counts.totals(Counted.CSTORE_FAILURE).items()):
            by_status.add_metric([status], n)
        yield by_status
        rejected = CounterMetricFamily(f"{PREFIX}_associations_rejected", "A-ASSOCIATE-RQ answered with a "
                                       "rejection, by reason", labels=["reason"])
        for reason, n in sorted(self.counts.totals(Counted.ASSOCIATION_REJECTED).items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield _counter("associations_aborted", "Accepted associations that ended in an A-ABORT (by the peer "
                       "or by the node) or a dropped connection (A-P-ABORT)",
                       sum(self.counts.totals(Counted.ASSOCIATION_ABORTED).values()))
        yield from self._stow_in()
        completions = index.query("SELECT CAST(COALESCE(SUM(completions), 0) AS BIGINT) AS n FROM studies")[0]["n"]
        yield _counter("studies_completed", "Study completions (any signal)",
                       completions + deleted["completions"])
        studies = GaugeMetricFamily(f"{PREFIX}_studies", "Stored studies by state", labels=["state"])
        for row in index.query("SELECT state, COUNT(*) AS n FROM studies GROUP BY state"):
            studies.add_metric([row["state"]], row["n"])
        yield studies
        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs by state", labels=["state"])
        for state, n in self.ctx.jobs.counts().items():
            jobs.add_metric([state.value], n)
        yield jobs
        deliveries = CounterMetricFamily(f"{PREFIX}_deliveries", "Result sets delivered, by destination",
                                         labels=["destination"])
        outbox = GaugeMetricFamily(f"{PREFIX}_outbox", "Outbox items by state and destination",
                                   labels=["state", "destination"])
        for row in index.query("SELECT state, destination, COUNT(*) AS n FROM outbox GROUP BY state, destination"):
            outbox.add_metric([row["state"], row["destination"]], row["n"])
            if row["state"] == "delivered":
                deliveries.add_metric([row["destination"]], row["n"])
        yield deliveries
        yield outbox
        yield from self._destinations()
        forwards = GaugeMetricFamily(f"{PREFIX}_mpps_forwards", "MPPS requests to forward (completion.mpps_forward)"
                                     " by state and destination", labels=["state", "destination"])
        for (state, destination), n in SignalForwards(index).counts().items():
            forwards.add_metric([state, destination], n)
        yield forwards
        space = disk(self.ctx.data_dir, self.ctx.config.storage.min_free_mb)
        yield _gauge("disk_free_bytes", "Free bytes on the data folder's disk", space["free_bytes"])
        yield _gauge("disk_watermark_bytes", "storage.min_free_mb in bytes (C-STORE refused below it)",
                     self.ctx.spool.min_free_bytes)
        yield _gauge("stored_bytes", "Bytes of instances stored now", stored["bytes"])
        yield _gauge("instances_missing", "Indexed instances whose file start-up reconciliation found gone",
                     index.missing_instances())
        yield _counter("retention_deleted_studies", "Studies deleted by retention", deleted["studies"])
        yield from self._models()

    def _models(self) -> Iterable[Metric]:
        """Per model version: runs, what went in and came out lately, drift, shadow agreement,
        verdicts (node/store/modelruns.py)."""
        runs = ModelRuns(self.ctx.index)
        watch = self.ctx.config.inference.monitoring
        summary = runs.summary()
        count = CounterMetricFamily(f"{PREFIX}_model_runs", "Model runs by model, version and role (live or shadow)",
                                    labels=["model", "version", "role"])
        verdicts = CounterMetricFamily(f"{PREFIX}_model_verdicts", "Radiologists' verdicts on results (from a Key"
                                       " Object Selection), by model, version and verdict",
                                       labels=["model", "version", "verdict"])
        dice = GaugeMetricFamily(f"{PREFIX}_model_shadow_dice", "Mean Dice of a shadow version's segmentations"
                                 " against the live version's", labels=["model", "version"])
        agreement = GaugeMetricFamily(f"{PREFIX}_model_shadow_agreement", "Share of studies where a shadow"
                                      " classifier's class is the live one's", labels=["model", "version"])
        for r in summary:
            labels = [r["model"], str(r["version"])]
            count.add_metric([*labels, r["role"]], r["runs"])
            if r["role"] == "shadow" and r["mean_dice"] is not None:
                dice.add_metric(labels, r["mean_dice"])
            if r["role"] == "shadow" and r["agreement"] is not None:
                agreement.add_metric(labels, r["agreement"])
            for verdict in ("rejected", "accepted"):
                if r[verdict]:
                    verdicts.add_metric([*labels, verdict], r[verdict])
        figures = GaugeMetricFamily(f"{PREFIX}_model_figure", f"What went into and came out of a model version's"
                                    f" latest {watch.window_runs} live runs (mean, min, max)",
                                    labels=["model", "version", "figure", "stat"])
        for (model, version), values in runs.recent(watch.window_runs).items():
            for figure, stats in values.items():
                for stat, value in zip(("mean", "min", "max"), stats):
                    figures.add_metric([model, str(version), figure, stat], value)
        drift = GaugeMetricFamily(f"{PREFIX}_model_drift", "1 where a figure of a model version's latest runs left"
                                  " the range of its first runs", labels=["model", "version", "figure"])
        for alarm in runs.drift(watch.baseline_runs, watch.window_runs, watch.tolerance):
            drift.add_metric([alarm.model, str(alarm.version), alarm.figure], 1)
        yield from (count, verdicts, dice, agreement, figures, drift)

    def _stow_in(self) -> Iterable[Metric]:
        """STOW-RS requests into the node (each is also an association row, called AE STOW-RS, so
        the association and instance figures above include them)."""
        requests = CounterMetricFamily(f"{PREFIX}_stow_requests", "STOW-RS requests by the HTTP status answered "
                                       "(none: the request ended without an answer), counted as they end",
                                       labels=["status"])
        for status, n in sorted(self.counts.totals(Counted.STOW_REQUEST).items()):
            requests.add_metric([status], n)
        yield requests
        yield _counter("stow_instances_received", "Instances stored and acknowledged by STOW-RS",
                       sum(self.counts.totals(Counted.STOW_STORED).values()))
        failures = CounterMetricFamily(f"{PREFIX}_stow_failures_by_reason", "STOW-RS instances refused, by "
                                       "Failure Reason (Failed SOP Sequence)", labels=["reason"])
        for reason, n in sorted(self.counts.totals(Counted.STOW_FAILURE).items()):
            failures.add_metric([reason], n)
        yield failures

    def _destinations(self) -> Iterable[Metric]:
        """Each configured destination's kind and peer (an info metric, to join the per-destination
        delivery figures on)."""
        info = GaugeMetricFamily(f"{PREFIX}_destination_info", "Configured destinations: kind (dimse or "
                                 "dicomweb) and where they are", labels=["destination", "kind", "where"])
        for name, destination in sorted(self.ctx.config.destinations.items()):
            info.add_metric([name, destination.kind, destination.where], 1)
        yield info


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class TritonCollector(Collector):
    """Per Triton server of the pool, as the job runner's pools count them in this process."""

    def __init__(self, ctx: ConsoleContext):
        self.ctx = ctx

    def collect(self) -> Iterable[Metric]:
        servers = self.ctx.triton_servers
        if not servers:
            return
        up = GaugeMetricFamily(f"{PREFIX}_triton_server_up", "1 while the server answers, 0 after it failed"
                               " (until a probe succeeds)", labels=["server"])
        outstanding = GaugeMetricFamily(f"{PREFIX}_triton_outstanding_requests", "Requests in flight",
                                        labels=["server"])
        requests = CounterMetricFamily(f"{PREFIX}_triton_requests", "Inference requests by outcome (ok, "
                                       "unavailable: failed over or waited; error: the server cannot run the model)",
                                       labels=["server", "outcome"])
        seconds = CounterMetricFamily(f"{PREFIX}_triton_request_seconds", "Time of the answered requests",
                                      labels=["server"])
        failovers = CounterMetricFamily(f"{PREFIX}_triton_failovers", "Requests this server lost that another "
                                        "server then took", labels=["server"])
        for server in servers:
            up.add_metric([server.url], 1 if server.up else 0)
            outstanding.add_metric([server.url], server.outstanding)
            for outcome, n in server.requests.items():
                requests.add_metric([server.url, outcome], n)
            seconds.add_metric([server.url], server.seconds)
            failovers.add_metric([server.url], server.failovers)
        yield from (up, outstanding, requests, seconds, failovers)


def registry_for(ctx: ConsoleContext) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IndexCollector(ctx))
    registry.register(TritonCollector(ctx))
    registry.register(events.REGISTRY)  # the service process's own event counters (node.metrics)
    return registry
