"""Mixture-of-experts stores and expert paging under a budget (edge.experts): the store holds each expert as
one record, a store run equals the GGUF's, and a paged run computes the same logits as every expert resident
whatever the cache size, eviction policy or prefetch depth, with its counters adding up."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from edge.strategies import Options

from edge.errors import EdgeError


def _greedy(engine, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    from edge.sampling import Sampler, SamplerConfig

    out = list(engine.generate(prompt, n, Sampler(SamplerConfig(temperature=0.0)), stop_at_end=False))
    return [ev.token for ev in out if ev.token >= 0], engine.model.forward(np.asarray(prompt[:8]), 0)


def test_store_holds_each_expert_as_one_record(moe_store):
    """Every expert's gate, up and down bytes are one chunk of experts/blk.<i>, the source's bytes exactly;
    the store runs (every expert resident) to the GGUF's logits."""
    from edge.engine import Engine
    from edge.gguf_file import GGUFFile
    from edge.store import Store

    gguf, store_path = moe_store
    src, store = GGUFFile(gguf), Store(store_path)
    lay = store.expert_layouts[1]
    arr = store.array("experts/blk.1")
    assert arr.n_chunks == 8 and arr.chunk_bytes == lay["gate_bytes"] + lay["up_bytes"] + lay["down_bytes"]
    rec = np.frombuffer(store.read_chunks(arr, [5])[0], np.uint8)
    parts = [src.tensor(f"blk.1.ffn_{k}_exps.weight").raw.reshape(8, -1)[5] for k in ("gate", "up", "down")]
    assert np.array_equal(rec, np.concatenate(parts))
    for name in ("blk.1.ffn_down_exps.weight", "blk.3.ffn_gate_exps.weight"):
        assert np.array_equal(store.tensor(name).raw, src.tensor(name).raw)
    prompt = [1, 5, 9, 200, 31, 7, 77, 3]
    a = Engine(gguf, n_ctx=64, backend="ggml", threads=2).model.forward(np.asarray(prompt), 0)
    b = Engine(store_path, n_ctx=64, backend="ggml", threads=2).model.forward(np.asarray(prompt), 0)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("evict,prefetch", [("score", 2), ("lru", 2), ("score", 0), ("lru", 1)])
def test_paged_experts_compute_what_resident_experts_do(moe_store, evict, prefetch):
    """Under a budget caching a quarter of the experts (8 of 32) the tokens and logits are the resident run's;
    every routed expert is a hit, a late hit or a miss; bytes read are whole records; without prefetch nothing
    is predicted; shrinking the cache to its minimum mid-run changes nothing but the counters."""
    from edge.engine import Engine

    _, store_path = moe_store
    prompt = [1, 5, 9, 200, 31, 7, 77, 3, 40, 41]
    ref = Engine(store_path, n_ctx=64, backend="ggml", threads=2)
    want_tokens, want_logits = _greedy(ref, prompt, 24)
    engine = Engine(store_path, n_ctx=64, threads=2, ram=1 << 40, options=Options(evict=evict, prefetch=prefetch))
    assert engine.plan.strategy == "experts" and engine.plan.detail.slots == 32  # everything fits
    plan = engine.resize(engine.plan.minimum + engine.plan.detail.extra_for(8))
    assert plan.detail.slots == 8 and engine.model.parts.ffn.experts.slots == 8
    tokens, logits = _greedy(engine, prompt, 24)
    assert tokens == want_tokens
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-4)
    st = engine.stats().cache
    assert st["needed"] == st["hits"] + st["late"] + st["misses"] > 0
    assert st["misses"] > 0 and st["evicted"] > 0
    lay = engine.file.expert_layouts[0]
    assert st["read_bytes"] == st["reads"] * (lay["gate_bytes"] + lay["up_bytes"] + lay["down_bytes"])
    assert st["reads"] == st["misses"] + st["prefetched"]
    if prefetch == 0:
        assert st["predicted"] == st["prefetched"] == 0
    else:
        assert st["predicted"] == prefetch * 3 * 23  # layers 1..3 of every decoded token but the first
        assert 0 <= st["recall"] <= 1 and 0 <= st["precision"] <= 1
    engine.resize(engine.plan.minimum)
    assert engine.model.parts.ffn.experts.slots == engine.plan.detail.min_slots
    again, _ = _greedy(engine, prompt, 8)
    assert again == want_tokens[:8]


