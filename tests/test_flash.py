"""The I/O engine returns exactly the file's bytes, whatever the order, overlap and coalescing."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import system
from edge.flash import ALIGN, FlashFile, IOEngine, coalesce


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("flash") / "data.bin"
    data = np.random.default_rng(0).integers(0, 256, 3 * 1024 * 1024 + 1234, np.uint8).tobytes()
    p.write_bytes(data)
    return p, data


@pytest.fixture(scope="module")
def engine():
    e = IOEngine(threads=4, buffer_bytes=16 << 20)
    yield e


@settings(max_examples=40, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(0, 3 * 1024 * 1024), st.integers(0, 70_000)), min_size=1, max_size=24),
       coalesced=st.booleans())
def test_reads_return_the_bytes(data_file, engine, reqs, coalesced):
    path, data = data_file
    reqs = [(o, min(n, len(data) - o)) for o, n in reqs]
    f = FlashFile(path)
    try:
        out = engine.read(f, reqs, coalesced=coalesced)
        for (o, n), view in zip(reqs, out):
            assert bytes(view) == data[o:o + n]
    finally:
        f.close()


@settings(max_examples=20, deadline=None)
@given(first=st.lists(st.tuples(st.integers(0, 3 * 1024 * 1024), st.integers(0, 70_000)), min_size=1, max_size=8),
       then=st.lists(st.tuples(st.integers(0, 3 * 1024 * 1024), st.integers(0, 70_000)), min_size=1, max_size=8))
def test_appended_reads_keep_the_last_reads_views(data_file, engine, first, then):
    """append=True places a read after the last one: both reads' views hold their bytes afterwards (the budgeted
    FFN reads what its read-ahead missed into the read-ahead's buffer)."""
    path, data = data_file
    first, then = ([(o, min(n, len(data) - o)) for o, n in r] for r in (first, then))
    f = FlashFile(path)
    try:
        a = engine.read(f, first)
        b = engine.read(f, then, append=True)
        for (o, n), view in zip(first + then, a + b):
            assert bytes(view) == data[o:o + n]
    finally:
        f.close()


def test_coalescing_merges_neighbours_and_aligns():
    spans = coalesce([(0, 100), (150, 100), (100_000, 10)], gap=4096, align=ALIGN, max_bytes=1 << 20)
    assert [(s.start, s.end, s.first, s.last) for s in spans] == [(0, 4096, 0, 2), (98304, 102400, 2, 3)]
    assert len(coalesce([(0, 100), (150, 100)], gap=-1, align=ALIGN, max_bytes=1 << 20)) == 2


def test_stats_count_reads(data_file):
    path, _ = data_file
    e = IOEngine(threads=2, buffer_bytes=4 << 20)
    f = FlashFile(path)
    e.read(f, [(0, 10), (5000, 10), (2_000_000, 4096)], coalesced=False)
    assert e.stats.reads == 3 and e.stats.bytes >= 3 * 4096 and sum(e.stats.histogram) == 3
    f.close()


def test_out_of_file_read_is_an_error(data_file, engine):
    path, data = data_file
    f = FlashFile(path)
    with pytest.raises(ValueError, match="outside the file"):
        engine.read(f, [(len(data) - 10, 20)])
    f.close()


def test_direct_or_dropped_cache(data_file):
    """O_DIRECT where the filesystem has it; elsewhere (tmpfs) buffered reads with the cache dropped after."""
    path, _ = data_file
    f = FlashFile(path)
    assert f.mode in (system.DIRECT, system.DROPPED) and f.direct == (f.mode == system.DIRECT)
    f.close()
    g = FlashFile(path, direct=False)
    assert not g.direct and g.mode == system.DROPPED
    g.close()


class Calls:
    """Records what a simulated platform was asked to do."""

    def __init__(self):
        self.fadvise: list[tuple] = []
        self.fcntl: list[tuple] = []


