"""A receiver process: `python -m node.receive CHANNEL_FD SETTINGS_FD` (node/receive/launch.py).

Only the service stops a receiver (STOP_SIGNAL, or its channel closing): a SIGTERM or Ctrl-C sent
to the whole process group (a terminal, systemd's control group) must leave the service's drain
to end the associations, not abort them here. So both are set aside before anything is imported:
a receiver is launched while the service starts, and its imports take about a second.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)

from node.receive.workers import main  # noqa: E402  (after the signals, on purpose)

main()
