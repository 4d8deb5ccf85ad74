"""`--gpu`: the hottest weights in a GPU's memory, computed there; the rest where the plan puts it.

A device of ggml's backend registry (edge.ggml.Accelerator: CUDA, Vulkan, Metal, or the CPU's own, which runs
the same path without a GPU) receives, in this order and up to `--gpu-mem`:

1. the attention's projections (q, k, v, output) of every layer, all or none: every token needs each of them;
   with them, on a GPU, the KV cache of the whole context (float16, edge.ggml.DeviceKV: the attention's scores
   are computed there, only new keys and values go in);
2. then FFN weights: under `--ram` (the sparse strategy) the same number of FFN clusters in every layer: with
   predictors (`--sparsity`) the clusters calibration found them to choose most often (`hot` in the store's
   calibration; PowerInfer's hot neurons), at sparsity 0 each layer's first (every cluster is needed at every
   token, so any set is as hot as another); a mixture's experts strategy the same number of experts in every
   layer, its most routed by calibration (EdgeMoE's profile; else its first), computed there when routed and
   never paged; with no budget, whole layers' FFNs, first layers first, then the head when every layer fit.

What is on the device is uploaded once at load and never crosses the bus again; per product only the activations
do (in and out). A layer's FFN clusters on the device compute while the CPU computes the layer's others (two
graphs at once, one per device, rather than one graph split by ggml_backend_sched: every product here runs
whole on one device). Everything else stays as the plan has it: the neuron cache in RAM, the rest read from
flash per token, the norms and rotary embeddings, the embedding, and under `--ram` the head, on the CPU (and the
KV cache where it did not fit, or on the CPU device, where float16 queries would only lose precision).

On unified memory (an integrated GPU, Apple silicon, the CPU device) the device's memory is the system's: what
is placed there counts inside `--ram` (the plan says so), and moving it saves no RAM; on a discrete GPU it leaves
RAM, and the budget's minimum falls by the attention's bytes and the read buffers of clusters that no longer
stream.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge.errors import EdgeError
from edge.sizes import format_size

DEFAULT_SHARE = 0.8  # --gpu without --gpu-mem: this share of the device's memory (its driver needs some)


@dataclass(frozen=True)
class GpuPlan:
    device: str       # as ggml's registry names it (CUDA0, Vulkan0, CPU)
    description: str
    unified: bool     # the device's memory is the system's RAM
    budget: int       # --gpu-mem
    attention: int    # the attention's projections placed there (bytes; 0: none)
    per_layer: int    # FFN clusters (sparse strategy) or experts (experts strategy) per layer placed there
    unit_bytes: int   # one of them in every layer
    ffn_layers: int = 0  # whole layers' FFNs placed there (no budget)
    ffn_bytes: int = 0
    head: int = 0        # the output projection placed there (no budget; bytes)
    kv: int = 0          # the KV cache of the whole context placed there (bytes), and attention computed there
    unit: str = "FFN clusters"  # what per_layer counts

    @property
    def used(self) -> int:
        return self.attention + self.kv + self.per_layer * self.unit_bytes + self.ffn_bytes + self.head

    @property
    def ram(self) -> int:
        """What the placement adds to RAM: all of it on unified memory, nothing on a discrete GPU."""
        return self.used if self.unified else 0

    def short(self) -> str:
        """The chat's one line: the device, its memory in use, what it holds."""
        f = format_size
        held = [what for what, n in (("attention", self.attention), ("KV cache", self.kv),
                                     (f"{self.per_layer} {self.unit.split()[-1]}/layer", self.per_layer),
                                     (f"FFN of {self.ffn_layers} layers", self.ffn_layers), ("head", self.head)) if n]
        return (f"{self.device} {f(self.used)} of {f(self.budget)}" + (" (in RAM)" if self.unified else "")
                + (f": {', '.join(held)}" if held else ""))

    def line(self) -> str:
        f = format_size
        placed = []
        if self.attention:
            placed.append(f"the attention's projections ({f(self.attention)})")
        if self.kv:
            placed.append(f"the KV cache and attention's scores ({f(self.kv)}, float16)")
        if self.per_layer and self.unit == "experts":
            placed.append(f"{self.per_layer} experts per layer ({f(self.per_layer * self.unit_bytes)}, each layer's "
                          "most routed by calibration: computed there when routed, never paged)")
        elif self.per_layer:
            placed.append(f"{self.per_layer} FFN clusters per layer ({f(self.per_layer * self.unit_bytes)}, "
                          "with --sparsity each layer's hottest by calibration: computed there at every token, "
                          "never read from flash)")
        if self.ffn_layers:
            placed.append(f"the FFN of layers 0-{self.ffn_layers - 1} ({f(self.ffn_bytes)})")
        if self.head:
            placed.append(f"the head ({f(self.head)})")
        where = ("unified memory: this is RAM, inside any --ram" if self.unified else
                 "discrete: outside --ram")
        return (f"GPU {self.device} ({self.description}, {where}): {f(self.used)} of --gpu-mem {f(self.budget)}: "
                + ("; ".join(placed) or "nothing fits") + "; norms, " + ("" if self.kv else "KV cache, ")
                + "embedding" + ("" if self.head else " and head") + " on the CPU")


