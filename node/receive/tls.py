"""The receivers' TLS context (scp.tls), also built by `config check` and before a reload, so a
certificate that cannot be loaded is refused there instead of stopping every new receiver."""

from __future__ import annotations

import ssl

from node.config import NodeConfig


def server_ssl_context(config: NodeConfig) -> ssl.SSLContext | None:
    tls = config.scp.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.client_ca:
        context.load_verify_locations(str(tls.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
