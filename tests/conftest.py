"""Shared fixtures: the two real models (from their PyPI packages), float32 copies, a tiny random GGUF."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from edge.models import default_model_path, gemma3_270m_path, pull

# A config dir of the tests' own: `edge probe-flash` saves this machine's profile in the user's, and conversions
# size their bundles by it, so tests that plan or stack would depend on who measured what here before.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="edge-tests-config-")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return gemma3_270m_path()


@pytest.fixture(scope="session")
def qwen25() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1GB): `edge pull`'s assembly of its package parts (pip's cache and
    the cache dir keep it between runs)."""
    return pull("qwen2.5-coder-1.5b", quiet=True)


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def real_model(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def smol_store(tmp_path_factory, smollm2):
    from weights_tools.convert import convert

    return convert(smollm2, tmp_path_factory.mktemp("stores") / "smol.edge", quiet=True)


@pytest.fixture(scope="session")
def gemma_store(tmp_path_factory, gemma3):
    from weights_tools.convert import convert

    return convert(gemma3, tmp_path_factory.mktemp("stores") / "gemma.edge", quiet=True)


@pytest.fixture(scope="session")
def smol_calibrated(tmp_path_factory, smollm2):
    """SmolLM2 as a store calibrated for --ram (its own copy: calibration writes into the store), calibrated by
    `edge convert STORE --calibrate` in a kernel memory cap at calibration's own estimate where a cgroup can be
    made (its peak and the estimate in calibration_peak.json beside the store: test_budget checks them)."""
    import json
    import subprocess
    import sys

    from edge.cgroup import MemoryCap
    from edge.dirs import bytes_under
    from edge.store import Store
    from weights_tools.calibrate import calibration_memory
    from weights_tools.convert import convert

    store = convert(smollm2, tmp_path_factory.mktemp("stores") / "SmolLM2-135M-Instruct.Q4_1.edge", quiet=True)
    tokens = 2048  # the default is 4096: half, for time
    need = calibration_memory(Store(store).config, bytes_under(store), tokens)
    cmd = [sys.executable, "-m", "edge", "convert", str(store), "--calibrate", "--calib-tokens", str(tokens),
           "--quiet"]
    cap, why = MemoryCap.make(need, "edge-calibrate")
    if cap is None:
        proc, peak = subprocess.run(cmd, capture_output=True, text=True), None
    else:
        try:
            proc, peak = cap.run(cmd), cap.peak
        finally:
            cap.close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    (store.parent / "calibration_peak.json").write_text(json.dumps({"need": need, "peak": peak, "why": why}))
    return store


@pytest.fixture(scope="session")
def f32_copy(tmp_path_factory):
    """The same weights dequantized to float32 GGUF, one per source model (cached for the session)."""
    from weights_tools.dequant_gguf import write_dequantized

    made: dict[Path, Path] = {}

    def make(src: Path) -> Path:
        if src not in made:
            made[src] = write_dequantized(src, tmp_path_factory.mktemp("f32") / (src.stem + ".F32.gguf"))
        return made[src]

    return make


def write_tiny_gguf(path: Path, arch: str = "llama", qtype: str = "Q8_0", n_layers: int = 2, dim: int = 64,
                    hidden: int = 128, n_heads: int = 4, n_kv: int = 2, vocab: int = 96, seed: int = 0,
                    extra_tensors: dict | None = None, tokenizer_from: Path | None = None,
                    rope_base: float = 10000.0, untied_output: bool = False) -> Path:
    """A small random-weight model (weights_tools.make_model) under the names the tests use."""
    from weights_tools.make_model import write_random_model

    return write_random_model(path, arch, n_layers, dim, hidden, n_heads, n_kv, vocab, qtype, seed, context=256,
                              tokenizer_from=tokenizer_from, rope_base=rope_base, untied_output=untied_output,
                              extra_tensors=extra_tensors, std=0.08)


@pytest.fixture(scope="session")
def tiny_stacked(tmp_path_factory, smollm2) -> Path:
    """A tiny random llama (SmolLM2's vocabulary) as a store with a 4-deep BitStack (`edge stack`)."""
    from weights_tools.convert import convert
    from weights_tools.stack import stack

    d = tmp_path_factory.mktemp("bitstack")
    src = write_tiny_gguf(d / "tiny.gguf", qtype="F32", n_layers=2, dim=64, tokenizer_from=smollm2)
    store = convert(src, d / "tiny.edge", quiet=True)
    stack(store, iters=4, calib=256, order_tokens=64)
    return store


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture(scope="session")
def moe_store(tmp_path_factory):
    """A random qwen2moe (shared expert, 8 experts, top 2, 4 layers) in Q8_0, and its store."""
    from weights_tools.__main__ import main
    from weights_tools.convert import convert

    d = tmp_path_factory.mktemp("moe")
    gguf = d / "qwen2moe.gguf"
    assert main(["make-model", "--arch", "qwen2moe", "--experts", "8", "--top-k", "2", "--layers", "4", "--dim",
                 "128", "--ffn", "96", "--heads", "4", "--kv-heads", "2", "--quant", "Q8_0", "--out", str(gguf)]) == 0
    return gguf, convert(gguf, d / "qwen2moe.edge", quiet=True)
