"""The node service: receiver processes, completion timers and the work queue, started together."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from node import logs
from node.assemble.completion import CompletionTimers
from node.assemble.workqueue import WorkQueue
from node.config import NodeConfig
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
        self.completion = CompletionTimers(self.index, self.scheduler)
        self.receivers = ReceiverPool(config, on_study_opened=self.completion.arm)
        self.outbox = Outbox(config, self.index, self.scheduler)

    @property
    def port(self) -> int:
        return self.receivers.port

    def start(self) -> None:
        partial = self.spool.clear_partial_writes()  # before any receiver runs
        requeued = self.queue.requeue_claimed()
        self.scheduler.start()
        self.completion.start()
        self.outbox.start()
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
        )

    def stop(self) -> None:
        self.receivers.stop()
        self.scheduler.shutdown(wait=False)
        logs.event(log, "node_stopped")

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        while not stop.wait(1.0):
            pass
        self.stop()
