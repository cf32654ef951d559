"""The node service: receiver processes, completion timers and the work queue, started together."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from inference.repository import ModelRepository
from node import logs
from node.assemble.completion import CompletionTimers
from node.assemble.workqueue import WorkQueue
from node.config import NodeConfig
from node.jobs import Pipeline
from node.route.live import LiveRules
from node.receive.workers import ReceiverPool
from node.send.outbox import Outbox
from node.store.index import Index
from node.store.spool import Spool

log = logging.getLogger("node.service")


class NodeService:
    def __init__(self, config: NodeConfig):
        self.config = config
        data_dir = Path(config.storage.data_dir)
        self.spool = Spool(data_dir, config.storage.min_free_mb)
        self.index = Index(data_dir / "index.sqlite")
        self.queue = WorkQueue(self.index, data_dir)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.models = ModelRepository(config.inference.model_repository)
        self.rules = LiveRules(config.pipeline.routing_file, self.models.names, set(config.destinations))
        self.outbox = Outbox(config, self.index, self.scheduler)
        self.pipeline = Pipeline(config, self.index, self.queue, self.outbox, self.rules, self.models, self.spool)
        self.completion = CompletionTimers(self.index, self.scheduler, on_complete=self.pipeline.route,
                                           quiet_override=self.pipeline.quiet_period_for)
        self.receivers = ReceiverPool(config, on_study_opened=self._study_opened)

    def _study_opened(self, study_uid: str, deadline: float) -> None:
        """Arm the completion timer; early enough for the shortest quiet period a rule may set."""
        shortest = min((r.quiet_period_s for r in self.rules.current.file.rules if r.quiet_period_s), default=None)
        self.completion.arm(study_uid, min(deadline, time.time() + shortest) if shortest else deadline)

    @property
    def port(self) -> int:
        return self.receivers.port

    def start(self) -> None:
        partial = self.spool.clear_partial_writes()  # before any receiver runs
        requeued = self.queue.requeue_claimed()
        self.scheduler.start()
        self.completion.start()
        self.outbox.start()
        self.scheduler.add_job(self.rules.check_for_changes, "interval", seconds=2, id="routing-reload",
                               coalesce=True, max_instances=1)
        self.pipeline.start()
        self.receivers.start()
        logs.event(
            log,
            "node_started",
            ae_title=self.config.scp.ae_title,
            bind=self.config.scp.bind,
            port=self.port,
            receivers=self.receivers.count,
            data_dir=str(self.config.storage.data_dir),
            requeued_work_items=requeued,
            partial_writes_removed=partial,
            tls=self.config.scp.tls.enabled,
            rules_version=self.rules.current.version,
            models=sorted(self.models.names()),
            backend="triton" if self.config.inference.triton.url else "local",
        )

    def stop(self) -> None:
        self.receivers.stop()
        self.pipeline.stop()
        self.scheduler.shutdown(wait=False)
        logs.event(log, "node_stopped")

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self.rules.reload, daemon=True).start())
        self.start()
        while not stop.wait(1.0):
            pass
        self.stop()
