"""One plan shape for every strategy: a `--ram` budget for the whole process split into what stays and what
streams.

budget = baseline (interpreter, libraries, tokenizer: measured) + KV cache (for the context) + I/O buffer
         + resident weights + scratch (read buffers, sign scratch) + margin (activations, temporaries)
         + held (what grows with the budget: a neuron cache, BitStack blocks, an expert cache).

The minimum is that with the least a strategy can run with (`least`: its scratch and held part at their smallest)
and the whole context's KV cache; below it the run is refused with that figure. The KV cache and the activations are
planned for the positions in use (`plan_context`: in steps of KV_STEP), so while a conversation is short the cache
holds what the rest of the context will take; the engine re-plans as the conversation grows. What differs by
strategy is in the plan's `detail` (its own frozen dataclass), which also words the plan for the user."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

from edge.errors import EdgeError
from edge.ggml import GRAPH_CACHE, GRAPH_ROWS
from edge.model import PREFILL_CHUNK
from edge.sizes import format_size
from edge.sparse import REPEAT_BYTES

MARGIN = 8 << 20        # read copies, allocator slack, kernels' work buffers (plus the activations, by model)
IO_BUFFER = 4 << 20     # the I/O engine's preallocated read buffer under a budget


@dataclass(frozen=True)
class Plan:
    strategy: str
    budget: int
    baseline: int
    kv: int
    io: int
    resident: int         # weights kept as they are: attention, norms, predictors, a low-rank head ...
    margin: int
    scratch: int          # buffers beside the I/O engine's: read buffers of streamed parts, sign scratch
    held: int             # the part that follows the budget (detail.part names it)
    least: int            # scratch + held at the minimum
    detail: object        # the strategy's own figures (a frozen dataclass with `part`, `cache`, lines)
    chunk: int = PREFILL_CHUNK  # prompt positions per forward step (activations scale with it)
    context: int = 0        # the context in tokens (plan_context; 0: a strategy's own plan for kv's tokens)
    kv_tokens: int = 0      # the positions `kv` and the activations are planned for (fewer: the rest grows)
    whole_minimum: int = 0  # the minimum with the whole context's KV cache, when planned for fewer positions
    gpu: object = None      # --gpu's placement (edge.offload.GpuPlan), the sparse strategy's; None: no GPU

    @property
    def minimum(self) -> int:
        """The smallest budget that runs the whole context: everything fixed, and the least the strategy runs
        with."""
        return max(self.whole_minimum, self.baseline + self.kv + self.io + self.resident + self.margin + self.least)

    @property
    def cache(self) -> int:
        """What a smaller budget can take back."""
        return self.detail.cache

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("detail", "gpu")}
        d["gpu"] = asdict(self.gpu) if self.gpu else None
        d.update(asdict(self.detail), minimum=self.minimum, cache=self.cache, **self.detail.figures())
        return d

    def parts(self) -> dict[str, int]:
        """The budget by part, as the chat UI's bar draws it."""
        return {"baseline": self.baseline, "KV cache": self.kv, "weights": self.resident,
                "buffers": self.io + self.scratch + self.margin, self.detail.part: self.held}

    def summary(self) -> str:
        return self.detail.summary()

    def shrunk_from(self, before: "Plan") -> str:
        return self.detail.shrunk_from(before.detail)

    def lines(self) -> list[str]:
        f = format_size
        resident, scratch, shown = self.detail.labels(self)
        kv = f" for {self.kv_tokens} of {self.context} tokens" if 0 < self.kv_tokens < self.context else ""
        return [f"budget {f(self.budget)}: baseline {f(self.baseline)}, KV cache {f(self.kv)}{kv}, I/O buffer "
                f"{f(self.io)}, {resident} {f(self.resident)}, {scratch} {f(shown)}, margin {f(self.margin)}",
                self.detail.line(self)] + ([self.gpu.line()] if self.gpu else [])


KV_STEP = 256  # the KV cache is planned for the positions in use, rounded up to this


class BelowMinimum(EdgeError):
    """A budget below a plan's minimum (`minimum`: the smallest that runs)."""

    def __init__(self, minimum: int, message: str):
        super().__init__(message)
        self.minimum = minimum


def plan_context(strategy, src, budget: int, baseline: int, n_ctx: int, used: int, options) -> Plan:
    """`strategy`'s plan for a context of n_ctx tokens of which `used` are in use: refused below the whole
    context's minimum; the KV cache and activations for `used` rounded up to KV_STEP, the rest of the budget the
    strategy's (held)."""
    whole = strategy.plan(src, budget, baseline, n_ctx, options)
    tokens = min(n_ctx, max(KV_STEP, -(-used // KV_STEP) * KV_STEP))
    if tokens >= n_ctx:
        return replace(whole, context=n_ctx, kv_tokens=n_ctx)
    now = strategy.plan(src, budget, baseline, tokens, fixed_choices(options, whole))
    return replace(now, context=n_ctx, kv_tokens=tokens, whole_minimum=whole.minimum)


def fixed_choices(options, plan: Plan):
    """`options` with what `plan` chose for them (the attention and the head streamed or resident, what went to
    the GPU), so that later plans for the same run choose the same."""
    fixed = {part: "stream" if getattr(plan.detail, part) else "resident" for part in ("attention", "head")
             if hasattr(plan.detail, part) and getattr(options, part) == "auto"}
    if plan.gpu is not None and options.gpu_place is None:  # what went to the device at load stays there
        fixed["gpu_place"] = (plan.gpu.attention, plan.gpu.per_layer, plan.gpu.kv)
    return replace(options, **fixed) if fixed else options


def fit_context(strategy, src, budget: int, baseline: int, ceiling: int, options) -> tuple[int, int]:
    """(the largest context up to `ceiling`, in steps of KV_STEP, whose minimum the budget holds (at least
    KV_STEP, or the ceiling when below: its plan refuses with that minimum), the minimum for the ceiling)."""
    def minimum(n_ctx: int) -> int:
        try:
            strategy.plan(src, 0, baseline, n_ctx, options)
        except BelowMinimum as exc:
            return exc.minimum
        return 0

    top = minimum(ceiling)
    if top <= budget or ceiling <= KV_STEP:
        return ceiling, top
    return min(ceiling, KV_STEP * last_fitting(1, ceiling // KV_STEP, lambda k: minimum(k * KV_STEP) <= budget)), top


def check_minimum(plan: Plan, n_ctx: int, what: str = "this model") -> None:
    """An EdgeError naming the minimum when the budget is below it."""
    if plan.budget < plan.minimum:
        raise BelowMinimum(plan.minimum, f"--ram {format_size(plan.budget)} is below the minimum of "
                           f"{format_size(plan.minimum)} for {what} with a context of {n_ctx} tokens; raise --ram "
                           "or lower --ctx")


def last_fitting(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """The largest k in lo..hi with fits(k), fits monotone (true up to some k, then false); lo when none."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def activation_bytes(cfg, n_ctx: int, chunk: int = PREFILL_CHUNK) -> int:
    """The temporaries of one prefill chunk: attention scores, the FFN's intermediates, copies of the hidden
    state (and the repeated inputs of batched products of streamed records: every plan holds room for them);
    and ggml's kept decode graphs."""
    return chunk * (cfg.n_heads * n_ctx + 6 * cfg.hidden_dim + 8 * cfg.dim) * 4 + REPEAT_BYTES + GRAPH_CACHE \
        + 8 * GRAPH_ROWS
