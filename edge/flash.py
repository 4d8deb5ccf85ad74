"""The I/O engine: reads from flash that the page cache neither hides nor charges to the RAM budget.

A pool of reader threads issues `preadv` into page-aligned, preallocated buffers. Requests that touch or
nearly touch are coalesced into one read. Files are opened so that the kernel's cache neither makes flash look
faster than it is nor silently eats the budget (edge.system: O_DIRECT, F_NOCACHE on macOS, else buffered reads
whose pages are dropped after each read). Every read is counted:
reads, bytes, and a latency histogram.

Emulation (`emulate(curve)`, process-wide, `--device NAME --emulate`): every batch of reads takes at least the
time the device's flash curve gives for it (edge.profile.FlashCurve: by read size and queue depth), sleeping
the difference; the modelled time is counted either way, so a run here also says what its reads would cost
there. A device faster than this storage cannot be emulated by sleeping; its modelled time is still counted.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from edge import system
from edge.errors import EdgeError

ALIGN = system.ALIGN
LATENCY_BUCKETS_US = (50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000)  # upper bounds; one more for above


@dataclass
class ReadStats:
    reads: int = 0
    bytes: int = 0
    seconds: float = 0.0  # summed over reads (threads overlap, so this exceeds wall time)
    wall: float = 0.0     # time callers spent in read(): what a caller waited for
    histogram: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_US) + 1))

    def add(self, n: int, seconds: float) -> None:
        self.reads += 1
        self.bytes += n
        self.seconds += seconds
        us = seconds * 1e6
        self.histogram[next((i for i, b in enumerate(LATENCY_BUCKETS_US) if us <= b), len(LATENCY_BUCKETS_US))] += 1


class Emulation:
    """A device's flash curve applied to every read of this process (see the module doc)."""

    def __init__(self, curve, sleep: bool = True):
        self.curve, self.sleep = curve, sleep
        self.seconds = 0.0  # modelled time of every batch of reads so far
        self._lock = threading.Lock()

    def apply(self, sizes: list[int], depth: int, started: float) -> None:
        model = self.curve.seconds(sizes, depth)
        with self._lock:
            self.seconds += model
        if self.sleep:
            left = model - (time.perf_counter() - started)
            if left > 0:
                time.sleep(left)


_EMULATION: Emulation | None = None


def emulate(curve, sleep: bool = True) -> Emulation | None:
    """From now on, reads follow `curve` (sleep=False: only count the modelled time; None: stop)."""
    global _EMULATION
    _EMULATION = Emulation(curve, sleep) if curve is not None else None
    return _EMULATION


def emulation() -> Emulation | None:
    return _EMULATION


class FlashFile:
    """One file opened for uncached reads (edge.system.open_uncached): `mode` says how its reads bypass the
    page cache, `direct` whether the device serves them without the cache at all (O_DIRECT, F_NOCACHE)."""

    def __init__(self, path: str | os.PathLike, direct: bool = True):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.fd, self.mode = system.open_uncached(self.path, self.size, uncached=direct)
        self.direct = self.mode in (system.DIRECT, system.NOCACHE)

    def drop_cache(self, offset: int = 0, length: int = 0) -> None:
        if not self.direct:
            system.forget(self.fd, offset, length)

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Span:
    """One coalesced read: file range [start, end) (aligned when direct) serving requests[first:last]."""

    start: int
    end: int
    first: int
    last: int


def coalesce(requests: list[tuple[int, int]], gap: int, align: int, max_bytes: int) -> list[Span]:
    """Group (offset, length) requests, sorted by offset, into aligned reads; bridge holes up to `gap` bytes."""
    spans: list[Span] = []
    i = 0
    while i < len(requests):
        start = requests[i][0] // align * align
        end = requests[i][0] + requests[i][1]
        j = i + 1
        while j < len(requests):
            off, n = requests[j]
            new_end = max(end, off + n)
            if off - end > gap or _round_up(new_end, align) - start > max_bytes:
                break
            end, j = new_end, j + 1
        spans.append(Span(start, _round_up(end, align), i, j))
        i = j
    return spans


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


class IOEngine:
    """Reads lists of byte ranges with a thread pool; results are memoryviews into the engine's buffer.

    The buffer is preallocated (`buffer_bytes`), page-aligned and reused by every call: a caller copies or
    consumes the views before its next `read`.
    """

    def __init__(self, threads: int = 4, buffer_bytes: int = 64 << 20, coalesce_gap: int = 16 << 10,
                 max_read: int = 1 << 20):
        self.threads = threads
        self.coalesce_gap = coalesce_gap
        self.max_read = max_read
        self.buffer = mmap.mmap(-1, _round_up(buffer_bytes, ALIGN))
        self.stats = ReadStats()
        self.end = 0  # the buffer's bytes in use by the last read
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edge-read")

    def read(self, f: FlashFile, requests: list[tuple[int, int]], coalesced: bool = True,
             append: bool = False) -> list[memoryview]:
        """Bytes of each (offset, length) request, in the order given. append: placed after the last read's
        bytes, whose views stay valid (else from the buffer's start)."""
        order = sorted(range(len(requests)), key=lambda k: requests[k][0])
        reqs = [requests[k] for k in order]
        for off, n in reqs:
            if off < 0 or n < 0 or off + n > f.size:
                raise ValueError(f"{f.path}: read of {n} bytes at {off} is outside the file ({f.size} bytes)")
        gap = self.coalesce_gap if coalesced else -1
        spans = coalesce(reqs, gap, ALIGN, self.max_read)
        places, pos = [], _round_up(self.end, ALIGN) if append else 0
        for s in spans:
            places.append(pos)
            pos += s.end - s.start
        if pos > len(self.buffer):
            raise ValueError(f"a read of {pos} bytes exceeds the I/O buffer of {len(self.buffer)} bytes")
        self.end = pos
        view = memoryview(self.buffer)
        dests = [view[p:p + s.end - s.start] for s, p in zip(spans, places)]
        started = time.perf_counter()
        for _ in self._pool.map(self._read_span, [f] * len(spans), spans, dests):
            pass
        if _EMULATION is not None and spans:
            _EMULATION.apply([s.end - s.start for s in spans], self.threads, started)
        self.stats.wall += time.perf_counter() - started
        out: list[memoryview | None] = [None] * len(requests)
        for s, base in zip(spans, places):
            for r in range(s.first, s.last):
                off, n = reqs[r]
                out[order[r]] = view[base + off - s.start: base + off - s.start + n]
        return out  # type: ignore[return-value]

    def _read_span(self, f: FlashFile, span: Span, dest: memoryview) -> None:
        t0 = time.perf_counter()
        length = min(span.end, _round_up(f.size, ALIGN)) - span.start
        got = os.preadv(f.fd, [dest[:length]], span.start)
        if got < min(length, f.size - span.start):
            raise EdgeError(f"{f.path}: short read at {span.start}: {got} of {length} bytes; the file is truncated: "
                            "convert the model again")
        f.drop_cache(span.start, length)
        with self._lock:
            self.stats.add(got, time.perf_counter() - t0)

    def resize_buffer(self, buffer_bytes: int) -> None:
        """A new preallocated buffer of this size (no read in flight, no view of the old one used again); the
        counters stay."""
        old, self.buffer, self.end = self.buffer, mmap.mmap(-1, _round_up(buffer_bytes, ALIGN)), 0
        try:
            old.close()
        except BufferError:  # a view of it is still alive somewhere: freed with that view
            pass

    def close(self) -> None:
        self._pool.shutdown()
        self.buffer.close()
