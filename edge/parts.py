"""The parts a model is built from, and the one contract each kind keeps.

A `Transformer` (edge.model) runs attention itself and calls its `Parts` for the rest:

- `linears.group(layer, name)`: the attention's linear groups ("attn_in": q, k, v; "attn_out"), and the FFN's
  where a part needs them ("ffn_in": gate, up; "ffn_h": down): `StoredLinears` (as stored, in RAM) or a
  BitStack (edge.bitstack.Stack);
- `ffn(layer, x, resid) -> y`: every FFN keeps the `FFN` protocol below, resident (`DenseFFN`, `MoEFFN` over
  `ResidentExperts`) or budgeted (edge.sparse.SparseFFN, edge.bitstack.StackedFFN, `MoEFFN` over
  edge.experts.ExpertPager);
- `embed(tokens)` and `head(x)`: edge.head.

Resident parts come from `resident_parts`; budgeted ones from a strategy (edge.strategies), which builds them
from its plan and resizes them to a new plan with `Parts.resize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from edge import quants
from edge.ggml import Weight
from edge.head import DenseEmbedding, DenseHead


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}

Trace = Callable[[int, str, np.ndarray], None]  # calibration: (layer, point, input of a linear group)


class FFN(Protocol):
    """One contract for every FFN, resident or budgeted.

    `ffn(i, x, resid)`: layer i's output for the normed input x (T, dim); resid is the residual stream x was
    normed from (expert prediction reads it). `resize(plan)`: follow a new plan of its strategy (a resident
    FFN ignores it). `stats(tokens)`: its counters since `reset()` as a dict, None when nothing is paged.
    `engines`: its I/O engines (reads and bytes). `wait_seconds`: time the compute thread waited for its reads.
    `per_position`: positions must run one at a time to be scored as generation sees them (predicted
    sparsity: a batch would use the union of its predictions). `trace`: calibration's hook, or None.
    """

    kind: str  # what its cache holds, as the chat names it: "FFN clusters", "experts", "" (no cache)
    per_position: bool
    trace: Trace | None

    def __call__(self, i: int, x: np.ndarray, resid: np.ndarray) -> np.ndarray: ...

    def resize(self, plan) -> None: ...

    def stats(self, tokens: int) -> dict | None: ...

    def reset(self) -> None: ...

    @property
    def engines(self) -> list: ...

    @property
    def wait_seconds(self) -> float: ...


class Resident:
    """What an FFN with nothing paged answers to the budget's calls (mixed in)."""

    kind = ""
    per_position = False
    trace: Trace | None = None

    def resize(self, plan) -> None:
        pass

    def stats(self, tokens: int) -> dict | None:
        return None

    def reset(self) -> None:
        pass

    @property
    def engines(self) -> list:
        return []

    @property
    def wait_seconds(self) -> float:
        return 0.0


def load_vector(src, name: str, size: int) -> np.ndarray:
    """A 1-D tensor (norm weights, biases) as float32."""
    t = src.tensor(name, (size,))
    return quants.dequantize(t.raw, t.type_id).reshape(-1).astype(np.float32)


def load_router(src, layer: int) -> np.ndarray:
    """A mixture's router for one layer, (n_experts, dim) float32."""
    n, dim = src.config.n_experts, src.config.dim
    r = src.tensor(f"blk.{layer}.ffn_gate_inp.weight", (n, dim))
    return quants.dequantize(r.raw, r.type_id, r.cols).reshape(n, dim).astype(np.float32)


def group_shapes(cfg, name: str) -> list[tuple[str, tuple[int, int]]]:
    """The tensors of a linear group (one product of the same input) and their logical shapes."""
    dim, hidden, kv = cfg.dim, cfg.hidden_dim, cfg.kv_dim
    return {"attn_in": [("attn_q", (cfg.q_dim, dim)), ("attn_k", (kv, dim)), ("attn_v", (kv, dim))],
            "attn_out": [("attn_output", (dim, cfg.q_dim))],
            "ffn_in": [("ffn_gate", (hidden, dim)), ("ffn_up", (hidden, dim))],
            "ffn_h": [("ffn_down", (dim, hidden))]}[name]


ATTENTION = ("attn_in", "attn_out")


class StoredLinears:
    """Linear groups of the tensors as stored, in RAM (the backend keeps them quantized)."""

    def __init__(self, src, backend):
        self.src, self.backend = src, backend

    def group(self, i: int, name: str):
        return self.backend.linear_group([self.src.tensor(f"blk.{i}.{n}.weight", shape)
                                          for n, shape in group_shapes(self.src.config, name)])

    def resize(self, plan) -> None:
        pass


