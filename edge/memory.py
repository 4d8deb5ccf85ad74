"""This process's memory: what it holds (`Meter`), giving freed heap back (`release_free_memory`), and pressure
from outside while it runs (`PressureWatch`: the system short of memory, or the cgroup limit lowered).

The budgeted runtime (edge.engine) measures its baseline with the meter, and between tokens asks the watch
how much to give back; every strategy then re-plans for less (edge.strategies).
"""

from __future__ import annotations

import ctypes
import ctypes.util

from edge.cgroup import own_limit
from edge.sizes import format_size
from edge.system import memory, rss, status_bytes

PRESSURE_FLOOR = 64 << 20  # system memory available below this: give cache back
LIMIT_ROUNDING = 64 << 10  # a cgroup limit this close under the budget is the budget (the kernel rounds it)


_TRIM: list = []  # glibc's malloc_trim, or None where there is none (found once: find_library runs ldconfig)


def release_free_memory() -> None:
    """Give the temporaries of loading back to the OS (glibc keeps freed heap pages otherwise)."""
    if not _TRIM:
        name = ctypes.util.find_library("c")
        _TRIM.append(getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None)
    if _TRIM[0] is not None:
        _TRIM[0](0)


class Meter:
    """RSS of this process, sampled per step; the peak RSS seen; and what a memory cap cannot take back
    (`committed`). (Bytes read from flash are counted by the I/O engines: edge.flash.)"""

    def __init__(self):
        self.peak_rss = 0
        self._file_at_baseline: int | None = None

    def baseline(self) -> int:
        """RSS now, as a plan's baseline; its file-backed part is remembered for `committed`."""
        self._file_at_baseline = status_bytes().get("RssFile")
        return self.rss()

    def committed(self) -> int:
        """RSS without the file-backed pages mapped since the baseline: anonymous and shared memory, and library
        pages up to what the baseline held. Pages mapped beyond that are the kernel's to reclaim under a cap, and
        whether it has yet depends on its reclaim, not on this process. RSS where /proc says nothing."""
        status = status_bytes()
        if self._file_at_baseline is None or "RssAnon" not in status:
            return self.rss()
        file = min(status.get("RssFile", 0), self._file_at_baseline)
        return status["RssAnon"] + status.get("RssShmem", 0) + file

    def rss(self) -> int:
        r = rss()
        self.peak_rss = max(self.peak_rss, r)
        return r


def probe_memory() -> tuple[int, int | None]:
    """(the system's available memory, this process's cgroup limit or None)."""
    return memory()[0], own_limit()


class PressureWatch:
    """Memory pressure from outside, checked between tokens: this process's cgroup limit lowered under the
    budget, or the system's available memory below PRESSURE_FLOOR. `target(budget, planned)` returns the budget
    to re-plan at (None: no pressure): at most the lowered limit, and, when the system is short, what the plan
    holds (`planned`, at most the budget) less what is short. `probe` returns (available bytes, cgroup limit or
    None); tests replace it."""

    def __init__(self, probe=None):
        self.probe = probe or probe_memory

    def target(self, budget: int, planned: int) -> int | None:
        available, limit = self.probe()
        targets = []
        if available < PRESSURE_FLOOR:
            targets.append(planned - (PRESSURE_FLOOR - available))
        if limit is not None and limit < budget - LIMIT_ROUNDING:  # a cap set to the budget reads back rounded
            targets.append(limit)                                    # down to pages
        return min(targets) if targets else None


def warn_above_physical(budget: int) -> str | None:
    total = memory()[1]
    if budget > total:
        return f"--ram {format_size(budget)} is more than this machine's {format_size(total)} of RAM"
    return None
