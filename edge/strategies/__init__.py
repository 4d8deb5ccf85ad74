"""Budgeted strategies: how a model runs under `--ram`. A registry (name -> its module), one module per strategy.

Every strategy keeps one protocol (`Strategy`):
- `plan(store, budget, baseline, n_ctx, options) -> Plan` (edge.strategies.plan: one shape for all; an
  EdgeError naming the minimum below it),
- `build(store, backend, act, plan) -> Parts` (edge.parts: linears, FFN, embedding, head, complete when built;
  `Parts.resize(plan)` follows a new plan of the same strategy),
- `io_buffer(plan)`: the store's I/O buffer under the plan,
- `name`, `mixture` (it runs mixtures of experts, not dense models), `empty_at_load` (its cache starts empty).

A new strategy is its own module and one line in REGISTRY. The registry names modules rather than importing
them, so the command line lists the strategies without loading the runtime.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from edge.errors import EdgeError

if TYPE_CHECKING:
    from edge.model import Transformer
    from edge.parts import Parts
    from edge.strategies.plan import Plan

# name: (module:class, what --help says of it)
REGISTRY: dict[str, tuple[str, str]] = {
    "sparse": ("edge.strategies.sparse:Sparse", "neuron cache + predicted clusters"),
    "naive": ("edge.strategies.naive:Naive", "every FFN weight read per token"),
    "bitstack": ("edge.strategies.bitstack:Bitstack", "as many BitStack blocks as fit (`edge stack`)"),
    "bitstack-stream": ("edge.strategies.bitstack:BitstackStream", "a deeper stack, its FFN by clusters of "
                        "neurons, half of them or more in RAM, the rest read per token"),
    "experts": ("edge.strategies.experts:Experts", "a mixture of experts paged into an expert cache"),
}
NAMES = ("auto", *REGISTRY)  # --strategy's choices


@dataclass(frozen=True)
class Options:
    """The strategy options a user sets (flags of `edge run`, `chat`, `eval`, `info`, `bench`), parsed once."""

    strategy: str = "auto"
    sparsity: float = 0.0     # sparse: fraction of FFN clusters the predictors may skip per token
    window: int = 5           # sparse: tokens whose clusters are the last to leave the cache
    prefetch: int = 0         # experts: read ahead per layer; sparse with sparsity > 0: read-ahead on (> 0)
    evict: str = "score"      # experts: eviction policy
    predict: str = "pregate"  # experts: how the next layer's experts are guessed
    attention: str = "auto"   # sparse, naive: "stream" (from flash each token), "resident", or "auto": streamed
                              # only where the budget cannot keep it (the engine fixes it at load)
    head: str = "auto"        # sparse, naive on an uncalibrated store: the head as stored, the same choices
    gpu: str = ""             # --gpu: a device of ggml's registry (edge.offload), "auto", or "" (none)
    gpu_mem: int = 0          # --gpu-mem: bytes of its memory to fill (0: edge.offload.DEFAULT_SHARE of it)
    gpu_place: tuple | None = None  # (attention, clusters or experts per layer, KV cache) the first plan put there:
                                    # re-plans keep it (what is uploaded stays; fixed_choices)


class Strategy(Protocol):
    name: str
    mixture: bool
    empty_at_load: bool

    def plan(self, store, budget: int, baseline: int, n_ctx: int, options: Options) -> Plan: ...

    def build(self, store, backend, act, plan: Plan) -> Parts: ...

    def io_buffer(self, plan: Plan) -> int: ...


_loaded: dict[str, Strategy] = {}


def get(name: str) -> Strategy:
    """The registered strategy `name` (its module imported on first use)."""
    if name not in _loaded:
        if name not in REGISTRY:
            raise EdgeError(f"--strategy {name}: choose one of {', '.join(NAMES)}")
        module, cls = REGISTRY[name][0].split(":")
        _loaded[name] = getattr(importlib.import_module(module), cls)()
    return _loaded[name]


def resolve(store, name: str) -> Strategy:
    """--strategy NAME for this store; auto: experts on a mixture of experts, bitstack when the store has a stack
    (`edge stack`), else sparse."""
    moe = store.is_moe
    if name == "auto":
        return get("experts" if moe else "bitstack" if store.stack is not None else "sparse")
    strategy = get(name)  # an unknown name: an EdgeError naming the choices
    if strategy.mixture != moe:
        raise EdgeError(f"--strategy {name}: {store.path} is {'' if moe else 'not '}a mixture of experts; "
                        f"use {'--strategy experts' if moe else 'another strategy'} (or auto)")
    return strategy


def load(store, n_ctx: int, plan: Plan, threads: int | None = None) -> Transformer:
    """The model under `plan`: llama.cpp's kernels on the stored bytes, its strategy's parts."""
    from edge.kernels import make_backend
    from edge.model import Transformer
    from edge.parts import ACTIVATIONS

    backend = make_backend("ggml", threads)
    parts = get(plan.strategy).build(store, backend, ACTIVATIONS[store.config.activation], plan)
    return Transformer(store, n_ctx, backend=backend, parts=parts, chunk=plan.chunk)


def help_text() -> str:
    """--strategy's help: every registered strategy's line."""
    return "; ".join(f"{name}: {what}" for name, (_, what) in REGISTRY.items()) + (
        "; auto (default): experts on a mixture of experts, bitstack on a stacked store, else sparse")
