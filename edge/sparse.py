"""The budgeted FFN of `--strategy sparse` and `naive`: FFN bundles streamed from flash into a neuron cache.

LLM in a flash (Alizadeh et al. 2023), adapted to SwiGLU/GeGLU models. The unit is the store's FFN bundle: a
cluster of neurons whose gate rows, up rows and down columns are one contiguous record in the source's own
GGML blocks, computed by llama.cpp's kernels (edge.ggml) straight from the cache. Per layer and token:

1. predict: with a sparsity target > 0, the layer's trained low-rank predictor (`edge convert --calibrate`)
   scores every cluster's log importance from the FFN input; clusters under the calibrated threshold are not
   read (while the cache has free slots they are read anyway, best scored first: skipping only saves reads,
   and cached clusters are always computed). At sparsity 0 (the default) every cluster is needed and the
   result equals the dense model's;
2. read: a needed cluster that is not cached is read from flash (one record, coalesced with its neighbours);
3. cache: one preallocated matrix per layer; insert appends a cluster in the first free slot, delete moves the
   last slot into the hole, so the used slots stay a prefix and nothing is reallocated per token. When the
   need exceeds the capacity, cached clusters not needed now go, least recently used first, those used by one
   of the last `window` tokens counted apart (windowing); needed clusters that still do not fit are used
   where they were read and not kept (counted as streamed). At sparsity 0 the cache therefore holds a fixed
   set and the rest streams every token: a fixed set beats any replacement when every token needs all. That
   set is read in at load (and after a resize), so a token reads only the clusters not cached and the read
   buffers are sized to those (`stream_scratch_bytes`: 65kB for SmolLM2 fully cached, 4.2MB with none);
4. compute: gate and up over the cache's used prefix and over the streamed records in one ggml graph (records
   at one stride in the read buffer are one batched product; one node per 32-row record measured 30% slower),
   act(gate) * up, the down products in a second graph, summed.

With `--gpu` (edge.offload) each layer's hottest clusters (by calibration; at sparsity 0 its first) live in the
device's memory and are computed there at every token, while the CPU computes the rest; the cache, the
predictor's choices and the reads deal with the others only.

Reads for layer i+1 run while layer i computes (its own thread and I/O engine): at sparsity 0 the clusters it
will read are known (those not cached). With predictors, `read_ahead` (`--prefetch 1`) reads the clusters
layer i+1's next-layer predictor names from layer i's input (the paper's overlap); clusters it then needs
and no prediction brought are read after them into the same buffer. Off by default: on 2 cores the read
thread competes with compute and a quarter of the read-ahead goes unused (benchmarks/README.md).

`naive` (the paper's baseline): no cache; every cluster of every layer is read and streamed each token, with
the same prefetch.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np

from edge import quants
from edge.errors import EdgeError
from edge.flash import ALIGN, IOEngine
from edge.ggml import Weight
from edge.memory import release_free_memory

SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)  # the levels calibration fits thresholds for (--sparsity)
PREDICTOR = "ridge-log-importance"  # the predictors' kind in attributes["edge"]["sparse"] (weights_tools.calibrate)

PREFETCH_READ = 1 << 20
REPEAT_BYTES = 2 << 20  # batched products of streamed records: their repeated input, their outputs, at most


@dataclass
class SparseStats:
    """Counters since the last `reset()`."""

    reads: int = 0
    read_bytes: int = 0
    needed: int = 0             # clusters the predictor asked for (all, at sparsity 0)
    hits: int = 0               # of those, already cached
    evicted: int = 0            # cached clusters dropped to make room
    evicted_in_window: int = 0  # of those, used by one of the last `window` tokens
    streamed: int = 0           # needed clusters read and used but not kept (the cache was full)
    neurons: int = 0            # neurons computed
    wait_seconds: float = 0.0   # time the compute thread waited for FFN reads (its own and prefetched ones)
    prefetched: int = 0         # clusters read ahead for the next layer
    prefetch_used: int = 0      # of those, needed by it (the rest are reads all the same)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.needed if self.needed else 1.0


class Layout:
    """One layer's bundle: `cluster` neurons, gate rows | up rows | down blocks, in the source's types."""

    def __init__(self, lay: dict):
        self.c, self.dim, self.hidden = lay["cluster"], lay["dim"], lay["hidden"]
        self.types = tuple(lay["types"])
        self.g, self.u, self.d = lay["gate_bytes"], lay["up_bytes"], lay["down_bytes"]
        self.bytes = self.g + self.u + self.d
        self.gate_row = quants.FORMATS[self.types[0]].row_bytes(self.dim)
        self.up_row = quants.FORMATS[self.types[1]].row_bytes(self.dim)
        self.down_part = self.d // self.dim  # bytes of one down row that belong to one cluster
        self.n_clusters = self.hidden // self.c


class _LayerCache:
    """Cached clusters of one layout: gate rows, up rows, down row parts; a used prefix of `slots`."""

    def __init__(self, slots: int, lay: Layout):
        self.slots, self.lay = slots, lay
        c = lay.c
        self.gate = np.zeros((slots * c, lay.gate_row), np.uint8)
        self.up = np.zeros((slots * c, lay.up_row), np.uint8)
        self.down = np.zeros((lay.dim, slots * lay.down_part), np.uint8)
        self.used = 0
        self.cluster_of = np.full(slots, -1, np.int64)
        self.slot_of = np.full(lay.n_clusters, -1, np.int64)
        self.last_use = np.zeros(slots, np.int64)
        self._weights: tuple | None = None  # (used, gate_up, down) as of the last weights()

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    def insert(self, cluster_id: int, rec: np.ndarray, step: int) -> None:
        s, lay = self.used, self.lay
        c = lay.c
        self.gate[s * c:(s + 1) * c] = rec[:lay.g].reshape(c, -1)
        self.up[s * c:(s + 1) * c] = rec[lay.g:lay.g + lay.u].reshape(c, -1)
        self.down[:, s * lay.down_part:(s + 1) * lay.down_part] = rec[lay.g + lay.u:lay.bytes].reshape(lay.dim, -1)
        self.cluster_of[s] = cluster_id
        self.slot_of[cluster_id] = s
        self.last_use[s] = step
        self.used += 1

    def delete(self, cluster_id: int) -> None:
        """Move the last used slot into the hole."""
        s = int(self.slot_of[cluster_id])
        self.slot_of[cluster_id] = -1
        last = self.used - 1
        c, part = self.lay.c, self.lay.down_part
        if s != last:
            self.gate[s * c:(s + 1) * c] = self.gate[last * c:(last + 1) * c]
            self.up[s * c:(s + 1) * c] = self.up[last * c:(last + 1) * c]
            self.down[:, s * part:(s + 1) * part] = self.down[:, last * part:(last + 1) * part]
            moved = int(self.cluster_of[last])
            self.cluster_of[s] = moved
            self.slot_of[moved] = s
            self.last_use[s] = self.last_use[last]
        self.cluster_of[last] = -1
        self.used = last

    def resize(self, slots: int) -> None:
        """Keep at most `slots` clusters (the least recently used go) in smaller arrays; frees the old ones."""
        while self.used > slots:
            self.delete(int(self.cluster_of[int(np.argmin(self.last_use[:self.used]))]))
        old = (self.gate, self.up, self.down, self.cluster_of, self.last_use)
        self.__init__(slots, self.lay)
        n, c, part = old[3][old[3] >= 0].size, self.lay.c, self.lay.down_part
        self.gate[:n * c], self.up[:n * c] = old[0][:n * c], old[1][:n * c]
        self.down[:, :n * part] = old[2][:, :n * part]
        self.cluster_of[:n], self.last_use[:n] = old[3][:n], old[4][:n]
        self.slot_of[self.cluster_of[:n]] = np.arange(n)
        self.used = n

    def weights(self) -> tuple[list[Weight], Weight]:
        """The used prefix as ggml weights (the same objects while the prefix stays: a fully cached layer's
        products run the same kept graphs every token)."""
        if self._weights is None or self._weights[0] != self.used:
            lay, n = self.lay, self.used * self.lay.c
            gate_up = [Weight(self.gate, lay.types[0], n, lay.dim), Weight(self.up, lay.types[1], n, lay.dim)]
            down = Weight(self.down, lay.types[2], lay.dim, n, row_stride=self.down.shape[1])
            self._weights = (self.used, gate_up, down)
        return self._weights[1], self._weights[2]


class SparseFFN:
    """The FFN of every layer, from the store's bundles, under a cache of `slots` clusters per layer (no cache:
    `naive`). Keeps the FFN contract (edge.parts.FFN)."""

    kind = "FFN clusters"

    def __init__(self, store, ggml, act, slots: int, sparsity: float = 0.0, window: int = 5, cache: bool = True,
                 read_threads: int = 4, read_ahead: bool = False, device: tuple | None = None):
        """device: (an edge.ggml.Accelerator, clusters per layer): each layer's first clusters are uploaded to it
        at load and computed there at every token (`--gpu`, edge.offload); the cache and the reads deal with the
        others only."""
        info = store.sparse
        cfg = store.config
        self.store, self.ggml, self.act, self.cfg = store, ggml, act, cfg
        self.layouts = [Layout(lay) for lay in store.ffn_layouts]
        self.window = window
        self.predicting = cache and sparsity > 0
        self.sparsity = sparsity if self.predicting else 0.0
        key = next((k for k in info["layers"][0]["thresholds"] if float(k) == sparsity), None) \
            if self.predicting else None
        if self.predicting and key is None:
            raise EdgeError(f"--sparsity {sparsity:g}: {store.path} is calibrated for "
                            f"{', '.join(info['layers'][0]['thresholds'])}; choose one of those")
        self.read_ahead = self.predicting and read_ahead
        self.trace = None  # the contract's calibration hook: calibration runs the resident FFN
        self.this, self.next = [], []  # per layer: predictors (A, B, bias) of its clusters and of the next layer's
        if self.predicting:  # predictors only where they choose something
            if info.get("predictor") != PREDICTOR:
                raise EdgeError(f"{store.path}: its predictors come from an older edge; run `edge convert "
                                f"{store.path} --calibrate` again to use --sparsity")
            self.tau = [float(layer["thresholds"][key]) for layer in info["layers"]]
            self.next_tau = [float(layer["next_thresholds"][key]) for layer in info["layers"][:-1]]
            n = [lay.n_clusters for lay in self.layouts]
            for i in range(cfg.n_layers):
                raw = store.read_array(f"sparse/aux.{i}").reshape(-1)
                ahead = n[i + 1] if self.read_ahead and i + 1 < len(n) else None  # the next layer's: read-ahead
                preds = unpack_predictors(raw, cfg.dim, info["rank"], n[i], ahead)
                self.this.append(preds[0])
                self.next.append(preds[1] if ahead else None)
        self.arrays = [store.array(f"ffn/blk.{i}") for i in range(cfg.n_layers)]
        self.device = device[0] if device else None
        self.gpu = [min(device[1] if device else 0, lay.n_clusters) for lay in self.layouts]
        # which: each layer's hottest by calibration (`hot`: with predictors it matters), else its first
        hot = [layer.get("hot") for layer in info["layers"]] if self.predicting else [None] * cfg.n_layers
        self.gpu_ids = [np.asarray(h[:g] if h else range(g), np.int64) for h, g in zip(hot, self.gpu)]
        self.on_gpu = [np.isin(np.arange(lay.n_clusters), ids) for lay, ids in zip(self.layouts, self.gpu_ids)]
        self.on_device = [self._upload(i) for i in range(cfg.n_layers)] if device else []
        self.caches = [_LayerCache(min(slots, lay.n_clusters - g), lay) for lay, g in zip(self.layouts, self.gpu)] \
            if cache else []
        self.counters = SparseStats()
        self.step = 0
        # prefetch: while layer i computes from one read buffer, layer i+1's reads land in the other, issued
        # from their own thread; streamed clusters are computed in place from the buffer they were read into.
        # At sparsity 0 the clusters layer i+1 will read are known (those not cached); with predictors and
        # read_ahead, those its next-layer predictor names from layer i's input (layer 0 of the next token is
        # read when needed)
        self._pending: dict[int, tuple[list[int], object, object]] = {}  # layer -> ids, engine, future
        self._ios = [IOEngine(threads=read_threads, buffer_bytes=self._buffer_bytes(slots), max_read=PREFETCH_READ)
                     for _ in range(2)]
        self._next_io = 0
        self._prefetch_pool = ThreadPoolExecutor(1, thread_name_prefix="edge-prefetch")
        self._fill()

    @property
    def keeps_full(self) -> bool:
        """At sparsity 0 every token needs every cluster: the cache holds a fixed set, read in at start (and
        after a resize), and each token reads only the others (the read buffers are sized to them)."""
        return not self.predicting and bool(self.caches)

    def _buffer_bytes(self, slots: int) -> int:
        return stream_buffer_bytes(self.layouts, (slots if self.keeps_full else 0) + max(self.gpu))

    def _upload(self, i: int) -> tuple:
        """Layer i's `gpu_ids[i]` clusters on the device, as one gate, up and down matrix (read a few records
        at a time into a cache of their own, which goes once uploaded)."""
        lay, arr = self.layouts[i], self.arrays[i]
        staging = _LayerCache(self.gpu[i], lay)
        for k in range(0, self.gpu[i], 8):
            ids = [int(c) for c in self.gpu_ids[i][k:k + 8]]
            for cid, rec in zip(ids, self.store.read_chunks(arr, ids)):
                staging.insert(cid, np.frombuffer(rec, np.uint8), 0)
        gate_up, down = staging.weights()
        return tuple(self.device.upload(gate_up + [down]))

    def _fill(self) -> None:
        """Fill every layer's free slots with its first clusters not cached (at sparsity 0 the set the first
        token would have kept), read through the store's engine a few records at a time."""
        if not self.keeps_full:
            return
        for i, (cache, arr) in enumerate(zip(self.caches, self.arrays)):
            ids = [int(c) for c in np.flatnonzero((cache.slot_of < 0) & ~self.on_gpu[i])][:cache.slots - cache.used]
            for k in range(0, len(ids), 8):
                for cid, rec in zip(ids[k:k + 8], self.store.read_chunks(arr, ids[k:k + 8])):
                    cache.insert(cid, np.frombuffer(rec, np.uint8), self.step)

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    @property
    def engines(self) -> list:
        """The I/O engines of the FFN reads (the store's own engine reads rows and resident tensors)."""
        return list(self._ios)

    @property
    def per_position(self) -> bool:
        return self.predicting

    @property
    def wait_seconds(self) -> float:
        return self.counters.wait_seconds

    def reset(self) -> None:
        self.counters.reset()

    def stats(self, tokens: int) -> dict:
        """The neuron cache's counters since `reset()`, per token where it says so."""
        st, n = self.counters, max(1, tokens)
        return {"reads": st.reads, "read_bytes": st.read_bytes, "read_bytes_per_token": st.read_bytes // n,
                "hit_rate": round(st.hit_rate, 4), "clusters_needed": st.needed, "evicted": st.evicted,
                "evicted_in_window": st.evicted_in_window, "streamed": st.streamed,
                "neurons_per_token": st.neurons // n, "cache_bytes": self.cache_bytes,
                "prefetched": st.prefetched, "prefetch_used": st.prefetch_used}

    def resize(self, plan) -> None:
        """Follow a new plan of its strategy (edge.strategies.sparse): its clusters per layer."""
        self.set_slots(plan.detail.slots)

    def set_slots(self, slots: int) -> None:
        """Hold `slots` clusters per layer: shrinking drops the least recently used (their memory goes back to
        the OS), growing adds free slots: at sparsity 0 read in now (only the added clusters), with predictors
        filled by the next tokens with what they read anyway. The read buffers follow (between tokens: the
        read ahead for the next token's first layer is waited for and dropped)."""
        for _, _, fut in self._pending.values():
            fut.result()
        self._pending.clear()
        for c, lay, g in zip(self.caches, self.layouts, self.gpu):
            c.resize(min(slots, lay.n_clusters - g))
        for io in self._ios:
            io.resize_buffer(self._buffer_bytes(slots))
        release_free_memory()
        self._fill()

    def predict(self, i: int, x: np.ndarray) -> np.ndarray:
        """Predicted log importance of every cluster of layer i for the tokens x (T, dim): (n_clusters,), the
        largest over the tokens."""
        return predict(self.this[i], x).max(axis=0)

    def __call__(self, i: int, x: np.ndarray, resid: np.ndarray | None = None) -> np.ndarray:
        lay, g = self.layouts[i], self.gpu[i]
        cache = self.caches[i] if self.caches else None
        if i == 0:
            self.step += 1
        st = self.counters
        if not self.predicting and cache is not None and cache.used == lay.n_clusters - g and i not in self._pending:
            cache.last_use[:cache.used] = self.step  # every cluster needed, every one cached: nothing to read
            st.needed += cache.used
            st.hits += cache.used
            self._start_prefetch(i, x)
            return self._compute(i, x, cache, [])
        score = self.predict(i, x) if self.predicting else None
        needed = np.flatnonzero(score >= self.tau[i]) if self.predicting else np.arange(lay.n_clusters)
        if g:
            needed = needed[~self.on_gpu[i][needed]]  # the device's are computed there, needed or not
        st.needed += len(needed)
        if cache is None:
            missing, stream = needed[:0], needed
        else:
            slots = cache.slot_of[needed]
            hit = slots >= 0
            cache.last_use[slots[hit]] = self.step
            missing = needed[~hit]
            st.hits += int(hit.sum())
            free = cache.slots - cache.used
            if len(missing) > free:
                keep = np.zeros(cache.used, bool)
                keep[slots[hit]] = True
                cand = np.flatnonzero(~keep)  # cached, not needed now: least recently used first
                cand = cand[np.argsort(cache.last_use[cand], kind="stable")][:len(missing) - free]
                for last, cid in [(int(cache.last_use[v]), int(cache.cluster_of[v])) for v in cand]:
                    cache.delete(cid)
                    st.evicted += 1
                    st.evicted_in_window += last > self.step - self.window
                free = cache.slots - cache.used
            if score is not None and len(missing) > free:  # the best scored get the free slots
                missing = missing[np.argsort(-score[missing], kind="stable")]
            elif score is not None and len(missing) < free:  # room to spare: fill it, best scored first
                extra = np.flatnonzero(cache.slot_of < 0)
                extra = extra[~np.isin(extra, missing) & ~self.on_gpu[i][extra]]
                extra = extra[np.argsort(-score[extra], kind="stable")][:free - len(missing)]
                missing = np.concatenate([missing, extra])
            missing, stream = missing[:free], missing[free:]
        st.streamed += len(stream)
        ids = sorted(int(c) for c in np.concatenate([missing, stream]))
        views, prefetched = self._take_prefetched(i, ids)
        self._start_prefetch(i, x)
        if ids:
            arr = self.arrays[i]
            rest = [c for c in ids if c not in views]
            if rest:
                t = time.perf_counter()
                views.update(zip(rest, self._read_now(arr, rest, prefetched)))
                st.wait_seconds += time.perf_counter() - t
            st.reads += len(ids)
            st.read_bytes += len(ids) * arr.chunk_bytes
            for cid in missing:
                cache.insert(int(cid), np.frombuffer(views[int(cid)], np.uint8), self.step)
        return self._compute(i, x, cache if cache is not None and cache.used else None,
                             [views[int(c)] for c in sorted(int(c) for c in stream)])

    def _read_now(self, arr, ids: list[int], prefetched) -> list:
        """Clusters needed now that no prefetch brought: after this layer's read-ahead in its buffer
        (`prefetched`, the engine it went to), else into the buffer not receiving the next layer's reads."""
        if prefetched is not None:
            return self.store.read_views(arr, ids, True, prefetched, append=True)
        return self.store.read_views(arr, ids, True, self._ios[self._next_io])

    def _start_prefetch(self, i: int, x: np.ndarray) -> None:
        """Read the next layer's (j = i + 1, wrapping to the next token's first) clusters that are not cached
        and will be needed: all of them at sparsity 0, those its predictor names from layer i's input x
        otherwise."""
        j = (i + 1) % self.cfg.n_layers
        cache = self.caches[j] if self.caches else None
        if self.predicting:
            if j == 0 or not self.read_ahead:
                return
            ids = np.flatnonzero(predict(self.next[i], x).max(axis=0) >= self.next_tau[i])
        else:
            ids = np.arange(self.layouts[j].n_clusters)
        if self.gpu[j]:
            ids = ids[~self.on_gpu[j][ids]]
        if cache is not None:
            ids = ids[cache.slot_of[ids] < 0]
        ids = [int(c) for c in ids]
        if ids:
            io = self._ios[self._next_io]
            self._next_io ^= 1
            self._pending[j] = (ids, io, self._prefetch_pool.submit(self.store.read_views, self.arrays[j], ids,
                                                                     True, io))

    def _take_prefetched(self, i: int, needed: list[int]) -> tuple[dict, object]:
        """Layer i's read-ahead clusters and the engine holding them; those it does not need count as reads
        all the same."""
        pending = self._pending.pop(i, None)
        if pending is None:
            return {}, None
        ids, io, fut = pending
        t = time.perf_counter()
        views = fut.result()
        st = self.counters
        st.wait_seconds += time.perf_counter() - t
        used = len(set(ids) & set(needed))
        st.prefetched += len(ids)
        st.prefetch_used += used
        st.reads += len(ids) - used
        st.read_bytes += (len(ids) - used) * self.arrays[i].chunk_bytes
        return dict(zip(ids, views)), io

    def _compute(self, i: int, x: np.ndarray, cache: _LayerCache | None, streamed: list) -> np.ndarray:
        """Layer i's FFN over the device's clusters, the cache's used prefix and the streamed records where they
        were read.

        Streamed records that sit at one stride in the read buffer (a coalesced read) are one batched product
        per matrix. One ggml graph computes every gate and up product, a second every down product. The device's
        part is started first and computes while the CPU's runs."""
        lay = self.layouts[i]
        y = np.zeros((len(x), self.cfg.dim), np.float32)
        device = None
        if self.on_device:
            d_gate, d_up, d_down = self.on_device[i]
            device = self.device.submit([(x, d_gate), (x, d_up)])
            self.counters.neurons += d_gate.rows
        first, second_w = [], []
        if cache is not None:
            gate_up, down = cache.weights()
            first += [(x, w) for w in gate_up]
            second_w.append(down)
        # a batched product takes its input once per record: one copy of `most` repeats, shared by every
        # product of this layer (each takes a prefix), bounds that memory by REPEAT_BYTES
        runs = _runs(streamed, lay.bytes)
        most = max(1, min(REPEAT_BYTES // x.nbytes, max((n for _, _, n, _ in runs), default=1)))
        repeated = np.repeat(x[None], most, axis=0) if most > 1 else None
        for buf, start, n, stride in runs:
            for first_rec in range(0, n, most):
                k, offset = min(most, n - first_rec), start + first_rec * stride
                xk = repeated[:k] if k > 1 else x  # (k, T, dim)
                first += [(xk, Weight(buf, lay.types[0], lay.c, lay.dim, None, offset, k, stride)),
                          (xk, Weight(buf, lay.types[1], lay.c, lay.dim, None, offset + lay.g, k, stride))]
                second_w.append(Weight(buf, lay.types[2], lay.dim, lay.c, lay.down_part, offset + lay.g + lay.u, k,
                                       stride))
        out = self.ggml.products(first) if first else []
        if device is not None:
            gate_out, up_out = device()
            device = self.device.submit([(self.act(gate_out) * up_out, d_down)])
        hs = [self.act(out[k]) * out[k + 1] for k in range(0, len(out), 2)]
        self.counters.neurons += sum(h.size // len(x) for h in hs)
        # the down products of a batch give one (T, dim) output per record, summed here: computed in groups
        # whose outputs stay under REPEAT_BYTES, so a long prefill does not hold every record's output at once
        group, size = [], 0
        for h, w in zip(hs, second_w):
            group.append((h, w))
            size += w.batches * len(x) * self.cfg.dim * 4
            if size >= REPEAT_BYTES or w is second_w[-1]:
                for out in self.ggml.products(group):
                    y += out if out.ndim == 2 else out.sum(axis=0)
                group, size = [], 0
        if device is not None:
            y += device()[0]
        return y


def predict(pred, x: np.ndarray) -> np.ndarray:
    """Predicted log importance of every cluster, (T, clusters)."""
    a, b, bias = pred
    return (x @ np.asarray(a, np.float32)) @ np.asarray(b, np.float32) + bias


def pack_predictors(this, nxt) -> np.ndarray:
    """One layer's predictors as bytes: A, B (float16) and bias (float32) of this layer's, then the next's."""
    parts = [this] + ([nxt] if nxt is not None else [])
    return np.concatenate([np.asarray(m).view(np.uint8).reshape(-1) for p in parts for m in p])


def unpack_predictors(raw: np.ndarray, dim: int, rank: int, clusters: int, next_clusters: int | None) -> list:
    """The inverse of pack_predictors, as float32 (A, B, bias) tuples: [this] or [this, next]."""
    out, o = [], 0
    for n in [clusters] + ([next_clusters] if next_clusters else []):
        r = min(rank, n)
        a = raw[o:o + 2 * dim * r].view(np.float16).reshape(dim, r).astype(np.float32)
        o += 2 * dim * r
        b = raw[o:o + 2 * r * n].view(np.float16).reshape(r, n).astype(np.float32)
        o += 2 * r * n
        bias = raw[o:o + 4 * n].view(np.float32).copy()
        o += 4 * n
        out.append((a, b, bias))
    return out


def _runs(views: list, record: int) -> list[tuple]:
    """Group record views (in cluster order) into runs at one stride in one buffer: (buffer, offset, count,
    stride) each."""
    runs: list[list] = []
    for v in views:
        obj = v.obj
        offset = np.frombuffer(v, np.uint8).ctypes.data - np.frombuffer(obj, np.uint8).ctypes.data
        if runs and runs[-1][0] is obj:
            run = runs[-1]
            if run[2] == 1 and offset > run[1]:
                run[2], run[3] = 2, offset - run[1]
                continue
            if offset == run[1] + run[2] * run[3]:
                run[2] += 1
                continue
        runs.append([obj, offset, 1, record])
    return [(np.frombuffer(obj, np.uint8), off, k, stride) for obj, off, k, stride in runs]


def stream_buffer_bytes(layouts: list[Layout], cached: int = 0) -> int:
    """A read buffer that holds what one layer reads in a token, its clusters beyond the `cached` ones, with
    room for the alignment of every read: a cluster each at worst (scattered by the predictors), reads split at
    PREFETCH_READ, a checksum array."""
    most = 0
    for lay in layouts:
        k = lay.n_clusters - min(cached, lay.n_clusters)
        most = max(most, k * (lay.bytes + 2 * ALIGN) + (k * lay.bytes // PREFETCH_READ + 4) * 2 * ALIGN)
    return most


def stream_scratch_bytes(layouts: list[Layout], cached: int = 0) -> int:
    """Both read buffers (the layer computing and the one read ahead) with `cached` clusters per layer cached
    and kept full (sparsity 0); cached=0 with predictors, whose tokens may read any cluster."""
    return 2 * stream_buffer_bytes(layouts, cached)


def check_calibrated(store, what: str) -> None:
    if getattr(store, "sparse", None) is None:
        raise EdgeError(f"{store.path}: {what} needs a calibrated store; run `edge convert {store.path} "
                        "--calibrate` first")
