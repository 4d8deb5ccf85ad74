"""The strategy contract (edge.strategies): every registered strategy plans one Plan shape, refuses a budget
below its minimum with that figure, builds parts that generate the resident model's tokens where it is exact,
and a live resize lands on the plan a fresh start at that budget would make."""

from __future__ import annotations

import numpy as np
import pytest

from edge import strategies
from edge.engine import Engine
from edge.errors import EdgeError
from edge.sampling import Sampler, SamplerConfig
from edge.sizes import format_size
from edge.store import Store
from edge.strategies import NAMES, REGISTRY, Options, get
from edge.strategies.plan import plan_context

COMMON = {"strategy", "budget", "baseline", "kv", "io", "resident", "margin", "scratch", "held", "least", "chunk",
          "minimum", "cache"}
# (store fixture, strategy, exact: its tokens are the resident model's)
CASES = [("smol_calibrated", "sparse", True), ("smol_calibrated", "naive", False),
         ("tiny_stacked", "bitstack", False), ("tiny_stacked", "bitstack-stream", False),
         ("moe_store", "experts", True)]


def store_path(request, fixture: str):
    value = request.getfixturevalue(fixture)
    return value[1] if fixture == "moe_store" else value


def test_every_strategy_is_registered_once():
    assert set(REGISTRY) == {"sparse", "naive", "bitstack", "bitstack-stream", "experts"}
    assert NAMES == ("auto", *REGISTRY)
    assert all(get(name).name == name for name in REGISTRY)
    assert all(f"{name}:" in strategies.help_text() for name in REGISTRY)


@pytest.mark.parametrize("fixture,auto", [("smol_calibrated", "sparse"), ("tiny_stacked", "bitstack"),
                                          ("moe_store", "experts")])
def test_auto_and_mismatches(request, fixture, auto):
    store = Store(store_path(request, fixture))
    assert strategies.resolve(store, "auto").name == auto
    wrong = "sparse" if auto == "experts" else "experts"
    with pytest.raises(EdgeError, match=f"--strategy {wrong}: .*mixture of experts"):
        strategies.resolve(store, wrong)
    with pytest.raises(EdgeError, match="--strategy fast: choose one of auto, sparse"):
        strategies.resolve(store, "fast")


@pytest.mark.parametrize("fixture,name,exact", CASES)
def test_one_plan_shape_and_its_minimum(request, fixture, name, exact):
    store = Store(store_path(request, fixture))
    strategy = get(name)
    options = Options(strategy=name, attention="resident")  # below its minimum "auto" would stream the attention
    plan = strategy.plan(store, 1 << 40, 50 << 20, 64, options)
    d = plan.as_dict()
    assert COMMON <= set(d) and d["strategy"] == name and d["minimum"] == plan.minimum <= plan.budget
    assert plan.minimum == plan.baseline + plan.kv + plan.io + plan.resident + plan.margin + plan.least
    assert sum(plan.parts().values()) <= plan.budget and plan.parts()[plan.detail.part] == plan.held
    assert len(plan.lines()) == 2 and plan.lines()[0].startswith("budget ") and plan.summary()
    least = strategy.plan(store, plan.minimum, 50 << 20, 64, options)
    assert least.minimum == plan.minimum and least.held <= plan.held
    with pytest.raises(EdgeError, match=f"--ram .* below the minimum of {format_size(plan.minimum)}"):
        strategy.plan(store, plan.minimum - 1, 50 << 20, 64, options)


def greedy(engine: Engine, prompt: list[int], n: int = 12) -> list[int]:
    events = engine.generate(prompt, n, Sampler(SamplerConfig(temperature=0.0)), stop_at_end=False)
    return [ev.token for ev in events if ev.token >= 0]


@pytest.mark.parametrize("fixture,name,exact", CASES)
def test_parts_generate_and_follow_a_resize(request, fixture, name, exact):
    """Built parts are complete (tokens come out; the exact ones equal the resident model's), and a resize
    leaves the plan a fresh start at that budget, with the same baseline, would make."""
    path = store_path(request, fixture)
    engine = Engine(path, n_ctx=64, threads=2, ram=1 << 40, options=Options(strategy=name))
    prompt = [1, 5, 9, 200, 31, 7, 77, 3]
    tokens = greedy(engine, prompt)
    assert len(tokens) == 12
    if exact:
        assert tokens == greedy(Engine(path, n_ctx=64, backend="ggml", threads=2), prompt)
    p = engine.plan
    budget = p.minimum + (p.held - p.least + p.scratch) // 3
    plan = engine.resize(budget)
    fresh = plan_context(get(name), engine.file, budget, p.baseline, engine.n_ctx, p.kv_tokens, engine.options)
    assert plan.as_dict() == fresh.as_dict()
    assert len(greedy(engine, prompt)) == 12
    stats = engine.stats()
    assert stats.plan is plan and stats.backend == "ggml"
    if stats.cache is not None:
        assert 0.0 <= stats.cache["hit_rate"] <= 1.0 and stats.cache_kind in ("FFN clusters", "experts")
    assert np.isfinite(engine.model.forward(np.asarray(prompt), 0)).all()


@pytest.mark.parametrize("name", ["sparse", "naive"])
def test_attention_streams_only_below_what_keeping_it_takes(smol_calibrated, name):
    """A budget under the minimum with the attention resident streams it (a layer's projections read into one
    buffer per use): the minimum drops by the attention less its buffer, and the tokens and logits are the
    resident attention's."""
    from edge.engine import Engine

    store = Store(smol_calibrated)
    strategy = get(name)
    kept = strategy.plan(store, 1 << 40, 50 << 20, 64, Options(strategy=name))
    assert kept.detail.attention == 0
    streamed = strategy.plan(store, kept.minimum - 1, 50 << 20, 64, Options(strategy=name))
    attention = streamed.detail.attention
    assert 0 < attention and streamed.resident == kept.resident - attention
    assert streamed.minimum < kept.minimum - attention // 2 and "attention's" in streamed.lines()[1]
    with pytest.raises(EdgeError, match=f"below the minimum of {format_size(streamed.minimum)}"):
        strategy.plan(store, streamed.minimum - 1, 50 << 20, 64, Options(strategy=name))

    prompt = [1, 5, 9, 200, 31, 7, 77, 3]
    ref = Engine(smol_calibrated, n_ctx=64, threads=2, ram=1 << 40, options=Options(strategy=name))
    engine = Engine(smol_calibrated, n_ctx=64, threads=2, ram=1 << 40,
                    options=Options(strategy=name, attention="stream"))
    assert engine.plan.detail.attention == attention and ref.plan.detail.attention == 0
    assert greedy(engine, prompt) == greedy(ref, prompt)
    np.testing.assert_allclose(engine.model.forward(np.asarray(prompt), 0), ref.model.forward(np.asarray(prompt), 0),
                               rtol=0, atol=1e-4)
    linears = engine.model.parts.linears
    assert linears.read_bytes > 0 and linears.read_bytes % attention == 0  # whole layers, every step
    engine.resize(engine.plan.minimum)
    assert engine.plan.detail.attention == attention  # a run keeps what it chose at load
