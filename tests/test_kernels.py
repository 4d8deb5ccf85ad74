"""The ORT and ggml backends (quantized weights, int8 activations) against the float32 reference, every
supported format; ggml's strided and batched views against plain products."""

import gguf
import numpy as np
import pytest

from edge.gguf_file import Tensor
from edge.kernels import GgmlBackend, NumpyBackend, OrtBackend


def tensor_of(name: str, rows: int = 96, cols: int = 512, seed: int = 0) -> Tensor:
    qt = gguf.GGMLQuantizationType[name]
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    if name in ("Q4_K", "Q6_K"):  # gguf cannot quantize K-quants: build them from random bytes
        from edge import quants

        fmt = quants.FORMATS[int(qt)]
        raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // 256 * fmt.block_bytes), np.uint8)
        blocks = raw.reshape(-1, fmt.block_bytes)
        for off in ([0, 2] if name == "Q4_K" else [208]):
            blocks[:, off + 1] = (blocks[:, off + 1] & 0x03) | 0x10  # small finite fp16 scales
    else:
        raw = gguf.quantize(w, qt).view(np.uint8).reshape(rows, -1)
    return Tensor("w", int(qt), (rows, cols), raw)


@pytest.mark.parametrize("name", ["F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("t_len", [1, 7])
@pytest.mark.parametrize("backend", [OrtBackend, GgmlBackend])
def test_backend_matches_float_reference(name, t_len, backend):
    t = tensor_of(name)
    x = np.random.default_rng(1).standard_normal((t_len, t.cols)).astype(np.float32)
    (ref,) = NumpyBackend().linear_group([t])(x)
    (ours,) = backend(threads=1).linear_group([t])(x)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 0.02, rel  # int8 rounding of the activations, as in llama.cpp


def test_group_outputs_in_order():
    a, b = tensor_of("Q4_1", rows=64, seed=1), tensor_of("Q8_0", rows=32, seed=2)
    x = np.random.default_rng(3).standard_normal((2, 512)).astype(np.float32)
    outs = OrtBackend(threads=1).linear_group([a, b])(x)
    refs = NumpyBackend().linear_group([a, b])(x)
    assert [o.shape for o in outs] == [(2, 64), (2, 32)]
    for o, r in zip(outs, refs):
        assert np.linalg.norm(o - r) / np.linalg.norm(r) < 0.02


def test_ggml_views_and_batches_equal_plain_products():
    """The forms the neuron cache uses: the first columns of longer rows, and a stack of matrices at a stride."""
    from edge import quants
    from edge.ggml import Weight, ggml

    g = ggml(1)
    t = tensor_of("Q4_1", rows=64, cols=512)
    w = quants.dequantize(t.raw, t.type_id, t.cols)
    x = np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32)
    (y,) = g.matmul(x, [Weight(t.raw, t.type_id, 64, 256, row_stride=t.raw.shape[1])])
    (ref,) = g.matmul(x, [Weight(np.ascontiguousarray(t.raw[:, :t.raw.shape[1] // 2]), t.type_id, 64, 256)])
    np.testing.assert_array_equal(y, ref)
    assert np.linalg.norm(y - x @ w[:, :256].T) / np.linalg.norm(y) < 0.02
    # 4 matrices of 16 rows, 16 * row_bytes apart, each times its own input
    xs = np.random.default_rng(5).standard_normal((4, 2, 512)).astype(np.float32)
    stride = 16 * t.raw.shape[1]
    (ys,) = g.products([(xs, Weight(t.raw, t.type_id, 16, 512, None, 0, 4, stride))])
    for k in range(4):
        (one,) = g.matmul(xs[k], [Weight(t.raw, t.type_id, 16, 512, offset=k * stride)])
        np.testing.assert_allclose(ys[k], one, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="past its buffer"):
        Weight(t.raw, t.type_id, 65, 512)


def test_ggml_kept_graphs_equal_fresh_ones_and_stay_bounded(monkeypatch):
    """One-row products run a kept graph (edge.ggml.Graph): the same numbers as a graph built for the call
    (keep=False), weights rewritten in place (the neuron cache) are read anew, outputs are the caller's own
    arrays, and the kept graphs stay within GRAPH_CACHE, least recently used out."""
    import edge.ggml as G
    from edge.ggml import Ggml, Weight

    g = Ggml(2)
    a, b = tensor_of("Q4_1", rows=64, seed=6), tensor_of("Q8_0", rows=32, seed=7)
    wa, wb = Weight(a.raw.copy(), a.type_id, 64, 512), Weight(b.raw, b.type_id, 32, 512)
    x, z = np.random.default_rng(8).standard_normal((2, 1, 512)).astype(np.float32)
    for _ in range(2):  # built, then kept
        ya, yb = g.products([(x, wa), (x, wb)])
        fa, fb = g.products([(x, wa), (x, wb)], keep=False)
        np.testing.assert_array_equal(ya, fa)
        np.testing.assert_array_equal(yb, fb)
    assert len(g._graphs) == 1
    y2, yz = g.products([(x, wa), (z, wb)])  # two inputs: another graph
    np.testing.assert_array_equal(y2, ya)
    np.testing.assert_array_equal(yz, g.matmul(z, [wb], keep=False)[0])
    stride = 16 * a.raw.shape[1]  # a stack of 4 matrices, each times its own copy of one position (streamed records)
    xs = np.random.default_rng(9).standard_normal((4, 1, 512)).astype(np.float32)
    stack = Weight(a.raw, a.type_id, 16, 512, None, 0, 4, stride)
    for _ in range(2):
        (ys,) = g.products([(xs, stack)])
        np.testing.assert_array_equal(ys, g.products([(xs, stack)], keep=False)[0])
    assert ys.shape == (4, 1, 16) and len(g._graphs) == 3
    ya[:] = 0  # the caller's copy: the next call is not affected
    np.testing.assert_array_equal(g.matmul(x, [wa])[0], fa)
    wa.buf[:] = b.raw[:, :wa.buf.shape[1]].repeat(2, axis=0)[:64]  # new weights at the same address
    np.testing.assert_array_equal(g.matmul(x, [wa])[0], g.matmul(x, [wa], keep=False)[0])
    # a bound that holds two graphs: a step of three recurring ones keeps two, not a cycle of rebuilds
    g2 = Ggml(1)
    ws = [Weight(a.raw, a.type_id, 64, 512, offset=0), Weight(a.raw, a.type_id, 32, 512, offset=32 * a.raw.shape[1]),
          Weight(b.raw, b.type_id, 16, 512)]
    monkeypatch.setattr(G, "GRAPH_CACHE", 2 * G.Graph.bytes_for(g2, [(1, 512)], [(0, ws[0])]) + 1)
    built = []
    monkeypatch.setattr(
        G.Graph, "__init__", lambda self, *args, _init=G.Graph.__init__: (built.append(1), _init(self, *args))[1]
    )
    for step in range(4):
        for w in ws:
            np.testing.assert_array_equal(g2.matmul(x, [w])[0], g2.matmul(x, [w], keep=False)[0])
    assert g2._graph_bytes <= G.GRAPH_CACHE
    assert len(built) == len(g2._graphs) == 2


def test_ggml_computes_on_the_backend_registrys_cpu_device():
    """Products run through ggml's backend registry (the path GPU devices take), on its CPU device, and equal
    the kernel's own row-by-row dot products: the same numbers a one-row and a many-row product give."""
    from edge.ggml import Weight, ggml

    from edge.ggml import devices

    gg = ggml(2)
    assert gg.device == "CPU" and ("CPU", "CPU") in [(name, kind) for name, _, kind, _ in devices()]
    t = tensor_of("Q8_0", rows=64, cols=256)
    w = Weight(t.raw, t.type_id, t.rows, t.cols)
    x = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    (many,) = gg.matmul(x, [w], keep=False)
    rows = np.concatenate([gg.matmul(x[i:i + 1], [w], keep=False)[0] for i in range(5)])
    np.testing.assert_array_equal(many, rows)