def attention_layout(store) -> tuple[list[dict[str, tuple[int, int, dict]]], int, int]:
    """Per layer, each attention projection's (offset, bytes, stored info) in one buffer; the largest layer's
    bytes (the buffer streaming the attention needs) and every layer's (what it takes out of RAM)."""
    places, largest, total = [], 0, 0
    for i in range(store.config.n_layers):
        at, layer = 0, {}
        for group in ATTENTION:
            for n, shape in group_shapes(store.config, group):
                info = store.tensor_info(f"blk.{i}.{n}.weight", shape)
                nbytes = info["shape"][0] * quants.FORMATS[info["type"]].row_bytes(info["shape"][1])
                layer[n] = (at, nbytes, info)
                at, total = at + -(-nbytes // 64) * 64, total + nbytes
        places.append(layer)
        largest = max(largest, at)
    return places, largest, total


class StreamedLinears(StoredLinears):
    """The attention's projections read from flash at each use, for budgets too small to keep them: when a
    layer's attention starts, its q, k, v and output projections are read into one buffer (the largest layer's
    size), and llama.cpp's kernels run on it. The FFN's groups (a dense FFN) stay as stored."""

    def __init__(self, src, backend):
        super().__init__(src, backend)
        self.places, size, _ = attention_layout(src)
        self.buffer = np.empty(size, np.uint8)
        self.loaded = -1   # the layer whose projections the buffer holds
        self.read_bytes = 0

    def group(self, i: int, name: str):
        if name not in ATTENTION:
            return super().group(i, name)
        weights = []
        for n, _ in group_shapes(self.src.config, name):
            at, _, info = self.places[i][n]
            weights.append(Weight(self.buffer, info["type"], info["shape"][0], info["shape"][1], offset=at))
        matmul = self.backend.ggml.matmul

        def run(x: np.ndarray) -> tuple:
            if self.loaded != i:
                self._load(i)
            return tuple(matmul(x, weights))

        return run

    def _load(self, i: int) -> None:
        self.loaded = -1  # a failed read leaves no layer half loaded
        for n, (at, nbytes, _) in self.places[i].items():
            self.src.read_into(f"t/blk.{i}.{n}.weight", self.buffer[at:at + nbytes])
            self.read_bytes += nbytes
        self.loaded = i


class DeviceLinears:
    """Linear groups whose weights are on a device (edge.ggml.Accelerator, `--gpu`): the attention's where the
    placement (edge.offload.GpuPlan) put it, the FFN's of its first `ffn_layers` layers; the others from `inner`
    as before."""

    def __init__(self, inner, acc, plan):
        self.inner, self.acc, self.plan = inner, acc, plan
        self.on_device = {name: plan.attention > 0 for name in ATTENTION}

    def group(self, i: int, name: str):
        if not self.on_device.get(name, i < self.plan.ffn_layers):
            return self.inner.group(i, name)
        src = self.inner.src
        uploaded = self.acc.upload([Weight.of(src.tensor(f"blk.{i}.{n}.weight", shape))
                                    for n, shape in group_shapes(src.config, name)])
        products = self.acc.products

        def run(x: np.ndarray) -> tuple:
            return tuple(products([(x, w) for w in uploaded]))

        return run

    def resize(self, plan) -> None:
        self.inner.resize(plan)


class DenseFFN(Resident):
    """The gated FFN of every layer from linear groups: act(gate) * up, then down."""

    def __init__(self, linears, n_layers: int, act):
        self.act = act
        self.groups = [(linears.group(i, "ffn_in"), linears.group(i, "ffn_h")) for i in range(n_layers)]

    def __call__(self, i: int, x: np.ndarray, resid: np.ndarray) -> np.ndarray:
        gate_up, down = self.groups[i]
        gate, up = gate_up(x)
        gate = self.act(gate)
        if self.trace is not None:
            self.trace(i, "ffn_in", x)
            self.trace(i, "ffn_gate", gate)
        act = gate * up
        if self.trace is not None:
            self.trace(i, "ffn_h", act)
        (h,) = down(act)
        return h


class ResidentExperts(Resident):
    """Every expert of every layer in RAM: (layer, x, top, weights, resid) -> the weighted sum of the routed
    experts' FFNs."""

    def __init__(self, src, backend, act):
        lin = backend.linear_group
        self.act, self.dim = act, src.config.dim
        self.experts = [[(lin([g, u]), lin([d])) for g, u, d in src.expert_tensors(i)]
                        for i in range(src.config.n_layers)]

    def __call__(self, i: int, x: np.ndarray, top: np.ndarray, weights: np.ndarray, resid=None) -> np.ndarray:
        out = np.zeros((len(x), self.dim), np.float32)
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)  # the tokens routed to expert e
            gate_up, down = self.experts[i][e]
            gate, up = gate_up(x[rows])
            (h,) = down(self.act(gate) * up)
            out[rows] += weights[rows, slot][:, None] * h
        return out


