"""`--strategy bitstack` and `bitstack-stream`: BitStack's variable-size weights (edge.bitstack) under a budget.

bitstack: what is not the stack (baseline, KV cache, I/O buffer, embedding, head and norms, the sign scratch,
margin) plus one block of every linear is the minimum; the rest loads the longest prefix of the universal order
that fits. bitstack-stream: a deeper stack whose FFN is read by clusters of neurons (StackedFFN), the deepest
prefix that keeps at least STREAM_CACHED of the FFN in RAM, then the most clusters that fit at that depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from edge.bitstack import FFN, SCRATCH_BYTES, FfnRecord, Stack, StackedFFN, StackInfo
from edge.errors import EdgeError
from edge.head import budget_ends, budget_ends_bytes
from edge.model import KVCache
from edge.parts import DenseFFN, Parts
from edge.sizes import format_size
from edge.strategies import Options
from edge.strategies.plan import IO_BUFFER, MARGIN, Plan, activation_bytes, check_minimum, last_fitting

STACK_PREFILL_CHUNK = 64  # BitStack prompts: larger steps than PREFILL_CHUNK, each rebuilds every weight once
STREAM_CACHED = 0.5  # bitstack-stream: the deepest stack that keeps at least this share of its FFN in RAM


@dataclass(frozen=True)
class StackDetail:
    base: int             # one block of every linear (bitstack-stream: and the FFN's shared factors, its records)
    prefix: int           # order entries loaded on top of the base
    stack_bytes: int      # all loaded blocks (base included)
    full_bytes: int       # every block of the stack
    entries: int          # length of the order
    params: int           # weights in the stacked linears
    depth_bytes: int = 0  # every block of the loaded depth, in RAM or streamed (0: stack_bytes, all in RAM)
    ffn_slots: int = -1   # bitstack-stream: FFN clusters per layer kept in RAM (the rest read every token)
    n_clusters: int = 0   # bitstack-stream: FFN clusters per layer

    part: ClassVar[str] = "BitStack"

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

    def figures(self) -> dict:
        return {"bits_per_weight": round(self.bits, 3)}

    def labels(self, plan: Plan) -> tuple[str, str, int]:
        return "embedding/head/norms", "sign scratch", plan.scratch

    def summary(self) -> str:
        ffn = f",\nFFN {self.ffn_slots}/{self.n_clusters} clusters cached" if self.streams else ""
        return f"BitStack {self.bits:.2f} bits/weight,\n{self.prefix}/{self.entries} blocks past the base{ffn}"

    def shrunk_from(self, before: "StackDetail") -> str:
        return (f"BitStack {before.bits:.2f} -> {self.bits:.2f} bits per weight "
                f"({format_size(before.stack_bytes - self.stack_bytes)} given back)")

    def line(self, plan: Plan) -> str:
        f = format_size
        if self.streams:
            return (f"BitStack {self.bits:.2f} bits per weight ({self.prefix}/{self.entries} of the order past "
                    f"one block of every linear: {f(self.depth_bytes)}, full depth {f(self.full_bytes)}); "
                    f"{f(self.stack_bytes)} in RAM: the FFN streamed by clusters of neurons, "
                    f"{self.ffn_slots}/{self.n_clusters} per layer cached, the rest read from flash every token")
        return (f"BitStack {f(self.stack_bytes)} loaded ({self.bits:.2f} bits per weight): one block of every "
                f"linear ({f(self.base)}) and {self.prefix}/{self.entries} of the order; full depth "
                f"{f(self.full_bytes)}")


def stack_resident_bytes(store) -> int:
    """Norms and the stack's scales (float32), and the embedding and head (edge.head.budget_ends)."""
    cfg = store.config
    total = budget_ends_bytes(store)
    for t in store.tensor_infos.values():
        if len(t["shape"]) == 1:
            total += 4 * t["shape"][0]  # norms, biases: float32 in RAM
    return total + 4 * cfg.n_layers * (2 * cfg.dim + cfg.q_dim + cfg.hidden_dim)


def stream_bytes(info: StackInfo, m: int, slots: int) -> tuple[int, int]:
    """bitstack-stream at prefix m with `slots` FFN clusters per layer cached: (bytes in RAM: the other linears'
    blocks, the FFN's shared factors and cached records, the largest layer's streamed records; every block of
    the depth)."""
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


class Bitstack:
    name = "bitstack"
    mixture = False
    empty_at_load = False  # its cache is read in at load
    streams = False

    def plan(self, store, budget: int, baseline: int, n_ctx: int, options: Options) -> Plan:
        cfg = store.config
        info = StackInfo.of(store)
        if self.streams and not info.streams_ffn:
            raise EdgeError(f"{store.path}: its stack has no FFN records by clusters (an older `edge stack`, or "
                            f"clusters not a multiple of 32); run `edge stack {store.path}` again for --strategy "
                            "bitstack-stream")
        sizes = info.prefix_bytes()
        largest = max(lin["block_bytes"] for lin in info.linears.values())
        scratch = max(SCRATCH_BYTES, max(lin["rows"] * lin["cols"] // 32 * 18 for lin in info.linears.values()))
        base = stream_bytes(info, 0, 0)[0] if self.streams else info.base_bytes
        n_clusters = cfg.hidden_dim // info.clusters[0] if self.streams else 0

        detail = StackDetail(base=base, prefix=0, stack_bytes=base, full_bytes=int(sizes[-1]), entries=len(info.order),
                             params=info.params(), n_clusters=n_clusters)
        least = Plan(strategy=self.name, budget=budget, baseline=baseline, kv=KVCache.bytes_for(cfg, n_ctx),
                     io=max(IO_BUFFER, 2 * (largest + (64 << 10))),  # the I/O engine reads a whole block at once
                     resident=stack_resident_bytes(store),
                     margin=MARGIN + activation_bytes(cfg, n_ctx, STACK_PREFILL_CHUNK), scratch=scratch,
                     held=base, least=scratch + base, detail=detail, chunk=STACK_PREFILL_CHUNK)
        check_minimum(least, n_ctx, "this stacked model")

        def plan(prefix: int, stack_bytes: int, depth_bytes: int = 0, ffn_slots: int = -1) -> Plan:
            return replace(least, held=stack_bytes, detail=replace(detail, prefix=prefix, stack_bytes=stack_bytes,
                                                                   depth_bytes=depth_bytes, ffn_slots=ffn_slots))

        room = budget - (least.minimum - base)
        if not self.streams:
            prefix = int(np.searchsorted(sizes, room, side="right")) - 1
            return plan(prefix, int(sizes[prefix]))
        half = math.ceil(n_clusters * STREAM_CACHED)
        prefix = last_fitting(0, len(sizes) - 1, lambda m: stream_bytes(info, m, half)[0] <= room)
        slots = last_fitting(0, n_clusters, lambda s: stream_bytes(info, prefix, s)[0] <= room)
        ram, depth = stream_bytes(info, prefix, slots)
        return plan(prefix, ram, depth, slots)

    def io_buffer(self, plan: Plan) -> int:
        return plan.io

    def build(self, store, backend, act, plan: Plan) -> Parts:
        d = plan.detail
        stack = Stack(store, backend.ggml, d.prefix, ffn=not d.streams)
        ffn = StackedFFN(store, backend.ggml, act, stack.info.depths(d.prefix), d.ffn_slots) if d.streams \
            else DenseFFN(stack, store.config.n_layers, act)
        embed, head = budget_ends(store, backend)
        return Parts(stack, ffn, embed, head)


class BitstackStream(Bitstack):
    name = "bitstack-stream"
    streams = True
