"""Pass MPPS on to other AEs (completion.mpps_forward): a RIS or PACS keeps tracking the steps.

Each N-CREATE and N-SET the node accepted was queued (node.store.signal_forwards) in the
transaction that stored it. A sweep sends what is due, per destination over one association, in
the order it came; an N-SET waits for its step's N-CREATE. Statuses (PS3.4 F.7.2):
- success or a warning: delivered;
- 0x0111 to an N-CREATE sent before (duplicate: the first attempt arrived, its response did
  not), 0x0110 to an N-SET sent before (the step already ended by it): delivered;
- any other failure status: dead, with the status (sending it again would get the same);
- no association, no response: retried with backoff (sending.retry_*) until sending.deadline_s.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from pynetdicom.presentation import build_context
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from common import logs
from common.backoff import backoff_delay
from node.config import NodeConfig
from node.send.scu import associate, destination_ssl_context, rejection
from node.store.signal_forwards import Forward, ForwardState, SignalForwards, decoded

log = logging.getLogger("node.send")

DUPLICATE_SOP_INSTANCE = 0x0111
MAY_NO_LONGER_BE_UPDATED = 0x0110


def _delivered(forward: Forward, status: int) -> bool:
    if status == 0 or status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return True
    again = forward.attempts > 0
    return again and ((forward.operation == "n_create" and status == DUPLICATE_SOP_INSTANCE)
                      or (forward.operation == "n_set" and status == MAY_NO_LONGER_BE_UPDATED))


class SignalForwarder:
    def __init__(self, forwards: SignalForwards, config: Callable[[], NodeConfig]):
        """`config()`: the configuration in force (destinations and retry settings reload live)."""
        self.forwards = forwards
        self.config = config

    def sweep(self) -> None:
        """Send every forward that is due (the scheduler calls this every sending.sweep_s)."""
        by_destination: dict[str, list[Forward]] = {}
        for forward in self.forwards.claim(time.time()):
            by_destination.setdefault(forward.destination, []).append(forward)
        for destination, forwards in by_destination.items():
            self._send(destination, forwards)

    def _send(self, name: str, forwards: list[Forward]) -> None:
        config = self.config()
        destination = config.destinations.get(name)
        if destination is None:
            for forward in forwards:
                self._dead(forward, f"no destination named {name!r} is configured")
            return
        where = destination.where
        assoc = associate(destination.host, destination.port, config.scp.ae_title, destination.ae_title,
                          [build_context(ModalityPerformedProcedureStep)], destination_ssl_context(destination.tls),
                          timeout=config.sending.timeout_s)
        if not assoc.is_established:
            refused = rejection(assoc)
            for forward in forwards:
                self._later(forward, f"no association with {where}" + (f" ({refused.text})" if refused else ""))
            return
        failed_steps: set[str] = set()  # a step whose forward waits: its later ones wait too
        try:
            for forward in forwards:
                if forward.sop_instance_uid in failed_steps or not assoc.is_established:
                    self._later(forward, f"{where}: an earlier request of the step is not delivered yet")
                    failed_steps.add(forward.sop_instance_uid)
                    continue
                ds = decoded(forward.dataset)
                if forward.operation == "n_create":
                    status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, forward.sop_instance_uid)
                else:
                    status, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, forward.sop_instance_uid)
                code = getattr(status, "Status", None)
                if code is None:
                    self._later(forward, f"{where} sent no response (connection lost or timed out)")
                    failed_steps.add(forward.sop_instance_uid)
                elif _delivered(forward, int(code)):
                    self.forwards.finish(forward.id, ForwardState.DELIVERED, time.time())
                    logs.event(log, "mpps_forwarded", destination=name, operation=forward.operation,
                               sop_instance_uid=forward.sop_instance_uid, status=f"0x{int(code):04X}")
                else:
                    self._dead(forward, f"{where} answered {forward.operation.upper().replace('_', '-')} with"
                                        f" status 0x{int(code):04X}")
        finally:
            if assoc.is_established:
                assoc.release()

    def _later(self, forward: Forward, reason: str) -> None:
        sending = self.config().sending
        now = time.time()
        if now - forward.created_at >= sending.deadline_s:
            self._dead(forward, f"{reason}; not delivered within sending.deadline_s")
            return
        self.forwards.retry(forward.id, now, now + backoff_delay(forward.attempts + 1, sending.retry_initial_s,
                                                                 sending.retry_max_s), reason)
        logs.event(log, "mpps_forward_retry", logging.WARNING, destination=forward.destination,
                   operation=forward.operation, sop_instance_uid=forward.sop_instance_uid, reason=reason)

    def _dead(self, forward: Forward, reason: str) -> None:
        self.forwards.finish(forward.id, ForwardState.DEAD, time.time(), reason)
        logs.event(log, "mpps_forward_dead", logging.ERROR, destination=forward.destination,
                   operation=forward.operation, sop_instance_uid=forward.sop_instance_uid, reason=reason)