@pytest.fixture
def platform(monkeypatch):
    """Simulate another platform's os/fcntl: the test removes what that platform lacks; calls are recorded."""
    import fcntl

    calls = Calls()
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: (calls.fadvise.append((off, n, how)),
                                                                       real_fadvise(fd, off, n, how))[1])
    monkeypatch.setattr(fcntl, "F_NOCACHE", 48, raising=False)  # macOS's value
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, arg=0: calls.fcntl.append((cmd, arg)) or 0)
    return calls


def _reads_right(path, data, f) -> None:
    e = IOEngine(threads=2, buffer_bytes=1 << 20)
    try:
        got = [bytes(v) for v in e.read(f, [(5000, 70_000), (123, 10)])]
        assert got == [data[5000:75_000], data[123:133]]
    finally:
        e.close()
        f.close()


def test_macos_reads_with_f_nocache(data_file, platform, monkeypatch):
    """macOS: no O_DIRECT, no posix_fadvise; F_NOCACHE set on the descriptor, nothing to drop after reads."""
    path, data = data_file
    monkeypatch.delattr(os, "O_DIRECT")
    monkeypatch.delattr(os, "posix_fadvise")
    monkeypatch.setattr(system.sys, "platform", "darwin")
    f = FlashFile(path)
    assert f.mode == system.NOCACHE and f.direct and platform.fcntl == [(48, 1)]
    _reads_right(path, data, f)
    assert platform.fadvise == []


def test_file_system_refusing_o_direct_drops_pages_after_reads(data_file, platform, monkeypatch):
    """Linux on a file system that refuses O_DIRECT at open (EINVAL), or accepts it and fails the first read
    (tmpfs): buffered reads, each one's pages dropped with FADV_DONTNEED."""
    import errno

    path, data = data_file
    real_open = os.open

    def refusing(p, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(os, "open", refusing)
    f = FlashFile(path)
    assert f.mode == system.DROPPED and not f.direct and platform.fcntl == []
    _reads_right(path, data, f)
    assert platform.fadvise and all(how == os.POSIX_FADV_DONTNEED for *_, how in platform.fadvise)
    monkeypatch.setattr(os, "open", real_open)

    direct_fds: set[int] = set()  # now O_DIRECT opens, and the first read fails
    tried = []

    def accepting(p, flags, *a):
        fd = real_open(p, flags, *a)
        (direct_fds.add if flags & os.O_DIRECT else direct_fds.discard)(fd)  # numbers are reused
        tried.append(bool(flags & os.O_DIRECT))
        return fd

    real_preadv = os.preadv
    monkeypatch.setattr(os, "open", accepting)
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real_preadv(fd, bufs, off) if fd not in direct_fds
                        else (_ for _ in ()).throw(OSError(errno.EINVAL, "Invalid argument")))
    f = FlashFile(path)
    assert tried == [True, False] and f.mode == system.DROPPED and f.fd not in direct_fds
    _reads_right(path, data, f)


def test_platform_without_any_cache_bypass(data_file, platform, monkeypatch, tmp_path):
    """Neither O_DIRECT, F_NOCACHE nor posix_fadvise (not Linux, not macOS): buffered reads that say so; dropping
    a file's pages (the benchmarks' cold start) does nothing instead of failing; no /proc: the memory figures
    fall back to the RSS (psutil's, which every platform has) and no cgroup is made, with the reason."""
    from edge import cgroup
    from edge.memory import Meter

    path, data = data_file
    monkeypatch.delattr(os, "O_DIRECT")
    monkeypatch.delattr(os, "posix_fadvise")
    monkeypatch.setattr(system.sys, "platform", "freebsd14")
    f = FlashFile(path)
    assert f.mode == system.CACHED and not f.direct
    _reads_right(path, data, f)
    system.forget_file(path)
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (_ for _ in ()).throw(FileNotFoundError(p))
                        if str(p) == "/proc/self/status" else real_open(p, *a, **k))
    assert system.status_bytes() == {}
    m = Meter()
    m.baseline()
    assert m.committed() == m.rss() > 0
    assert cgroup.own_cgroup() is None and cgroup.own_limit() is None
    cap, why = cgroup.MemoryCap.make(1 << 30, "edge-test")
    assert cap is None and "not available on this platform" in why