def test_every_expert_cached_reads_each_once(moe_store):
    """With room for all 32 experts, each is read at most once however long the run (reads over two runs:
    distinct experts routed to)."""
    from edge.engine import Engine

    _, store_path = moe_store
    engine = Engine(store_path, n_ctx=64, threads=2, ram=1 << 40)
    _greedy(engine, [1, 2, 3, 4], 30)
    first = engine.stats().cache
    assert first["reads"] <= 32 and first["evicted"] == 0
    _greedy(engine, [5, 6, 7, 8], 30)
    second = engine.stats().cache
    assert first["reads"] + second["reads"] == engine.model.parts.ffn.experts.cached <= 32 and second["evicted"] == 0


def test_expert_budget_errors_name_the_figure(moe_store):
    from edge import strategies
    from edge.sizes import format_size
    from edge.store import Store

    store = Store(moe_store[1])
    experts = strategies.get("experts")
    plan = experts.plan(store, 1 << 40, 100 << 20, 64, Options())
    with pytest.raises(EdgeError, match=f"minimum of {format_size(plan.minimum)}"):
        experts.plan(store, plan.minimum - 1, 100 << 20, 64, Options())
    with pytest.raises(EdgeError, match="--prefetch 9"):
        experts.plan(store, 1 << 40, 100 << 20, 64, Options(prefetch=9))
    with pytest.raises(EdgeError, match="--strategy sparse"):
        strategies.resolve(store, "sparse")
    least = dataclasses.replace(plan.detail, slots=plan.detail.min_slots)
    assert least.cache == plan.detail.min_slots * plan.detail.classes[0][0]


def test_corrupt_expert_record_is_named(moe_store, tmp_path):
    """A flipped byte inside an expert's record fails its checksum when that expert is first paged in."""
    import shutil

    from edge.engine import Engine
    from edge.store import Store

    store_path = tmp_path / "bad.edge"
    shutil.copytree(moe_store[1], store_path)
    arr = Store(store_path).array("experts/blk.0")
    with open(arr.file, "r+b") as f:
        for e in range(8):  # every expert of layer 0: whichever the router picks
            f.seek(int(arr.offsets[e]) + 100)
            b = f.read(1)
            f.seek(int(arr.offsets[e]) + 100)
            f.write(bytes([b[0] ^ 0xFF]))
    engine = Engine(store_path, n_ctx=64, threads=2, ram=1 << 40)
    with pytest.raises(EdgeError, match="experts/blk.0.*checksum|checksum.*experts/blk.0"):
        _greedy(engine, [1, 2, 3], 2)


def test_routing_traces_drive_the_trace_predictor(moe_store, tmp_path):
    """`edge convert STORE --calibrate` on a mixture of experts records routing counts: per layer they add up
    to tokens x k (and x k again for the pair tables), the held-out recall of the table is stored, and
    `--predict trace` then prefetches from them without changing a token. Before calibration it is refused
    in one line naming the command."""
    import shutil

    from edge.engine import Engine
    from edge.experts import load_tables
    from edge.store import Store
    from weights_tools.moe_traces import calibrate_experts

    store_path = tmp_path / "traced.edge"
    shutil.copytree(moe_store[1], store_path)
    with pytest.raises(EdgeError, match="--calibrate"):
        Engine(store_path, n_ctx=64, threads=2, ram=1 << 40, options=Options(predict="trace"))
    summary = calibrate_experts(store_path, tokens=200, threads=2)
    assert summary["tokens"] == 200 and len(summary["table_recall"]) == 3
    assert all(0.0 <= r <= 1.0 for r in summary["table_recall"])
    tables = load_tables(Store(store_path))
    assert tables.shape == (4, 17, 8)
    assert np.all(tables[:, 0].sum(axis=1) == 200 * 2)
    assert tables[0, 1:].sum() == 0 and np.all(tables[1:, 1:9].sum(axis=(1, 2)) == 200 * 4)
    assert tables[1, 9:].sum() == 0 and np.all(tables[2:, 9:].sum(axis=(1, 2)) == 200 * 4)
    prompt = [1, 5, 9, 200, 31, 7, 77, 3]
    want, _ = _greedy(Engine(store_path, n_ctx=64, backend="ggml", threads=2), prompt, 16)
    engine = Engine(store_path, n_ctx=64, threads=2, ram=1 << 40, options=Options(predict="trace", prefetch=2))
    engine.resize(engine.plan.minimum + engine.plan.detail.extra_for(8))
    got, _ = _greedy(engine, prompt, 16)
    assert got == want
    st = engine.stats().cache
    assert st["predicted"] == 2 * 3 * 15 and st["predicted_used"] <= st["predicted"]


