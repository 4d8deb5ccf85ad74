"""BitStack: the block format, the decomposition, the Q4_0 sign kernel path, `edge stack` (resumable, committed
only when whole), loading a prefix of the universal order by budget, and live resize."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge.strategies import Options

from edge import bitstack
from edge.errors import EdgeError

from tests.conftest import write_tiny_gguf


def test_sign_packing_round_trips_and_becomes_q4_0_plus_minus_one():
    import gguf

    rng = np.random.default_rng(0)
    pos = rng.random((5, 96)) < 0.5
    packed = bitstack.pack_signs(pos)
    assert packed.shape == (5, 12)
    signs = bitstack.unpack_signs(packed, 96)
    assert np.array_equal(signs, np.where(pos, 1.0, -1.0))
    buf = np.zeros(5 * 96 // 32 * 18, np.uint8)
    bitstack.fill_q4(buf, packed, 5, 96)
    ref = gguf.dequantize(buf.reshape(5, -1), gguf.GGMLQuantizationType.Q4_0)  # gguf's reference dequantizer
    assert np.array_equal(ref, signs)


def test_decomposition_converges_and_blocks_have_the_stated_size():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 96)) * rng.random(96)[None, :]).astype(np.float32)
    rank = 2
    blocks = list(bitstack.decompose(w, 6, rank))
    assert all(b.nbytes == bitstack.block_bytes(64, 96, rank) == 64 * 96 // 8 + 2 * rank * (64 + 96) for b in blocks)
    errs = [np.linalg.norm(bitstack.reconstruct(blocks[:n], 64, 96, rank) - w) / np.linalg.norm(w)
            for n in range(1, 7)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[0] < 0.75 and errs[-1] < 0.3 * errs[0]


def test_top_abs_factors_is_the_best_rank_k_approximation():
    rng = np.random.default_rng(2)
    for shape in ((40, 70), (70, 40)):
        a = np.abs(rng.standard_normal(shape)).astype(np.float32)
        u, v = bitstack.top_abs_factors(a, 3)
        uu, s, vt = np.linalg.svd(a.astype(np.float64))
        best = (uu[:, :3] * s[:3]) @ vt[:3]
        assert np.allclose(u @ v, best, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 4, bitstack.REBUILD_TOKENS + 3])
def test_stacked_group_matches_the_dense_reconstruction(tokens):
    """Both runtime paths against the float32 sum of the same blocks: few tokens go through llama.cpp's kernel
    on the signs as Q4_0 +-1 (activations quantized to Q8, so within 2%), a batch rebuilds the weights in
    float32 bands (exact up to float rounding)."""
    from edge.ggml import ggml

    rng = np.random.default_rng(3)
    lins, dense = [], []
    for rows in (96, 64):
        w = rng.standard_normal((rows, 128)).astype(np.float32)
        lin = bitstack.StackedLinear(f"w{rows}", rows, 128, 2)
        for b in bitstack.decompose(w, 3, 2):
            lin.push(b)
        lins.append(lin)
        dense.append(lin.dense())
    scale = (rng.random(128) + 0.5).astype(np.float32)
    group = bitstack.StackedGroup(lins, 1.0 / scale, ggml(2))
    x = rng.standard_normal((tokens, 128)).astype(np.float32)
    for y, w in zip(group(x), dense):
        ref = (x / scale) @ w.T
        err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert err < (1e-5 if tokens >= bitstack.REBUILD_TOKENS else 0.02)
        assert err > 0 or tokens >= bitstack.REBUILD_TOKENS  # the kernel path really ran on Q8 activations


def test_stack_writes_a_universal_order_of_every_block(tiny_stacked):
    from edge.bitstack import LINEARS, StackInfo
    from edge.store import Store

    store = Store(tiny_stacked)
    info = StackInfo.of(store)
    names = {f"blk.{i}.{n}.weight" for i in range(2) for n in LINEARS}
    assert set(info.linears) == names
    # every linear's blocks 2..4 exactly once, level by level (the paper's "average" order)
    assert sorted(info.order) == sorted((n, b) for n in names for b in (1, 2, 3))
    assert [b for _, b in info.order] == sorted(b for _, b in info.order)
    sizes = info.prefix_bytes()
    assert sizes[0] == info.base_bytes and np.all(np.diff(sizes) > 0)
    assert len(store.stack["level_ppl"]) == 4
    assert not (tiny_stacked / "stack.partial").exists()


def test_runtime_equals_the_reconstructed_weights(tiny_stacked):
    """A model loaded at a prefix computes what a float32 model with the reconstructed weights computes: same
    greedy tokens, logits within Q8 activation rounding."""
    from edge.engine import Engine
    from edge.head import DenseEmbedding, DenseHead
    from edge.kernels import make_backend
    from edge.model import Transformer
    from edge.parts import ACTIVATIONS, DenseFFN, Parts

    eng = Engine(tiny_stacked, n_ctx=64, ram=400 << 20, options=Options(strategy="bitstack"))
    stack = eng.model.parts.linears
    assert stack.prefix == len(stack.info.order)  # the whole stack fits
    eng.resize(eng.plan.minimum + stack.info.prefix_bytes()[5] - stack.info.base_bytes)
    assert stack.prefix == 5

    class Reconstructed:
        """The stack's linears at its prefix as float32 matrices."""

        def group(self, i, g):
            ours = stack.group(i, g)
            ws = [lin.dense() for lin in ours.linears]
            return lambda x, ws=ws, inv=ours.inv_scale: tuple((x * inv) @ w.T for w in ws)

        def resize(self, plan):
            pass

    backend, cfg = make_backend("numpy"), eng.config
    parts = Parts(Reconstructed(), DenseFFN(Reconstructed(), cfg.n_layers, ACTIVATIONS[cfg.activation]),
                  DenseEmbedding(eng.file), DenseHead(eng.file, backend))
    ref = Transformer(eng.file, 64, backend=backend, parts=parts)
    tokens = np.arange(1, 40) * 7 % eng.config.vocab_size
    a = eng.model.forward(tokens, 0, all_logits=True)
    b = ref.forward(tokens, 0, all_logits=True)
    print("top-1", np.mean(a.argmax(-1) == b.argmax(-1)), "max diff", np.abs(a - b).max() / np.abs(b).max())
    # a random model's logits are nearly flat (near-ties flip on Q8 rounding): the logits are the test
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()