def test_probe_curve_and_profile(tmp_path):
    import tomllib

    from edge import probe

    cells, mode = probe.probe(tmp_path, 64 << 20, 0.05, chunks=(4096, 65536), threads=(1, 2))
    assert len(cells) == 4 and all(c.mb_s > 0 and c.latency_us > 0 for c in cells)
    profile = tomllib.loads(probe.to_toml(cells, tmp_path, mode))
    assert profile["device"]["name"] == "this-machine" and len(profile["flash"]["curve"]) == 4
    assert "64KiB" in probe.table(cells) and probe.small_reads(cells).startswith("small reads: 4KiB at ")
    assert not any(tmp_path.iterdir())  # the scratch file is gone


def test_probe_flash_rejects_tiny_size(capsys):
    from edge.cli import main

    assert main(["probe-flash", "--size", "1MB"]) == 2
    assert "at least 64MiB" in capsys.readouterr().err


def test_bundle_size_follows_the_saved_flash_curve(tmp_path, monkeypatch):
    """convert's default cluster grows until a bundle reaches the smallest read that gets half the best
    throughput on the probed curve (interpolated in log size between measured reads)."""
    from edge.probe import Cell, to_toml
    from edge.profile import bundle_target
    from tests.test_kernels import tensor_of
    from weights_tools.convert import default_cluster

    curve = [Cell(4 << 10, 4, 60.0, 200.0), Cell(64 << 10, 4, 900.0, 280.0), Cell(256 << 10, 4, 1800.0, 560.0),
             Cell(1 << 20, 4, 1900.0, 2100.0), Cell(64 << 10, 1, 400.0, 150.0)]
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert bundle_target() is None  # nothing probed
    profile = tmp_path / "edge" / "devices" / "this-machine.toml"
    profile.parent.mkdir(parents=True)
    profile.write_text(to_toml(curve, tmp_path, "O_DIRECT", 12.5))
    assert bundle_target() == 128 << 10  # 64K: 900 < 950 = half of 1900; 128K: 1350 between 900 and 1800
    assert bundle_target("rpi5-microsd") == 16 << 10  # a packaged profile, from its modelled curve
    gate, down = tensor_of("Q4_1", rows=4096, cols=512), tensor_of("Q4_1", rows=512, cols=4096)
    small, large = default_cluster(down, gate, 32 << 10), default_cluster(down, gate, 256 << 10)
    assert small % 32 == 0 and large == 8 * small  # bundles of 3 x 320 bytes per neuron


def test_file_cut_short_after_open_is_one_error(tmp_path):
    """A file truncated under a running model (its size was taken at open): the read says so, naming it."""
    from edge.errors import EdgeError

    path = tmp_path / "cut.bin"
    path.write_bytes(bytes(4 * ALIGN))
    f = FlashFile(path)
    os.truncate(path, ALIGN)
    eng = IOEngine(threads=1, buffer_bytes=1 << 20)
    try:
        with pytest.raises(EdgeError, match=r"cut.bin: short read .* truncated"):
            eng.read(f, [(2 * ALIGN, 100)])
    finally:
        eng.close()
        f.close()


def test_probe_says_whether_small_reads_pay():
    from edge.probe import Cell, small_reads

    slow = [Cell(4096, 16, 73, 300), Cell(1 << 20, 16, 1473, 8000)]  # this machine's disk, 2026-12-06
    fast = [Cell(4096, 32, 900, 100), Cell(1 << 20, 16, 1400, 8000)]  # an NVMe drive at queue depth
    assert "5% of 1MiB" in small_reads(slow) and "saves no read time" in small_reads(slow)
    assert "64% of 1MiB" in small_reads(fast) and "can read less time" in small_reads(fast)
