"""The RAM planner: a `--ram` budget for the whole process split into what stays resident and what streams.

budget = baseline (interpreter, libraries, tokenizer: measured) + KV cache (for the context) + I/O buffer
         + resident weights (attention and norms as stored, predictors, the head's low-rank copy, row cache)
         + stream buffers (streamed clusters are computed where they were read: this layer's, the next's)
         + margin (activations, temporaries) + neuron cache (the rest, in whole clusters per layer).

The minimum is that fixed part with an empty neuron cache (every cluster streams each token, as `naive`);
below it the run is refused with that figure.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from edge import quants
from edge.errors import EdgeError
from edge.sizes import format_size

MARGIN = 8 << 20        # read copies, allocator slack, kernels' work buffers (plus the activations, by model)
IO_BUFFER = 4 << 20     # the I/O engine's preallocated read buffer under a budget (streamed FFN: store_io_bytes)
IO_ROWS = 1 << 20       # under a streamed FFN, at least this much for rows (the head's candidates: ~33 reads a call)
KERNEL_SHARE = 64       # expert plans leave 1/64 of the cache for what the cap also charges with it: page
                        # tables, huge-page rounding, the libraries' page cache


@dataclass(frozen=True)
class Plan:
    budget: int
    baseline: int
    kv: int
    io: int
    resident: int         # attention, norms, predictors, low-rank head
    margin: int
    scratch: int          # read buffers of streamed clusters: the layer computing and the one prefetched
    min_scratch: int      # those buffers with no cluster cached (every one streams)
    slot_bytes: int       # one cached cluster in every layer
    slots: int            # cached clusters per layer
    n_clusters: int       # clusters per layer
    n_layers: int
    ffn_bytes: int        # all clusters of all layers, as stored
    strategy: str
    sparsity: float
    window: int
    read_ahead: bool      # with sparsity > 0: the next layer's predicted clusters read during this layer

    @property
    def cache(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def cached_fraction(self) -> float:
        return min(1.0, self.slots / self.n_clusters)

    @property
    def minimum(self) -> int:
        """Everything but the neuron cache, with every cluster streaming: the smallest budget that runs."""
        return self.baseline + self.kv + self.io + self.resident + self.margin + self.min_scratch

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(cache=self.cache, minimum=self.minimum, cached_fraction=round(self.cached_fraction, 4))
        return d

    def parts(self) -> dict[str, int]:
        """The budget by part, as the chat UI's bar draws it."""
        return {"baseline": self.baseline, "KV cache": self.kv, "weights": self.resident,
                "buffers": self.io + self.scratch + self.margin, "neuron cache": self.cache}

    def shrunk_from(self, before: "Plan") -> str:
        return (f"neuron cache down to {self.slots} clusters per layer ({format_size(before.cache - self.cache)} "
                "given back)")

    def summary(self) -> str:
        return (f"{self.slots}/{self.n_clusters} FFN clusters per layer cached,\n"
                f"{100 * (1 - self.cached_fraction):.0f}% stream from flash")

    def lines(self) -> list[str]:
        f = format_size
        return [_fixed_line(self, "resident weights", "stream buffers"),
                f"neuron cache {f(self.cache)}: {self.slots}/{self.n_clusters} clusters per layer "
                f"({100 * self.cached_fraction:.0f}% of the FFN's {f(self.ffn_bytes)}); the rest streams from flash "
                f"({self.strategy}, sparsity {self.sparsity:g}, window {self.window}"
                f"{', next layer read ahead by prediction' if self.read_ahead else ''})"]


def _fixed_line(p, resident: str, scratch: str, scratch_bytes: int | None = None) -> str:
    f = format_size
    return (f"budget {f(p.budget)}: baseline {f(p.baseline)}, KV cache {f(p.kv)}, I/O buffer {f(p.io)}, "
            f"{resident} {f(p.resident)}, {scratch} {f(p.scratch if scratch_bytes is None else scratch_bytes)}, "
            f"margin {f(p.margin)}")