def test_resize_reads_only_the_added_blocks(tiny_stacked):
    from edge.engine import Engine

    eng = Engine(tiny_stacked, n_ctx=64, ram=400 << 20, options=Options(strategy="bitstack"))
    stack = eng.model.parts.linears
    sizes = stack.info.prefix_bytes()
    base = eng.plan.minimum - stack.info.base_bytes
    eng.resize(base + sizes[3])
    assert stack.prefix == 3 and stack.nbytes == sizes[3]
    before = stack.read_bytes
    eng.resize(base + sizes[10] + 100)  # between two steps: the smaller prefix
    assert stack.prefix == 10 and stack.read_bytes - before == sizes[10] - sizes[3]
    before = stack.read_bytes
    eng.resize(base + sizes[1])
    assert stack.prefix == 1 and stack.read_bytes == before and stack.nbytes == sizes[1]
    out = list(eng.generate(eng.tokenizer.encode("Hello"), 4))
    assert len(out) >= 1
    with pytest.raises(EdgeError, match="below the minimum of"):
        eng.resize(base)
    assert stack.prefix == 1

    eng.resize(base + sizes[10])
    plan = eng.plan
    eng.meter.committed = lambda: plan.budget  # a reading: the process has grown to its budget since the plan
    eng.relieve_pressure()
    assert eng.plan.budget == plan.budget and stack.prefix < 10  # (all the tiny stack: the margin is larger)
    assert eng.last.shrinks == [f"memory grew past the plan: {eng.plan.shrunk_from(plan)}"]