class MoEFFN:
    """Mixture of experts as llama.cpp computes it: softmax over the router's logits, the top k experts per
    token, their weights renormalized (Mixtral, Qwen3-MoE; not Qwen2-MoE, OLMoE), the weighted sum of their
    FFNs, plus Qwen2-MoE's sigmoid-gated shared expert. `experts`: ResidentExperts, or an
    edge.experts.ExpertPager under a budget (its cache is this FFN's)."""

    def __init__(self, src, backend, act, experts, routers: list[np.ndarray] | None = None):
        """routers: every layer's (load_router), where the caller holds them already."""
        cfg = src.config
        self.cfg, self.act, self.experts = cfg, act, experts
        self.routers = routers or [load_router(src, i) for i in range(cfg.n_layers)]
        self.shared = [self._shared(src, backend, i) for i in range(cfg.n_layers)] if cfg.shared_expert_hidden \
            else None
        self.trace: Trace | None = None
        self.kind = "experts" if experts.engines else ""
        self.per_position = False

    @staticmethod
    def _shared(src, backend, i: int) -> tuple:
        cfg, p, lin = src.config, f"blk.{i}.", backend.linear_group
        dim, hidden = cfg.dim, cfg.shared_expert_hidden
        return (load_vector(src, p + "ffn_gate_inp_shexp.weight", dim),
                lin([src.tensor(p + "ffn_gate_shexp.weight", (hidden, dim)),
                     src.tensor(p + "ffn_up_shexp.weight", (hidden, dim))]),
                lin([src.tensor(p + "ffn_down_shexp.weight", (dim, hidden))]))

    def __call__(self, i: int, x: np.ndarray, resid: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        logits = x @ self.routers[i].T  # (T, n_experts)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :cfg.n_experts_used]  # (T, k)
        weights = np.take_along_axis(probs, top, axis=-1)
        if cfg.expert_weights_norm:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        if self.trace is not None:
            self.trace(i, "experts", top)
        out = self.experts(i, x, top, weights, resid)
        if self.shared is not None:  # qwen2moe: every token also through the shared expert, gated by a sigmoid
            gate_vec, gate_up, down = self.shared[i]
            gate, up = gate_up(x)
            (h,) = down(self.act(gate) * up)
            out += h / (1.0 + np.exp(-(x @ gate_vec)))[:, None]
        return out

    def resize(self, plan) -> None:
        self.experts.resize(plan)

    def stats(self, tokens: int) -> dict | None:
        return self.experts.stats(tokens)

    def reset(self) -> None:
        self.experts.reset()

    @property
    def engines(self) -> list:
        return self.experts.engines

    @property
    def wait_seconds(self) -> float:
        return self.experts.wait_seconds


@dataclass
class Parts:
    """What a Transformer calls besides attention (module doc). A strategy's build returns them complete."""

    linears: object  # .group(layer, name), .resize(plan)
    ffn: FFN
    embed: Callable[[np.ndarray], np.ndarray]
    head: object     # head(x) -> (logits,), head.nll(x, targets), head.stats()
    kv: Callable[[int], object] | None = None  # n_ctx -> a KV cache elsewhere than RAM (--gpu); None: RAM's

    def resize(self, plan) -> None:
        """Follow a new plan: the linears first (a BitStack's depth), then the FFN (which may read at it)."""
        self.linears.resize(plan)
        self.ffn.resize(plan)


def resident_parts(src, backend, act, gpu=None, device=None) -> Parts:
    """Every weight in RAM as stored (no budget): the dense or mixture FFN, the embedding and head tensors; with
    `gpu` (an edge.offload.GpuPlan, a dense model) the attention, the KV cache, the first layers' FFNs and the
    head where it placed them, on `device` (its edge.ggml.Accelerator)."""
    linears = StoredLinears(src, backend)
    if gpu is not None:
        linears = DeviceLinears(linears, device, gpu)
    cfg = src.config
    ffn = MoEFFN(src, backend, act, ResidentExperts(src, backend, act)) if cfg.n_experts \
        else DenseFFN(linears, cfg.n_layers, act)
    return Parts(linears, ffn, DenseEmbedding(src), DenseHead(src, backend, device if gpu and gpu.head else None),
                 device_kv(device, cfg) if gpu and gpu.kv else None)


def device_kv(device, cfg) -> Callable[[int], object]:
    """Parts.kv for a KV cache in a device's memory (edge.ggml.DeviceKV)."""
    from edge.ggml import DeviceKV

    return lambda n_ctx: DeviceKV(device, cfg.n_layers, cfg.n_kv_heads, n_ctx, cfg.head_dim)
