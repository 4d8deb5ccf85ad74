"""One progress line on stderr for long work inside the runtime package (`edge pull`, building llama.cpp)."""

from __future__ import annotations

import sys
import time


class Bar:
    """Work done of a total on one terminal line, silent when quiet or not a terminal. counts_bytes: also the
    megabytes done and their rate. on_progress(fraction): also told of every update (the chat shows it)."""

    def __init__(self, total: int, label: str, quiet: bool, on_progress=None, counts_bytes: bool = True):
        self.total, self.label, self.on_progress, self.counts_bytes = total, label, on_progress, counts_bytes
        self.t0, self.start = time.perf_counter(), None
        self.show = not quiet and sys.stderr.isatty()

    def update(self, done: int) -> None:
        if self.start is None:
            self.start = done
        frac = done / max(1, self.total)
        if self.on_progress is not None:
            self.on_progress(frac)
        if not self.show:
            return
        line = f"\r{self.label} [{'#' * int(30 * frac):<30}] {frac:4.0%}"
        if self.counts_bytes:
            rate = (done - self.start) / max(1e-9, time.perf_counter() - self.t0) / 1e6
            line += f" {done / 1e6:7.0f}MB {rate:5.0f} MB/s"
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        if self.show:
            sys.stderr.write("\n")
