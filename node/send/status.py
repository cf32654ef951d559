"""What a C-STORE response status means for the sender: the one rule for every C-STORE we send
(result delivery, `dicom-node send`, the demo).

PS3.7 Annex C.1 groups DIMSE statuses by their value: 0x0000 Success; 0x0001 and 0xBxxx Warning;
everything else a Failure (0xA7xx Out of Resources, 0xA9xx Data Set does not match SOP Class,
0xCxxx Cannot understand, 0x0122 SOP Class not supported, ...). PS3.4 Annex B.2.3 lists the
C-STORE ones (Warnings 0xB000 Coercion of Data Elements, 0xB007 Data Set does not match SOP
Class, 0xB006 Elements Discarded); C.4 adds the general warnings 0x0107 Attribute List Error and
0x0116 Attribute Value Out of Range.

For a sender a status is one of four outcomes:
- ``success``;
- ``warning``: the peer stored the object (with the coercion, discard or mismatch it names): it
  counts as delivered, the warning is kept. 0x0111 Duplicate SOP Instance is a Failure in PS3.7,
  but the node's result objects keep their SOP Instance UIDs on every attempt, so the peer
  already holds this very object (an attempt cut off after the store, or a replica racing
  ours): it too counts as delivered;
- ``transient``: 0xA7xx, the peer is out of resources now; sending again later may work (an
  association rejected-transient, `scu.Rejection.permanent` False, is retried the same way);
- ``permanent``: every other failure (0xA9xx, 0xCxxx, 0x0122, 0x0124 not authorized, and any
  status this table does not know): sending the same object again will not help.
"""

from __future__ import annotations

from typing import Literal

Outcome = Literal["success", "warning", "transient", "permanent"]

SUCCESS = 0x0000
DUPLICATE_SOP_INSTANCE = 0x0111
# PS3.7 C.1: 0x0001 and 0xBxxx are warnings; C.4: 0x0107 and 0x0116 are warnings too.
WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116}) | frozenset(range(0xB000, 0xC000))
OUT_OF_RESOURCES = range(0xA700, 0xA800)  # 0xA7xx


def classify_status(status: int) -> Outcome:
    """'success', 'warning', 'transient' or 'permanent' for a C-STORE response status."""
    if status == SUCCESS:
        return "success"
    if status in WARNING_STATUSES or status == DUPLICATE_SOP_INSTANCE:
        return "warning"
    if status in OUT_OF_RESOURCES:
        return "transient"
    return "permanent"  # 0xA9xx, 0xCxxx, 0x0122 and anything unknown: resending will not help


def delivered(status: int | None) -> bool:
    """Whether the peer holds the object after this status (None: no response at all)."""
    return status is not None and classify_status(int(status)) in ("success", "warning")
