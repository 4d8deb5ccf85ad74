"""A kernel memory cap for a child process: a fresh cgroup (v2 `memory.max` or v1 `memory.limit_in_bytes`).

Page cache is charged to the cgroup too, so a capped process cannot hide weights in it. Where no cgroup can be
made (no permission, no memory controller), `MemoryCap.make` returns None and says why.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edge.system import forget_file

ROOT = Path("/sys/fs/cgroup")


LIMIT_FILE = {True: "memory.limit_in_bytes", False: "memory.max"}  # by "is cgroup v1"


def own_cgroup() -> tuple[Path, bool] | None:
    """This process's memory cgroup directory and whether it is cgroup v1; None when there is none (and on
    every platform but Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1 = next((line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"), None)
    if v1 is not None and (ROOT / "memory" / v1.lstrip("/")).is_dir():
        return ROOT / "memory" / v1.lstrip("/"), True
    v2 = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    return (ROOT / v2.lstrip("/"), False) if v2 is not None else None


class MemoryCap:
    def __init__(self, path: Path, v1: bool):
        self.path, self.v1 = path, v1

    @classmethod
    def make(cls, limit: int, name: str) -> tuple["MemoryCap | None", str]:
        """(cap, "") or (None, why not): a child cgroup of this process's own."""
        parent = own_cgroup()
        if parent is None:
            return None, ("no memory cgroup controller" if sys.platform.startswith("linux") else
                          "memory cgroups are not available on this platform (Linux only)")
        try:
            path = parent[0] / f"{name}.{os.getpid()}"
            path.mkdir()
            (path / LIMIT_FILE[parent[1]]).write_text(str(limit))
            return cls(path, parent[1]), ""
        except OSError as exc:
            return None, f"cannot create a memory cgroup ({exc.strerror or exc})"

    def _join(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def run(self, cmd: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run cmd inside the cap (the child joins the cgroup before exec)."""
        return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=self._join, timeout=timeout)

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start cmd inside the cap (the child joins the cgroup before exec)."""
        return subprocess.Popen(cmd, preexec_fn=self._join, **kwargs)

    @property
    def peak(self) -> int:
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            try:
                return int((self.path / name).read_text())
            except (OSError, ValueError):
                continue
        return 0

    @property
    def oom_killed(self) -> bool:
        for name, key in (("memory.oom_control", "oom_kill "), ("memory.events", "oom_kill ")):
            try:
                for line in (self.path / name).read_text().splitlines():
                    if line.startswith(key):
                        return int(line.split()[1]) > 0
            except OSError:
                continue
        return False

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def own_limit() -> int | None:
    """The memory limit of the cgroup this process is in (None when unlimited or unknown)."""
    own = own_cgroup()
    if own is None:
        return None
    try:
        text = (own[0] / LIMIT_FILE[own[1]]).read_text().strip()
    except OSError:
        return None
    return int(text) if text != "max" and int(text) < 1 << 60 else None


def drop_page_cache(files: list[Path]) -> bool:
    """Drop the page cache (root), else at least these files' pages; True when the whole cache was dropped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        for f in files:
            forget_file(f)
        return False