def find_device(name: str) -> tuple[str, str, str, int]:
    """(name, description, kind, memory) of --gpu NAME in ggml's registry; auto: the first GPU, else the first
    integrated GPU. An EdgeError naming what there is when none."""
    from edge.ggml import devices

    have = devices()
    found = [d for d in have if name in ("auto", d[0])]
    if name == "auto":
        found = [d for d in found if d[2] == "GPU"] or [d for d in found if d[2] == "integrated GPU"]
    if not found:
        raise EdgeError(f"--gpu {name}: no such device in this build of llama-cpp-python (it has "
                        f"{', '.join(d[0] for d in have)}); `make gpu` builds it with CUDA, Vulkan or Metal")
    return found[0]


def is_unified(name: str, kind: str, description: str) -> bool:
    """The device's memory is the system's: an integrated GPU (a Jetson's CUDA device, as ggml types it), Apple
    silicon's Metal device (MTL0), the CPU, and Mesa's software Vulkan (llvmpipe, typed as a GPU)."""
    return kind in ("integrated GPU", "CPU") or name.startswith(("MTL", "Metal")) or "llvmpipe" in description


def gpu_budget(options, memory: int) -> int:
    """--gpu-mem, checked against the device's memory; DEFAULT_SHARE of that without it."""
    if options.gpu_mem > memory:
        raise EdgeError(f"--gpu-mem {format_size(options.gpu_mem)} is above the {format_size(memory)} of --gpu "
                        f"{options.gpu}; give at most that")
    return options.gpu_mem if options.gpu_mem else int(DEFAULT_SHARE * memory)


