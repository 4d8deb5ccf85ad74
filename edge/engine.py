"""The one token generator: prompt in, tokens out, each with its stats. Feeds the CLI, the TUI and `bench`.

`Engine.generate` yields `TokenEvent`s and keeps the KV cache of what it has seen (a chat's next prompt reuses
the common prefix); `Engine.stats()` is what the chat and the CLI show. Under a budget the engine plans with
its strategy (edge.strategies), builds the model's parts from the plan, re-plans on `resize` and under memory
pressure, and the parts follow.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edge import flash, strategies
from edge.errors import EdgeError
from edge.flash import IOEngine
from edge.gguf_file import GGUFFile
from edge.kernels import make_backend
from edge.memory import Meter, PressureWatch, release_free_memory
from edge.model import KVCache, Transformer
from edge.models import resolve_model
from edge.offload import accelerator, find_device, resident_placement
from edge.parts import ACTIVATIONS, resident_parts
from edge.profile import load as load_profile
from edge.sampling import Sampler, SamplerConfig
from edge.store import Store
from edge.strategies import Options
from edge.sizes import format_size
from edge.strategies.plan import IO_BUFFER, Plan, fit_context, fixed_choices, plan_context
from edge.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenEvent:
    token: int
    text: str                # printable text this token completes (may be empty mid-character)
    seconds: float           # wall time of this step
    flash_read_bytes: int    # bytes read from flash during this step (Engine.read_bytes)
    resident_bytes: int      # process RSS after this step
    position: int            # the token's position in the context


@dataclass
class RunStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0   # prompt tokens whose keys/values were already cached
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    tokens: list[int] = field(default_factory=list)
    flash_read_bytes: int = 0  # prefill and decode
    decode_read_bytes: int = 0  # over the decode window (see Engine._decode)
    peak_rss_bytes: int = 0
    stopped: str = ""        # "eog", "length", "context" or "cancelled"
    shrinks: list[str] = field(default_factory=list)  # cache given back under memory pressure
    decode_wait_seconds: float = 0.0   # decode time spent waiting for reads (the rest computed)
    decode_flash_model_seconds: float = 0.0  # decode reads timed on the emulated device's curve (--device)
    decode_counters: dict = field(default_factory=dict)  # over the decode: Engine.counters()' differences

    def profile(self) -> dict[str, float]:
        """Milliseconds per decoded token by part: the FFN's compute and its wait for reads, attention, the head
        and the embedding (their row reads included, `row reads` apart), and the rest (sampling, the loop)."""
        n, p = len(self.tokens) - 1, self.decode_counters
        if n <= 0 or not p:
            return {}
        parts = {"ffn compute": p["ffn"] - p["ffn_read_wait"], "ffn read wait": p["ffn_read_wait"],
                 "attention": p["attention"], "head": p["head"], "embedding": p["embedding"]}
        parts["other"] = self.decode_seconds - sum(parts.values())
        parts["row reads (in head, embedding)"] = p["row_read_wait"]
        return {k: round(1e3 * v / n, 3) for k, v in parts.items()}

    def ffn_reads(self) -> dict[str, float]:
        """The FFN's reads over the decode: bytes per token, mean read size, and the bandwidth they ran at
        (bytes over the time the reading threads spent in them: read ahead or waited for)."""
        n, p = len(self.tokens) - 1, self.decode_counters
        if n <= 0 or not p.get("ffn_reads"):
            return {}
        return {"bytes_per_token": p["ffn_read_bytes"] // n, "mean_read_bytes": p["ffn_read_bytes"] // p["ffn_reads"],
                "bytes_per_second": round(p["ffn_read_bytes"] / max(p["ffn_read_seconds"], 1e-9))}

    @property
    def prefill_tok_s(self) -> float:
        computed = self.prompt_tokens - self.reused_tokens
        return computed / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def tok_s(self) -> float:
        """Decode speed: tokens after the first (the first one's logits come from the prefill)."""
        n = len(self.tokens) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


PRESSURE_EVERY = 8  # tokens between memory-pressure checks under a budget
DEFAULT_CTX = 4096  # tokens of context when --ctx is not given (at most the model's own; see Engine)


@dataclass(frozen=True)
class EngineStats:
    """What the chat and the CLI show of a loaded model and its last run: typed, never the model's insides."""

    backend: str                 # compute kernels (kernels.BACKENDS)
    threads: int | None
    weights_bytes: int           # resident weights the backend holds
    kv_bytes: int                # the KV cache's positions in use (its memory is taken as they are written)
    plan: Plan | None            # the budget's plan (None: everything resident)
    run: RunStats                # the last run
    cache_kind: str              # what the budget's cache holds: "FFN clusters", "experts", "" (none)
    cache: dict | None           # its counters over the last run (None: nothing paged)
    head: dict                   # the flash head's row cache (empty when the head is resident)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "threads": self.threads,
                "plan": self.plan.as_dict() if self.plan else None, "cache_kind": self.cache_kind,
                "cache": self.cache, "head": self.head}


