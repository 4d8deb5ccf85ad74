"""Mixture-of-experts under a RAM budget: experts paged from flash into an expert cache (EdgeMoE, Yi et al. 2023).

Everything but the experts stays resident (attention, norms, routers, shared experts, embedding, head). Each
expert is one record in the store (`experts/blk.<i>`: its gate, up and down rows in the source's GGML types,
or `bits/<type>/blk.<i>` where `edge expert-bits` chose a lower bitwidth for it), so bringing an expert in is
one read; llama.cpp's kernels compute it where it lies in the cache.

Per MoE layer and step:
1. route: the router's top-k (edge.parts.MoEFFN) names the experts this layer needs;
2. ensure: an expert already cached is a hit (a prefetch still in flight is waited for: a late hit); any other
   is read now (a miss, "on demand") into a slot freed by eviction;
3. predict and prefetch: before computing this layer's experts, the next layer's are predicted and the ones
   not cached are read on an I/O thread while this layer's experts, and the next layer's attention, compute.
   Predictors: `pregate` (Pre-gated MoE, Mixtral offloading): the next layer's router applied to this layer's
   residual stream under the next layer's FFN norm; `trace` (EdgeMoE): calibration tables of which experts
   follow the ones this token took at the two layers before (weights_tools.moe_traces). Prefetch 0 is
   on-demand loading;
4. evict: `score` (EdgeMoE): the cached expert with the lowest frequency / (layers until its layer runs again)
   goes first, experts predicted for the next layer and the layer computing are kept; `lru`: the least
   recently used goes first (Mixtral offloading keeps an LRU per layer; here one pool over all layers, so
   the budget decides how many per layer).

Frequency is the expert's share of routing decisions in its layer, counted as the run goes (plus one each).

Slots: one preallocated array per cached expert, in a class per record size (one class unless `edge
expert-bits` mixed bitwidths); an expert goes to, and evicts from, its own class only (split_slots shares the
slots among the classes).

Stats (`ExpertStats`): needed experts, hits, late hits, misses, evictions, prediction precision and recall,
reads and bytes, and the seconds the compute thread waited for reads.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np

from edge.errors import EdgeError
from edge.flash import IOEngine
from edge.ggml import Weight

POLICIES = ("score", "lru")
PREDICTORS = ("pregate", "trace")


@dataclass
class ExpertStats:
    """Counters since the last `reset()`."""

    needed: int = 0        # (layer, expert) pairs a step routed to
    hits: int = 0          # of those, cached and loaded when needed
    late: int = 0          # of those, still being prefetched: waited for
    misses: int = 0        # of those, read on demand
    evicted: int = 0
    predicted: int = 0     # experts the predictor named for the next layer
    predicted_used: int = 0  # of those, routed to by that layer
    routed_after_prediction: int = 0  # experts routed to at layers that had a prediction (recall's denominator)
    prefetched: int = 0    # experts read ahead (predicted and not cached)
    reads: int = 0
    read_bytes: int = 0
    wait_seconds: float = 0.0  # compute thread waiting for expert reads (its own and prefetches)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    @property
    def hit_rate(self) -> float:
        return (self.hits + self.late) / self.needed if self.needed else 1.0

    @property
    def precision(self) -> float:
        return self.predicted_used / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.predicted_used / self.routed_after_prediction if self.routed_after_prediction else 0.0

    def as_dict(self, tokens: int = 1) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(hit_rate=round(self.hit_rate, 4), precision=round(self.precision, 4), recall=round(self.recall, 4),
                 read_bytes_per_token=self.read_bytes // max(1, tokens), wait_seconds=round(self.wait_seconds, 4))
        return d


class ExpertLayout:
    """One layer's expert record: gate rows | up rows | down rows, in the source's types."""

    def __init__(self, lay: dict):
        self.n, self.dim, self.hidden = lay["n"], lay["dim"], lay["hidden"]
        self.types = tuple(lay["types"])
        self.g, self.u, self.d = lay["gate_bytes"], lay["up_bytes"], lay["down_bytes"]
        self.bytes = self.g + self.u + self.d

    def weights(self, record: np.ndarray) -> tuple[Weight, Weight, Weight]:
        """Gate, up and down of the expert whose record `record` holds, where they lie."""
        tg, tu, td = self.types
        return (Weight(record, tg, self.hidden, self.dim), Weight(record, tu, self.hidden, self.dim, offset=self.g),
                Weight(record, td, self.dim, self.hidden, offset=self.g + self.u))


def record_sizes(store) -> np.ndarray:
    """(n_layers, n_experts): each expert's record bytes in the bitwidth it runs in."""
    cfg = store.config
    sizes = {}
    out = np.zeros((cfg.n_layers, cfg.n_experts), np.int64)
    for i in range(cfg.n_layers):
        for e in range(cfg.n_experts):
            kind = store.expert_kind(i, e)
            if (i, kind) not in sizes:
                sizes[i, kind] = ExpertLayout(store.expert_source(i, kind)[1]).bytes
            out[i, e] = sizes[i, kind]
    return out


