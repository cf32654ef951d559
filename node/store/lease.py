"""Who holds a lease: one name per node process, unique across machines, restarts and replicas."""

from __future__ import annotations

import os
import socket
import uuid
from functools import cache


@cache
def process_owner() -> str:
    """host:pid:random (the random part: a pid reused by a later process is another owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
