"""`edge probe-flash`: the storage's read curve (throughput and latency by chunk size and thread count).

Random, aligned, uncoalesced reads through the same I/O engine the runtime uses (O_DIRECT or dropped
cache), over a scratch file written once. The curve is printed and saved as a device profile TOML, from
which cluster size and read threads can be chosen.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge import system
from edge.errors import EdgeError
from edge.flash import ALIGN, FlashFile, IOEngine

from edge.profile import CHUNKS, DEPTHS as THREADS
from edge.sizes import format_size, power_of_two_size


@dataclass(frozen=True)
class Cell:
    chunk_bytes: int
    threads: int
    mb_s: float
    latency_us: float  # mean per read


def scratch_file(directory: Path, size: int) -> Path:
    """A file of random bytes under `directory` (reused when it already has the size; removed after the probe)."""
    if not directory.is_dir():
        raise EdgeError(f"{directory}: not a directory; give the directory on the storage to measure")
    path = directory / ".edge-probe-flash.bin"
    if path.exists() and path.stat().st_size == size:
        return path
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, 8 << 20, np.uint8).tobytes()
    try:
        with open(path, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
            f.write(block[: size % len(block)])
            f.flush()
            os.fsync(f.fileno())
            system.forget(f.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise EdgeError(f"{path}: cannot write the {format_size(size)} probe file ({exc.strerror}); free some space "
                        "or use a smaller --size") from None
    return path


def measure_cell(f: FlashFile, chunk: int, threads: int, seconds: float, rng) -> Cell:
    engine = IOEngine(threads=threads, buffer_bytes=chunk * threads * 2 + ALIGN, max_read=chunk)
    n_slots = (f.size - chunk) // ALIGN
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        offsets = rng.integers(0, n_slots, threads * 2) * ALIGN
        engine.read(f, [(int(o), chunk) for o in offsets], coalesced=False)
    wall = time.perf_counter() - t0
    s = engine.stats
    engine.close()
    return Cell(chunk, threads, s.bytes / wall / 1e6, s.seconds / max(1, s.reads) * 1e6)


def probe(directory: Path, size: int, seconds: float, chunks=CHUNKS, threads=THREADS, progress=None) -> tuple:
    path = scratch_file(directory, size)
    f = FlashFile(path)
    rng = np.random.default_rng(1)
    cells = []
    try:
        for c in chunks:
            for t in threads:
                cells.append(measure_cell(f, c, t, seconds, rng))
                if progress:
                    progress(cells[-1])
    finally:
        f.close()
        path.unlink(missing_ok=True)
    return cells, f.mode


def to_toml(cells: list[Cell], directory: Path, mode: str, gemv_gb_s: float | None = None) -> str:
    lines = ["# Written by `edge probe-flash`: random aligned reads, uncoalesced (threads = queue depth).",
             "[device]", 'name = "this-machine"', 'title = "this machine (measured)"',
             f"ram_bytes = {system.memory()[1]}", f"cores = {os.cpu_count()}", ""]
    if gemv_gb_s:
        lines += ["[compute]", f"gemv_gb_s = {gemv_gb_s:.2f}",
                  'basis = "measured: a Q4_0 matrix-vector product with llama.cpp\'s kernel, all cores"', ""]
    lines += ["[flash]", f'kind = "{directory} ({mode})"', ""]
    for c in cells:
        lines += ["[[flash.curve]]", f"chunk_bytes = {c.chunk_bytes}", f"threads = {c.threads}",
                  f"mb_s = {c.mb_s:.1f}", f"latency_us = {c.latency_us:.1f}", ""]
    return "\n".join(lines)


def table(cells: list[Cell]) -> str:
    chunks = sorted({c.chunk_bytes for c in cells})
    threads = sorted({c.threads for c in cells})
    by = {(c.chunk_bytes, c.threads): c for c in cells}
    head = "chunk \\ threads " + "".join(f"{t:>14}" for t in threads)
    rows = [head, "(MB/s, mean latency)"]
    for ch in chunks:
        rows.append(f"{power_of_two_size(ch):>15} " + "".join(
            f"{by[ch, t].mb_s:7.0f} {by[ch, t].latency_us / 1000:4.1f}ms" if (ch, t) in by else " " * 14
            for t in threads))
    return "\n".join(rows)


SMALL_READS_PAY = 0.5  # small reads at least this fraction of large ones' bandwidth: skipping single neurons pays


def small_reads(cells: list[Cell]) -> str:
    """Whether this storage serves small random reads near its bandwidth: what skipping single FFN neurons
    (records of a few kB) needs to read less time than streaming whole layers in large reads."""
    small, large = min(c.chunk_bytes for c in cells), max(c.chunk_bytes for c in cells)
    best = {size: max(c.mb_s for c in cells if c.chunk_bytes == size) for size in (small, large)}
    share = best[small] / max(best[large], 1e-9)
    verdict = ("skipping single neurons (a few kB each) can read less time than streaming whole layers"
               if share >= SMALL_READS_PAY else
               "reading scattered neurons (a few kB each) is slower here than streaming whole layers, so "
               "activation sparsity saves no read time on this storage")
    return (f"small reads: {power_of_two_size(small)} at {best[small]:.0f}MB/s, {100 * share:.0f}% of "
            f"{power_of_two_size(large)} reads' {best[large]:.0f}MB/s: {verdict}")
