"""Device profiles: what a target has (RAM, cores, the flash read curve, compute throughput) and what a run
measured here would do there.

Profiles are TOML: the packaged `devices/*.toml` (public figures, each with its source; what is an estimate
says so) and `<config dir>/devices/NAME.toml` (`this-machine`, written by `edge probe-flash`). They give
`--device NAME` its defaults (compute threads, read threads, budget, bundle size), `--emulate` its flash
curve, and `edge bench --device` its projection:

    projected seconds per token = flash time of this run's reads on the target's curve
                                + compute time measured here x (this machine's GEMV GB/s / the target's)

Compute is not emulated (a run here computes at this machine's speed); the projection scales it by the one
figure that governs decoding on CPUs, the bytes of weights per second a matrix-vector product streams.
"""

from __future__ import annotations

import math
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge import quants
from edge.dirs import config_dir
from edge.errors import EdgeError
from edge.ggml import Weight, ggml
from edge.sizes import parse_size

CHUNKS = (4 << 10, 16 << 10, 64 << 10, 128 << 10, 256 << 10, 1 << 20)
DEPTHS = (1, 2, 4, 8, 16, 32)


def _packaged() -> Path:
    import devices

    return Path(devices.__file__).resolve().parent


@dataclass(frozen=True)
class FlashCurve:
    """Read throughput (MB/s) by chunk size and queue depth, from measured or modelled points."""

    points: tuple[tuple[int, int, float], ...]  # (chunk bytes, queue depth, MB/s)

    @classmethod
    def from_spec(cls, seq_mb_s: float, rand4k_qd1_iops: float, rand4k_max_iops: float) -> "FlashCurve":
        """The usual three datasheet figures as a curve: a request costs a fixed latency (from the 4 KiB QD1
        rate) plus its transfer at the sequential bandwidth; q requests overlap, up to the bandwidth and the
        device's IOPS ceiling."""
        bw = seq_mb_s * 1e6
        latency = max(1.0 / rand4k_qd1_iops - 4096 / bw, 0.0)
        pts = []
        for c in CHUNKS:
            for q in DEPTHS:
                rate = min(bw, q * c / (latency + c / bw), rand4k_max_iops * c)
                pts.append((c, q, rate / 1e6))
        return cls(tuple(pts))

    def mb_s(self, chunk: int, depth: int) -> float:
        """Interpolated in log2(chunk size) at the deepest measured queue not above `depth`; below the
        smallest chunk, the smallest chunk's request rate."""
        depths = sorted({q for _, q, _ in self.points})
        q = max([d for d in depths if d <= depth] or depths[:1])
        row = sorted((c, r) for c, d, r in self.points if d == q)
        if chunk <= row[0][0]:
            return row[0][1] * chunk / row[0][0]
        if chunk >= row[-1][0]:
            return row[-1][1]
        for (c0, r0), (c1, r1) in zip(row, row[1:]):
            if c0 <= chunk <= c1:
                t = (math.log2(chunk) - math.log2(c0)) / (math.log2(c1) - math.log2(c0))
                return r0 + t * (r1 - r0)
        raise AssertionError("unreachable")

    def seconds(self, sizes: list[int], depth: int) -> float:
        """Time for these reads issued together on `depth` readers: each takes its share of the throughput
        the device gives at that depth and size."""
        q = max(1, min(depth, len(sizes)))
        return sum(n / (self.mb_s(n, q) * 1e6) for n in sizes)

    def best_chunk(self, depth: int, fraction: float = 0.5) -> int:
        """The smallest read that reaches `fraction` of the best throughput at `depth` readers."""
        best = max(self.mb_s(c, depth) for c in CHUNKS)
        return min(c for c in CHUNKS if self.mb_s(c, depth) >= fraction * best)


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    ram_bytes: int
    cores: int
    flash: FlashCurve
    flash_kind: str = ""
    cpu: str = ""
    gpu: str = ""
    threads: int | None = None          # compute threads
    read_threads: int = 4               # the I/O engine's readers (queue depth)
    ram: int | None = None              # default --ram
    gemv_gb_s: float | None = None      # weight bytes per second a decode step streams through the CPU
    compute_basis: str = ""
    sources: tuple[dict, ...] = field(default_factory=tuple)
    path: Path | None = None

    @property
    def cluster_bytes(self) -> int:
        """Bundle size for `edge convert --device`: the smallest read reaching half the best throughput."""
        return self.flash.best_chunk(self.read_threads)