def resident_bytes(store, predictors: bool, read_ahead: bool = False) -> int:
    """Bytes the budgeted runtime keeps resident besides the FFN cache (see module doc)."""
    cfg, info = store.config, store.sparse
    total = 0
    for name, t in store.attrs["tensors"].items():
        if name.startswith("blk.") or name == "output_norm.weight":  # attention and norms, as stored
            rows, cols = (t["shape"] + [1])[:2]
            total += rows * quants.FORMATS[t["type"]].row_bytes(cols) if len(t["shape"]) == 2 else 4 * rows
    if predictors:  # per layer, float32 at run time: its clusters' (and the next layer's: edge.sparse.predict)
        n = [lay["hidden"] // lay["cluster"] for lay in store.attrs["ffn"]]
        for k in n + (n[1:] if read_ahead else []):
            r = min(info["rank"], k)
            total += 4 * (cfg.dim * r + r * k + k)
    return total + flash_head_bytes(store)


def flash_head_bytes(store) -> int:
    """The head scored by its low-rank copy with exact rows (and embedding rows) read from flash: what stays
    resident (edge.sparse.ApproxHead, RowCache)."""
    cfg, info = store.config, store.sparse
    total = 0
    vocab, r = store.attrs["tensors"][info["head"]["tensor"]]["shape"][0], info["head_rank"]
    total += vocab * quants.FORMATS[quants.Q4_0].row_bytes(r) + 4 * cfg.dim * r  # low-rank head, basis
    if info["head"].get("miss"):
        total += 2 * 4 * vocab  # the second stage's per-row bound, and its temporary per token
    from edge.sparse import ROW_CACHE

    caches = {info["head"]["tensor"], "token_embd.weight"}  # one row cache when the head is tied
    for name in caches:
        t = store.attrs["tensors"][name]
        total += ROW_CACHE * quants.FORMATS[t["type"]].row_bytes(t["shape"][1]) + 4 * t["shape"][0] + 16 * ROW_CACHE
    return total


def activation_bytes(cfg, n_ctx: int, chunk: int | None = None) -> int:
    """The temporaries of one prefill chunk: attention scores, the FFN's intermediates, copies of the hidden
    state (and the repeated inputs of batched products of streamed records); and ggml's kept decode graphs."""
    from edge.ggml import GRAPH_CACHE, GRAPH_ROWS
    from edge.model import PREFILL_CHUNK
    from edge.sparse import REPEAT_BYTES

    return (chunk or PREFILL_CHUNK) * (cfg.n_heads * n_ctx + 6 * cfg.hidden_dim + 8 * cfg.dim) * 4 + REPEAT_BYTES \
        + GRAPH_CACHE + 8 * GRAPH_ROWS


def store_io_bytes(store) -> int:
    """The store's I/O buffer under a streamed FFN: its largest single read (a chunk of a resident tensor, of
    the low-rank head, its basis, the warm head rows or a predictor), with alignment, and at least IO_ROWS.
    Row lookups batch to what it holds (Store.read_chunks)."""
    from edge.flash import ALIGN

    optional = [f"sparse/{p}" for p in ("head", "head_basis", "head_hot", "head_hot_ids")]
    optional += [f"sparse/aux.{i}" for i in range(store.config.n_layers)]  # older calibrations lack some
    paths = ["t/" + name for name in store.attrs["tensors"]] + [p for p in optional if (store.path / p).is_dir()]
    largest = max(store.array(p).chunk_bytes for p in paths)
    return max(IO_ROWS, -(-(largest + 4 * ALIGN) // ALIGN) * ALIGN)


def make_plan(store, budget: int, baseline: int, n_ctx: int, strategy: str = "sparse", sparsity: float = 0.0,
              window: int = 5, read_ahead: bool = False) -> Plan:
    """At sparsity 0 every token reads the clusters not cached, so the read buffers hold only those and
    shrink as the cache grows: the cache is the largest that fits with the buffers it leaves. With
    predictors a token may read any cluster: buffers for all."""
    from edge.model import KVCache
    from edge.sparse import Layout, stream_scratch_bytes

    cfg = store.config
    layouts = [Layout(lay) for lay in store.attrs["ffn"]]
    n_clusters = max(lay.n_clusters for lay in layouts)
    predicting = strategy == "sparse" and sparsity > 0
    min_scratch = stream_scratch_bytes(layouts, 0)
    fixed = dict(budget=budget, baseline=baseline, kv=KVCache.bytes_for(cfg, n_ctx), io=store_io_bytes(store),
                 resident=resident_bytes(store, predicting, read_ahead),
                 margin=MARGIN + activation_bytes(cfg, n_ctx), min_scratch=min_scratch,
                 slot_bytes=sum(lay.bytes for lay in layouts), n_clusters=n_clusters,
                 n_layers=cfg.n_layers, ffn_bytes=sum(lay.bytes * lay.n_clusters for lay in layouts),
                 strategy=strategy, sparsity=sparsity, window=window, read_ahead=read_ahead and predicting)
    probe = Plan(slots=0, scratch=min_scratch, **fixed)
    if budget < probe.minimum:
        raise EdgeError(f"--ram {format_size(budget)} is below the minimum of {format_size(probe.minimum)} for "
                        f"this model with a context of {n_ctx} tokens; raise --ram or lower --ctx")
    if strategy == "naive":
        return probe
    if predicting:
        slots = min(n_clusters, (budget - probe.minimum) // probe.slot_bytes)
        return Plan(slots=int(slots), scratch=min_scratch, **fixed)
    room = budget - (probe.minimum - min_scratch)
    slots = next(s for s in range(n_clusters, -1, -1)
                 if stream_scratch_bytes(layouts, s) + s * probe.slot_bytes <= room)
    return Plan(slots=slots, scratch=stream_scratch_bytes(layouts, slots), **fixed)


def plan_for(store, strategy: str, budget: int, baseline: int, n_ctx: int, sparsity: float = 0.0, window: int = 5,
             prefetch: int = 0, evict: str = "score", predict: str = "pregate"):
    """The plan of a resolved strategy (edge.engine.resolve_strategy): BitStack's, the expert cache's, or the
    streamed FFN's (which needs a calibrated store)."""
    if strategy in ("bitstack", "bitstack-stream"):
        return make_stack_plan(store, budget, baseline, n_ctx, stream=strategy == "bitstack-stream")
    if strategy == "experts":
        return make_expert_plan(store, budget, baseline, n_ctx, prefetch, evict, predict)
    from edge.sparse import check_calibrated

    check_calibrated(store, "--ram")
    return make_plan(store, budget, baseline, n_ctx, strategy, sparsity, window, read_ahead=prefetch > 0)


PRESSURE_FLOOR = 64 << 20  # system memory available below this: give cache back
LIMIT_ROUNDING = 64 << 10  # a cgroup limit this close under the budget is the budget (the kernel rounds it)


class PressureWatch:
    """Memory pressure from outside, checked between tokens: the system's available memory below
    PRESSURE_FLOOR, or this process's cgroup limit lowered under the budget. `check()` returns the bytes the
    runtime should give back (0: none). `probe` returns (available bytes, cgroup limit or None); tests replace it."""

    def __init__(self, plan: Plan, probe=None):
        self.plan = plan
        self.probe = probe or _probe_memory

    def check(self) -> int:
        available, limit = self.probe()
        need = 0
        if available < PRESSURE_FLOOR:
            need = PRESSURE_FLOOR - available
        if limit is not None and limit < self.plan.budget - LIMIT_ROUNDING:  # a cap set to the budget reads
            need = max(need, self.plan.budget - limit)                      # back rounded down to pages
        return need


def _probe_memory() -> tuple[int, int | None]:
    import psutil

    from edge.cgroup import own_limit

    return psutil.virtual_memory().available, own_limit()


def warn_above_physical(budget: int) -> str | None:
    import psutil

    total = psutil.virtual_memory().total
    if budget > total:
        return f"--ram {format_size(budget)} is more than this machine's {format_size(total)} of RAM"
    return None


STACK_PREFILL_CHUNK = 64  # BitStack prompts: larger steps than PREFILL_CHUNK, each rebuilds every weight once


@dataclass(frozen=True)
class StackPlan:
    """A budget over a BitStack model (`edge stack`): what is not the stack (baseline, KV cache, I/O buffer,
    embedding, head and norms as stored, the sign scratch, margin) plus one block of every linear is the
    minimum; the rest loads the longest prefix of the universal order that fits."""

    budget: int
    baseline: int
    kv: int
    io: int
    resident: int         # embedding, head, norms, scales
    margin: int
    scratch: int          # the Q4_0 sign matrices of the group computing
    base: int             # one block of every linear
    prefix: int           # order entries loaded on top of the base
    stack_bytes: int      # all loaded blocks (base included)
    full_bytes: int       # every block of the stack
    entries: int          # length of the order
    params: int           # weights in the stacked linears
    strategy: str = "bitstack"
    chunk: int = STACK_PREFILL_CHUNK  # prompt positions per forward step: each step rebuilds the weights once
    depth_bytes: int = 0  # every block of the loaded depth, in RAM or streamed (0: stack_bytes, all in RAM)
    ffn_slots: int = -1   # bitstack-stream: FFN clusters per layer kept in RAM (the rest read every token)
    n_clusters: int = 0   # bitstack-stream: FFN clusters per layer

    @property
    def minimum(self) -> int:
        return self.baseline + self.kv + self.io + self.resident + self.margin + self.scratch + self.base

    @property
    def bits(self) -> float:
        return 8 * (self.depth_bytes or self.stack_bytes) / self.params

    @property
    def streams(self) -> bool:
        return self.ffn_slots >= 0

    @property
    def cache(self) -> int:
        """What a smaller budget can take back: the blocks loaded past the base."""
        return self.stack_bytes - self.base

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(minimum=self.minimum, bits_per_weight=round(self.bits, 3))
        return d

    def parts(self) -> dict[str, int]:
        return {"baseline": self.baseline, "KV cache": self.kv, "weights": self.resident,
                "buffers": self.io + self.scratch + self.margin, "BitStack": self.stack_bytes}

    def summary(self) -> str:
        ffn = f",\nFFN {self.ffn_slots}/{self.n_clusters} clusters cached" if self.streams else ""
        return f"BitStack {self.bits:.2f} bits/weight,\n{self.prefix}/{self.entries} blocks past the base{ffn}"

    def shrunk_from(self, before: "StackPlan") -> str:
        return (f"BitStack down to {self.bits:.2f} bits per weight "
                f"({format_size(before.stack_bytes - self.stack_bytes)} given back)")

    def lines(self) -> list[str]:
        f = format_size
        fixed = _fixed_line(self, "embedding/head/norms", "sign scratch")
        if self.streams:
            return [fixed, f"BitStack {self.bits:.2f} bits per weight ({self.prefix}/{self.entries} of the order past "
                           f"one block of every linear: {f(self.depth_bytes)}, full depth {f(self.full_bytes)}); "
                           f"{f(self.stack_bytes)} in RAM: the FFN streamed by clusters of neurons, "
                           f"{self.ffn_slots}/{self.n_clusters} per layer cached, the rest read from flash every token"]
        return [fixed, f"BitStack {f(self.stack_bytes)} loaded ({self.bits:.2f} bits per weight): one block of every "
                       f"linear ({f(self.base)}) and {self.prefix}/{self.entries} of the order; full depth "
                       f"{f(self.full_bytes)}"]


def stack_resident_bytes(store) -> int:
    """Norms and the stack's scales (float32), and the embedding and head: from flash through the low-rank head
    on a calibrated store, else resident as stored."""
    cfg = store.config
    total = flash_head_bytes(store) if store.sparse is not None else 0
    for name, t in store.attrs["tensors"].items():
        shape = t["shape"]
        if name in ("token_embd.weight", "output.weight") and store.sparse is None:
            total += shape[0] * quants.FORMATS[t["type"]].row_bytes(shape[1])
        elif len(shape) == 1:
            total += 4 * shape[0]  # norms, biases: float32 in RAM
    return total + 4 * cfg.n_layers * (2 * cfg.dim + cfg.q_dim + cfg.hidden_dim)


def _last_fitting(n: int, fits) -> int:
    """The largest k in 0..n-1 with fits(k), fits monotone (true, then false); 0 when none."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


STREAM_CACHED = 0.5  # bitstack-stream: the deepest stack that keeps at least this share of its FFN in RAM


def _stream_bytes(info, m: int, slots: int) -> tuple[int, int]:
    """bitstack-stream at prefix m with `slots` FFN clusters per layer cached: (bytes in RAM: the other linears'
    blocks, the FFN's shared factors and cached records, the largest layer's streamed records; every block of
    the depth)."""
    from edge.bitstack import FFN, FfnRecord

    depths = info.depths(m)
    ram = depth = 0
    stream = 0
    for name, lin in info.linears.items():
        depth += depths[name] * lin["block_bytes"]
        if name.split(".")[2] not in FFN:
            ram += depths[name] * lin["block_bytes"]
    for i, c in enumerate(info.clusters):
        names = [f"blk.{i}.{n}.weight" for n in FFN]
        lins = [info.linears[n] for n in names]
        rec = FfnRecord(c, lins[0]["cols"], tuple(lin["rank"] for lin in lins))
        d, n = max(depths[n] for n in names), lins[0]["rows"] // c
        ram += d * (rec.shared_nbytes + min(slots, n) * rec.nbytes)
        stream = max(stream, d * max(0, n - slots) * rec.nbytes)
    return ram + stream, depth


def make_stack_plan(store, budget: int, baseline: int, n_ctx: int, stream: bool = False) -> StackPlan:
    import numpy as np

    from edge.bitstack import SCRATCH_BYTES, StackInfo
    from edge.model import KVCache

    cfg = store.config
    info = StackInfo.of(store)
    if stream and not info.streams_ffn:
        raise EdgeError(f"{store.path}: its stack has no FFN records by clusters (an older `edge stack`, or clusters "
                        f"not a multiple of 32); run `edge stack {store.path}` again for --strategy bitstack-stream")
    sizes = info.prefix_bytes()
    largest = max(lin["block_bytes"] for lin in info.linears.values())
    fixed = dict(budget=budget, baseline=baseline, kv=KVCache.bytes_for(cfg, n_ctx),
                 io=max(IO_BUFFER, 2 * (largest + (64 << 10))),  # the I/O engine reads a whole block at once
                 resident=stack_resident_bytes(store),
                 margin=MARGIN + activation_bytes(cfg, n_ctx, STACK_PREFILL_CHUNK),
                 scratch=max(SCRATCH_BYTES, max(lin["rows"] * lin["cols"] // 32 * 18 for lin in info.linears.values())),
                 base=info.base_bytes, full_bytes=int(sizes[-1]), entries=len(info.order),
                 params=info.params())
    if stream:
        n_clusters = cfg.hidden_dim // info.clusters[0]
        fixed.update(base=_stream_bytes(info, 0, 0)[0], strategy="bitstack-stream", n_clusters=n_clusters)
    probe = StackPlan(prefix=0, stack_bytes=fixed["base"], **fixed)
    if budget < probe.minimum:
        raise EdgeError(f"--ram {format_size(budget)} is below the minimum of {format_size(probe.minimum)} for "
                        f"this stacked model with a context of {n_ctx} tokens; raise --ram or lower --ctx")
    room = budget - (probe.minimum - fixed["base"])
    if not stream:
        prefix = int(np.searchsorted(sizes, room, side="right")) - 1
        return StackPlan(prefix=prefix, stack_bytes=int(sizes[prefix]), **fixed)
    half = math.ceil(n_clusters * STREAM_CACHED)
    prefix = _last_fitting(len(sizes), lambda m: _stream_bytes(info, m, half)[0] <= room)
    slots = _last_fitting(n_clusters + 1, lambda s: _stream_bytes(info, prefix, s)[0] <= room)
    ram, depth = _stream_bytes(info, prefix, slots)
    return StackPlan(prefix=prefix, stack_bytes=ram, depth_bytes=depth, ffn_slots=slots, **fixed)


@dataclass(frozen=True)
class ExpertPlan:
    """A budget over a mixture-of-experts store: everything but the experts resident (as stored; routers and
    norms float32), the experts paged into a cache of whole records (edge.experts). The minimum holds the
    experts of one layer's token and of the next layer's prefetch, in each slot class."""

    budget: int
    baseline: int
    kv: int
    io: int               # the store's I/O buffer and the two expert read buffers
    resident: int
    margin: int
    classes: tuple        # slot classes: (record bytes, experts of that size) (edge.experts.slot_classes)
    slots: int            # experts cached
    floor: int            # slots each class keeps at least: a token's routed and predicted experts
    n_experts: int        # experts in the model, all layers
    prefetch: int         # experts predicted and read ahead per layer
    policy: str = "score"  # eviction (edge.experts.POLICIES)
    predictor: str = "pregate"  # edge.experts.PREDICTORS
    strategy: str = "experts"

    def share(self, slots: int) -> list[int]:
        """Each slot class's part of `slots` cached experts (edge.experts.split_slots)."""
        from edge.experts import split_slots

        return split_slots(slots, self.classes, self.floor)

    def cache_for(self, slots: int) -> int:
        """What `slots` cached experts take."""
        return sum(n * b for n, (b, _) in zip(self.share(slots), self.classes))

    @property
    def min_slots(self) -> int:
        return sum(min(self.floor, n) for _, n in self.classes)

    @property
    def cache(self) -> int:
        return self.cache_for(self.slots)

    @property
    def cached_fraction(self) -> float:
        return min(1.0, self.slots / self.n_experts)

    @property
    def minimum(self) -> int:
        return self.baseline + self.kv + self.io + self.resident + self.margin + self.cache_for(self.min_slots)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(cache=self.cache, minimum=self.minimum, cached_fraction=round(self.cached_fraction, 4))
        return d

    def budget_for(self, slots: int) -> int:
        """The smallest budget whose plan caches `slots` experts (each costs its record and a 1/KERNEL_SHARE)."""
        extra = [n - m for n, m in zip(self.share(slots), self.share(self.min_slots))]
        return self.minimum + sum(n * (b + b // KERNEL_SHARE) for n, (b, _) in zip(extra, self.classes))

    def parts(self) -> dict[str, int]:
        return {"baseline": self.baseline, "KV cache": self.kv, "weights": self.resident,
                "buffers": self.io + self.margin, "expert cache": self.cache}

    def summary(self) -> str:
        ahead = f"{self.prefetch} read ahead per layer" if self.prefetch else "the rest loaded on demand"
        return f"{self.slots}/{self.n_experts} experts cached,\n{ahead}"

    def shrunk_from(self, before: "ExpertPlan") -> str:
        return f"expert cache down to {self.slots} experts ({format_size(before.cache - self.cache)} given back)"

    def lines(self) -> list[str]:
        f = format_size
        sizes = [f(b) for b, _ in self.classes]
        each = f"{sizes[0]} each" if len(sizes) == 1 else f"records of {' / '.join(sizes)} in slots of their size"
        return [_fixed_line(self, "non-expert weights", "expert slots minimum", self.cache_for(self.min_slots)),
                f"expert cache {f(self.cache)}: {self.slots}/{self.n_experts} experts "
                f"({100 * self.cached_fraction:.0f}%, {each}); the rest pages from flash, "
                f"{self.prefetch} predicted ({self.predictor}) and read ahead per layer, eviction {self.policy}"]


def expert_resident_bytes(store) -> int:
    """Every tensor of a mixture-of-experts store but the experts: as stored; routers and 1-D tensors float32."""
    total = 0
    for name, t in store.attrs["tensors"].items():
        shape = t["shape"]
        if len(shape) == 1:
            total += 4 * shape[0]
        elif name.endswith("ffn_gate_inp.weight"):
            total += 4 * shape[0] * shape[1]
        else:
            total += shape[0] * quants.FORMATS[t["type"]].row_bytes(shape[-1])
    return total


def make_expert_plan(store, budget: int, baseline: int, n_ctx: int, prefetch: int = 0,
                     evict: str = "score", predict: str = "pregate") -> ExpertPlan:
    from edge.experts import POLICIES, PREDICTORS, read_buffer_bytes, record_sizes, slot_classes
    from edge.model import KVCache

    cfg = store.config
    k = cfg.n_experts_used
    if predict not in PREDICTORS:
        raise EdgeError(f"--predict {predict}: choose one of {', '.join(PREDICTORS)}")
    if evict not in POLICIES:
        raise EdgeError(f"--evict {evict}: choose one of {', '.join(POLICIES)}")
    if not 0 <= prefetch <= cfg.n_experts:
        raise EdgeError(f"--prefetch {prefetch}: between 0 (on-demand loading) and the {cfg.n_experts} experts "
                        "of a layer")
    sizes = record_sizes(store)
    fixed = dict(budget=budget, baseline=baseline, kv=KVCache.bytes_for(cfg, n_ctx),
                 io=IO_BUFFER + read_buffer_bytes(int(sizes.max()), prefetch), resident=expert_resident_bytes(store),
                 margin=MARGIN + activation_bytes(cfg, n_ctx), classes=slot_classes(sizes),
                 floor=k + prefetch, n_experts=cfg.n_layers * cfg.n_experts, prefetch=prefetch,
                 policy=evict, predictor=predict)
    probe = ExpertPlan(slots=0, **fixed)
    if budget < probe.minimum:
        raise EdgeError(f"--ram {format_size(budget)} is below the minimum of {format_size(probe.minimum)} for "
                        f"this mixture-of-experts model with a context of {n_ctx} tokens; raise --ram or lower --ctx")
    lo, hi = probe.min_slots, fixed["n_experts"]  # the most experts whose budget fits (budget_for grows with slots)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if probe.budget_for(mid) <= budget else (lo, mid - 1)
    return ExpertPlan(slots=lo, **fixed)
