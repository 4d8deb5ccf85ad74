"""What the operating system offers edge, in one place: reads that bypass the page cache, and this process's
and the system's memory as the kernel counts it.

Reads from flash must neither be served from the page cache (it would make flash look faster than it is) nor
leave their pages there (on a unified-memory machine they count against everything else). The ways, best
first, and the one `open_uncached` puts in force for a file:

- O_DIRECT (Linux): reads go from the device into our aligned buffers, the cache is not touched;
- F_NOCACHE (macOS, `fcntl`): the same, macOS's way;
- buffered reads, each followed by posix_fadvise(DONTNEED) (file systems that refuse O_DIRECT: tmpfs, some
  overlay file systems): the pages are dropped as soon as they are read;
- buffered reads alone, where the platform has none of these: the kernel keeps what it reads (`edge info` and
  `edge probe-flash` say so).

Every function degrades instead of failing where a platform lacks a feature; the memory cgroups used to cap a
process are Linux's and live in edge.cgroup.
"""

from __future__ import annotations

import mmap
import os
import sys

DIRECT = "O_DIRECT"
NOCACHE = "F_NOCACHE"
DROPPED = "buffered, cache dropped after each read"
CACHED = "buffered through the page cache (this platform cannot bypass it)"
ALIGN = 4096


def open_uncached(path: str | os.PathLike, size: int, uncached: bool = True) -> tuple[int, str]:
    """(file descriptor, the way its reads bypass the cache: DIRECT, NOCACHE, DROPPED or CACHED) for reading
    `path` (`size` bytes). uncached=False: a plain buffered descriptor whose pages are dropped after reads."""
    if uncached and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # the file system refuses O_DIRECT at open
            pass
        else:
            if _reads_directly(fd, size):
                return fd, DIRECT
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    if uncached and sys.platform == "darwin":
        import fcntl

        try:
            fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
            return fd, NOCACHE
        except (AttributeError, OSError):
            pass
    return fd, DROPPED if hasattr(os, "posix_fadvise") else CACHED


def _reads_directly(fd: int, size: int) -> bool:
    """Some file systems (tmpfs) accept O_DIRECT at open and fail the first read: try one."""
    if size == 0:
        return True
    buf = mmap.mmap(-1, ALIGN)
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        buf.close()


def forget(fd: int, offset: int = 0, length: int = 0) -> None:
    """Drop these bytes of the file from the page cache where the platform can (length 0: to the end)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def forget_file(path: str | os.PathLike) -> None:
    """Drop a whole file from the page cache where the platform can (nothing happens elsewhere)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        forget(fd)
    finally:
        os.close(fd)


def rss() -> int:
    """This process's resident set in bytes: Linux's /proc/self/statm, psutil elsewhere (imported only there: it
    costs a budgeted process 2MB)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss


def memory() -> tuple[int, int]:
    """(the system's available memory, its total) in bytes: Linux's /proc/meminfo, psutil elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, ValueError, KeyError):
        import psutil

        vm = psutil.virtual_memory()
        return vm.available, vm.total


def status_bytes() -> dict[str, int]:
    """This process's RssAnon, RssFile, RssShmem in bytes (Linux's /proc); {} where the platform has no such
    breakdown (callers fall back to the RSS)."""
    try:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                    if k in ("RssAnon", "RssFile", "RssShmem")}
    except (OSError, ValueError):
        return {}