def _parse(text: str, path: Path) -> Profile:
    try:
        d = tomllib.loads(text)
        dev, fl = d["device"], d["flash"]
        if "curve" in fl:
            curve = FlashCurve(tuple((int(p["chunk_bytes"]), int(p["threads"]), float(p["mb_s"]))
                                     for p in fl["curve"]))
        else:
            curve = FlashCurve.from_spec(float(fl["seq_mb_s"]), float(fl["rand4k_qd1_iops"]),
                                         float(fl["rand4k_max_iops"]))
        de, co = d.get("defaults", {}), d.get("compute", {})
        return Profile(
            name=dev["name"], title=dev.get("title", dev["name"]), ram_bytes=int(dev["ram_bytes"]),
            cores=int(dev["cores"]), flash=curve, flash_kind=fl.get("kind", ""), cpu=dev.get("cpu", ""),
            gpu=dev.get("gpu", ""), threads=de.get("threads"), read_threads=int(de.get("read_threads", 4)),
            ram=parse_size(de["ram"], f"{path} defaults.ram") if "ram" in de else None,
            gemv_gb_s=co.get("gemv_gb_s"), compute_basis=co.get("basis", ""),
            sources=tuple(d.get("sources", [])), path=path)
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EdgeError(f"{path}: not a valid device profile ({type(exc).__name__}: {exc}); fix it or remove it "
                        "(`edge probe-flash` rewrites this-machine)") from None


def _user_dir() -> Path:
    return config_dir() / "devices"


def names() -> list[str]:
    found = {p.stem for p in _packaged().glob("*.toml")}
    if _user_dir().is_dir():
        found |= {p.stem for p in _user_dir().glob("*.toml")}
    return sorted(found)


def load(name: str, asked_by: str = "--device") -> Profile:
    """A profile by name (user profiles first: this-machine) or by path to a TOML file; asked_by: how the user
    named it, for the error."""
    candidates = (
        [Path(name)] if name.endswith(".toml") else [_user_dir() / f"{name}.toml", _packaged() / f"{name}.toml"]
    )
    for path in candidates:
        if path.is_file():
            return _parse(path.read_text(), path)
    hint = " (`edge probe-flash` writes it)" if name == "this-machine" else ""
    raise EdgeError(f"{asked_by} {name}: no such device profile{hint}; choose one of: {', '.join(names())}")


def bundle_target(device: str | None = None) -> int | None:
    """The bundle size `edge convert` aims for: from --device, else from this machine's probe when saved
    (`edge probe-flash`), else None."""
    if device is None:
        path = _user_dir() / "this-machine.toml"
        if not path.is_file():
            return None
        device = str(path)
    return load(device).cluster_bytes


def measure_gemv(threads: int | None = None, rows: int = 8192, cols: int = 8192, repeats: int = 20) -> float:
    """This machine's decode throughput in weight GB/s: a Q4_0 matrix-vector product (llama.cpp's kernel)
    over a matrix larger than the caches, best of `repeats`."""
    row_bytes = quants.FORMATS[quants.Q4_0].row_bytes(cols)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (rows, row_bytes), np.uint8)
    blocks.reshape(rows, -1, 18)[:, :, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # sane scales
    w = Weight(blocks.reshape(-1), quants.Q4_0, rows, cols)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    g = ggml(threads or os.cpu_count() or 1)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        g.products([(x, w)])
        best = min(best, time.perf_counter() - t)
    return blocks.nbytes / best / 1e9


@dataclass(frozen=True)
class Projection:
    device: str
    flash_s: float      # per token, this run's reads on the target's curve
    compute_s: float    # per token, compute measured here scaled to the target
    gemv_here: float
    gemv_target: float

    @property
    def tok_s(self) -> float:
        """Reads and compute one after the other (a lower bound)."""
        return 1.0 / (self.flash_s + self.compute_s)

    @property
    def tok_s_overlapped(self) -> float:
        """Reads entirely hidden behind compute or the reverse (an upper bound)."""
        return 1.0 / max(self.flash_s, self.compute_s)


def project(profile: Profile, tokens: int, compute_seconds: float, flash_model_seconds: float,
            gemv_here: float) -> Projection:
    """Per-token figures on `profile` for a run here of `tokens` decode steps that computed for
    `compute_seconds` (wall time not stalled on reads) and whose reads take `flash_model_seconds` on the
    target's curve (edge.flash emulation accounts them)."""
    if not profile.gemv_gb_s:
        raise EdgeError(f"--device {profile.name}: the profile has no compute.gemv_gb_s figure to project with")
    n = max(1, tokens)
    return Projection(profile.name, flash_model_seconds / n, compute_seconds / n * gemv_here / profile.gemv_gb_s,
                      gemv_here, profile.gemv_gb_s)
