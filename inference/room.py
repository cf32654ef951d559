"""Room for a segmentation model's output: checked against the memory left to the node before it
is allocated, and counted while it is held. A series' volume is checked the same way before it is
read (node.jobs.stages.load): a series too big for the node fails saying so instead of getting
the service killed (twice, before the job is failed for its deaths: pipeline.interrupted_runs).

Allocated anyway, an output that does not fit gets the service (or its container) killed for
memory, with every job and delivery it holds, and the job would run again at the next start.
Only the output is counted: it is a job's one array of the model grid times the classes; 105
classes on a 300-slice CT at 1.5 mm (benchmarks.many_classes) peaked at 4777 MiB over the job's
start, 4576 MiB of it the output.
"""

from __future__ import annotations

import math
import threading

import torch

from common.memory import memory_room
from inference.errors import MemoryTaken, NotEnoughMemory
from inference.spec import ModelSpec
from inference.windows import output_bytes


class OutputRoom:
    """The outputs this process holds now. One job at a time goes from its check to its
    output's allocation (with `pipeline.workers` above 1, the next job's check then counts it),
    and what the others hold is not counted as the service's for good: they let it go."""

    def __init__(self) -> None:
        self._turn = threading.Lock()
        self._held = 0

    def allocate(self, spec: ModelSpec, spatial: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """Zeros for `spec`'s sliding-window output over a model grid of `spatial` (padded to a
        window: inference.windows.output_bytes), once check_room passes; and the bytes to
        `release` once the job lets it go."""
        with self._turn:
            size, need = check_room(spec, spatial, others=self._held)
            output = torch.zeros((1, spec.output_channels, *size), dtype=dtype)
            self._held += need
        return output, need

    def check(self, need: int, what: str, detail: str, advice: str) -> None:
        """Another of a job's needs (its series' volume) checked as an output is, beside the
        outputs held now (check_fits); not counted: the job's own arrays hold it."""
        with self._turn:
            check_fits(need, what, detail, advice, others=self._held)

    def release(self, held: int) -> None:
        with self._turn:
            self._held -= held


OUTPUTS = OutputRoom()  # the process's: every job's output is counted in one place


def check_room(spec: ModelSpec, spatial: tuple[int, ...], others: int = 0) -> tuple[tuple[int, ...], int]:
    """The output's padded size and bytes where it fits in the memory left to the node; else
    raise (check_fits)."""
    need, size = output_bytes(spec.preprocessing.patch_size, spatial, spec.output_channels)
    check_fits(need, f"model {spec.name}'s output on this series",
               f"{spec.output_channels} classes x {'x'.join(map(str, size))} voxels, float32",
               "give the node more memory, or the model a coarser grid", others)
    return size, need


def check_fits(need: int, what: str, detail: str, advice: str, others: int = 0) -> None:
    """Raise where `need` bytes do not fit in the memory left to the node (common.memory);
    `what` needs them, `detail` says of what they are, `advice` what would let them fit. Beyond
    the limit less what the service holds for good (its anonymous memory: libraries, models, this
    job's arrays; less `others`, the outputs other jobs hold now), waiting cannot help:
    NotEnoughMemory; within it, MemoryTaken (the job waits for memory that other jobs or
    processes hold now)."""
    room = memory_room()
    if room is None or need <= room.available:
        return
    what = f"{what} needs {_gib(need, up=True)} GiB ({detail})"
    kept = max(room.own - others, 0)
    if need > room.limit - kept:
        raise NotEnoughMemory(f"{what}; the node's machine or container allows {_gib(room.limit)} GiB, of which its"
                              f" service holds {_gib(kept, up=True)} GiB: run, it would be killed for memory;"
                              f" {advice}", beyond_limit=need > room.limit)
    raise MemoryTaken(f"{what}, and {_gib(room.available)} GiB are free now")


def _gib(size: int, up: bool = False) -> str:
    """Bytes in GiB to two decimals, rounded up (what is needed) or down (what there is), so
    that a message never says a need is more than an equal room."""
    hundredths = size * 100 / 2**30
    return f"{(math.ceil(hundredths) if up else math.floor(hundredths)) / 100:.2f}"