def test_interrupted_stack_resumes_and_never_loads_half(tmp_path, smollm2):
    from edge.engine import Engine
    from weights_tools.convert import convert
    from weights_tools.stack import stack

    src = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q8_0", n_layers=2, dim=64, tokenizer_from=smollm2)
    store = convert(src, tmp_path / "tiny.edge", quiet=True)
    seen = []

    def stop_after_three(done, total, label):
        seen.append(label)
        if sum(lab.startswith("decompose") for lab in seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stack(store, iters=2, calib=256, order_tokens=32, progress=stop_after_three)
    assert (store / "stack.partial").exists()
    assert "stack" not in json.loads((store / "zarr.json").read_text())["attributes"]["edge"]
    with pytest.raises(EdgeError, match="edge stack"):
        Engine(store, n_ctx=64, ram=400 << 20, options=Options(strategy="bitstack"))
    labels = []
    stack(store, iters=2, calib=256, order_tokens=32, progress=lambda d, t, label: labels.append(label))
    assert sum(lab.startswith("decompose") for lab in labels) == 14 - 3  # the finished three are kept
    assert not any(lab == "activation scales" for lab in labels)
    eng = Engine(store, n_ctx=64, ram=400 << 20)  # auto: a stacked store runs as BitStack
    assert eng.plan.strategy == "bitstack"


def test_budget_below_the_stack_minimum_names_it(tiny_stacked):
    from edge.engine import Engine

    with pytest.raises(EdgeError, match=r"--ram 50\.0MB is below the minimum of .*stacked model"):
        Engine(tiny_stacked, n_ctx=64, ram=50_000_000)


def test_stack_cli_refuses_a_gguf(tmp_path, capsys):
    from edge.cli import main

    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert main(["stack", str(src)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an edge store" in err[0] and "edge convert" in err[0]


def test_calibrated_stacked_store_reads_embedding_and_head_from_flash(tiny_stacked, tmp_path):
    """With calibration data the stacked run keeps no head in RAM (low-rank head + exact rows from flash, as the
    sparse runtime does; the embedding's rows come from flash either way): a smaller minimum, the same
    perplexity."""
    import shutil

    from edge.engine import Engine
    from edge.head import ApproxHead, DenseHead
    from weights_tools.calibrate import calibrate

    store = shutil.copytree(tiny_stacked, tmp_path / "calibrated.edge")
    calibrate(store, rank=16, head_rank=32, tokens=512)
    plain = Engine(tiny_stacked, n_ctx=64, ram=400 << 20)
    flash = Engine(store, n_ctx=64, ram=400 << 20)
    assert isinstance(plain.model.parts.head, DenseHead) and isinstance(flash.model.parts.head, ApproxHead)
    assert flash.plan.strategy == "bitstack" and flash.plan.resident < plain.plan.resident
    window = [int(t) for t in np.arange(1, 50) * 11 % plain.config.vocab_size]
    a, b = plain.model.nll(window), flash.model.nll(window)
    assert np.allclose(a, b, rtol=0.02, atol=0.02)


def test_corrupt_stack_block_is_named_on_load(tiny_stacked, tmp_path):
    import shutil

    from edge.engine import Engine

    store = shutil.copytree(tiny_stacked, tmp_path / "corrupt.edge")
    shard = next((store / "stack" / "blk.1.ffn_up.weight").rglob("c/*/*"))
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # a sign byte of the first block
    shard.write_bytes(bytes(data))
    with pytest.raises(EdgeError, match=r"chunk 0 of array 'stack/blk\.1\.ffn_up\.weight' fails its checksum"):
        Engine(store, n_ctx=64, ram=400 << 20)


@pytest.mark.parametrize("flags, message", [(["--iters", "0"], "--iters and --rank must be at least 1"),
                                            (["--calib-tokens", "100000000"], "calibration text has")])
def test_stack_cli_bad_flags_are_one_line(tiny_stacked, tmp_path, capsys, flags, message):
    import shutil

    from edge.cli import main

    store = shutil.copytree(tiny_stacked, tmp_path / "s.edge")
    assert main(["stack", str(store), "--quiet", *flags]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (store / "stack.partial").exists()  # nothing written; the stack already there still loads
    assert json.loads((store / "zarr.json").read_text()) == json.loads((tiny_stacked / "zarr.json").read_text())


@pytest.mark.slow
def test_stack_of_the_real_model_improves_with_depth(smol_store, tmp_path):
    """SmolLM2 itself, two blocks per linear: the second level lowers the calibration perplexity, and the
    runtime's perplexity on held-out text falls as the budget grows."""
    import shutil

    from edge.engine import Engine
    from edge.evaluate import eval_text, perplexity, windows
    from weights_tools.stack import stack

    store = shutil.copytree(smol_store, tmp_path / "smol.edge")
    attrs = stack(store, iters=2, calib=256, order_tokens=16)
    assert attrs["level_ppl"][1] < attrs["level_ppl"][0]
    eng = Engine(store, n_ctx=128, ram=1 << 30)
    wins = windows(eng.tokenizer.encode(eval_text()), 128, 1, None)
    stack_ = eng.model.parts.linears
    full = perplexity(eng.model.nll, wins).ppl
    eng.resize(eng.plan.minimum)
    assert stack_.prefix == 0
    base = perplexity(eng.model.nll, wins).ppl
    assert full < base / 10, (full, base)


def test_streamed_ffn_computes_what_the_resident_stack_does(tiny_stacked):
    """--strategy bitstack-stream: the FFN's blocks regrouped by clusters of neurons, the first clusters of
    every layer in RAM, the others read from flash every token: the same function as the resident stack at
    the same depth, reading exactly the uncached clusters' records."""
    from edge.engine import Engine

    resident = Engine(tiny_stacked, n_ctx=64, ram=400 << 20, options=Options(strategy="bitstack"))
    streamed = Engine(tiny_stacked, n_ctx=64, ram=400 << 20, options=Options(strategy="bitstack-stream"))
    info = streamed.model.parts.linears.info
    assert streamed.plan.detail.streams and info.streams_ffn
    assert not any(".ffn_" in name for name in streamed.model.parts.linears.linears)  # not loaded whole
    ffn = streamed.model.parts.ffn
    prefix = 9
    resident.model.parts.linears.set_prefix(prefix)
    streamed.model.parts.linears.set_prefix(prefix)
    ffn.configure(info.depths(prefix), 1)
    n = ffn.layers[0].n
    assert ffn.slots == 1 < n
    tokens = np.arange(1, 13) * 7 % resident.config.vocab_size  # fewer than REBUILD_TOKENS: both by their signs
    a = resident.model.forward(tokens, 0, all_logits=True)
    b = streamed.model.forward(tokens, 0, all_logits=True)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert ffn.read_bytes == sum(max(lay.depth) * (n - 1) * lay.rec.nbytes for lay in ffn.layers)


def test_streamed_ffn_plans_a_deeper_stack_at_the_same_budget(tiny_stacked):
    """At a budget that holds only part of the stack, bitstack-stream loads deeper (at least half of each
    layer's FFN clusters cached, the rest streamed); info and --json say how."""
    from edge.strategies import get
    from edge.store import Store

    store = Store(tiny_stacked)

    def plan(budget: int, strategy: str = "bitstack"):
        return get(strategy).plan(store, budget, 40 << 20, 64, Options(strategy=strategy))

    whole = plan(400 << 20)
    sizes = whole.detail.full_bytes
    budget = whole.minimum + (sizes - whole.detail.base) // 3
    resident = plan(budget)
    streamed = plan(budget, "bitstack-stream")
    assert 0 < resident.detail.prefix < whole.detail.prefix
    assert streamed.detail.prefix > resident.detail.prefix and streamed.detail.bits > resident.detail.bits
    assert streamed.detail.n_clusters // 2 <= streamed.detail.ffn_slots < streamed.detail.n_clusters
    assert streamed.minimum + streamed.detail.stack_bytes - streamed.detail.base <= budget
    assert "the FFN streamed by clusters" in "\n".join(streamed.lines())


def test_streamed_ffn_resize_reads_only_what_it_adds(tiny_stacked):
    """Growing the depth or the cached clusters reads only the added records; shrinking reads nothing; the
    result is what a fresh load at that depth and those clusters computes."""
    from edge.bitstack import FFN, StackedFFN
    from edge.engine import Engine

    eng = Engine(tiny_stacked, n_ctx=64, ram=400 << 20, options=Options(strategy="bitstack-stream"))
    ffn, info, store = eng.model.parts.ffn, eng.model.parts.linears.info, eng.file
    x = np.random.default_rng(0).standard_normal((3, eng.config.dim)).astype(np.float32)
    rec = ffn.layers[0].rec.nbytes
    shared = store.array("stack/ffn_shared.0").chunk_bytes
    for prefix, slots in ((3, 1), (30, 1), (30, 2), (5, 2), (5, 1), (42, 2)):
        old = [(max(lay.depth), ffn.slots) for lay in ffn.layers]
        before = ffn.load_bytes
        ffn.configure(info.depths(prefix), slots)
        read = ffn.load_bytes - before
        added = sum((max(lay.depth) * ffn.slots - min(d, max(lay.depth)) * min(s, ffn.slots)) * rec
                    + max(0, max(lay.depth) - d) * shared for lay, (d, s) in zip(ffn.layers, old))
        assert read == added, (prefix, slots, read, added)
        fresh = StackedFFN(store, eng.model.backend.ggml, eng.model.act, info.depths(prefix), slots)
        for i in range(len(ffn.layers)):
            np.testing.assert_array_equal(ffn(i, x), fresh(i, x))
    plan = eng.resize(eng.plan.minimum + (eng.plan.detail.full_bytes - eng.plan.detail.base) // 4)  # as Ctrl+B does
    depths = info.depths(plan.detail.prefix)
    assert eng.model.parts.linears.prefix == plan.detail.prefix and ffn.slots == plan.detail.ffn_slots
    assert all(lay.depth == tuple(depths[f"blk.{lay.i}.{n}.weight"] for n in FFN) for lay in ffn.layers)
    assert len(list(eng.generate(eng.tokenizer.encode("Hello"), 3))) >= 1