def open_tokenizer(src) -> Tokenizer:
    return Tokenizer(src.tokenizer_path, src.config.arch, src.chat_template)


def plan_budget(src, ram: int, n_ctx: int | None, options: Options, meter: Meter) -> tuple:
    """(strategy, plan, tokenizer, note) for a budget: the tokenizer opened first (its vocabulary is part of the
    fixed part the plan measures), the temporaries of reading it given back, --gpu's device started, then the
    baseline measured. One
    measurement for `edge run`, `chat` and `info`: the same inputs give the same minimum and plan. n_ctx None:
    the largest context up to DEFAULT_CTX (and the model's own) the budget holds (`plan.context`); `note` says
    so when that is less (else None)."""
    tokenizer = open_tokenizer(src)
    release_free_memory()
    strategy = strategies.resolve(src, options.strategy)
    if options.gpu:
        if strategy.name not in ("sparse", "experts"):
            raise EdgeError(f"--gpu under --ram runs --strategy sparse or experts (this store runs "
                            f"{strategy.name}); drop --gpu, or --ram to run it resident")
        accelerator(find_device(options.gpu)[0])  # its driver's memory in RAM (a CUDA context's) is baseline
    baseline = meter.baseline()
    note = None
    if n_ctx is None:
        ceiling = min(DEFAULT_CTX, src.config.context_length)
        n_ctx, needs = fit_context(strategy, src, ram, baseline, ceiling, options)
        if n_ctx < ceiling:
            note = (f"context {n_ctx} tokens: what --ram {format_size(ram)} holds beside the model (--ctx {ceiling} "
                    f"needs --ram {format_size(needs)})")
    return strategy, plan_context(strategy, src, ram, baseline, n_ctx, 0, options), tokenizer, note


