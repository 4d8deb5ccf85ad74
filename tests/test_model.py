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


def test_sequences_batched_through_a_block_equal_each_alone(tiny_gguf):
    """block_batch (calibration's chat answers): sequences at their own positions with their own KV caches,
    their products as one, give what each gives alone; each cache holds its own sequence."""
    from edge.model import KVCache

    f = GGUFFile(tiny_gguf)
    m = Transformer(f, 32, backend="numpy")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 96, n) for n in (5, 3, 7)]
    alone = []
    for p in prompts:
        m.kv = KVCache(m.cfg, 32)
        x = m.embed(p)
        for i in range(m.cfg.n_layers):
            x = m.block(i, x, 0)
        nxt = m.embed(np.array([int(p[0])]))
        for i in range(m.cfg.n_layers):
            nxt = m.block(i, nxt, len(p))
        alone.append((x, nxt, m.kv))
    caches = [KVCache(m.cfg, 32) for _ in prompts]
    xs = [m.embed(p) for p in prompts]
    for i in range(m.cfg.n_layers):
        xs = m.block_batch(i, xs, [0, 0, 0], caches)
    steps = [m.embed(np.array([int(p[0])])) for p in prompts]
    for i in range(m.cfg.n_layers):
        steps = m.block_batch(i, steps, [len(p) for p in prompts], caches)
    for (x, nxt, kv), got, step, cache in zip(alone, xs, steps, caches):
        np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(step, nxt, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(cache.k, kv.k)