def slot_classes(sizes: np.ndarray) -> tuple[tuple[int, int], ...]:
    """The expert cache's slot classes from the record sizes (record_sizes): (record bytes, experts of that
    size), smallest first. One class unless `edge expert-bits` chose several bitwidths; each class's slots hold
    only its experts, so an expert at a lower bitwidth takes a smaller slot."""
    size, count = np.unique(sizes, return_counts=True)
    return tuple((int(b), int(n)) for b, n in zip(size, count))


def split_slots(slots: int, classes, floor: int) -> list[int]:
    """`slots` cache slots shared among the classes: each first gets min(floor, its experts) (a token's routed
    and predicted experts may all be of one size), then one at a time to the class holding the smallest share
    of its experts (so every bitwidth is cached in about the same proportion). Adding a slot never takes one
    from a class."""
    counts = [n for _, n in classes]
    out = [min(floor, n) for n in counts]
    for _ in range(max(0, min(slots, sum(counts)) - sum(out))):
        c = min((k for k in range(len(counts)) if out[k] < counts[k]), key=lambda k: out[k] / counts[k])
        out[c] += 1
    return out


def read_buffer_bytes(record: int, prefetch: int) -> int:
    """The read buffers for records of at most `record` bytes: on demand (one record) and, with prefetch > 0,
    ahead (`prefetch` records), each record with alignment slack."""
    rec = record + (8 << 10)
    return rec + prefetch * rec


