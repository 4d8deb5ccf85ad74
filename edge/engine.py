"""The one token generator: prompt in, tokens out, each with its stats. Feeds the CLI, the TUI and `bench`.

Layered as step -> stream -> whole: `Engine.generate` yields `TokenEvent`s; `Engine.chat` keeps a
conversation and reuses the KV cache for the part of the chat already seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edge import flash
from edge.errors import EdgeError
from edge.flash import IOEngine
from edge.sampling import Sampler, SamplerConfig


@dataclass(frozen=True)
class TokenEvent:
    token: int
    text: str                # printable text this token completes (may be empty mid-character)
    seconds: float           # wall time of this step
    flash_read_bytes: int    # bytes the process read from storage during this step
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


class _Meter:
    """Storage bytes read and RSS of this process (psutil), sampled per step."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self._has_io = hasattr(self._proc, "io_counters")
        self.peak_rss = 0

    def read_bytes(self) -> int:
        return self._proc.io_counters().read_bytes if self._has_io else 0

    def rss(self) -> int:
        r = self._proc.memory_info().rss
        self.peak_rss = max(self.peak_rss, r)
        return r


class Engine:
    """A model ready to generate: weights, KV cache, tokenizer; one conversation's cache state."""

    def __init__(self, model: str | Path | None = None, n_ctx: int = 2048, backend: str = "auto",
                 threads: int | None = None, verify: str = "first", ram: int | None = None,
                 strategy: str = "auto", sparsity: float = 0.0, window: int = 5, device: str | None = None,
                 emulate: bool = False, prefetch: int = 0, evict: str = "score", predict: str = "pregate"):
        """ram: a budget in bytes for the whole process (a calibrated store; see edge.budget).
        device: a device profile's name (edge.profile): its compute and read threads; with emulate, reads
        take the time its flash curve gives (compute runs at this machine's speed)."""
        import threading

        from edge.profile import load
        from edge.gguf_file import GGUFFile
        from edge.model import Transformer
        from edge.models import resolve_model
        from edge.store import Store
        from edge.tokenizer import Tokenizer

        self.path = resolve_model(model, store=ram is not None)
        self.meter = _Meter()
        self.plan = None
        # what every re-plan (resize) keeps
        self._plan_options = dict(sparsity=sparsity, window=window, prefetch=prefetch, evict=evict,
                                   predict=predict)
        self.device = load(device) if device else None
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
            raise EdgeError(f"{self.path}: --ram runs from a store; run `edge convert {self.path} --calibrate` (a "
                            "mixture of experts needs no --calibrate) and give the .edge directory")
        io = None
        if ram is not None:
            from edge.budget import IO_BUFFER

            io = IOEngine(threads=read_threads, buffer_bytes=IO_BUFFER)
        self.file = Store(self.path, engine=io, verify=verify) if self.path.is_dir() else GGUFFile(self.path)
        self.config = self.file.config
        if n_ctx < 16:
            raise EdgeError(f"--ctx {n_ctx}: the context must hold at least 16 tokens")
        self.n_ctx = min(n_ctx, self.config.context_length)
        def tokenizer() -> Tokenizer:
            return Tokenizer(getattr(self.file, "tokenizer_path", self.path), self.config.arch,
                             self.file.chat_template)

        if ram is not None:
            self.tokenizer = tokenizer()  # part of the baseline the planner measures
            from edge.budget import PressureWatch, plan_for
            from edge.model import release_free_memory

            release_free_memory()  # reading the vocabulary's temporaries are not baseline

            self.plan = plan_for(self.file, resolve_strategy(self.file, strategy), ram, self.meter.rss(), self.n_ctx,
                                 **self._plan_options)
            streamed = ("bitstack", "bitstack-stream", "sparse", "naive")
            if self.plan.strategy in streamed and self.plan.io != len(io.buffer):
                io.close()  # BitStack: blocks over half the buffer; a streamed FFN: its largest chunk
                self.file.engine = IOEngine(threads=read_threads, buffer_bytes=self.plan.io)
            self.pressure = PressureWatch(self.plan)
        self.model = Transformer(self.file, self.n_ctx, backend=backend, threads=threads, plan=self.plan)
        if self.plan is not None and self.plan.strategy == "experts":
            self._fold_load_slack()
        if ram is None:
            self.tokenizer = tokenizer()  # after the model: its checks name a bad tensor, llama.cpp's do not
        self.cached: list[int] = []   # tokens whose keys and values are in the KV cache, in order
        self.last = RunStats()

    def _fold_load_slack(self) -> None:
        """What loading left beyond the resident weights (allocator slack, libraries mapped on first use) is
        measured now and counted as baseline: the expert cache, still empty, shrinks by it."""
        slack = self.meter.rss() - (self.plan.baseline + self.plan.resident)
        if slack > 0:
            self.resize(self.plan.budget, baseline=self.plan.baseline + slack)

    def _fold_growth(self) -> None:
        """The process grown past its plan while running (a chat's widgets and history, allocator slack; the
        plan measured the baseline once, at start): when resident memory comes within an eighth of the margin
        of the budget, enough of the cache to bring it back to a quarter of the margin under the budget becomes
        baseline; the budget stays. At the minimum there is nothing more to give."""
        p = self.plan
        rss = self.meter.rss()
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
        for part in self.model.paged:
            part.stats.reset()
        stream = self.tokenizer.streamer()
        io0 = self.meter.read_bytes()
        t0 = time.perf_counter()
        logits, stats.reused_tokens = self._prefill(prompt)
        stats.prefill_seconds = time.perf_counter() - t0
        history = list(prompt)
        wait0, model0 = self.io_seconds()
        try:
            yield from self._decode(logits, history, max_tokens, sampler, stop_at_end, stream)
        finally:
            stats.stopped = stats.stopped or "cancelled"
            wait1, model1 = self.io_seconds()
            stats.decode_wait_seconds, stats.decode_flash_model_seconds = wait1 - wait0, model1 - model0
            stats.flash_read_bytes = self.meter.read_bytes() - io0
            stats.peak_rss_bytes = self.meter.peak_rss

    def _decode(self, logits, history, max_tokens, sampler, stop_at_end, stream) -> Iterator[TokenEvent]:
        """decode_seconds and decode_read_bytes run from the first token sampled (its logits came from the
        prefill) to the last: forward steps and sampling, as a native peer's decode window counts."""
        stats = self.last
        step_start, io_start = time.perf_counter(), self.meter.read_bytes()
        first = None
        for _ in range(max_tokens):
            token = sampler(logits, history)
            history.append(token)
            stats.tokens.append(token)
            if first is None:
                first = time.perf_counter(), self.meter.read_bytes()
            else:
                stats.decode_seconds = time.perf_counter() - first[0]
                stats.decode_read_bytes = self.meter.read_bytes() - first[1]
            if stop_at_end and self.tokenizer.is_end(token):
                stats.stopped = "eog"
                break
            io_now = self.meter.read_bytes()
            yield TokenEvent(token, stream.push(token), time.perf_counter() - step_start, io_now - io_start,
                             self.meter.rss(), len(self.cached))
            if len(stats.tokens) >= max_tokens:
                stats.stopped = "length"
                break
            if len(self.cached) >= self.n_ctx:
                stats.stopped = "context"
                break
            if self.plan is not None and len(stats.tokens) % PRESSURE_EVERY == 0:
                self._relieve_pressure()
            step_start, io_start = time.perf_counter(), io_now
            with self._lock:
                logits = self.model.forward(np.asarray([token]), len(self.cached))
            self.cached.append(token)
        tail = stream.flush()
        if tail:
            yield TokenEvent(-1, tail, 0.0, 0, self.meter.rss(), len(self.cached))

    def read_totals(self) -> tuple[int, int]:
        """(reads, bytes) from flash so far, over every I/O engine of this model (the chat's MB/s, reads/s)."""
        engines = [self.file.engine] if hasattr(self.file, "engine") else []
        for part in self.model.paged:
            engines += part.engines
        return sum(e.stats.reads for e in engines), sum(e.stats.bytes for e in engines)

    def io_seconds(self) -> tuple[float, float]:
        """(seconds the compute thread has waited for reads, modelled seconds of every read on the device's
        curve) since start; the first is 0 without a budget (nothing is read while decoding). The store's
        engine does the row reads (embedding, head candidates) on the compute thread."""
        parts = self.model.paged
        wait = self.file.engine.stats.wall + sum(p.stats.wait_seconds for p in parts) if parts else 0.0
        emu = flash.emulation()
        return wait, emu.seconds if emu else 0.0

    def resize(self, budget: int, baseline: int | None = None):
        """Re-plan for a new budget while the model is loaded (between tokens, also mid-answer): the neuron
        cache grows or shrinks; growing reads the added clusters now at sparsity 0 (with predictors the next
        tokens fill the new slots with what they read anyway), shrinking frees the least recently used
        clusters. Below the minimum: EdgeError, nothing changes. baseline: a new measure of the process without
        weights (load slack folded in)."""
        from edge.budget import plan_for
        from edge.model import release_free_memory

        if self.plan is None:
            raise EdgeError("this model runs without a budget (everything resident); start it with --ram to "
                            "change the budget live")
        p = self.plan
        plan = plan_for(self.file, p.strategy, budget, p.baseline if baseline is None else baseline, self.n_ctx,
                        **self._plan_options)
        with self._lock:
            for part in self.model.paged:
                part.resize(plan.slots)  # keeps the most recently used clusters / experts
            if self.model.stack is not None:
                self.model.stack.set_prefix(plan.prefix)  # reads only the added blocks, drops the last ones
            if self.model.stack_ffn is not None:  # reads only the added records, drops the others
                self.model.stack_ffn.configure(self.model.stack.info.depths(plan.prefix), plan.ffn_slots)
            if self.model.experts is not None or self.model.stack is not None:
                release_free_memory()
            self.plan = plan
            self.pressure.plan = self.plan
        return self.plan

    def _relieve_pressure(self) -> None:
        """Shrink the cache when memory is short from outside, or the process has grown past its plan, and
        keep going."""
        import dataclasses

        need = self.pressure.check()
        if need <= 0:
            self._fold_growth()
            return
        if self.model.stack is not None or self.model.experts is not None:  # a shallower stack, fewer experts
            before = self.plan
            try:
                self.resize(self.plan.budget - need)
            except EdgeError:
                self.resize(self.plan.minimum)
            if self.plan.budget < before.budget:  # at the minimum already: nothing more to give
                self.last.shrinks.append(f"memory pressure: {self.plan.shrunk_from(before)}")
            return
        if self.model.sparse_ffn is None or not self.model.sparse_ffn.caches:
            return
        ffn = self.model.sparse_ffn
        before, held = self.plan, ffn.cache_bytes + ffn.buffer_bytes
        slots = ffn.shrink(need)
        freed = held - (ffn.cache_bytes + ffn.buffer_bytes)  # the read buffers grow by the clusters now streamed
        self.plan = dataclasses.replace(self.plan, slots=slots, budget=self.plan.budget - freed,
                                        scratch=ffn.buffer_bytes)
        self.pressure.plan = self.plan
        self.last.shrinks.append(f"memory pressure: {self.plan.shrunk_from(before)}")

    def expert_stats(self) -> dict | None:
        """Expert cache counters of the last run (None unless experts page under a budget)."""
        pager = self.model.experts
        if pager is None:
            return None
        return dict(pager.stats.as_dict(len(self.last.tokens)), cached=pager.cached, slots=pager.slots,
                    cache_bytes=pager.cache_bytes)

    def sparse_stats(self) -> dict | None:
        """Neuron cache counters of the last run (None without a budget)."""
        ffn = self.model.sparse_ffn
        if ffn is None:
            return None
        st = ffn.stats
        n = max(1, len(self.last.tokens))
        return {"reads": st.reads, "read_bytes": st.read_bytes, "read_bytes_per_token": st.read_bytes // n,
                "hit_rate": round(st.hit_rate, 4), "clusters_needed": st.needed, "evicted": st.evicted,
                "evicted_in_window": st.evicted_in_window, "streamed": st.streamed,
                "neurons_per_token": st.neurons // n, "cache_bytes": ffn.cache_bytes,
                "prefetched": st.prefetched, "prefetch_used": st.prefetch_used, **self._head_stats()}

    def _head_stats(self) -> dict:
        """The streamed head's row cache: head candidates and embedding rows found in RAM, and read; rows the
        head's second stage rescored beyond its candidates."""
        head = self.model.output
        rows = getattr(head, "row_cache", None)
        if rows is None:
            return {}
        return {"head_rows_cached": rows.hits, "head_rows_read": rows.misses, "head_rows_second_stage": head.extra}

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages)


def resolve_strategy(store, strategy: str) -> str:
    """--strategy auto: experts on a mixture-of-experts store, bitstack when the store has a stack (`edge
    stack`), else sparse."""
    from edge.cli import STRATEGIES

    if strategy not in STRATEGIES:
        raise EdgeError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")
    moe = "experts" in store.attrs
    if strategy == "auto":
        return "experts" if moe else "bitstack" if "stack" in store.attrs else "sparse"
    if moe != (strategy == "experts"):
        raise EdgeError(f"--strategy {strategy}: {store.path} is {'' if moe else 'not '}a mixture of experts; "
                        f"use {'--strategy experts' if moe else 'another strategy'} (or auto)")
    return strategy
