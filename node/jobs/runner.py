"""The pipeline workers: claim a job, run its stages, and move it to its next state.

A bounded pool of threads claims jobs from the store (highest priority first). Each applied rule
forwards the study and/or runs its models; each model runs load -> infer -> encode -> enqueue.
Transient failures (Triton unavailable, disk full) put the job in `waiting` with backoff until its
retry deadline; anything else fails it at once with a reason that quotes no source data.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from apscheduler.schedulers.base import BaseScheduler

from common import logs
from common.backoff import backoff_delay
from inference.repository import ModelRepository
from node import metrics
from inference.spec import ModelSpec
from node.config import NodeConfig, OutputOptions
from node.encode.uids import ResultUIDs, SourceIdentity
from node.jobs.backends import BackendCache
from node.jobs.failures import JobError, Superseded, describe, is_transient, waiting_reason
from node.jobs.heap import freeze_loaded_objects, release_free_memory
from node.jobs.modelruns import record_live, run_shadow
from node.jobs.store import IllegalTransition, Job, JobState, JobStore
from node.jobs.turns import Turns
from node.route.decision import AppliedRule, RoutingDecision
from node.route.rules import SENDER
from node.route.study import SeriesView, StudyView, study_from_index
from node.send.outbox import Outbox
from node.store.identity import installation_uid
from node.store.index import Db, Index
from node.store.spool import Spool

if TYPE_CHECKING:
    from inference.headers import ParsedHeaders
    from node.jobs.stages import ModelTask

log = logging.getLogger("node.jobs")
# how long after its study completed a header read ahead waits to be taken by a job here
HEADERS_KEPT_S = 60.0
# outputs drawn from the source's voxels, which inference lets go (SeriesVolume.set_pixels_aside)
_READS_VOXELS = frozenset({"SC", "SALIENCY"})


class JobRunner:
    def __init__(self, config: NodeConfig, index: Index, jobs: JobStore, outbox: Outbox, models: ModelRepository,
                 spool: Spool, scheduler: BaseScheduler, decide: Callable[[str], RoutingDecision]):
        """`decide(study_uid)` routes a job that has no decision yet (see JobStore.create_unrouted)."""
        self.config = config
        self.index = index
        self.jobs = jobs
        self.outbox = outbox
        self.models = models
        self.spool = spool
        self.scheduler = scheduler
        self.decide = decide
        self.data_dir = Path(config.storage.data_dir)
        self.installation_uid = installation_uid(index)
        self.backends = BackendCache(models, config.inference.triton)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stopping = threading.Event()  # the node is stopping: no job is claimed any more (stopping)
        self._turns = Turns()  # a job its node died under runs alone
        # the pipeline has loaded (or failed to: the first job reports it), or the runner stops (its
        # workers then end at once instead of waiting for torch's import)
        self._go = threading.Event()
        self._wanted = threading.Event()  # the pipeline is to load (want_pipeline)
        self._threads: list[threading.Thread] = []
        self._parsed: ParsedHeaders | None = None  # once the pipeline has loaded (read_ahead)

    def start(self, load_after: Callable[[], object] = lambda: None, load_at_start: bool = True) -> None:
        """`load_after`: returns when the pipeline may load (the receivers first: two cores
        importing torch and starting receiver processes at once delay the first association).
        `load_at_start`: False when nothing in sight needs it (no routing rules): it then loads
        at the first `want_pipeline`, or once a worker finds a job to claim (one left from before,
        a retry, a round trip's results). No job is claimed before it has loaded."""
        if load_at_start:
            self._wanted.set()
        else:
            logs.event(log, "pipeline_deferred", reason="no routing rules: it loads when rules come in force")
        threading.Thread(target=self._import_pipeline, args=(load_after,), name="pipeline-import", daemon=True).start()
        for n in range(self.config.pipeline.workers):
            thread = threading.Thread(target=self._work, name=f"pipeline-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        due = self.jobs.next_due()
        if due is not None:
            self._wake_at(due)

    def want_pipeline(self) -> None:
        """Load the pipeline now, if it has not loaded: routing rules came in force."""
        self._wanted.set()

    def stopping(self) -> None:
        """The node was told to stop (its drain begins): no job is claimed any more, and the
        running ones are marked, so that a SIGKILL before the stop ends does not count against
        them (JobStore.mark_stopping). They go on meanwhile and may finish."""
        self._stopping.set()
        # (on a thread: a busy index must not hold the receivers' listener open meanwhile)
        threading.Thread(target=self._mark_stopping, name="mark-stopping", daemon=True).start()

    def _mark_stopping(self) -> None:
        try:
            self.jobs.mark_stopping()
        except Exception as exc:  # noqa: BLE001 - the stop goes on; a SIGKILL now would count
            logs.event(log, "job_mark_stopping_failed", logging.WARNING, error=type(exc).__name__)

    def stop(self) -> None:
        self._stopping.set()
        self._stop.set()
        self._go.set()
        self._wanted.set()
        self._wake.set()
        for thread in self._threads:
            # A job still running is queued again for the next start (or another replica), which
            # runs it again (same outputs, same UIDs): stopping does not wait for a model.
            thread.join(1.0)
        try:  # queued again, not counted as the node dying under them (JobStore.release_running)
            released = self.jobs.release_running()
        except Exception as exc:  # noqa: BLE001 - the stop goes on; the next start requeues them
            logs.event(log, "job_release_failed", logging.WARNING, error=type(exc).__name__)
        else:
            if released:
                logs.event(log, "jobs_released", jobs=released)
        if not any(thread.is_alive() for thread in self._threads):
            self.backends.close()

    def wake(self, *_: object) -> None:
        self._wake.set()

    def reads_ahead(self) -> bool:
        """Whether `read_ahead` reads anything now: not before the pipeline has loaded (its
        modules are imported once, by one thread), nor with `pipeline.read_ahead_headers` 0."""
        return self._parsed is not None and self.config.pipeline.read_ahead_headers > 0 and not self._stop.is_set()

    def read_ahead(self, study_uid: str) -> int:
        """Parse the headers of the series the rules in force would run a model on, for the job
        the study will become (inference.headers), until it completes; how many."""
        parsed, limit = self._parsed, self.config.pipeline.read_ahead_headers
        if parsed is None or not self.reads_ahead():
            return 0
        view = study_from_index(self.index, study_uid, self.data_dir)
        if view is None:
            return 0
        from inference.volume import HEADER_KEYWORDS  # loaded with the pipeline (reads_ahead)

        chosen = {applied.series_uid for applied in self.decide(study_uid).applied if applied.actions.run}
        def go_on() -> bool:
            return not self._stop.is_set() and self._stopped_receiving(study_uid) is None

        return sum(parsed.read_ahead(study_uid, series.files, limit, go_on, HEADER_KEYWORDS)
                   for series in view.series if series.series_uid in chosen)

    def _stopped_receiving(self, study_uid: str) -> float | None:
        """When the study completed (None: still receiving, reading ahead for it goes on; 0: no
        longer indexed)."""
        state = self.index.study_state(study_uid)
        if state is None:
            return 0.0
        return None if state["state"] == "receiving" else float(state["completed_at"] or 0.0)

    def _expire_headers(self) -> None:
        """Headers read ahead for a study that completed a minute ago and more are not taken here
        any more (its job ran on another replica, or has waited that long for a worker here)."""
        if self._parsed is not None:
            self._parsed.expire(self._stopped_receiving, grace_s=HEADERS_KEPT_S)

    def _wake_at(self, when: float) -> None:
        self.scheduler.add_job(self.wake, "date", run_date=datetime.fromtimestamp(when, tz=timezone.utc),
                               misfire_grace_time=None)

    def _import_pipeline(self, load_after: Callable[[], object]) -> None:
        load_after()
        self._wanted.wait()
        if not self._stop.is_set():
            self._load_pipeline()

    def _load_pipeline(self) -> None:
        """torch and MONAI (seconds to import, 5 s of CPU) load here, once, while the receivers
        already accept associations; a worker waits for it before it runs a job (several threads
        importing torch at once can deadlock), and torch's threads are fitted to a CPU quota
        (inference.pipeline.confine_threads). Then highdicom reads its tables of the standard
        (node.encode.warmup), so that the first study does not wait for them either. What is
        loaded by then is kept out of the collector's walks (node.jobs.heap)."""
        try:
            started = time.monotonic()
            importlib.import_module("node.jobs.stages")
            threads = importlib.import_module("inference.pipeline").confine_threads()
            importlib.import_module("node.encode.warmup").warm_up()
            frozen = freeze_loaded_objects()
            # after the freeze: headers read ahead are let go like any job's
            self._parsed = importlib.import_module("inference.headers").ParsedHeaders()
            self.scheduler.add_job(self._expire_headers, "interval", seconds=HEADERS_KEPT_S / 2,
                                   id="read-ahead-expiry", replace_existing=True, coalesce=True)
            logs.event(log, "pipeline_ready", seconds=round(time.monotonic() - started, 2), threads=threads,
                       frozen_objects=frozen)
        except Exception:  # the first job then meets the same failure and reports it
            log.exception("pipeline_load_failed")
        finally:
            self._go.set()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._go.is_set():  # nothing is claimed before the pipeline has loaded
                    if not self._wanted.is_set() and self.jobs.claimable():
                        self._wanted.set()
                    self._go.wait(1.0)
                    continue
                job = self._claim()
                if job is not None:
                    try:
                        self.run(job)
                    finally:
                        self._turns.ended(job)
                    release_free_memory()
            except Exception as exc:  # e.g. the index busy past its timeout: the worker must live on
                # (a job caught between states stays running and runs again at the next start)
                logs.event(log, "job_worker_error", logging.ERROR, error=type(exc).__name__)
                self._stop.wait(1.0)
                continue
            if job is None:
                self._wake.wait(1.0)
                if not self._stop.is_set():  # a stop's wake-up is for every worker: leave it set
                    self._wake.clear()

    def _claim(self) -> Job | None:
        """The next job for this worker, in its turn (node.jobs.turns); none once the node stops."""
        if self._stopping.is_set():
            return None
        job = self._turns.take(self.jobs.claim, alone=self._alone,
                               next_alone=lambda: self._alone_after(self.jobs.next_interruptions()),
                               waiting=lambda: not self._stopping.is_set())
        if job is not None and self._stopping.is_set():
            # claimed as the stop came (perhaps after the stop's mark, or its release): not started
            self._hand_back(job)
            self._turns.ended(job)
            return None
        return job

    def _hand_back(self, job: Job) -> None:
        """A job claimed as the stop came, queued again at once, uncounted: another replica may
        take it now. Where that fails (the index busy) it is marked, as the running ones were, so
        that a SIGKILL before the next start does not count against it."""
        try:
            self.jobs.release_running(job.id)
        except Exception as exc:  # noqa: BLE001 - the stop goes on; its own release may still queue it
            logs.event(log, "job_release_failed", logging.WARNING, job=job.id, error=type(exc).__name__)
            self._mark_stopping()

    def _alone(self, job: Job) -> bool:
        return self._alone_after(job.interruptions)

    def _alone_after(self, interruptions: int | None) -> bool:
        """Whether a job with so many deaths against it runs alone: one past the limit fails at
        once (_execute), nothing to wait for."""
        return 0 < (interruptions or 0) < self.config.pipeline.interrupted_runs

    # -- one job ------------------------------------------------------------------------------

    def run(self, job: Job) -> None:
        """Run a claimed job to its next state; never raises."""
        try:
            self._run(job)
        except IllegalTransition as exc:  # released at this process's stop, or taken over by a replica
            logs.event(log, "job_lease_lost", logging.WARNING, job=job.id, study_uid=job.study_uid, reason=str(exc))

    def _run(self, job: Job) -> None:
        started = time.time()
        progress = Progress()
        try:
            self._execute(job, progress)
        except IllegalTransition:  # not this process's job any more: nothing of it to move (run)
            raise
        except Superseded as exc:
            self.jobs.abandon(job.id, exc.newer)
            logs.event(log, "job_superseded", job=job.id, study_uid=job.study_uid, newer_job=exc.newer,
                       stage=progress.stage)
            return
        except Exception as exc:  # the job gets its state and reason; the service and other jobs go on
            reason = describe(exc, progress.stage)
            if is_transient(exc, beside_others=self._turns.running > 1):
                self._wait(job, waiting_reason(exc, reason))
            else:
                self.jobs.fail(job.id, reason)
                logs.event(log, "job_failed", logging.ERROR, job=job.id, study_uid=job.study_uid, reason=reason[:500])
                metrics.job_finished(self.jobs, job.id, "failed")
                self._notify_failure(job, reason)
            return
        self.jobs.finish(job.id)
        logs.event(log, "job_done", job=job.id, study_uid=job.study_uid, seconds=round(time.time() - started, 3))
        metrics.job_finished(self.jobs, job.id, "done")

    def _wait(self, job: Job, reason: str) -> None:
        inference = self.config.inference
        delay = backoff_delay(job.attempts, inference.retry_initial_s, inference.retry_max_s)
        state = self.jobs.wait(job.id, reason, delay, inference.retry_deadline_s)
        if state is JobState.WAITING:
            logs.event(log, "job_waiting", logging.WARNING, job=job.id, study_uid=job.study_uid,
                       retry_in_s=round(delay, 1), attempt=job.attempts, reason=reason[:500])
            self._wake_at(time.time() + delay)
        else:
            logs.event(log, "job_failed", logging.ERROR, job=job.id, study_uid=job.study_uid,
                       reason=f"retry deadline passed: {reason}"[:500])
            metrics.job_finished(self.jobs, job.id, "failed")
            self._notify_failure(job, f"retry deadline passed: {reason}")

    def _notify_failure(self, job: Job, reason: str) -> None:
        """The 'AI ran' notice for a job failed for good (node.jobs.notices; never raises)."""
        from node.jobs.notices import send_failure_notices

        send_failure_notices(self, job, reason)

    def _execute(self, job: Job, progress: Progress) -> None:
        if job.interruptions >= self.config.pipeline.interrupted_runs:
            raise JobError(f"the node stopped {job.interruptions} times while this job ran (last in its"
                           f" {job.stage or 'first'} stage), killed or crashed: it is not run again, as it may be"
                           f" what stops the node (killed for memory: see the kernel's log); `dicom-node jobs retry"
                           f" {job.id}` runs it again")
        view = study_from_index(self.index, job.study_uid, self.data_dir)
        if view is None:
            raise JobError(f"study {job.study_uid} has no stored instances")
        decision = job.decision
        if decision is None:  # routing failed at completion (or an older release's job): route now
            progress.stage = "route"
            decision = self.decide(job.study_uid)
            self.jobs.set_decision(job.id, decision)
        if view.missing and any(applied.actions.forward_to for applied in decision.applied):
            raise JobError(f"{view.missing} instance(s) of the study have lost their file (instances_missing):"
                           " forwarding it would send part of it; send the study again")
        if decision.returned is not None:
            from node.jobs.returns import receive_results

            receive_results(self, job, decision.returned, view, progress)
            return
        for applied in decision.applied:
            for name in applied.actions.forward_to:
                files = [f for series in view.series for f in series.files]
                self.outbox.enqueue(f"{job.id}:{applied.rule}:forward", job.study_uid,
                                    self.destination(name, view), files, guard=self.still_current(job))
            if applied.actions.deidentify is not None:
                self._send_deidentified(job, applied, view, progress)
            for model in applied.actions.run:
                task = self._task(job, applied, model, view)
                live = self._run_model(job, task, progress)
                for candidate in applied.actions.shadow:
                    if candidate.partition("@")[0] == model.partition("@")[0]:
                        run_shadow(self, job, task, candidate, live, progress)

    def _chosen(self, applied: AppliedRule, view: StudyView) -> SeriesView:
        series = next((s for s in view.series if s.series_uid == applied.series_uid), None)
        if series is None:
            raise JobError(f"series {applied.series_uid} chosen by rule {applied.rule} has no stored instances")
        if series.missing:
            raise JobError(f"{series.label()} chosen by rule {applied.rule}: {series.missing} of its instances have"
                           " lost their file (instances_missing); results from the rest would be wrong, send the"
                           " study again")
        return series

    def _send_deidentified(self, job: Job, applied: AppliedRule, view: StudyView, progress: Progress) -> None:
        from node.jobs.deidentify import deidentified_series, open_round_trip, study_pseudonym_of

        action = applied.actions.deidentify
        assert action is not None
        project = self.config.deidentification.get(action.project)
        if project is None:
            raise JobError(f"rule {applied.rule}: no de-identification project {action.project!r} in node.yaml")
        series = self._chosen(applied, view)
        key = f"{job.id}:{applied.rule}:deidentify"
        files = [Path(f) for f in job.outputs.get(key, [])]
        if files and all(f.is_file() for f in files):  # a re-run: written and mapped already
            study_pseudonym = study_pseudonym_of(files)
        else:
            with self.stage(job, "deidentify", progress):
                sent = deidentified_series(job.id, applied.rule, list(series.files), action.project, project,
                                           self.data_dir / "results" / key.replace(":", "_"), self.spool,
                                           self.index)
            files, study_pseudonym = sent.files, sent.study_pseudonym
            self.jobs.record_outputs(job.id, key, files)
        if action.results_to:  # before the copy goes: results may come back at once
            open_round_trip(self.index, job_id=job.id, rule=applied.rule, study_uid=job.study_uid, action=action,
                            project=project, source=series.files[0], study_pseudonym=study_pseudonym)
            when = datetime.fromtimestamp(time.time() + action.results_within_minutes * 60 + 1, tz=timezone.utc)
            self.scheduler.add_job(self.time_out_round_trips, "date", run_date=when, misfire_grace_time=None)
        for name in action.send_to:
            self.outbox.enqueue(key, job.study_uid, name, files, guard=self.still_current(job))

    def time_out_round_trips(self) -> None:
        """Round trips past their deadline (node/jobs/returns.py): checked at each one's deadline
        and by the service's sweep (after a restart)."""
        from node.jobs.returns import time_out_overdue

        time_out_overdue(self)

    def _task(self, job: Job, applied: AppliedRule, model: str, view: StudyView) -> ModelTask:
        series = self._chosen(applied, view)
        from node.jobs.stages import ModelTask

        return ModelTask(
            job_id=job.id, study_uid=job.study_uid, rule=applied.rule, model=model, series_uid=series.series_uid,
            files=tuple(series.files), outputs=tuple(applied.actions.outputs),
            destinations=tuple(self.destination(name, view) for name in applied.actions.send_to),
            notices=applied.actions.notices,
        )

    def _run_model(self, job: Job, task: ModelTask, progress: Progress) -> tuple[list, list] | None:
        """Run, encode and queue; (volumes, results) when inference ran (not for a re-run that
        only had delivery left)."""
        from inference.pipeline import torch_threads
        from node.jobs import stages

        spec = self.models.spec(task.model)
        ran = None
        variants = {d: self.config.destinations[d].output(self.config.output) for d in task.destinations}
        encoded = {key: [Path(f) for f in files] for key, files in job.outputs.items()
                   if all(Path(f).is_file() for f in files)}
        missing = {task.output_key(o): o for o in variants.values() if task.output_key(o) not in encoded}
        if missing:  # else a re-run after a crash: the results were written, only delivery is left
            with self.stage(job, "load", progress):
                ahead = self._parsed.take(job.study_uid, task.files) if self._parsed is not None else {}
                volumes = stages.load(task, ahead)  # several for e.g. a multi-echo MR series: one result set each
            logs.event(log, "series_loaded", job=job.id, series_uid=task.series_uid, instances=len(task.files),
                       read_ahead=len(ahead))
            results = []
            for volume in volumes:
                with self.stage(job, "inference", progress), \
                        self.backends.use(f"{spec.name}@{spec.version}") as backend:
                    results.append(stages.infer(volume, spec, backend, explain="SALIENCY" in {
                        *task.outputs, *(name for o in variants.values() for name in o.outputs or ())}))
            folder = self.data_dir / "results" / task.key.replace(":", "_")
            if any(_READS_VOXELS & set(options.outputs or task.outputs) for options in missing.values()):
                with self.stage(job, "encode", progress):  # inference let the voxels go: read them again
                    for result in results:  # before any variant is written, so that a resend meanwhile
                        _ = result.volume.array  # fails the job before two variants could differ
            for key, options in missing.items():
                with self.stage(job, "encode", progress):
                    files = self.encode_results(job, task, spec, results, options, folder / options.variant)
                self.jobs.record_outputs(job.id, key, files)
                encoded[key] = files
            record_live(self, job, task, spec.version, results, [f for key in missing for f in encoded[key]])
            ran = (volumes, results)
            for result in results:
                logs.event(log, "model_ran", job=job.id, model=spec.name, version=spec.version,
                           series_uid=task.series_uid,
                           volume=result.volume.label or None, findings=len(getattr(result, "findings", ())),
                           threads=torch_threads(), seconds={k: round(v, 3) for k, v in result.seconds.items()})
                metrics.model_ran(spec.name, result.seconds)  # per model: versions are in dicom_node_model_runs
        with self.stage(job, "enqueue", progress):
            for destination, options in variants.items():
                self.outbox.enqueue(task.output_key(options), task.study_uid, destination,
                                    encoded[task.output_key(options)], guard=self.still_current(job))
        return ran

    def encode_results(self, job: Job, task: ModelTask, spec: ModelSpec, results: list, options: OutputOptions,
                       folder: Path) -> list[Path]:
        """The SEG/SR/... of one variant of a task's results (one subfolder per volume when a series
        held several), with UIDs that depend only on the source, the model version and the rule."""
        from node.jobs import stages

        files: list[Path] = []
        for number, result in enumerate(results, start=1):
            source = SourceIdentity.of(task.study_uid, task.series_uid, task.instance_uids, result.volume.label)
            uids = ResultUIDs(installation_uid=self.installation_uid, job_id=job.id, source=source,
                              model=spec.name, model_version=str(spec.version), rule=task.rule,
                              root=self.config.output.uid_root)
            subfolder = folder / (f"volume{number}" if len(results) > 1 else "")
            files += stages.encode(result, options, uids, options.outputs or task.outputs, subfolder, self.spool,
                                   notices=task.notices)
        return files

    def destination(self, name: str, view: StudyView) -> str:
        if name != SENDER:
            return name
        found = self.config.destination_for_caller(view.calling_ae)
        if found is None and self.config.sending.sender_fallback:
            logs.event(log, "sender_fallback_used", study_uid=view.study_uid, calling_ae=view.calling_ae,
                       destination=self.config.sending.sender_fallback)
            return self.config.sending.sender_fallback
        if found is None:
            raise JobError(f"results go back to the sender, but no destination has the study's calling AE title"
                           f" {view.calling_ae!r} (and sending.sender_fallback is not set)")
        return found

    def still_current(self, job: Job, running: bool = True) -> Callable[[Db], None]:
        """A guard for the transaction that queues the job's results: the study completing again
        (a newer job) commits either before it, and nothing is queued, or after it. `running`:
        and this process still runs the job (not released at a stop, nor taken over); a failed
        job's notice is queued after it failed."""
        def check(db: Db) -> None:
            newer = self.jobs.newer_job(job.id, job.study_uid, db)
            if newer is not None:
                raise Superseded(newer)
            if running:
                self.jobs.check_held(db, job.id)
        return check

    @contextmanager
    def stage(self, job: Job, name: str, progress: Progress) -> Iterator[None]:
        newer = self.jobs.newer_job(job.id, job.study_uid)
        if newer is not None:  # the study completed again while this job ran
            raise Superseded(newer)
        progress.stage = name
        self.jobs.enter_stage(job.id, name)
        started = time.time()
        yield
        self.jobs.record_stage(job.id, name, started, time.time())


class Progress:
    """The stage a job is in, for its failure reason."""

    stage: str | None = None
