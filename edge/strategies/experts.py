"""`--strategy experts` (EdgeMoE): a mixture of experts with everything but the experts resident (as stored;
routers and norms float32), the experts paged into a cache of whole records (edge.experts.ExpertPager). The
minimum holds the experts of one layer's token and of the next layer's prefetch, in each slot class; the rest
of the budget caches as many experts as fit, each costing its record and a 1/KERNEL_SHARE."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from edge import quants
from edge.errors import EdgeError
from edge.experts import POLICIES, PREDICTORS, ExpertPager, read_buffer_bytes, record_sizes, slot_classes, split_slots
from edge.head import DenseEmbedding, DenseHead
from edge.model import KVCache
from edge.offload import accelerator, placement, ram_parts
from edge.parts import (DeviceLinears, MoEFFN, Parts, StoredLinears, attention_layout, device_kv, load_router,
                        load_vector)
from edge.sizes import format_size
from edge.strategies import Options
from edge.strategies.plan import IO_BUFFER, MARGIN, Plan, activation_bytes, check_minimum, last_fitting

KERNEL_SHARE = 64  # expert plans leave 1/64 of the cache for what the cap also charges with it: page tables,
                   # huge-page rounding, the libraries' page cache


@dataclass(frozen=True)
class ExpertDetail:
    classes: tuple        # slot classes: (record bytes, experts of that size) (edge.experts.slot_classes)
    slots: int            # experts cached
    floor: int            # slots each class keeps at least: a token's routed and predicted experts
    n_experts: int        # experts in the model, all layers
    prefetch: int         # experts predicted and read ahead per layer
    policy: str = "score"  # eviction (edge.experts.POLICIES)
    predictor: str = "pregate"  # edge.experts.PREDICTORS
    gpu_experts: int = 0  # experts per layer on the GPU (--gpu: computed there when routed, never paged)
    per_layer: int = 1    # experts in a layer

    part: ClassVar[str] = "expert cache"

    def share(self, slots: int) -> list[int]:
        """Each slot class's part of `slots` cached experts (edge.experts.split_slots)."""
        return split_slots(slots, self.classes, self.floor)

    def cache_for(self, slots: int) -> int:
        """What `slots` cached experts take."""
        return sum(n * b for n, (b, _) in zip(self.share(slots), self.classes))

    def extra_for(self, slots: int) -> int:
        """What `slots` cached experts cost beyond the minimum's (each its record and a 1/KERNEL_SHARE)."""
        extra = [n - m for n, m in zip(self.share(slots), self.share(self.min_slots))]
        return sum(n * (b + b // KERNEL_SHARE) for n, (b, _) in zip(extra, self.classes))

    @property
    def min_slots(self) -> int:
        return sum(min(self.floor, n) for _, n in self.classes)

    @property
    def cache(self) -> int:
        return self.cache_for(self.slots)

    @property
    def cached_fraction(self) -> float:
        return min(1.0, self.slots / self.n_experts)

    def figures(self) -> dict:
        return {"cached_fraction": round(self.cached_fraction, 4)}

    def labels(self, plan: Plan) -> tuple[str, str, int]:
        return "non-expert weights", "expert slots minimum", self.cache_for(self.min_slots)

    @property
    def on_gpu(self) -> int:
        """Experts on the GPU, all layers."""
        return self.gpu_experts * (self.n_experts // max(1, self.per_layer))

    def summary(self) -> str:
        ahead = f"{self.prefetch} read ahead per layer" if self.prefetch else "the rest loaded on demand"
        gpu = f", {self.on_gpu} on the GPU" if self.gpu_experts else ""
        return f"{self.slots}/{self.n_experts} experts cached{gpu},\n{ahead}"

    def shrunk_from(self, before: "ExpertDetail") -> str:
        return (f"expert cache {before.slots} -> {self.slots} experts "
                f"({format_size(before.cache - self.cache)} given back)")

    def line(self, plan: Plan) -> str:
        f = format_size
        sizes = [f(b) for b, _ in self.classes]
        each = f"{sizes[0]} each" if len(sizes) == 1 else f"records of {' / '.join(sizes)} in slots of their size"
        gpu = f", {self.on_gpu} more on the GPU" if self.gpu_experts else ""
        head = (f"expert cache {f(self.cache)}: {self.slots}/{self.n_experts} experts "
                f"({100 * self.cached_fraction:.0f}%, {each}){gpu}; ")
        if self.slots + self.on_gpu >= self.n_experts:
            return head + "each read once, nothing pages"
        return head + (f"the rest pages from flash, {self.prefetch} predicted ({self.predictor}) and read ahead per "
                       f"layer, eviction {self.policy}")


def expert_resident_bytes(store) -> int:
    """Every tensor of a mixture-of-experts store but the experts: as stored; routers and 1-D tensors float32."""
    total = 0
    for name, t in store.tensor_infos.items():
        shape = t["shape"]
        if len(shape) == 1:
            total += 4 * shape[0]
        elif name.endswith("ffn_gate_inp.weight"):
            total += 4 * shape[0] * shape[1]
        else:
            total += shape[0] * quants.FORMATS[t["type"]].row_bytes(shape[-1])
    return total


class Experts:
    name = "experts"
    mixture = True
    empty_at_load = True  # its cache starts empty (the engine folds load slack into the baseline)

    def plan(self, store, budget: int, baseline: int, n_ctx: int, options: Options) -> Plan:
        cfg = store.config
        prefetch = options.prefetch
        if options.predict not in PREDICTORS:
            raise EdgeError(f"--predict {options.predict}: choose one of {', '.join(PREDICTORS)}")
        if options.evict not in POLICIES:
            raise EdgeError(f"--evict {options.evict}: choose one of {', '.join(POLICIES)}")
        if not 0 <= prefetch <= cfg.n_experts:
            raise EdgeError(f"--prefetch {prefetch}: between 0 (on-demand loading) and the {cfg.n_experts} experts "
                            "of a layer")
        sizes = record_sizes(store)

        def alone() -> tuple[bool, int]:
            return True, self.plan(store, budget, baseline, n_ctx, replace(options, gpu="")).detail.slots // \
                cfg.n_layers

        gpu = placement(options, attention_layout(store)[2], KVCache.bytes_for(cfg, n_ctx),
                        int(sizes.max(axis=1).sum()), cfg.n_experts, "experts", alone) if options.gpu else None
        placed = gpu.per_layer if gpu else 0
        d = ExpertDetail(classes=slot_classes(sizes), slots=0, floor=cfg.n_experts_used + prefetch,
                         n_experts=cfg.n_layers * cfg.n_experts, prefetch=prefetch, policy=options.evict,
                         predictor=options.predict, gpu_experts=placed, per_layer=cfg.n_experts)
        resident, kv = ram_parts(gpu, expert_resident_bytes(store), KVCache.bytes_for(cfg, n_ctx))
        least = Plan(strategy=self.name, budget=budget, baseline=baseline, kv=kv,
                     io=IO_BUFFER + read_buffer_bytes(int(sizes.max()), prefetch),
                     resident=resident, margin=MARGIN + activation_bytes(cfg, n_ctx),
                     scratch=0, held=d.cache, least=d.cache_for(d.min_slots), detail=d, gpu=gpu)
        check_minimum(least, n_ctx, "this mixture-of-experts model")
        most = max(d.min_slots, d.n_experts - d.on_gpu)  # experts the device holds are never cached
        slots = last_fitting(d.min_slots, most, lambda s: least.minimum + d.extra_for(s) <= budget)
        cached = replace(d, slots=slots)
        return replace(least, held=cached.cache, detail=cached)

    def io_buffer(self, plan: Plan) -> int:
        return IO_BUFFER  # the store's; the pager's read buffers are its own

    def build(self, store, backend, act, plan: Plan) -> Parts:
        d, cfg = plan.detail, store.config
        routers = [load_router(store, i) for i in range(cfg.n_layers)]
        norms = [load_vector(store, f"blk.{i}.ffn_norm.weight", cfg.dim) for i in range(cfg.n_layers)]
        gpu = plan.gpu
        acc = accelerator(gpu.device) if gpu else None
        pager = ExpertPager(store, backend.ggml, act, d.slots, d.policy, d.prefetch, d.predictor,
                            read_threads=store.engine.threads, routers=routers, norms=norms,
                            device=(acc, d.gpu_experts) if d.gpu_experts else None)
        linears = StoredLinears(store, backend)
        if gpu and gpu.attention:
            linears = DeviceLinears(linears, acc, gpu)
        return Parts(linears, MoEFFN(store, backend, act, pager, routers), DenseEmbedding(store),
                     DenseHead(store, backend), device_kv(acc, cfg) if gpu and gpu.kv else None)
