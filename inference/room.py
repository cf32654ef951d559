"""Room for a job's big arrays, checked against the memory left to the node before they are
allocated: a segmentation model's output, counted while it is held; a series' volume
(node.jobs.stages.load) and a model's input (inference.pipeline.to_model_space), counted while
they are loaded. A job whose arrays cannot fit fails saying so instead of getting the service
killed (twice, before the job is failed for its deaths: pipeline.interrupted_runs).

Allocated anyway, an array that does not fit gets the service (or its container) killed for
memory, with every job and delivery it holds, and the job would run again at the next start.
These arrays are counted, not the rest: an output is a job's one array of the model grid times
the classes; 105 classes on a 300-slice CT at 1.5 mm (benchmarks.many_classes) peaked at 4777
MiB over the job's start, 4576 MiB of it the output.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from common.memory import memory_room
from inference.errors import MemoryTaken, NotEnoughMemory
from inference.spec import ModelSpec
from inference.windows import output_bytes


class ArrayRoom:
    """The big arrays this process's jobs hold or are loading now: outputs from their check until
    they are let go, volumes and model inputs from their check until they are loaded (then the
    job's own arrays, in the service's memory). One job at a time goes from its check to its
    output's allocation, so with `pipeline.workers` above 1 the next job's check counts it; what
    the others hold is not counted as the service's for good: they let it go."""

    def __init__(self) -> None:
        self._turn = threading.Lock()
        self._held = 0  # outputs allocated
        self._loading = 0  # volumes and inputs being loaded, at their foreseen size (partly allocated already)

    def allocate(self, spec: ModelSpec, spatial: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """Zeros for `spec`'s sliding-window output over a model grid of `spatial` (padded to a
        window: inference.windows.output_bytes), once check_room passes; and the bytes to
        `release` once the job lets it go."""
        with self._turn:
            size, need = check_room(spec, spatial, others=self._held, loading=self._loading)
            output = torch.zeros((1, spec.output_channels, *size), dtype=dtype)
            self._held += need
        return output, need

    def release(self, held: int) -> None:
        with self._turn:
            self._held -= held

    @contextmanager
    def loading(self, what: str, advice: str) -> Iterator[Callable[..., None]]:
        """While a volume is read or a model's input built: a check for its foreseen bytes, what
        they are and how many of them are allocated already (`taken`, in the service's memory by
        then: read_volumes' `room`), beside the outputs held and what other jobs are loading
        (check_fits). What it passes is counted as being loaded until the block ends; told a larger
        need later (all of the series' headers read, the input's layout known), it checks that and
        counts it instead."""
        counted = 0

        def fits(need: int, detail: str, taken: int = 0) -> None:
            nonlocal counted
            with self._turn:
                if need <= counted:
                    return
                check_fits(need, what, detail, advice, others=self._held, loading=self._loading - counted, taken=taken)
                self._loading += need - counted
                counted = need

        try:
            yield fits
        finally:
            with self._turn:
                self._loading -= counted


ARRAYS = ArrayRoom()  # the process's: every job's big arrays are counted in one place


def check_room(spec: ModelSpec, spatial: tuple[int, ...], others: int = 0,
               loading: int = 0) -> tuple[tuple[int, ...], int]:
    """The output's padded size and bytes where it fits in the memory left to the node; else
    raise (check_fits)."""
    need, size = output_bytes(spec.preprocessing.patch_size, spatial, spec.output_channels)
    check_fits(need, f"model {spec.name}'s output on this series",
               f"{spec.output_channels} classes x {'x'.join(map(str, size))} voxels, float32",
               "give the node more memory, or the model a coarser grid", others, loading)
    return size, need


def check_fits(need: int, what: str, detail: str, advice: str, others: int = 0, loading: int = 0,
               taken: int = 0) -> None:
    """Raise where `need` bytes, `taken` of them allocated already, do not fit in the memory left
    to the node (common.memory); `what` needs them, `detail` says of what they are, `advice` what
    would let them fit. Beyond the limit less what the service holds for good (its anonymous
    memory: libraries, models, this job's other arrays; less `others`, the outputs other jobs hold
    now, and `loading`, what they are loading), waiting cannot help: NotEnoughMemory; within it but
    beyond what is free now less `loading` (counted whole: how much of it is allocated already is
    not known), MemoryTaken (the job waits for memory that other jobs or processes hold now)."""
    room = memory_room()
    if room is None or need - taken <= room.available - loading:
        return
    what = f"{what} needs {_gib(need, up=True)} GiB ({detail})"
    kept = max(room.own - others - loading - taken, 0)
    if need > room.limit - kept:
        raise NotEnoughMemory(f"{what}; the node's machine or container allows {_gib(room.limit)} GiB, of which its"
                              f" service holds {_gib(kept, up=True)} GiB: run, it would be killed for memory;"
                              f" {advice}", beyond_limit=need > room.limit)
    beside = f", while other jobs load arrays foreseen at {_gib(loading, up=True)} GiB" if loading else ""
    raise MemoryTaken(f"{what}, and {_gib(room.available)} GiB are free now{beside}")


def _gib(size: int, up: bool = False) -> str:
    """Bytes in GiB to two decimals, rounded up (what is needed) or down (what there is), so
    that a message never says a need is more than an equal room."""
    hundredths = size * 100 / 2**30
    return f"{(math.ceil(hundredths) if up else math.floor(hundredths)) / 100:.2f}"
