"""What the console reads from the running node: its stores, its configuration in force, health."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from inference.backends.pool import ServerStats
from inference.repository import ModelRepository
from node.config import NodeConfig
from node.console.oidc import OidcProvider
from node.console.sessions import SHARED_TOKEN_SESSION, Sessions
from node.jobs.store import JobStore
from node.liveconfig import LiveConfig
from node.retention import Retention
from node.route.rules import RuleSet
from node.store.accounts import Accounts
from node.store.audit import AuditTrail
from node.store.identity import console_secret
from node.store.index import Index
from node.store.spool import Spool


@dataclass
class ConsoleContext:
    index: Index
    jobs: JobStore
    live: LiveConfig
    models: ModelRepository
    spool: Spool
    retention: Retention
    receivers_alive: Callable[[], bool]
    scp_port: int
    wake_outbox: Callable[[], None] = lambda: None
    wake_jobs: Callable[[], None] = lambda: None
    on_study_opened: Callable[[str, float], None] = lambda study_uid, deadline: None  # STOW-RS: arm completion
    triton_servers: list[ServerStats] = field(default_factory=list)  # the job runner's, live
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.accounts = Accounts(self.index)
        self.sessions = Sessions(self.index)
        # the shared token may have changed with this start (http.* needs a restart): its sessions end
        self.sessions.end_all(SHARED_TOKEN_SESSION)
        self.trail = AuditTrail(self.index)
        self.stow_slots = threading.BoundedSemaphore(self.live.current.scp.max_associations)  # STOW-RS requests at once
        oidc = self.live.current.http.oidc  # http.* needs a restart: fixed for the process
        self.oidc = OidcProvider(oidc) if oidc is not None else None
        # signs the console's one-time messages (pages.back): from the installation's identity, so
        # every replica of one installation reads another's (a redirect may land on any of them)
        self.flash_key = hashlib.sha256(b"dicom-node flash\x00" + console_secret(self.index)).digest()

    @property
    def config(self) -> NodeConfig:
        return self.live.current

    @property
    def rules(self) -> RuleSet:
        return self.live.rules.current

    @property
    def data_dir(self) -> Path:
        return Path(self.config.storage.data_dir)
