"""Which items this process computes: job-array shards and accelerate processes.

Two levels split a run, and neither changes any result (seeds derive from item ids):

* ``--shard k/N`` (job arrays, one job per shard): shard ``k`` of ``N`` (0-based) takes the
  ``k``-th of ``N`` contiguous blocks of the item list;
* the processes of one job, started by ``accelerate launch`` or ``torchrun``: accelerate's
  ``PartialState().split_between_processes`` splits the shard's items between them.

Items are split before finished ones are skipped, so every process sees the same split
whatever the other processes have finished already.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based), for job arrays.

    Examples
    --------
    >>> Shard.parse("1/4").select(list(range(10)))
    [2, 3, 4]
    """

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Read ``"k/N"`` with ``0 <= k < N``.

        Raises
        ------
        ValueError
            For anything else; the message shows the format.
        """
        match = _SHARD.match(str(text))
        if not match:
            raise ValueError(f"--shard {text!r}: write k/N, e.g. 0/4 for the first of 4 shards")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise ValueError(
                f"--shard {text!r}: k must be in 0..N-1 (shards are numbered from 0, like "
                "job-array task ids)"
            )
        return cls(index, count)

    def select(self, items: list[T]) -> list[T]:
        """This shard's contiguous block of ``items``."""
        n = len(items)
        return items[self.index * n // self.count : (self.index + 1) * n // self.count]


class DuplicatedProcessError(RuntimeError):
    """Every process would compute every item: the launcher and accelerate disagree."""


@dataclass
class Processes:
    """This process's place among the processes of one job.

    Attributes
    ----------
    rank, count : int
        Process index and number of processes.
    device : str
        Where this process runs its pipeline.
    state : accelerate.PartialState or None
        The accelerate state (``None`` for a plain single process without accelerate).
    """

    rank: int
    count: int
    device: str
    state: Any = None

    @property
    def is_main(self) -> bool:
        """Whether this is process 0."""
        return self.rank == 0

    def split(self, items: list[T]) -> list[T]:
        """This process's share of ``items`` (accelerate's contiguous split)."""
        if self.state is None or self.count == 1:
            return list(items)
        with self.state.split_between_processes(list(items)) as mine:
            return list(mine)

    def main_first(self) -> Any:
        """Context in which process 0 goes first and the others wait for it."""
        import contextlib

        if self.state is None or self.count == 1:
            return contextlib.nullcontext()
        return self.state.main_process_first()


def launched_world_size() -> int:
    """Number of processes the launcher says it started (1 without a launcher).

    Raises
    ------
    DuplicatedProcessError
        When ``WORLD_SIZE`` is set to something other than a positive whole number.
    """
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.strip().isdecimal() or int(text) < 1:
        raise DuplicatedProcessError(
            f"WORLD_SIZE={text!r} is not a number of processes; launch with torchrun or "
            "`accelerate launch`, or unset it for one process"
        )
    return int(text)


def processes(device: str | None = None) -> Processes:
    """Start (or join) accelerate's process group and say which process this is.

    Parameters
    ----------
    device : str, optional
        ``"cpu"`` forces the CPU (gloo) even where CUDA exists; default CUDA when available.

    Raises
    ------
    ImportError
        Without accelerate, for a multi-process launch (install the ``[runs]`` extra).
    DuplicatedProcessError
        When the launcher started several processes but accelerate sees one: each process
        would then compute every item. On a machine without a GPU this happens unless the
        state is made with ``cpu=True``, which :func:`processes` does.
    """
    world = launched_world_size()
    try:
        from accelerate import PartialState
    except ImportError:
        if world > 1:
            raise ImportError(
                f"the launcher started {world} processes, and splitting items between them "
                "needs accelerate: pip install 'diffwidget[runs]'"
            ) from None
        return Processes(0, 1, device or "cpu")
    import torch

    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes != world:
        raise DuplicatedProcessError(
            f"the launcher started {world} processes but accelerate sees "
            f"{state.num_processes}; every process would compute every item. Launch with "
            "torchrun or `accelerate launch`, and on a machine without a GPU let diffwidget "
            "create the state (it passes cpu=True)"
        )
    return Processes(state.process_index, state.num_processes, str(state.device), state)
