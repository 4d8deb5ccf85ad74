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

from edge.errors import EdgeError
from edge.flash import ALIGN, FlashFile, IOEngine

CHUNKS = (4 << 10, 16 << 10, 64 << 10, 128 << 10, 256 << 10, 1 << 20)
THREADS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Cell:
    chunk_bytes: int
    threads: int
    mb_s: float
    latency_us: float  # mean per read


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "edge"


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
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise EdgeError(f"{path}: cannot write the {size >> 20} MiB probe file ({exc.strerror}); free some space "
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
    return cells, f.direct


def to_toml(cells: list[Cell], directory: Path, direct: bool) -> str:
    import psutil

    lines = ["# Written by `edge probe-flash`: random aligned reads, uncoalesced.",
             "[device]", 'name = "this-machine"', f"ram_bytes = {psutil.virtual_memory().total}",
             f"cores = {os.cpu_count()}", "", "[flash]", f'path = "{directory}"',
             f"direct = {'true' if direct else 'false'}", ""]
    for c in cells:
        lines += ["[[flash.curve]]", f"chunk_bytes = {c.chunk_bytes}", f"threads = {c.threads}",
                  f"mb_s = {c.mb_s:.1f}", f"latency_us = {c.latency_us:.1f}", ""]
    return "\n".join(lines)


def bundle_target(profile: Path | None = None, threads: int = 4, fraction: float = 0.5) -> int | None:
    """From a saved probe (default: this machine's), the smallest read size that reaches `fraction` of the
    best throughput at `threads` readers: what an FFN bundle should at least be. None without a profile."""
    import tomllib

    path = profile or config_dir() / "devices" / "this-machine.toml"
    try:
        curve = tomllib.loads(path.read_text())["flash"]["curve"]
    except (OSError, KeyError, ValueError):
        return None
    cells = [c for c in curve if c.get("threads") == threads] or curve
    best = max(c["mb_s"] for c in cells)
    return min(c["chunk_bytes"] for c in cells if c["mb_s"] >= fraction * best)


def table(cells: list[Cell]) -> str:
    chunks = sorted({c.chunk_bytes for c in cells})
    threads = sorted({c.threads for c in cells})
    by = {(c.chunk_bytes, c.threads): c for c in cells}
    head = "chunk \\ threads " + "".join(f"{t:>14}" for t in threads)
    rows = [head, "(MB/s, mean latency)"]
    for ch in chunks:
        label = f"{ch >> 10} KiB" if ch < (1 << 20) else f"{ch >> 20} MiB"
        rows.append(f"{label:>15} " + "".join(
            f"{by[ch, t].mb_s:7.0f} {by[ch, t].latency_us / 1000:4.1f}ms" if (ch, t) in by else " " * 14
            for t in threads))
    return "\n".join(rows)