def test_interrupted_trace_calibration_leaves_the_store_as_it_was(moe_store, tmp_path, monkeypatch):
    """Cut before its commit, the calibration leaves no traces the store would load."""
    import shutil

    from edge.store import Store
    from weights_tools import moe_traces

    store_path = tmp_path / "cut.edge"
    shutil.copytree(moe_store[1], store_path)

    def cut(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("weights_tools.convert.commit_group", cut)
    with pytest.raises(KeyboardInterrupt):
        moe_traces.calibrate_experts(store_path, tokens=64, threads=2)
    assert Store(store_path).moe is None


def test_memory_pressure_gives_experts_back_once(moe_store):
    """A cgroup limit lowered under the budget mid-run drops cached experts and the run goes on with the same
    tokens; at the minimum it is not reported again; a limit equal to the budget rounded to pages is no
    pressure."""
    from edge.engine import Engine

    _, store_path = moe_store
    prompt = [1, 5, 9, 200, 31, 7, 77, 3]
    want, _ = _greedy(Engine(store_path, n_ctx=64, backend="ggml", threads=2), prompt, 24)
    engine = Engine(store_path, n_ctx=64, threads=2, ram=1 << 40)
    budget = engine.resize(engine.plan.minimum + engine.plan.detail.extra_for(16)).budget
    engine.pressure.probe = lambda: (1 << 40, budget - 4095)  # the kernel's page rounding
    assert engine.pressure.target(budget, budget) is None
    low = engine.plan.minimum + engine.plan.detail.extra_for(6)
    engine.pressure.probe = lambda: (1 << 40, low)
    got, _ = _greedy(engine, prompt, 24)
    assert got == want
    assert len(engine.last.shrinks) == 1 and re.search(r"expert cache \d+ -> 6 experts", engine.last.shrinks[0])
    assert engine.model.parts.ffn.experts.slots == 6 and engine.model.parts.ffn.experts.cached <= 6


def test_expert_bitwidths_follow_measured_sensitivity(moe_store, tmp_path):
    """`edge expert-bits`: at 5.2 bits per expert weight the experts are split between q4_0 (4.5) and the
    source's Q8_0 (8.5), least sensitive first, within the target; each profile score is what a whole run with
    that expert alone lowered measures; the store then runs its mixed bitwidths paged exactly as resident; a new
    target reuses the variants and profile; an interrupted profile leaves the store as it was and a rerun writes
    no variant again; a target under the smallest variant names it."""
    import shutil

    from edge.engine import Engine
    from edge.store import Store
    from weights_tools import expert_bits
    from weights_tools.calibrate import LayerReplay

    store_path = tmp_path / "bits.edge"
    shutil.copytree(moe_store[1], store_path)
    calls = []

    def cut(done, total, label):
        calls.append(label)
        if label.startswith("profile layer 2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        expert_bits.adapt(store_path, 5.2, tokens=64, threads=2, progress=cut)
    assert Store(store_path).bits is None and (store_path / "bits.partial").is_dir()
    written = (store_path / "bits.partial" / "q4_1" / "blk.0" / "c" / "0" / "0").stat().st_mtime_ns
    attrs = expert_bits.adapt(store_path, 5.2, tokens=64, threads=2)
    assert (store_path / "bits" / "q4_1" / "blk.0" / "c" / "0" / "0").stat().st_mtime_ns == written  # not rewritten
    assert attrs["bounds"] == ["q4_0", "keep"] and 5.0 < attrs["bits_per_weight"] <= 5.2
    store = Store(store_path)
    scores = np.array(attrs["profiles"]["q4_0/keep"]["scores"])
    kinds = np.array([[store.expert_kind(i, e) for e in range(8)] for i in range(4)])
    assert 0 < (kinds == "q4_0").sum() < 32 and set(kinds.ravel()) == {"q4_0", "keep"}
    assert scores[kinds == "q4_0"].max() <= scores[kinds == "keep"].min()

    ids = expert_bits.held_out(store, 64)
    var = expert_bits.Variants(store, ["q4_0", "keep"], len(ids), threads=2)
    replay = LayerReplay(var.model, ids)
    var.apply([["keep"] * 8 for _ in range(4)])
    replay.inputs()
    base = replay.ppl_from(4)
    assert base == pytest.approx(attrs["profiles"]["q4_0/keep"]["base"], rel=1e-6)
    i, e = 2, int(np.argmax(scores[2]))
    var.set(i, e, "q4_0")
    replay.inputs()
    assert replay.ppl_from(4) - base == pytest.approx(scores[i, e], rel=1e-4, abs=1e-6)

    prompt = [1, 5, 9, 200, 31, 7, 77, 3, 40, 41]
    want_tokens, want_logits = _greedy(Engine(store_path, n_ctx=64, backend="ggml", threads=2), prompt, 16)
    engine = Engine(store_path, n_ctx=64, threads=2, ram=1 << 40)
    plan = engine.resize(engine.plan.minimum + engine.plan.detail.extra_for(12))
    (small, n_small), (big, n_big) = plan.detail.classes  # q4_0 and Q8_0 records: slots of each size
    assert n_small == (kinds == "q4_0").sum() and plan.detail.min_slots == 4 and big > small
    pager = engine.model.parts.ffn.experts
    mine = np.bincount(pager.slot_class, minlength=2)
    assert pager.slots == 12 and mine.min() >= 2 and abs(mine[0] / n_small - mine[1] / n_big) < 0.25
    assert pager.cache_bytes == plan.cache == mine[0] * small + mine[1] * big < 12 * big
    tokens, logits = _greedy(engine, prompt, 16)
    assert tokens == want_tokens
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-4)
    st = engine.stats().cache
    assert st["misses"] > 0 and st["evicted"] > 0
    assert all(pager.class_of[key] == pager.slot_class[s] for key, s in pager.slot_of.items())
    less = engine.resize(plan.minimum + plan.detail.extra_for(12) - 1)  # one less byte: one expert less
    assert less.detail.slots == 11
    source = Engine(moe_store[1], n_ctx=64, backend="ggml", threads=2)
    assert not np.allclose(_greedy(source, prompt, 1)[1], want_logits, atol=1e-3)  # other bytes did run

    again = expert_bits.adapt(store_path, 8.5, tokens=64, threads=2)
    assert again["bounds"] is None and {k for row in again["choice"] for k in row} == {"keep"}
    assert again["profiles"] == attrs["profiles"]
    with pytest.raises(EdgeError, match="at least 4.50"):
        expert_bits.adapt(store_path, 4.0, tokens=64, threads=2)

    from edge.cli import main

    args = ["expert-bits", str(store_path), "--bits", "5.2", "--calib-tokens", "64", "--threads", "2", "--quiet"]
    assert main(args + ["--bounds", "q5_0,q4_1"]) == 2  # fewer bits first
    assert main(args + ["--bounds", "q4_1,q5_0"]) == 0
    assert Store(store_path).bits["bounds"] == ["q4_1", "q5_0"]