class Engine:
    """A model ready to generate: weights, KV cache, tokenizer; one conversation's cache state."""

    def __init__(self, model: str | Path | None = None, n_ctx: int | None = None, backend: str = "auto",
                 threads: int | None = None, verify: str = "first", ram: int | None = None,
                 options: Options = Options(), device: str | None = None, emulate: bool = False):
        """n_ctx: the context in tokens (at most the model's trained context); None: DEFAULT_CTX, under a budget
        the largest up to it the budget holds. ram: a budget in bytes for the whole process (a store; see
        edge.strategies), run by the strategy `options` names. device: a device profile's name (edge.profile):
        its compute and read threads; with emulate, reads take the time its flash curve gives (compute runs at
        this machine's speed)."""
        self.path = resolve_model(model, store=ram is not None)
        self.meter = Meter()
        self.plan: Plan | None = None
        self.options = options  # what every re-plan (resize) keeps
        self.device = load_profile(device) if device else None
        if emulate and self.device is None:
            raise EdgeError("--emulate needs --device NAME: the device whose flash to emulate")
        if self.device is not None:
            threads = threads or self.device.threads
        # with a device, every read's time on its flash curve is counted (and slept, with emulate)
        flash.emulate(self.device.flash if self.device else None, sleep=emulate)
        self.emulating = emulate
        read_threads = self.device.read_threads if self.device else 4
        self._lock = threading.Lock()  # one forward step or one resize at a time
        if ram is not None and not self.path.is_dir():
            raise EdgeError(f"{self.path}: --ram runs from a store; run `edge convert {self.path}` (with --calibrate "
                            "the head leaves RAM too) and give the .edge directory")
        io = IOEngine(threads=read_threads, buffer_bytes=IO_BUFFER) if ram is not None else None
        self.file = Store(self.path, engine=io, verify=verify) if self.path.is_dir() else GGUFFile(self.path)
        self.config = self.file.config
        if n_ctx is not None and n_ctx < 16:
            raise EdgeError(f"--ctx {n_ctx}: the context must hold at least 16 tokens")
        trained = self.config.context_length
        self.n_ctx = min(n_ctx or DEFAULT_CTX, trained)
        self.warnings: list[str] = []  # what the caller should tell the user (the CLI prints them)
        if n_ctx is not None and n_ctx > trained:
            self.warnings.append(f"--ctx {n_ctx} is above the model's trained context of {trained} tokens; "
                                 f"using {trained}")

        self.pressure = PressureWatch()
        self.gpu = None  # --gpu's placement (edge.offload.GpuPlan); under a budget, the plan's
        if ram is None:
            self.strategy = None
            self.gpu = resident_placement(self.file, options, self.n_ctx)
            parts = None
            if self.gpu is not None:
                if backend not in ("auto", "ggml"):
                    raise EdgeError(f"--gpu computes with ggml's kernels; drop --backend {backend}")
                backend = make_backend("ggml", threads)
                parts = resident_parts(self.file, backend, ACTIVATIONS[self.config.activation], self.gpu,
                                       accelerator(self.gpu.device))
            self.model = Transformer(self.file, self.n_ctx, backend=backend, threads=threads, parts=parts)
            self.tokenizer = open_tokenizer(self.file)  # after the model: its checks name a bad tensor first
        else:
            self.strategy, self.plan, self.tokenizer, note = plan_budget(self.file, ram, n_ctx and self.n_ctx,
                                                                         options, self.meter)
            self.n_ctx = self.plan.context
            self.options = fixed_choices(options, self.plan)  # a re-plan keeps what this one chose
            self.warnings += [note] if note else []
            size = self.strategy.io_buffer(self.plan)
            if size != len(io.buffer):  # BitStack: blocks over half the buffer; a streamed FFN: its largest chunk
                io.close()
                self.file.engine = IOEngine(threads=read_threads, buffer_bytes=size)
            self.gpu = self.plan.gpu
            self.model = strategies.load(self.file, self.n_ctx, self.plan, threads)
            if self.strategy.empty_at_load:
                self._fold_load_slack()
        self.cached: list[int] = []   # tokens whose keys and values are in the KV cache, in order
        self.last = RunStats()

    def _hold_context(self, tokens: int) -> None:
        """Under a budget, a conversation grown past the positions its KV cache is planned for: re-planned for
        more (the cache gives the room; the minimum held the whole context from the start). Written positions
        keep their pages, so the plan never goes back to fewer."""
        p = self.plan
        if p is None or tokens <= p.kv_tokens:
            return
        plan = self.resize(p.budget, tokens=tokens)
        if plan.cache < p.cache:
            self.last.shrinks.append(f"the conversation reached {tokens} tokens, KV cache planned for "
                                     f"{plan.kv_tokens}: {plan.shrunk_from(p)}")

    def _fold_load_slack(self) -> None:
        """What loading left beyond the resident weights (allocator slack, libraries mapped on first use) is
        measured now and counted as baseline while the cache is still empty (the expert cache shrinks by it;
        caches read in at load leave theirs to the growth check between tokens)."""
        slack = self.meter.committed() - (self.plan.baseline + self.plan.resident)
        if slack > 0:
            self.resize(self.plan.budget, baseline=self.plan.baseline + slack)

    def _fold_growth(self) -> None:
        """The process grown past its plan while running (a chat's widgets and history, allocator slack; the
        plan measured the baseline once, at start): when what the process holds beyond the cap's reach
        (Meter.committed: library pages the kernel may drop do not count) comes within an eighth of the margin
        of the budget, enough of the cache to bring it back to a quarter of the margin under the budget becomes
        baseline; the budget stays. At the minimum there is nothing more to give."""
        p = self.plan
        rss = self.meter.committed()
        if rss <= p.budget - p.margin // 8:
            return
        planned = sum(p.parts().values())  # at most the budget (less where the cache is whole)
        grown = min(rss - (planned - p.margin // 4), p.budget - p.minimum)
        if grown <= 0:
            return
        self.resize(p.budget, baseline=p.baseline + grown)
        if self.plan.cache < p.cache:
            self.last.shrinks.append(f"memory grew past the plan: {self.plan.shrunk_from(p)}")

    @property
    def name(self) -> str:
        return self.file.metadata.get("general.name") or self.path.stem

    def _prefill(self, tokens: list[int]) -> tuple[np.ndarray, int]:
        """Bring the cache to `tokens` (reusing the common prefix) and return the last token's logits."""
        reuse = 0
        for a, b in zip(self.cached, tokens[:-1]):  # always recompute at least the last token
            if a != b:
                break
            reuse += 1
        self.cached = self.cached[:reuse]
        self._hold_context(len(tokens))
        with self._lock:
            logits = self.model.forward(np.asarray(tokens[reuse:]), reuse)
        self.cached = list(tokens)
        return logits, reuse

    def generate(self, prompt: list[int], max_tokens: int = 256, sampler: Sampler | None = None,
                 stop_at_end: bool = True) -> Iterator[TokenEvent]:
        """Yield sampled tokens one by one. Stats of the whole run are in `self.last` as they accumulate."""
        if not prompt:
            raise EdgeError("the prompt is empty; give some text with -p")
        if len(prompt) >= self.n_ctx:
            raise EdgeError(f"the prompt is {len(prompt)} tokens but the context holds {self.n_ctx}; "
                            "shorten it or raise --ctx")
        sampler = sampler or Sampler(SamplerConfig())
        stats = self.last = RunStats(prompt_tokens=len(prompt))
        self.model.parts.ffn.reset()
        stream = self.tokenizer.streamer()
        io0 = self.read_bytes()
        t0 = time.perf_counter()
        logits, stats.reused_tokens = self._prefill(prompt)
        stats.prefill_seconds = time.perf_counter() - t0
        history = list(prompt)
        counters0 = self.counters()
        try:
            yield from self._decode(logits, history, max_tokens, sampler, stop_at_end, stream)
        finally:
            stats.stopped = stats.stopped or "cancelled"
            d = stats.decode_counters = {k: v - counters0[k] for k, v in self.counters().items()}
            stats.decode_wait_seconds = d["ffn_read_wait"] + d["row_read_wait"]
            stats.decode_flash_model_seconds = d["flash_model"]
            stats.flash_read_bytes = self.read_bytes() - io0
            stats.peak_rss_bytes = self.meter.peak_rss

    def _decode(self, logits, history, max_tokens, sampler, stop_at_end, stream) -> Iterator[TokenEvent]:
        """decode_seconds and decode_read_bytes run from the first token sampled (its logits came from the
        prefill) to the last: forward steps and sampling, as a native peer's decode window counts."""
        stats = self.last
        if max_tokens <= 0:
            stats.stopped = "length"
            return
        step_start, io_start = time.perf_counter(), self.read_bytes()
        first = None
        for _ in range(max_tokens):
            token = sampler(logits, history)
            history.append(token)
            stats.tokens.append(token)
            if first is None:
                first = time.perf_counter(), self.read_bytes()
            else:
                stats.decode_seconds = time.perf_counter() - first[0]
                stats.decode_read_bytes = self.read_bytes() - first[1]
            if stop_at_end and self.tokenizer.is_end(token):
                stats.stopped = "eog"
                break
            io_now = self.read_bytes()
            yield TokenEvent(token, stream.push(token), time.perf_counter() - step_start, io_now - io_start,
                             self.meter.rss(), len(self.cached))
            if len(stats.tokens) >= max_tokens:
                stats.stopped = "length"
                break
            if len(self.cached) >= self.n_ctx:
                stats.stopped = "context"
                break
            if self.plan is not None and len(stats.tokens) % PRESSURE_EVERY == 0:
                self.relieve_pressure()
            step_start, io_start = time.perf_counter(), io_now
            self._hold_context(len(self.cached) + 1)
            with self._lock:
                logits = self.model.forward(np.asarray([token]), len(self.cached))
            self.cached.append(token)
        tail = stream.flush()
        if tail:
            yield TokenEvent(-1, tail, 0.0, 0, self.meter.rss(), len(self.cached))

    def read_totals(self) -> tuple[int, int]:
        """(reads, bytes) from flash so far, over every I/O engine of this model (the chat's MB/s, reads/s)."""
        engines = self.model.parts.ffn.engines + ([self.file.engine] if self.plan is not None else [])
        return sum(e.stats.reads for e in engines), sum(e.stats.bytes for e in engines)

    def read_bytes(self) -> int:
        """Bytes read from flash so far by this model's I/O engines (counted by edge itself, on every platform)."""
        return self.read_totals()[1]

    def counters(self) -> dict[str, float]:
        """So far: seconds in each part of the model (edge.model.PROFILED); the compute thread's waits for reads,
        the FFN's and the store's row reads (embedding, head candidates: the store's engine reads them on the
        compute thread; 0 without a budget, where nothing is read while decoding); the FFN engines' reads, bytes
        and seconds in reading; the modelled seconds of every read on the emulated device's curve."""
        ffn = [e.stats for e in self.model.parts.ffn.engines]
        emu = flash.emulation()
        return {**self.model.seconds, "ffn_read_wait": self.model.parts.ffn.wait_seconds,
                "row_read_wait": self.file.engine.stats.wall if self.plan is not None else 0.0,
                "ffn_reads": sum(s.reads for s in ffn), "ffn_read_bytes": sum(s.bytes for s in ffn),
                "ffn_read_seconds": sum(s.wall for s in ffn), "flash_model": emu.seconds if emu else 0.0}

    def resize(self, budget: int, baseline: int | None = None, tokens: int | None = None) -> Plan:
        """Re-plan for a new budget while the model is loaded (between tokens, also mid-answer), and let the
        parts follow: a neuron cache grows (at sparsity 0 the added clusters are read now; with predictors the
        next tokens fill the new slots) or shrinks (the least recently used go), a stack reads or drops blocks,
        an expert cache adds or frees slots. Below the minimum: EdgeError, nothing changes. baseline: a new
        measure of the process without weights (load slack folded in). tokens: context positions to plan the KV
        cache for (default: as planned)."""
        if self.plan is None:
            raise EdgeError("this model runs without a budget (everything resident); start it with --ram to "
                            "change the budget live")
        p = self.plan
        plan = plan_context(self.strategy, self.file, budget, p.baseline if baseline is None else baseline,
                            self.n_ctx, tokens or p.kv_tokens, self.options)
        with self._lock:
            self.model.parts.resize(plan)
            release_free_memory()
            self.plan = plan
        return self.plan

    def relieve_pressure(self) -> None:
        """Shrink the cache when memory is short from outside (re-plan at the lowered limit, or at what the plan
        holds less what the system lacks; at least at the minimum), or when the process has grown past its
        plan, and keep going."""
        p = self.plan
        target = self.pressure.target(p.budget, min(p.budget, sum(p.parts().values())))
        if target is None:
            self._fold_growth()
            return
        try:
            self.resize(target)  # under the budget (edge.memory.PressureWatch.target)
        except EdgeError:
            self.resize(p.minimum)
        if self.plan.cache < p.cache:  # else the plan had room under the lower limit, or nothing more to give
            self.last.shrinks.append(f"memory pressure: {self.plan.shrunk_from(p)}")

    def stats(self) -> EngineStats:
        """The model and its last run, as the chat and the CLI show them."""
        ffn = self.model.parts.ffn
        return EngineStats(backend=self.model.backend.name, threads=getattr(self.model.backend, "threads", None),
                           weights_bytes=self.model.backend.resident_bytes,
                           kv_bytes=KVCache.bytes_for(self.config, len(self.cached)),
                           plan=self.plan, run=self.last, cache_kind=ffn.kind,
                           cache=ffn.stats(len(self.last.tokens)), head=self.model.parts.head.stats())

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages)
