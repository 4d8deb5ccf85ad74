"""The forward pass on a tiny random GGUF: incremental decode equals the batched pass; backends agree."""

import numpy as np
import pytest

from conftest import write_tiny_gguf
from edge.gguf_file import GGUFFile
from edge.model import Transformer


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "F32"])
def test_incremental_equals_batched(tmp_path, qtype):
    f = GGUFFile(write_tiny_gguf(tmp_path / "m.gguf", qtype=qtype))
    m = Transformer(f, 64, backend="numpy")
    tokens = np.random.default_rng(0).integers(0, 96, 20)
    full = m.forward(tokens, 0, all_logits=True)
    m2 = Transformer(f, 64, backend="numpy")
    step = [m2.forward(tokens[:5], 0)] + [m2.forward(tokens[i:i + 1], i) for i in range(5, 20)]
    np.testing.assert_allclose(np.stack(step), full[4:], rtol=1e-3, atol=1e-3)


def test_backends_agree(tiny_gguf):
    f = GGUFFile(tiny_gguf)
    tokens = np.arange(12) % 96
    ref = Transformer(f, 64, backend="numpy").forward(tokens, 0, all_logits=True)
    ours = Transformer(f, 64, backend="ort", threads=1).forward(tokens, 0, all_logits=True)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 0.03


def test_context_overflow_is_a_clear_error(tiny_gguf):
    from edge.errors import EdgeError

    m = Transformer(GGUFFile(tiny_gguf), 16, backend="numpy")
    with pytest.raises(EdgeError, match="context"):
        m.forward(np.zeros(17, np.int64), 0)


def test_kv_cache_allocated_once(tiny_gguf):
    m = Transformer(GGUFFile(tiny_gguf), 32, backend="numpy")
    k_before = m.kv.k
    m.forward(np.arange(8), 0)
    m.forward(np.array([3]), 8)
    assert m.kv.k is k_before and m.kv.k.shape[2] == 32
