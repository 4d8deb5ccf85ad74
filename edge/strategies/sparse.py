"""`--strategy sparse`: LLM in a flash's neuron cache over the store's FFN bundles (edge.sparse.SparseFFN).

The budget's variable part is a neuron cache of whole clusters per layer. At sparsity 0 every token reads the
clusters not cached, so the read buffers hold only those and shrink as the cache grows: the cache is the largest
that fits with the buffers it leaves. With predictors (sparsity > 0) a token may read any cluster: buffers for
all. The embedding and head come from flash (edge.head), the rest of the weights stay as stored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from edge import quants
from edge.flash import ALIGN
from edge.head import HEAD_IO, budget_ends, budget_ends_bytes, head_bytes
from edge.errors import EdgeError
from edge.model import KVCache
from edge.offload import accelerator, placement, ram_parts
from edge.parts import DeviceLinears, Parts, StoredLinears, StreamedLinears, attention_layout, device_kv
from edge.sizes import format_size
from edge.sparse import Layout, SparseFFN, check_calibrated, stream_scratch_bytes
from edge.strategies import Options
from edge.strategies.plan import MARGIN, Plan, activation_bytes, check_minimum

IO_ROWS = 1 << 20  # under a streamed FFN, the store's buffer holds at least this much for rows (the head's
                   # candidates: ~33 reads a call)


@dataclass(frozen=True)
class SparseDetail:
    min_scratch: int      # the read buffers with no cluster cached (every one streams)
    slot_bytes: int       # one cached cluster in every layer
    slots: int            # cached clusters per layer
    n_clusters: int       # clusters per layer
    n_layers: int
    ffn_bytes: int        # all clusters of all layers, as stored
    sparsity: float
    window: int
    read_ahead: bool      # with sparsity > 0: the next layer's predicted clusters read during this layer
    calibrated: bool      # a low-rank head (else the head as stored: resident, or streamed, `head`)
    attention: int = 0    # the attention's projections, as stored: 0 resident, else streamed (their bytes)
    head: int = 0         # an uncalibrated store's head: 0 resident, else streamed (its bytes)
    gpu_clusters: int = 0  # clusters per layer on the GPU (--gpu: never cached in RAM, never read per token)

    part: ClassVar[str] = "neuron cache"

    @property
    def cache(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def cached_fraction(self) -> float:
        return min(1.0, self.slots / self.n_clusters)

    def figures(self) -> dict:
        return {"cached_fraction": round(self.cached_fraction, 4)}

    def labels(self, plan: Plan) -> tuple[str, str, int]:
        return "resident weights", "stream buffers", plan.scratch

    def summary(self) -> str:
        gpu = f", {self.gpu_clusters} on the GPU" if self.gpu_clusters else ""
        streamed = max(0.0, 1 - (self.slots + self.gpu_clusters) / self.n_clusters)
        return (f"{self.slots}/{self.n_clusters} FFN clusters per layer cached{gpu},\n"
                f"{100 * streamed:.0f}% stream from flash")

    def shrunk_from(self, before: "SparseDetail") -> str:
        return (f"neuron cache {before.slots} -> {self.slots} clusters per layer "
                f"({format_size(before.cache - self.cache)} given back)")

    def line(self, plan: Plan) -> str:
        f = format_size
        whole = self.slots + self.gpu_clusters >= self.n_clusters
        rest = "nothing streams" if whole else "the rest streams from flash"
        gpu = f", {self.gpu_clusters} more on the GPU" if self.gpu_clusters else ""
        return (f"neuron cache {f(self.cache)}: {self.slots}/{self.n_clusters} clusters per layer "
                f"({100 * self.cached_fraction:.0f}% of the FFN's {f(self.ffn_bytes)}){gpu}; {rest} "
                f"({plan.strategy}, sparsity {self.sparsity:g}, window {self.window}"
                f"{', next layer read ahead by prediction' if self.read_ahead else ''})"
                + ("" if self.calibrated else
                   f"; the head {'read from flash at every token' if self.head else 'resident as stored'} (the "
                   "store is not calibrated: `edge convert STORE --calibrate` replaces it by a low-rank copy, "
                   f"{'much faster' if self.head else 'which leaves more for the cache'})")
                + (f"; the attention's {f(self.attention)} too is read from flash, a layer at a time (the budget "
                   "is below what keeping it takes)" if self.attention else ""))


def resident_bytes(store, predictors: bool, read_ahead: bool = False) -> int:
    """Bytes kept resident besides the FFN cache: attention and norms as stored, the predictors (float32 at
    run time: each layer's, and the next layer's with read-ahead), the flash head's."""
    cfg, info = store.config, store.sparse
    total = 0
    for name, t in store.tensor_infos.items():
        if name.startswith("blk.") or name == "output_norm.weight":  # attention and norms, as stored
            rows, cols = (t["shape"] + [1])[:2]
            total += rows * quants.FORMATS[t["type"]].row_bytes(cols) if len(t["shape"]) == 2 else 4 * rows
    if predictors:  # only on a calibrated store
        n = [lay["hidden"] // lay["cluster"] for lay in store.ffn_layouts]
        for k in n + (n[1:] if read_ahead else []):
            r = min(info["rank"], k)
            total += 4 * (cfg.dim * r + r * k + k)
    return total + budget_ends_bytes(store)


def store_io_bytes(store) -> int:
    """The store's I/O buffer under a streamed FFN: its largest single read (a chunk of a resident tensor, of
    the low-rank head, its basis, the warm head rows or a predictor), with alignment, and at least IO_ROWS.
    Row lookups batch to what it holds (Store.read_chunks)."""
    optional = [f"sparse/{p}" for p in ("head", "head_basis", "head_hot", "head_hot_ids")]
    optional += [f"sparse/aux.{i}" for i in range(store.config.n_layers)]  # older calibrations lack some
    paths = ["t/" + name for name in store.tensor_infos] + [p for p in optional if (store.path / p).is_dir()]
    largest = max(store.array(p).chunk_bytes for p in paths)
    return max(IO_ROWS, -(-(largest + 4 * ALIGN) // ALIGN) * ALIGN)


class Sparse:
    name = "sparse"
    mixture = False  # runs dense models
    empty_at_load = False  # its cache is read in at load
    caches = True    # keeps a neuron cache (naive: none)

    def plan(self, store, budget: int, baseline: int, n_ctx: int, options: Options) -> Plan:
        if options.sparsity > 0 and self.caches:
            check_calibrated(store, "--sparsity")  # its predictors; at sparsity 0 nothing needs calibration
        cfg = store.config
        layouts = [Layout(lay) for lay in store.ffn_layouts]
        n_clusters = max(lay.n_clusters for lay in layouts)
        predicting = self.caches and options.sparsity > 0
        slot_bytes = sum(lay.bytes for lay in layouts)
        gpu = None
        if options.gpu:
            if not self.caches:
                raise EdgeError(f"--gpu: --strategy {self.name} is the paper's baseline, run on the CPU; use sparse")

            def alone() -> tuple[bool, int]:
                d = self.plan(store, budget, baseline, n_ctx, replace(options, gpu="")).detail
                return not d.attention, d.slots

            gpu = placement(options, attention_layout(store)[2], KVCache.bytes_for(cfg, n_ctx), slot_bytes,
                            n_clusters, "FFN clusters", alone)
        g = gpu.per_layer if gpu else 0  # clusters on the GPU: never read per token, so never in a read buffer
        min_scratch = stream_scratch_bytes(layouts, g)

        detail = SparseDetail(min_scratch=min_scratch, slot_bytes=slot_bytes, slots=0, n_clusters=n_clusters,
                              n_layers=cfg.n_layers, ffn_bytes=sum(lay.bytes * lay.n_clusters for lay in layouts),
                              sparsity=options.sparsity if self.caches else 0.0, window=options.window,
                              read_ahead=options.prefetch > 0 and predicting, calibrated=store.sparse is not None,
                              gpu_clusters=g)
        resident, kv = ram_parts(gpu, resident_bytes(store, predicting, options.prefetch > 0),
                                 KVCache.bytes_for(cfg, n_ctx))
        least = Plan(strategy=self.name, budget=budget, baseline=baseline, kv=kv,
                     io=store_io_bytes(store), resident=resident,
                     margin=MARGIN + activation_bytes(cfg, n_ctx), scratch=min_scratch, held=0, least=min_scratch,
                     detail=detail, gpu=gpu)
        extra = 0  # the attention's buffer when it streams
        on_gpu = gpu is not None and gpu.attention > 0
        if not on_gpu and (options.attention == "stream" or (options.attention == "auto" and
                                                             budget < least.minimum)):
            _, extra, attention = attention_layout(store)  # below what keeping the attention takes: it streams
            detail = replace(detail, attention=attention)
            least = replace(least, resident=least.resident - attention, scratch=min_scratch + extra,
                            least=min_scratch + extra, detail=detail)
        if not detail.calibrated and (options.head == "stream" or (options.head == "auto" and
                                                                    budget < least.minimum)):
            streamed = head_bytes(store)  # below what keeping the head takes: every token reads it
            detail = replace(detail, head=streamed)
            least = replace(least, resident=least.resident - streamed, io=max(least.io, HEAD_IO), detail=detail)
        check_minimum(least, n_ctx)

        def plan(slots: int, scratch: int) -> Plan:
            cached = replace(detail, slots=slots)
            return replace(least, scratch=scratch + extra, held=cached.cache, detail=cached)

        if not self.caches:
            return least
        if predicting:  # any cluster may be read: buffers for all, the rest caches
            return plan(int(min(n_clusters - g, (budget - least.minimum) // slot_bytes)), min_scratch)
        room = budget - (least.minimum - min_scratch)
        slots = next(s for s in range(n_clusters - g, -1, -1)  # the most that fit with the buffers they leave
                     if stream_scratch_bytes(layouts, s + g) + s * slot_bytes <= room)
        return plan(slots, stream_scratch_bytes(layouts, slots + g))

    def io_buffer(self, plan: Plan) -> int:
        return plan.io

    def build(self, store, backend, act, plan: Plan) -> Parts:
        d, gpu = plan.detail, plan.gpu
        acc = accelerator(gpu.device) if gpu else None
        ffn = SparseFFN(store, backend.ggml, act, d.slots, d.sparsity, d.window, cache=self.caches,
                        read_threads=store.engine.threads, read_ahead=d.read_ahead,
                        device=(acc, d.gpu_clusters) if d.gpu_clusters else None)
        embed, head = budget_ends(store, backend, stream_head=d.head > 0)
        linears = (StreamedLinears if d.attention else StoredLinears)(store, backend)
        if gpu and gpu.attention:
            linears = DeviceLinears(linears, acc, gpu)
        return Parts(linears, ffn, embed, head, device_kv(acc, store.config) if gpu and gpu.kv else None)