class ExpertPager:
    """The experts of every layer under one cache of `slots` records."""

    def __init__(self, store, ggml, act, slots: int, policy: str = "score", prefetch: int = 0,
                 predictor: str = "pregate", read_threads: int = 4, routers: list | None = None,
                 norms: list | None = None, device: tuple | None = None):
        """prefetch: experts predicted and read ahead per layer (0: on-demand loading, no prediction).
        predictor: pregate, or trace (the routing tables of `edge convert --calibrate`). routers, norms: every
        layer's router (n_experts, dim) and FFN norm weights (pregate predicts from them). device: (an
        edge.ggml.Accelerator, experts per layer): each layer's most routed experts by calibration (else its
        first) are uploaded to it at load and computed there when routed; the cache pages the others."""
        cfg = store.config
        self.store, self.ggml, self.act, self.cfg = store, ggml, act, cfg
        # per layer and expert: the array its record lies in (its chosen bitwidth) and the record's layout
        self.sources = [[store.expert_source(i, store.expert_kind(i, e)) for e in range(cfg.n_experts)]
                        for i in range(cfg.n_layers)]
        self.layouts = [[ExpertLayout(lay) for _, lay in layer] for layer in self.sources]
        self.policy = policy
        self.prefetch = prefetch
        sizes = np.array([[lay.bytes for lay in layer] for layer in self.layouts], np.int64)
        self.classes = slot_classes(sizes)
        self.class_of = np.searchsorted([b for b, _ in self.classes], sizes)  # (layer, expert) -> its slot class
        # one array per slot, sized for its class: shrinking frees whole slots, growing allocates new ones,
        # nothing is copied
        self.bufs: list[np.ndarray] = []
        self.slot_class = np.zeros(0, np.int64)
        self.key_of: list[tuple[int, int] | None] = []
        self.last_use = np.zeros(0, np.int64)
        self.slots = 0
        self.slot_of: dict[tuple[int, int], int] = {}
        self.pending: dict[int, Future] = {}  # slot -> prefetch in flight
        self.tables = load_tables(store)
        if predictor == "trace" and self.tables is None:
            raise EdgeError(f"{store.path}: --predict trace needs the routing traces of `edge convert "
                            f"{store.path} --calibrate`; run that, or use --predict pregate")
        self.predictor = predictor
        # routing frequency (EdgeMoE's eviction weighs it): this run's counts plus one each. The paper profiles
        # it offline; the calibration counts as a prior measured worse on moefied SmolLM2 (hit rate 0.74 vs
        # 0.85 at half the experts cached: calibration text routes unlike a chat)
        self.freq = np.ones((cfg.n_layers, cfg.n_experts), np.float64)
        self._chosen: dict[int, np.ndarray] = {}  # layer -> experts this token was routed to (trace predictor)
        self.counters = ExpertStats()
        self.clock = 0  # layer steps so far (recency)
        self._cur = 0   # the layer computing (eviction's distances count from it)
        self._keep: set[int] = set()  # slots not to evict now (this layer's, the next layer's predicted)
        self._predicted: dict[int, set[int]] = {}  # layer -> experts predicted for it
        rec = read_buffer_bytes(int(sizes.max()), 0)  # one record and its alignment slack (the plan counts both)
        self._io = IOEngine(threads=read_threads, buffer_bytes=rec, max_read=max(1 << 20, rec))
        self._io_ahead = self._pool = None  # the read-ahead thread and its buffers, with prefetch only
        if prefetch:
            self._io_ahead = IOEngine(threads=min(read_threads, prefetch), buffer_bytes=prefetch * rec,
                                      max_read=max(1 << 20, rec))
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="edge-experts")
        self._count = threading.Lock()  # read counters: bumped by the compute and the read-ahead threads
        self.routers, self.norms = routers or [], norms or []
        self._gates: list[np.ndarray] | None = None  # router rows times the FFN norm's weights, per layer
        self.set_slots(slots)
        self.device = device[0] if device else None
        self.on_device: list[dict[int, tuple]] = [{} for _ in range(cfg.n_layers)]  # layer -> expert -> weights
        for i in range(cfg.n_layers if device else 0):
            order = np.argsort(-self.tables[i, 0], kind="stable") if self.tables is not None \
                else np.arange(cfg.n_experts)
            for e in (int(e) for e in order[:device[1]]):
                (view,) = store.read_views(self.sources[i][e][0], [e], True, self._io)
                record = np.frombuffer(view, np.uint8)
                self.on_device[i][e] = tuple(self.device.upload(list(self.layouts[i][e].weights(record))))

    @property
    def cache_bytes(self) -> int:
        return sum(b.nbytes for b in self.bufs)

    @property
    def engines(self) -> list:
        return [e for e in (self._io, self._io_ahead) if e is not None]

    @property
    def cached(self) -> int:
        return len(self.slot_of)

    # -- the step ---------------------------------------------------------------------------------------------

    def __call__(self, i: int, x: np.ndarray, top: np.ndarray, weights: np.ndarray,
                 resid: np.ndarray | None = None) -> np.ndarray:
        """The weighted sum of the routed experts' FFNs for x (T, dim); top, weights: (T, k) from the router."""
        self.clock += 1
        self._cur = i
        st = self.counters
        placed = self.on_device[i]  # the device's: computed there; the cache's counters are the others'
        needed = sorted((int(e) for e in np.unique(top) if int(e) not in placed),
                        key=lambda e: (i, e) not in self.slot_of)  # cached first
        st.needed += len(needed)
        np.add.at(self.freq[i], top.reshape(-1), 1.0)
        if len(x) == 1:
            self._chosen[i] = top[0]
        predicted = self._predicted.pop(i, None)
        if predicted is not None:
            st.predicted_used += len(predicted & set(needed))
            st.routed_after_prediction += len(needed)
        out = np.zeros((len(x), self.cfg.dim), np.float32)
        if placed:
            self._compute(x, top, weights, [(int(e), placed[int(e)]) for e in np.unique(top) if int(e) in placed],
                          self.device.products, out)
        k = self.cfg.n_experts_used
        for j in range(0, len(needed), k):  # a token's worth of experts at a time: a prompt's union may not fit
            group = needed[j:j + k]
            self._keep = {self.slot_of[(i, e)] for e in group if (i, e) in self.slot_of}
            if j == 0 and self.prefetch and resid is not None and i + 1 < self.cfg.n_layers and len(x) == 1:
                self._prefetch(i + 1, resid, group)  # read while this layer's experts load and compute
            slots = [self._ensure(i, e) for e in group]
            self.last_use[slots] = self.clock
            cached = [(e, self.layouts[i][e].weights(self.bufs[s])) for e, s in zip(group, slots)]
            self._compute(x, top, weights, cached, self.ggml.products, out)
        return out

    def _compute(self, x: np.ndarray, top: np.ndarray, weights: np.ndarray, experts: list[tuple[int, tuple]],
                 products, out: np.ndarray) -> None:
        """out += the weighted FFNs of `experts` ((expert, its gate, up and down) each) through `products` (the
        CPU's, or the device's): gate and up of all of them in one graph, their downs in a second."""
        first, routed = [], []
        for e, (g, u, d) in experts:
            rows, which = np.nonzero(top == e)
            xe = x[rows] if len(rows) < len(x) else x
            first += [(xe, g), (xe, u)]
            routed.append((rows, which, d))
        if not first:
            return
        outs = products(first)
        downs = products([(self.act(outs[2 * n]) * outs[2 * n + 1], d) for n, (_, _, d) in enumerate(routed)])
        for (rows, which, _), h in zip(routed, downs):
            out[rows] += weights[rows, which][:, None] * h

    def _ensure(self, i: int, e: int) -> int:
        """The slot holding expert e of layer i: cached, prefetched (waited for) or read now."""
        st = self.counters
        s = self.slot_of.get((i, e))
        if s is not None:
            fut = self.pending.pop(s, None)
            if fut is not None and not fut.done():
                t = time.perf_counter()
                fut.result()
                st.wait_seconds += time.perf_counter() - t
                st.late += 1
            else:
                if fut is not None:
                    fut.result()  # raise a failed read here
                st.hits += 1
            self._keep.add(s)
            return s
        st.misses += 1
        s = self._take_slot(i, e)
        t = time.perf_counter()
        (view,) = self.store.read_views(self.sources[i][e][0], [e], True, self._io)
        self.bufs[s][:len(view)] = np.frombuffer(view, np.uint8)
        with self._count:
            st.wait_seconds += time.perf_counter() - t
            st.reads += 1
            st.read_bytes += len(view)
        self._keep.add(s)
        return s

    def _take_slot(self, i: int, e: int) -> int:
        """A free slot of the expert's class, or the one the policy evicts from it; assigned to (i, e)."""
        mine = np.flatnonzero(self.slot_class == self.class_of[i, e])
        free = [int(s) for s in mine if self.key_of[s] is None]
        if free:
            s = free[0]
        else:
            s = self._victim(mine)
            self._drop(s)
            self.counters.evicted += 1
        self.key_of[s] = (i, e)
        self.slot_of[(i, e)] = s
        return s

    def _drop(self, s: int) -> None:
        fut = self.pending.pop(s, None)
        if fut is not None:
            fut.result()  # a slot being written is not reused before its read ends
        key = self.key_of[s]
        if key is not None:
            del self.slot_of[key]
        self.key_of[s] = None

    def _victim(self, mine: np.ndarray) -> int:
        """The slot to evict among `mine` (one class's slots)."""
        cand = np.array([s for s in mine if s not in self._keep], np.int64)
        if not len(cand):
            raise RuntimeError("expert cache: every slot is in use by this step (the plan's minimum was not kept)")
        if self.policy == "lru":
            return int(cand[np.argmin(self.last_use[cand])])
        # EdgeMoE: the expert's share of its layer's routing / layers until its layer runs again
        layer = np.array([self.key_of[s][0] for s in cand])
        expert = np.array([self.key_of[s][1] for s in cand])
        n = self.cfg.n_layers
        dist = (layer - self._cur) % n
        dist[dist == 0] = n
        value = self.freq[layer, expert] / self.freq[layer].sum(axis=1) / dist
        best = np.lexsort((self.last_use[cand], value))[0]  # lowest value, then least recently used
        return int(cand[best])

    # -- prediction and prefetch ---------------------------------------------------------------------------

    def predict(self, j: int, resid: np.ndarray) -> list[int]:
        """Layer j's most likely experts, as many as the prefetch depth. pregate: layer j's router on this
        residual stream under layer j's FFN norm (RMS normalization scales every logit alike, so the ranking
        is that of the residual times the router with the norm's weights folded in). trace: the calibration
        tables given the experts this token took at the two layers before j."""
        if self.predictor == "trace":
            logits = trace_scores(self.tables, j, self._chosen.get(j - 1), self._chosen.get(j - 2))
        else:
            if self._gates is None:
                self._gates = [r * w[None, :] for r, w in zip(self.routers, self.norms)]
            logits = self._gates[j] @ resid[-1]
        return [int(e) for e in np.argsort(-logits, kind="stable")[:self.prefetch]]

    def _prefetch(self, j: int, resid: np.ndarray, now: list[int]) -> None:
        """Read layer j's predicted experts ahead; `now`: this layer's experts, whose slots (some still to be
        read) are set aside first."""
        spare = np.bincount(self.slot_class, minlength=len(self.classes))  # per class: slots not set aside
        for s in self._keep:
            spare[self.slot_class[s]] -= 1
        for e in now:
            if (self._cur, e) not in self.slot_of:
                spare[self.class_of[self._cur, e]] -= 1
        guess = [e for e in self.predict(j, resid) if e not in self.on_device[j]]  # the device's need no read
        self._predicted[j] = set(guess)
        self.counters.predicted += len(guess)
        todo = []
        for e in guess:
            s = self.slot_of.get((j, e))
            if s is not None:
                self._keep.add(s)
                continue
            c = self.class_of[j, e]
            if spare[c] <= 0:
                continue  # no slot of its size to spare: it loads on demand
            spare[c] -= 1
            s = self._take_slot(j, e)
            self._keep.add(s)
            todo.append((e, s))
        if todo:
            self.counters.prefetched += len(todo)
            fut = self._pool.submit(self._read_ahead, j, todo)
            for _, s in todo:
                self.pending[s] = fut

    def _read_ahead(self, j: int, todo: list[tuple[int, int]]) -> None:
        for arr in {id(self.sources[j][e][0]): self.sources[j][e][0] for e, _ in todo}.values():
            mine = [(e, s) for e, s in todo if self.sources[j][e][0] is arr]  # experts of one bitwidth: one batch
            views = self.store.read_views(arr, [e for e, _ in mine], True, self._io_ahead)
            for (_, s), view in zip(mine, views):
                self.bufs[s][:len(view)] = np.frombuffer(view, np.uint8)
                with self._count:
                    self.counters.reads += 1
                    self.counters.read_bytes += len(view)

    # -- budget changes --------------------------------------------------------------------------------------

    def resize(self, plan) -> None:
        """Follow a new plan of its strategy (edge.strategies.experts): its experts cached."""
        self.set_slots(plan.detail.slots)

    def stats(self, tokens: int) -> dict:
        """The expert cache's counters since `reset()`, and what it holds now."""
        return dict(self.counters.as_dict(tokens), cached=self.cached, slots=self.slots, cache_bytes=self.cache_bytes)

    def reset(self) -> None:
        self.counters.reset()

    @property
    def wait_seconds(self) -> float:
        return self.counters.wait_seconds

    def set_slots(self, slots: int) -> None:
        """Hold `slots` experts, shared among the slot classes by split_slots: shrinking keeps each class's most
        recently used and frees the other slots' arrays, growing adds empty slots; no expert's bytes move."""
        for fut in list(self.pending.values()):
            fut.result()
        self.pending.clear()
        self._keep = set()
        want = split_slots(slots, self.classes, self.cfg.n_experts_used + self.prefetch)
        keep = []
        for c, n in enumerate(want):
            mine = [s for s in range(self.slots) if self.slot_class[s] == c]
            mine.sort(key=lambda s: (self.key_of[s] is None, -self.last_use[s]))
            keep += [(c, s) for s in mine[:n]] + [(c, None) for _ in range(n - len(mine))]
        self.bufs = [self.bufs[s] if s is not None else np.zeros(self.classes[c][0], np.uint8) for c, s in keep]
        self.key_of = [self.key_of[s] if s is not None else None for _, s in keep]
        self.last_use = np.array([self.last_use[s] if s is not None else 0 for _, s in keep], np.int64)
        self.slot_class = np.array([c for c, _ in keep], np.int64)
        self.slots = len(keep)
        self.slot_of = {k: s for s, k in enumerate(self.key_of) if k is not None}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def trace_scores(tables: np.ndarray, j: int, before: np.ndarray | None, before2: np.ndarray | None) -> np.ndarray:
    """Scores of layer j's experts given the experts chosen at j-1 (`before`) and j-2 (`before2`): the mean
    conditional probability from each table, plus the layer's frequency as a tie-break."""
    e = tables.shape[2]
    freq = tables[j, 0]
    score = 1e-3 * freq / max(1.0, freq.sum())
    for chosen, row in ((before, 1), (before2, 1 + e)):
        if chosen is not None and j >= (1 if row == 1 else 2):
            c = tables[j, row + np.asarray(chosen)]  # (k, E)
            score = score + (c / np.maximum(1.0, c.sum(axis=1, keepdims=True))).mean(axis=0)
    return score


def load_tables(store) -> np.ndarray | None:
    """The routing count tables (weights_tools.moe_traces.count_tables), or None before `edge convert
    --calibrate`."""
    if store.moe is None:
        return None
    cfg = store.config
    e = cfg.n_experts
    raw = store.read_array("moe/counts").reshape(-1)
    return raw.view(np.float32).reshape(cfg.n_layers, 1 + 2 * e, e).copy()
