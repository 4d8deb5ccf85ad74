"""`edge chat`: a Textual chat over the token generator, with a live panel of the budget, speed and flash.

A thread worker iterates `Engine.generate` and posts tokens to the UI thread. Esc or Ctrl+C stops the answer
(never the app) and keeps the chat; Ctrl+B changes the RAM budget while the model is loaded (the engine
re-plans between two tokens); Ctrl+N starts a new chat; Ctrl+O reopens a saved one; F1 lists the keys.
Chats are saved as they happen (tui.history).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Footer, Header, Input, Markdown, Sparkline, Static

from edge.errors import EdgeError
from edge.sampling import Sampler, SamplerConfig
from edge.sizes import format_size
from tui.history import ChatLog, SavedChat

# the parts of the budget, in the order the bar draws them (expert cache and BitStack depth: the MoE and
# BitStack runtimes' shares; zero until a model uses them)
PARTS = (("baseline", "grey62"), ("KV cache", "yellow"), ("weights", "cyan"), ("buffers", "magenta"),
         ("neuron cache", "green"), ("expert cache", "blue"), ("BitStack", "red"))
BAR = 30


class Message(Markdown):
    """One chat message. An answer grows by `grow`: only the new text is parsed (Markdown.update re-parses
    the whole answer and, ten times a second, left ~40MB of Textual's memory behind after 500 updates; append
    leaves ~6MB), which the budget would otherwise have to take from the cache."""

    DEFAULT_CSS = """
    Message { margin: 0 1 1 1; padding: 0 1; }
    Message.user { background: $primary 15%; }
    Message.assistant { background: $surface; }
    """

    shown = 0  # characters of the answer given to the widget so far

    def grow(self, text: str) -> None:
        """Show `text`, the answer so far (it only ever grows)."""
        if len(text) > self.shown:
            self.append(text[self.shown:])
            self.shown = len(text)


class StatsPanel(Static):
    DEFAULT_CSS = "StatsPanel { padding: 0 1; }"


def budget_text(parts: dict, budget: int | None, free: int | None, width: int = BAR) -> Text:
    """The budget bar: one run of cells per part, scaled to the budget (or, without one, to what is resident),
    then the legend and the system's free memory."""
    used = sum(parts.values())
    total = budget or used or 1
    t = Text()
    drawn = 0
    for name, color in PARTS:
        n = round(width * parts.get(name, 0) / total)
        n = min(n, width - drawn)
        t.append("█" * n, style=color)
        drawn += n
    t.append("░" * (width - drawn), style="grey35")
    t.append("\n")
    if budget:
        t.append(f"budget {format_size(budget)}", style="bold")
        t.append(f", {format_size(max(0, budget - used))} unplanned\n")
    else:
        t.append("no budget: everything resident", style="bold")
        t.append(" (--ram sets one)\n")
    for name, color in PARTS:
        n = parts.get(name)
        t.append("■ ", style=color)
        t.append(f"{name:<13}{format_size(n) if n else '—':>8}\n")
    if free is not None:
        warn = budget is not None and budget > free
        t.append(f"system free {format_size(free)}", style="bold red" if warn else "")
        t.append(" (less than the budget)\n" if warn else "\n")
    return t


