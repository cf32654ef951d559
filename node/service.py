"""The node service: receiver processes, completion timers, the job runner and the outbox, started together."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError

from inference.repository import ModelRepository
from common import logs
from node.assemble.completion import CompletionTimers
from node.assemble.read_ahead import ReadAhead
from node.config import NodeConfig
from node.console.listening import bind_console
from node.jobs.admission import SIGNAL_POLL_S, Admission
from node.jobs.returns import TIMEOUT_SWEEP_S
from node.jobs.runner import JobRunner
from node.jobs.store import JobStore
from node.liveconfig import LiveConfig, receivers_affected
from node.retention import Retention
from node.route.live import LiveRules
from node.receive.hl7 import Hl7Listener
from node.receive.launch import LaunchedReceiver
from node.receive.workers import ReceiverPool
from node.send.atna import AtnaSender
from node.send.signal_forward import SignalForwarder
from node.send.outbox import Outbox
from node.store.audit import AuditEvent, AuditEventType, AuditRecord, AuditTrail, Outcome
from node.store.index import Index
from node.store.lease import Heartbeat
from node.store.signal_forwards import SignalForwards
from node.store.spool import Spool

log = logging.getLogger("node.service")
STOP_SEND_TIMEOUT_S = 5.0


def stop_scheduler(scheduler: BackgroundScheduler) -> None:
    """Stop the timers without tripping APScheduler's shutdown race.

    `shutdown()` marks the scheduler stopped before it takes the job-store lock. A turn of the
    scheduler's thread already inside that lock then removes a finished one-shot job (a
    completion timer, a runner wake-up) from the pending list instead of the store, and the
    thread dies on `JobLookupError` (agronholm/apscheduler#104 is the same class of race).
    Pausing first stops new turns; `remove_all_jobs()` takes the lock, so it waits for a turn in
    progress to end. The jobs are in memory and rebuilt from the index at the next start. Left
    open: a turn that began before the pause but takes the lock only after a job added since
    then falls due and after `shutdown()` began (three coincidences at once)."""
    scheduler.pause()
    scheduler.remove_all_jobs()
    scheduler.shutdown(wait=False)


class NodeService:
    def __init__(self, config: NodeConfig, config_path: Path | None = None,
                 overrides: dict[str, object] | None = None, launched: Sequence[LaunchedReceiver] = ()):
        """`config_path` and `overrides` (command-line flags): node.yaml is reloaded from there.
        `launched`: receiver processes launched ahead, given their settings by `start`."""
        self.config = config
        data_dir = Path(config.storage.data_dir)
        self.spool = Spool(data_dir, config.storage.min_free_mb, config.storage.journal_mb)
        self.index = Index.open(config.storage)
        self.jobs = JobStore(self.index, lease_s=config.storage.lease_s)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.models = ModelRepository(config.inference.model_repository)
        self.rules = LiveRules(config.pipeline.routing_file, self.models.catalog, set(config.destinations),
                               set(config.deidentification))
        self.live = LiveConfig(config, self.rules, config_path, overrides)
        self.live.on_change(self._config_changed)
        self.retention = Retention(self.index, data_dir)
        self.trail = AuditTrail(self.index)
        self.atna = AtnaSender(self.trail, lambda: self.live.current)
        self.http = None
        self.outbox = Outbox(config, self.index, self.scheduler)
        # The completion settings in force for a caller (the receivers computed their deadline
        # with the settings they started with; a rule's quiet period replaces both).
        self.admission = admission = Admission(self.index, self.rules, data_dir, config=lambda: self.live.current)
        self.signals = admission.signals
        self.runner = JobRunner(config, self.index, self.jobs, self.outbox, self.models, self.spool, self.scheduler,
                                decide=admission.decide)
        self.read_ahead = ReadAhead(self.index, self.scheduler, read=self.runner.read_ahead,
                                    enabled=self.runner.reads_ahead)
        self.completion = CompletionTimers(self.index, self.scheduler, prepare=admission.route, admit=admission.admit,
                                           on_admitted=self.runner.wake, sweep_s=config.completion.sweep_s,
                                           first_check=self._first_check, on_waiting=self.read_ahead.waiting)
        self.receivers = ReceiverPool(config, on_study_opened=self._study_opened, on_signal=self._signal,
                                      launched=launched)
        self.hl7 = Hl7Listener(config.hl7, self.signals, self._signal) if config.hl7.port is not None else None
        forwards = SignalForwards(self.index, config.storage.lease_s)
        self.forwarder = SignalForwarder(forwards, lambda: self.live.current)
        # Keeps the jobs and sends this process holds; a replica that stops renewing loses them.
        self.heartbeat = Heartbeat(config.storage.lease_s, [self.jobs.renew_leases, self.outbox.renew_leases,
                                                            forwards.renew_leases])

    def _signal(self, study_uid: str) -> None:
        """A completion signal named the study (MPPS, IAN, HL7): check it now."""
        self.completion.arm(study_uid, time.time())

    def _application(self, event_type: AuditEventType) -> None:
        """The node started or stopped (PS3.15 A.5.3.1 Application Activity); an index that
        fails here is logged, it does not stop the start or the stop."""
        try:
            self.trail.record(AuditRecord(AuditEvent.APPLICATION_ACTIVITY, "E", Outcome.SUCCESS,
                                          actor=self.config.scp.ae_title, event_type=event_type), time.time())
        except SQLAlchemyError as exc:
            logs.event(log, "audit_failed", logging.ERROR, event=AuditEvent.APPLICATION_ACTIVITY.value,
                       error=type(exc).__name__)

    def _prune_audit(self) -> None:
        pruned = self.trail.prune(time.time() - self.live.current.audit.keep_days * 86400)
        if pruned:
            logs.event(log, "audit_pruned", records=pruned)

    def _prune_logins(self) -> None:
        """Ended console sessions, abandoned sign-ins and failed logins past the throttling window."""
        from node.console.sessions import Sessions
        from node.store.accounts import Accounts

        http = self.live.current.http
        Sessions(self.index).prune(http.session_idle_minutes * 60, http.session_max_hours * 3600)
        Accounts(self.index).prune_failures(time.time() - http.login_window_minutes * 60)

    def _prune_signals(self) -> None:
        pruned = self.signals.prune(time.time(), self.live.current.completion.signal_keep_s)
        if pruned:
            logs.event(log, "signals_pruned", signals=pruned)

    def _prune_pseudonyms(self) -> None:
        """The de-identification mapping, and the round trips it serves, past their projects' mapping_days."""
        from node.store.pseudonyms import PseudonymMap
        from node.store.roundtrips import RoundTrips

        now = time.time()
        pruned, trips = PseudonymMap(self.index).prune(now), RoundTrips(self.index).prune(now)
        if pruned or trips:
            logs.event(log, "pseudonyms_pruned", rows=pruned, round_trips=trips)

    def _study_opened(self, study_uid: str, deadline: float) -> None:
        self.completion.arm(study_uid, self._first_check(study_uid, deadline))
        self.read_ahead.opened(study_uid)

    def _first_check(self, study_uid: str, deadline: float) -> float:
        """When to check a receiving study first: early enough for the shortest quiet period a
        rule or the completion settings in force may set, or for a completion signal that may
        have come already (a check that finds it not due re-arms itself)."""
        completion = self.live.current.completion
        periods = [r.quiet_period_s for r in self.rules.current.file.rules if r.quiet_period_s]
        periods += [completion.quiet_period_s, *completion.quiet_period_by_calling_ae.values()]
        state = self.index.study_state(study_uid)
        if self.admission.polls(study_uid, (state or {}).get("calling_ae") or ""):
            periods.append(SIGNAL_POLL_S)
        return min(deadline, time.time() + min(periods))

    def _config_changed(self, old: NodeConfig, new: NodeConfig) -> None:
        """A reload put new live settings in force: hand them to the parts that read them."""
        self.config = self.runner.config = self.outbox.config = new
        self.spool.set_watermark(new.storage.min_free_mb)
        if new.sending.sweep_s != old.sending.sweep_s and self.scheduler.get_job("outbox-sweep"):
            self.scheduler.reschedule_job("outbox-sweep", trigger="interval", seconds=new.sending.sweep_s)
        if new.storage.retention != old.storage.retention:
            self._schedule_retention()
        if receivers_affected(old, new):
            self._reconfigure_receivers()
        if self._routes_anything():  # the pipeline loads before a study needs it
            self.runner.want_pipeline()

    def _routes_anything(self) -> bool:
        """Whether the rules in force have any rule: a node without any needs no pipeline yet."""
        return bool(self.rules.current.file.rules)

    def _reconfigure_receivers(self) -> None:
        """Receivers with the settings in force; tried again every 30 s until they start, so the
        console never shows settings that no receiver applies for long."""
        if not self.receivers.reconfigure(self.live.current) and self.scheduler.running:
            self.scheduler.add_job(self._reconfigure_receivers, "date", id="receivers-reconfigure",
                                   run_date=datetime.fromtimestamp(time.time() + 30, tz=timezone.utc),
                                   replace_existing=True, misfire_grace_time=None)

    def _schedule_retention(self) -> None:
        policy = self.live.current.storage.retention
        if policy.instances_days or policy.results_days or policy.max_store_gb:
            self.scheduler.add_job(self._run_retention, "interval", seconds=policy.interval_s, id="retention",
                                   replace_existing=True, coalesce=True, max_instances=1)
        elif self.scheduler.get_job("retention"):
            self.scheduler.remove_job("retention")

    def _run_retention(self) -> None:
        self.retention.run(self.live.current.storage.retention)

    def _start_http(self, bound: socket.socket | None) -> None:
        """The console, on the socket bound first thing (its modules load while the receiver
        processes start: the first association does not wait for them)."""
        if bound is None:
            return
        from node.console.app import HttpServer
        from node.console.context import ConsoleContext

        ctx = ConsoleContext(index=self.index, jobs=self.jobs, live=self.live, models=self.models, spool=self.spool,
                             retention=self.retention, receivers_alive=self.receivers.alive, scp_port=self.port,
                             wake_outbox=self.outbox.sweep, wake_jobs=self.runner.wake,
                             on_study_opened=self._study_opened,
                             triton_servers=self.runner.backends.servers)
        self.http = HttpServer(ctx, bound)
        self.http.start()

    @property
    def port(self) -> int:
        return self.receivers.port

    def start(self) -> None:
        from node.receive.reconcile import reconcile

        # first: a console port in use stops the start before anything runs
        bound = bind_console(self.config.http.bind, self.config.http.port) if self.config.http.port else None
        if self.hl7 is not None:
            self.hl7.start()
        # Before any receiver runs: what crashed processes journalled, put back and made durable;
        # then files without an index row, partial writes (README, Receiving).
        journalled = self.spool.recover()
        reconciled = reconcile(self.config, self.spool, self.index)
        requeued = 0 if self.index.shared else self.jobs.requeue_running()
        self.scheduler.start()
        self.heartbeat.start()
        self.completion.start()
        self.outbox.start()
        self.scheduler.add_job(self.live.check_for_changes, "interval", seconds=2, id="config-reload",
                               coalesce=True, max_instances=1)
        self._schedule_retention()
        self.scheduler.add_job(self.forwarder.sweep, "interval", seconds=self.config.sending.sweep_s,
                               id="mpps-forward-sweep", coalesce=True, max_instances=1)
        self.scheduler.add_job(self._prune_signals, "interval", seconds=min(3600.0, self.config.completion.signal_keep_s),
                               id="signal-prune", coalesce=True, max_instances=1)
        self.scheduler.add_job(self._prune_audit, "interval", seconds=3600.0, id="audit-prune", coalesce=True,
                               max_instances=1)
        self.scheduler.add_job(self._prune_logins, "interval", seconds=600.0, id="login-prune", coalesce=True,
                               max_instances=1)
        self.scheduler.add_job(self._prune_pseudonyms, "interval", seconds=3600.0, id="pseudonym-prune",
                               coalesce=True, max_instances=1)
        self.scheduler.add_job(self.runner.time_out_round_trips, "interval", seconds=TIMEOUT_SWEEP_S,
                               id="round-trip-timeouts", coalesce=True, max_instances=1)
        self.scheduler.add_job(self.atna.sweep, "interval", seconds=self.config.audit.sweep_s, id="audit-send",
                               coalesce=True, max_instances=1)
        self._application(AuditEventType.APPLICATION_START)
        self.live.write_snapshot()
        self.receivers.start()
        try:
            self._start_http(bound)
        except BaseException:
            if bound is not None:
                bound.close()
            raise
        self.runner.start(load_after=lambda: self.receivers.wait_ready(timeout=10.0),
                          load_at_start=self._routes_anything())
        logs.event(
            log,
            "node_started",
            ae_title=self.config.scp.ae_title,
            bind=self.config.scp.bind,
            port=self.port,
            receivers=self.receivers.count,
            data_dir=str(self.config.storage.data_dir),
            requeued_jobs=requeued,
            index="postgresql" if self.index.shared else "sqlite",
            installation_uid=self.runner.installation_uid,
            reconciled=reconciled,
            journal_replayed=journalled,
            tls=self.config.scp.tls.enabled,
            rules_version=self.rules.current.version,
            models=sorted(self.models.names()),
            backend="triton" if self.config.inference.triton.servers else "local",
            triton_servers=self.config.inference.triton.servers or None,
            http=f"{self.http.scheme}://{self.config.http.bind}:{self.config.http.port}" if self.http else None,
            hl7_port=self.hl7.port if self.hl7 else None,
        )

    def stop(self, hurry: threading.Event | None = None) -> None:
        """Drain, then stop: no new connections from the first moment (`/health/receiving` fails
        at once), open associations may finish within scp.timeouts.drain (`hurry`: a second
        signal cuts that short), then the console, jobs and timers stop. Jobs are claimed no more
        from the first moment; those running go on through the drain (JobRunner.stopping)."""
        self.runner.stopping()
        self.receivers.stop(drain=self.live.current.scp.timeouts.drain, hurry=hurry)
        if self.http is not None:
            self.http.stop()
        if self.hl7 is not None:
            self.hl7.stop()
        self.runner.stop()
        self.admission.stop()
        self.heartbeat.stop()
        if self.scheduler.running:  # not yet, when the start failed early (console port in use)
            # the stop in the trail, and sent if the repository answers now (else with the next
            # start), before the scheduler stops: the process ends right after it, as it always did
            self._application(AuditEventType.APPLICATION_STOP)
            try:
                self.atna.sweep(timeout=STOP_SEND_TIMEOUT_S)
            except SQLAlchemyError as exc:
                logs.event(log, "audit_send_failed", logging.WARNING, reason=type(exc).__name__)
            stop_scheduler(self.scheduler)
        self.spool.close()
        logs.event(log, "node_stopped")

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT; then drain (a second signal stops at once)."""
        stop, hurry = threading.Event(), threading.Event()

        def on_signal(*_: object) -> None:
            self.receivers.signalled()
            (hurry if stop.is_set() else stop).set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self.live.reload, daemon=True).start())
        self.start()
        while not stop.wait(1.0):
            pass
        self.stop(hurry)