def plan_budgeted(options, attention: int, kv: int, unit_bytes: int, units: int,
                  unit: str = "FFN clusters") -> GpuPlan | None:
    """The placement under a budget: the attention (all layers, if it fits), its KV cache (`kv` bytes, with the
    attention, on a GPU), then as many FFN clusters or experts (`unit`) per layer as the rest holds, of `units`
    a layer has, `unit_bytes` one in every layer. None without --gpu."""
    if not options.gpu:
        return None
    name, desc, kind, memory = find_device(options.gpu)
    budget = gpu_budget(options, memory)
    att, kv = place_attention(kind, budget, attention, kv)
    per_layer = int(min(units, (budget - att - kv) // unit_bytes))
    return GpuPlan(name, desc, is_unified(name, kind, desc), budget, att, per_layer, unit_bytes, kv=kv, unit=unit)


def placement(options, attention: int, kv: int, unit_bytes: int, units: int, unit: str, alone) -> GpuPlan | None:
    """A budgeted strategy's placement (plan_budgeted): a re-plan's is what the first put there
    (Options.gpu_place); on unified memory what the budget would keep without a GPU caps it (`alone()`: the
    (attention kept resident, units per layer cached) of the strategy's plan without --gpu). None without --gpu."""
    gpu = plan_budgeted(options, attention, kv, unit_bytes, units, unit)
    if gpu is None:
        return None
    if options.gpu_place is not None:  # a re-plan: what is on the device stays
        att, per_layer, kv = options.gpu_place
        return replace(gpu, attention=att, per_layer=per_layer, kv=kv)
    if gpu.unified:  # the device's memory is RAM: it takes over what this budget keeps, no more
        keeps_attention, cached = alone()
        gpu = replace(gpu, attention=gpu.attention if keeps_attention else 0, kv=gpu.kv if keeps_attention else 0,
                      per_layer=min(gpu.per_layer, cached))
    return gpu


def ram_parts(gpu: GpuPlan | None, resident: int, kv: int) -> tuple[int, int]:
    """(resident weights, KV cache) in RAM with this placement: the attention and its KV cache leave RAM for a
    discrete GPU; on unified memory everything the device holds is RAM (its KV cache the whole context's, at
    load)."""
    if gpu is None:
        return resident, kv
    resident += gpu.ram - gpu.attention - gpu.kv
    return resident, (gpu.kv if gpu.unified else 0) if gpu.kv else kv


def place_attention(kind: str, budget: int, attention: int, kv: int) -> tuple[int, int]:
    """(attention, KV cache) bytes on the device: the projections if they fit, then the KV cache if it fits too
    and the device is a GPU (on the CPU device the cache would only lose precision: float16 queries)."""
    att = attention if attention <= budget else 0
    return att, kv if att and kind != "CPU" and att + kv <= budget else 0


def plan_resident(options, attention: int, kv: int, ffn_layers: list[int], head: int) -> GpuPlan | None:
    """The placement with no budget: the attention and its KV cache, then whole FFN layers in order while they
    fit, then the head if all of them did and it fits too."""
    if not options.gpu:
        return None
    name, desc, kind, memory = find_device(options.gpu)
    budget = gpu_budget(options, memory)
    att, kv = place_attention(kind, budget, attention, kv)
    room, k = budget - att - kv, 0
    while k < len(ffn_layers) and ffn_layers[k] <= room:
        room -= ffn_layers[k]
        k += 1
    head = head if k == len(ffn_layers) and head <= room else 0
    return GpuPlan(name, desc, is_unified(name, kind, desc), budget, att, 0, 0, k, sum(ffn_layers[:k]), head, kv)


def group_bytes(src, i: int, name: str) -> int:
    """Layer i's linear group `name` (edge.parts.group_shapes) as stored, in bytes."""
    from edge.parts import group_shapes

    return sum(tensor_bytes(src, f"blk.{i}.{n}.weight") for n, _ in group_shapes(src.config, name))


def tensor_bytes(src, name: str) -> int:
    """A 2-D tensor as stored, in bytes."""
    from edge import quants

    if name in getattr(src, "tensor_infos", {}):  # a store's tensor as stored: from its metadata, without reading
        info = src.tensor_info(name)
        return info["shape"][0] * quants.FORMATS[info["type"]].row_bytes(info["shape"][1])
    return src.tensor(name).raw.nbytes  # a GGUF file's (a view of its mapping), a store's FFN (from its bundles)


def resident_placement(src, options, n_ctx: int) -> GpuPlan | None:
    """plan_resident for a model with no budget and no mixture, a context of n_ctx (None without --gpu)."""
    if not options.gpu:
        return None
    if src.config.n_experts:
        raise EdgeError("--gpu with a mixture of experts runs under --ram (its experts paged, the most routed on "
                        "the GPU); give --ram, or drop --gpu")
    layers = range(src.config.n_layers)
    attention = sum(group_bytes(src, i, g) for i in layers for g in ("attn_in", "attn_out"))
    from edge.head import head_name
    from edge.model import KVCache

    ffn = [group_bytes(src, i, "ffn_in") + group_bytes(src, i, "ffn_h") for i in layers]
    return plan_resident(options, attention, KVCache.bytes_for(src.config, n_ctx), ffn,
                         tensor_bytes(src, head_name(src)))


_ACCELERATORS: dict[str, object] = {}


def accelerator(name: str):
    """The process's edge.ggml.Accelerator for this device (one each)."""
    from edge.ggml import Accelerator
    from edge.kernels import default_threads

    if name not in _ACCELERATORS:
        _ACCELERATORS[name] = Accelerator(name, default_threads())
    return _ACCELERATORS[name]
