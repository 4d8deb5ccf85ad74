"""Device profiles: every packaged profile parses and cites its figures; the flash curve model; emulation that
really slows reads to the curve; the projection; `edge devices`, `--device` defaults and `bench --device`."""

import time

import numpy as np
import pytest

from edge import flash, profile
from edge.errors import EdgeError
from edge.flash import FlashFile, IOEngine
from edge.profile import FlashCurve, Profile, project
from tests.test_budget import run_cli

TARGETS = ["laptop-x86-nvme", "apple-m2", "rpi5-microsd", "rpi5-nvme", "jetson-orin-nano", "phone-ufs4"]


@pytest.mark.parametrize("name", TARGETS)
def test_packaged_profiles_parse_and_cite(name):
    p = profile.load(name)
    assert p.name == name and p.ram_bytes > 1 << 30 and p.cores >= 4 and p.gemv_gb_s > 0
    assert p.sources and all(s["url"].startswith("http") and s["what"] for s in p.sources)
    assert p.compute_basis and p.ram and p.read_threads >= 1
    for q in profile.DEPTHS:  # more bytes per read and more reads in flight never make the device slower
        rates = [p.flash.mb_s(c, q) for c in profile.CHUNKS]
        assert rates == sorted(rates)
    for c in profile.CHUNKS:
        rates = [p.flash.mb_s(c, q) for q in profile.DEPTHS]
        assert rates == sorted(rates)
    assert p.cluster_bytes in profile.CHUNKS


def test_curve_from_datasheet_figures():
    c = FlashCurve.from_spec(seq_mb_s=90, rand4k_qd1_iops=2500, rand4k_max_iops=4000)
    assert c.mb_s(4096, 1) == pytest.approx(4096 * 2500 / 1e6, rel=1e-6)  # the QD1 rate, exactly
    assert c.mb_s(4096, 32) == pytest.approx(4096 * 4000 / 1e6, rel=1e-6)  # the IOPS ceiling
    assert c.mb_s(1 << 20, 32) == pytest.approx(90)  # the bandwidth
    assert c.mb_s(2048, 1) == pytest.approx(c.mb_s(4096, 1) / 2)  # below the table: the same request rate
    assert c.mb_s(4096, 3) == c.mb_s(4096, 2)  # the deepest measured queue not above the asked one
    assert c.seconds([1 << 20] * 4, 4) == pytest.approx(4 * (1 << 20) / 90e6)


def test_bad_profiles_are_one_line_errors(tmp_path):
    with pytest.raises(EdgeError, match="no such device profile.*rpi5-microsd"):
        profile.load("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[device]\nname = 'x'\n")
    with pytest.raises(EdgeError, match="bad.toml: not a valid device profile"):
        profile.load(str(bad))
    bad.write_text("[device\n")
    with pytest.raises(EdgeError, match="not a valid device profile"):
        profile.load(str(bad))


def test_emulation_slows_reads_to_the_curve(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4 << 20, np.uint8).tobytes())
    f = FlashFile(path)
    io = IOEngine(threads=4, buffer_bytes=8 << 20)
    slow = FlashCurve.from_spec(seq_mb_s=40, rand4k_qd1_iops=1000, rand4k_max_iops=2000)
    reqs = [(k * (256 << 10), 64 << 10) for k in range(8)]  # 8 reads of 64 KiB, not coalesced
    try:
        emu = flash.emulate(slow)
        t = time.perf_counter()
        io.read(f, reqs)
        took = time.perf_counter() - t
        expected = slow.seconds([64 << 10] * 8, 4)
        assert emu.seconds == pytest.approx(expected) and took >= expected * 0.99
        counting = flash.emulate(slow, sleep=False)  # --device without --emulate: counted, not slept
        io.read(f, reqs)
        assert counting.seconds == pytest.approx(expected)
    finally:
        flash.emulate(None)
        io.close()
        f.close()


def test_projection_scales_compute_and_adds_flash():
    p = Profile(name="t", title="t", ram_bytes=1 << 32, cores=4, flash=FlashCurve.from_spec(100, 1000, 5000),
                gemv_gb_s=5.0)
    proj = project(p, tokens=10, compute_seconds=1.0, flash_model_seconds=2.0, gemv_here=10.0)
    assert proj.compute_s == pytest.approx(0.2) and proj.flash_s == pytest.approx(0.2)
    assert proj.tok_s == pytest.approx(2.5) and proj.tok_s_overlapped == pytest.approx(5.0)
    assert profile.measure_gemv(threads=1, rows=1024, cols=1024, repeats=3) > 0.1


def test_devices_command(capsys):
    code, out, _ = run_cli(capsys, "devices")
    assert code == 0 and all(n in out for n in TARGETS)
    code, out, _ = run_cli(capsys, "devices", "rpi5-microsd")
    assert code == 0 and "QD32" in out and "source:" in out and "Cortex-A76" in out
    code, _, err = run_cli(capsys, "devices", "toaster")
    assert code == 2 and "edge devices toaster: no such device profile" in err


def test_device_sets_defaults_and_emulate_needs_a_device(capsys, smol_calibrated):
    from edge.engine import Engine

    engine = Engine(smol_calibrated, n_ctx=64, ram=4 << 30, device="rpi5-nvme")
    try:
        assert engine.file.engine.threads == 8 and engine.model.backend.threads == 4  # the profile's threads
        assert not engine.emulating and flash.emulation() is not None  # counted, not slept
    finally:
        flash.emulate(None)
    code, _, err = run_cli(capsys, "run", str(smol_calibrated), "--ram", "4GB", "--emulate", "-p", "hi")
    assert code == 2 and "--emulate needs --device" in err


def test_bench_projects_onto_a_device(capsys, smol_calibrated):
    code, out, _ = run_cli(capsys, "bench", str(smol_calibrated), "--vs", "none", "-n", "6", "--ram", "4GB",
                           "--device", "rpi5-microsd", "--emulate", "--json")
    assert code == 0 and "projected on rpi5-microsd" in out and "flash emulated" in out
    import json

    row = json.loads(out.strip().splitlines()[-1])[0]
    proj = row["projection"]
    assert proj["tok_s"] > 0 and proj["tok_s"] <= proj["tok_s_overlapped"]
    assert row["ours"]["emulated"] and row["ours"]["device"] == "rpi5-microsd"