class ChatApp(App):
    TITLE = "edge chat"
    CSS = """
    #body { height: 1fr; }
    #chat { width: 1fr; }
    #side { width: 44; border-left: solid $primary; }
    #speed { height: 3; margin: 0 1; }
    Input { dock: bottom; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+c", "stop", "Stop answer", priority=True, show=False),
        Binding("ctrl+b", "budget", "Budget"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+o", "open_chat", "Open chat"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, model: str | None = None, system: str | None = None, n_ctx: int | None = None,
                 sampler: SamplerConfig = SamplerConfig(temperature=0.7), max_tokens: int = 512,
                 backend: str = "auto", threads: int | None = None, engine_options: dict | None = None,
                 resume: SavedChat | None = None, autoload: bool = True, save: bool = True):
        """autoload=False: the UI without a model (layout snapshots); save=False: chats are not written."""
        super().__init__()
        self.model_arg, self.system, self.n_ctx = model, system, n_ctx
        self.sampler_cfg, self.max_tokens = sampler, max_tokens
        self.backend, self.threads = backend, threads
        self.engine_options = engine_options or {}
        self.autoload, self.save = autoload, save
        self.engine = None
        self.resume = resume
        self.log_file: ChatLog | None = None
        self.messages: list[dict] = []
        self.generating = False
        self._stop = threading.Event()
        self.speeds: deque[float] = deque([0.0] * 40, maxlen=40)
        self.stats: dict = {"status": "loading model..."}
        self._io_mark = (time.perf_counter(), 0, 0)

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            yield VerticalScroll(id="chat")
            with VerticalScroll(id="side"):
                yield StatsPanel(id="stats")
                yield Sparkline(list(self.speeds), id="speed")
                yield StatsPanel(id="live")
        yield Input(placeholder="Loading the model...", id="prompt", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        if self.resume is not None:
            self._show_saved(self.resume)
        self._refresh_stats()
        if self.autoload:
            self.load_engine()

    # loading ---------------------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="load")
    def load_engine(self) -> None:
        from edge.engine import Engine
        from edge.models import CATALOGUE

        try:
            if self.engine_options.get("ram") is not None and (self.model_arg is None or (
                    self.model_arg in CATALOGUE and not Path(self.model_arg).exists())):
                self._prepare_store()
            engine = Engine(self.model_arg, n_ctx=self.n_ctx, backend=self.backend, threads=self.threads,
                            **self.engine_options)
        except EdgeError as exc:
            self.call_from_thread(self._load_failed, str(exc))
            return
        except Exception as exc:  # a bug or an OS error: said, not a crash of the chat
            self.call_from_thread(self._load_failed, f"{type(exc).__name__}: {exc}")
            return
        self.call_from_thread(self._engine_ready, engine)

    def _prepare_store(self) -> None:
        """First run under a budget of the default model or a named one: it becomes a store (`edge convert
        [NAME]`: seconds, in about the memory of the budgets it runs at; calibrating is left to the user, the plan
        says what it gives), its progress shown in the panel."""
        import subprocess
        import sys

        from edge.models import store_path

        try:
            store_path(self.model_arg)
            return
        except EdgeError:
            pass
        name = self.model_arg or "the default model"
        proc = subprocess.Popen([sys.executable, "-m", "edge", "convert", *([self.model_arg] if self.model_arg else []),
                                 "--progress-lines"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        last = ""
        for line in proc.stderr:
            last = line.strip() or last
            fraction, _, label = last.partition(" ")
            try:
                self.call_from_thread(self._set_status, f"first run: {label} {name} {float(fraction):.0%}")
            except ValueError:
                pass
        code = proc.wait()
        if code < 0:  # a signal: under a memory cap, the kernel's OOM killer
            how = "`edge convert" + (f" {self.model_arg}`" if self.model_arg else "`")
            raise EdgeError(f"preparing {name} was killed (signal {-code}; out of memory under a cap?): run {how} "
                            "once outside the budget, then start the chat again")
        if code != 0:
            raise EdgeError(f"preparing {name} failed: {last}")

    def _set_status(self, text: str) -> None:
        self.stats["status"] = text
        self._refresh_stats()

    def _load_failed(self, text: str) -> None:
        self._set_status("error: the model did not load")
        self.notify(text, title="Cannot load the model", severity="error", timeout=30)

    def _engine_ready(self, engine) -> None:
        from edge import quants

        self.engine = engine
        self.sub_title = engine.name
        try:
            quant = quants.type_name(engine.file.tensor("blk.0.attn_q.weight").type_id)
        except Exception:  # an architecture without that tensor name: the panel just leaves it out
            quant = "?"
        self.stats.update(status="ready", model=engine.name, arch=engine.config.arch, quant=quant,
                          backend=engine.stats().backend, ctx=engine.n_ctx,
                          device=engine.device.name + (" (flash emulated)" if engine.emulating else "")
                          if engine.device else "this machine")
        self._plan_stats()
        for text in engine.warnings:  # what the CLI prints as warnings (a clamped or fitted context)
            self.notify(text, title="Note", severity="warning", timeout=15)
        self._io_mark = (time.perf_counter(), *engine.read_totals())
        prompt = self.query_one("#prompt", Input)
        prompt.disabled = False
        prompt.placeholder = "Type a message, Enter to send (Esc stops the answer, F1 help)"
        prompt.focus()
        self._refresh_stats()

    def _plan_stats(self) -> None:
        """The budget's parts from the engine's plan, or, without a budget, what is resident."""
        e = self.engine
        p = e.plan
        if e.gpu is not None:
            self.stats["gpu"] = e.gpu.short()
        if p is not None:
            self.stats.update(budget=p.budget, minimum=p.minimum, parts=p.parts(), cache=p.summary())
        else:
            st = e.stats()
            weights, kv = st.weights_bytes, st.kv_bytes
            rss = e.meter.rss()
            self.stats.update(budget=None, parts={"baseline": max(0, rss - weights - kv), "weights": weights,
                                                  "KV cache": kv})

    # chatting --------------------------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if event.input.id != "prompt" or not text or self.engine is None:
            return
        if self.generating:
            self.notify("Still answering: press Esc to stop it first", severity="warning")
            return
        event.input.value = ""
        self.messages.append({"role": "user", "content": text})
        if self.save:
            if self.log_file is None:
                self.log_file = ChatLog.new(self.engine.name, self.system)
            self.log_file.user(text)
        chat = self.query_one("#chat", VerticalScroll)
        chat.mount(Message(text, classes="user"))
        reply = Message("", classes="assistant")
        chat.mount(reply)
        chat.scroll_end(animate=False)
        self.generating = True
        self._stop.clear()
        self.answer(reply)

    @work(thread=True, exclusive=True, group="answer")
    def answer(self, reply: Message) -> None:
        engine = self.engine
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        text = ""
        last_draw = 0.0
        log = self.log_file
        try:
            prompt = engine.chat_tokens(history)
            for ev in engine.generate(prompt, self.max_tokens, Sampler(self.sampler_cfg)):
                text += ev.text
                if log is not None:
                    log.delta(ev.text)
                if ev.seconds > 0:
                    self.speeds.append(1.0 / ev.seconds)
                if self._stop.is_set():
                    break
                now = time.perf_counter()
                if now - last_draw > 0.1:
                    last_draw = now
                    self.call_from_thread(self._update_reply, reply, text, ev)
        except EdgeError as exc:
            self.call_from_thread(self.notify, str(exc), severity="error")
        except Exception as exc:  # a bug or an OS error (a disk gone): the chat stays, the error is shown
            self.call_from_thread(self.notify, f"{type(exc).__name__}: {exc}", title="The answer stopped",
                                  severity="error", timeout=20)
        if log is not None:
            log.end(engine.last.stopped)
        self.call_from_thread(self._finish_reply, reply, text)

    def _update_reply(self, reply: Message, text: str, ev) -> None:
        reply.grow(text)
        self.query_one("#chat", VerticalScroll).scroll_end(animate=False)
        recent = [s for s in list(self.speeds)[-5:] if s > 0]
        self.stats.update(status="answering", rss=ev.resident_bytes, position=ev.position,
                          tok_s_now=sum(recent) / len(recent) if recent else 0.0)
        self._sample_io()
        self._refresh_stats()

    def _finish_reply(self, reply: Message, text: str) -> None:
        e = self.engine
        s = e.last
        if text:
            reply.grow(text)
        else:
            reply.update("_(no answer)_")
        self.messages.append({"role": "assistant", "content": text})
        self.generating = False
        self.stats.update(status="stopped" if s.stopped == "cancelled" else "ready", tok_s=s.tok_s,
                          prefill_tok_s=s.prefill_tok_s, tokens=len(s.tokens), rss=s.peak_rss_bytes,
                          position=len(e.cached), tok_s_now=0.0)
        sp = e.stats().cache
        if sp is not None:
            self.stats.update(hit_rate=sp["hit_rate"], read_per_token=sp["read_bytes_per_token"])
        if s.shrinks:  # the cache gave memory back during the answer: say so, show the plan it runs under now
            self.notify(s.shrinks[-1] + (f" ({len(s.shrinks)} times)" if len(s.shrinks) > 1 else ""),
                        title="Cache shrunk", severity="warning", timeout=10)
            self._plan_stats()
        self._sample_io()
        self._refresh_stats()
        self.query_one("#chat", VerticalScroll).scroll_end(animate=False)

    def _sample_io(self) -> None:
        """Flash MB/s and reads/s since the last sample."""
        t0, reads0, bytes0 = self._io_mark
        now = time.perf_counter()
        reads, nbytes = self.engine.read_totals()
        if now - t0 >= 0.2:
            self.stats.update(flash_mb_s=(nbytes - bytes0) / (now - t0) / 1e6, reads_s=(reads - reads0) / (now - t0))
            self._io_mark = (now, reads, nbytes)
        cache = self.engine.stats().cache
        if cache is not None:
            self.stats["hit_rate"] = cache["hit_rate"]

    def _refresh_stats(self) -> None:
        import psutil

        s = self.stats
        head = Text()
        head.append(f"{s.get('status', '')}\n", style="bold")
        if "model" in s:
            head.append(f"model   {s['model'][:32]}\n        {s['arch']}, {s['quant']}, {s['backend']} kernels\n"
                        f"device  {s['device']}\n")
        if "parts" in s:
            head.append("\n")
            head.append_text(budget_text(s["parts"], s.get("budget"), s.get("free", psutil.virtual_memory().available)))
            if "cache" in s:
                head.append(s["cache"] + "\n")
            if "gpu" in s:
                head.append(f"gpu     {s['gpu']}\n")
        self.query_one("#stats", StatsPanel).update(head)
        live = Text()
        now = s.get("tok_s_now", 0.0)
        live.append(f"now     {f'{now:.1f} tok/s' if now else '-'}\n")
        if "tok_s" in s:
            live.append(f"last    {s['tokens']} tokens: decode {s['tok_s']:.1f} tok/s\n"
                        f"        prefill {s['prefill_tok_s']:.1f} tok/s\n")
        if "flash_mb_s" in s:
            live.append(f"flash   {s['flash_mb_s']:.1f} MB/s, {s['reads_s']:.0f} reads/s\n")
        if "read_per_token" in s:
            live.append(f"        {format_size(s['read_per_token'])} read per token\n")
        if "hit_rate" in s:
            what = self.engine.stats().cache_kind if self.engine is not None else "FFN clusters"
            live.append(f"cache   {100 * s['hit_rate']:.1f}% of {what} hit\n")
        if "rss" in s:
            live.append(f"RSS     {format_size(s['rss'])}\n")
        if "position" in s:
            live.append(f"context {s['position']}/{s.get('ctx', '?')} tokens\n")
        self.query_one("#live", StatsPanel).update(live)
        self.query_one("#speed", Sparkline).data = list(self.speeds)

    # keys ------------------------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.generating:
            self._stop.set()

    def action_new_chat(self) -> None:
        if self.generating:
            self._stop.set()
        self.messages.clear()
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        self.query_one("#chat", VerticalScroll).remove_children()

    def action_help(self) -> None:
        from tui.screens import HelpScreen

        self.push_screen(HelpScreen())

    def action_budget(self) -> None:
        from tui.screens import BudgetScreen

        if self.engine is None:
            self.notify("The model is still loading", severity="warning")
            return
        if self.engine.plan is None:
            self.notify("This chat runs without a budget (everything resident); start it with --ram SIZE to "
                        "change the budget live", severity="warning", timeout=8)
            return
        p = self.engine.plan
        self.push_screen(BudgetScreen(format_size(p.budget), format_size(p.minimum)), self._budget_chosen)

    def _budget_chosen(self, text: str | None) -> None:
        if text:
            self.resize_budget(text)

    @work(thread=True, exclusive=True, group="resize")
    def resize_budget(self, text: str) -> None:
        from edge.sizes import parse_size

        try:
            t = time.perf_counter()
            plan = self.engine.resize(parse_size(text, flag="budget"))
        except EdgeError as exc:
            self.call_from_thread(self.notify, str(exc), title="Budget unchanged", severity="error", timeout=10)
            return
        took = time.perf_counter() - t

        def done() -> None:
            self._plan_stats()
            self._refresh_stats()
            self.notify(f"{format_size(plan.budget)}: {plan.summary().replace(chr(10), ' ')} "
                        f"(re-planned in {1e3 * took:.0f} ms)", title="Budget changed")

        self.call_from_thread(done)

    def action_open_chat(self) -> None:
        from tui.history import saved_chats
        from tui.screens import ChatsScreen

        if self.generating:
            self.notify("Still answering: press Esc to stop it first", severity="warning")
            return
        self.push_screen(ChatsScreen(saved_chats()), self._chat_chosen)

    def _chat_chosen(self, chat: SavedChat | None) -> None:
        if chat is not None:
            self.action_new_chat()
            self._show_saved(chat)

    def _show_saved(self, chat: SavedChat) -> None:
        """Show a saved chat and continue it (appending to its file); its cache is rebuilt on the next turn."""
        self.messages = [dict(m) for m in chat.messages]
        self.system = chat.system if chat.system is not None else self.system
        if self.save:
            self.log_file = ChatLog(chat.path)
        box = self.query_one("#chat", VerticalScroll)
        for m in self.messages:
            box.mount(Message(m["content"] or "_(no answer)_", classes=m["role"]))
        box.scroll_end(animate=False)
        self.sub_title = f"{chat.created}: {chat.title}"


def run_chat(args) -> int:
    from edge.flags import budget_options, model_arg, sampler_config
    from tui import history

    if args.list:
        chats = history.saved_chats()
        if not chats:
            print(f"no saved chats in {history.chats_dir()}")
        for c in chats:
            print(f"{c.id:18} {c.created:19} {len(c.messages):3} messages  {c.title}")
        return 0
    resume = history.find(args.resume) if args.resume else None
    ChatApp(model_arg(args), system=args.system, n_ctx=args.ctx, sampler=sampler_config(args),
            max_tokens=args.max_tokens, backend=args.backend, threads=args.threads,
            engine_options=budget_options(args), resume=resume).run()
    return 0
