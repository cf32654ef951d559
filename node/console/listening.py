"""The console's listening socket, bound before anything else starts (a port in use stops the
node's start at once) without loading the console's modules: those load while the receiver
processes start (node.service)."""

from __future__ import annotations

import socket


def bind_console(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise OSError(exc.errno, f"the console cannot listen on {host}:{port}: {exc.strerror}") from None
