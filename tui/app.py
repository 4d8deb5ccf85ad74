"""`edge chat`: a Textual chat over the token generator, with a live stats panel.

A thread worker iterates `Engine.generate` and posts each token to the UI thread; Esc or Ctrl+C stops the
answer (never the app) and keeps the chat; Ctrl+N starts a new chat; Ctrl+Q quits.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Footer, Header, Input, Markdown, Sparkline, Static

from edge.errors import EdgeError
from edge.sampling import Sampler, SamplerConfig
from edge.sizes import format_size


class Message(Markdown):
    DEFAULT_CSS = """
    Message { margin: 0 1 1 1; padding: 0 1; }
    Message.user { background: $primary 15%; }
    Message.assistant { background: $surface; }
    """


class StatsPanel(Static):
    DEFAULT_CSS = "StatsPanel { width: 34; padding: 0 1; border-left: solid $primary; }"


class ChatApp(App):
    TITLE = "edge chat"
    CSS = """
    #body { height: 1fr; }
    #chat { width: 1fr; }
    #side { width: 36; }
    #speed { height: 4; }
    Input { dock: bottom; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+c", "stop", "Stop answer", priority=True, show=False),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, model: str | None = None, system: str | None = None, n_ctx: int = 4096,
                 sampler: SamplerConfig = SamplerConfig(temperature=0.7), max_tokens: int = 512,
                 backend: str = "auto", threads: int | None = None, engine_options: dict | None = None):
        super().__init__()
        self.model_arg, self.system, self.n_ctx = model, system, n_ctx
        self.sampler_cfg, self.max_tokens = sampler, max_tokens
        self.backend, self.threads = backend, threads
        self.engine_options = engine_options or {}
        self.engine = None
        self.messages: list[dict] = []
        self.generating = False
        self._stop = threading.Event()
        self.speeds: deque[float] = deque([0.0] * 30, maxlen=30)
        self.stats = {"status": "loading model..."}

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            yield VerticalScroll(id="chat")
            with VerticalScroll(id="side"):
                yield StatsPanel(id="stats")
                yield Sparkline(list(self.speeds), id="speed")
        yield Input(placeholder="Loading the model...", id="prompt", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        self._refresh_stats()
        self.load_engine()

    @work(thread=True, exclusive=True, group="load")
    def load_engine(self) -> None:
        from edge.engine import Engine

        try:
            engine = Engine(self.model_arg, n_ctx=self.n_ctx, backend=self.backend, threads=self.threads,
                            **self.engine_options)
        except EdgeError as exc:
            self.call_from_thread(self._load_failed, str(exc))
            return
        self.call_from_thread(self._engine_ready, engine)

    def _load_failed(self, text: str) -> None:
        self.stats["status"] = "error"
        self._refresh_stats()
        self.notify(text, title="Cannot load the model", severity="error", timeout=30)

    def _engine_ready(self, engine) -> None:
        self.engine = engine
        self.sub_title = engine.name
        self.stats.update(status="ready", model=engine.name, arch=engine.config.arch,
                          backend=engine.model.backend.name, ctx=engine.n_ctx,
                          weights=engine.model.backend.resident_bytes, kv=engine.model.kv.nbytes)
        if engine.plan is not None:
            p = engine.plan
            self.stats.update(budget=p.budget, cache=p.cache, cached=f"{p.slots}/{p.n_clusters}")
        prompt = self.query_one("#prompt", Input)
        prompt.disabled = False
        prompt.placeholder = "Type a message, Enter to send (Esc stops the answer)"
        prompt.focus()
        self._refresh_stats()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.engine is None:
            return
        if self.generating:
            self.notify("Still answering: press Esc to stop it first", severity="warning")
            return
        event.input.value = ""
        self.messages.append({"role": "user", "content": text})
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
        try:
            prompt = engine.chat_tokens(history)
            for ev in engine.generate(prompt, self.max_tokens, Sampler(self.sampler_cfg)):
                text += ev.text
                if ev.seconds > 0:
                    self.speeds.append(1.0 / ev.seconds)
                if self._stop.is_set():
                    break
                now = time.perf_counter()
                if now - last_draw > 0.05:
                    last_draw = now
                    self.call_from_thread(self._update_reply, reply, text, ev)
        except EdgeError as exc:
            self.call_from_thread(self.notify, str(exc), severity="error")
        self.call_from_thread(self._finish_reply, reply, text)

    def _update_reply(self, reply: Message, text: str, ev) -> None:
        reply.update(text)
        self.query_one("#chat", VerticalScroll).scroll_end(animate=False)
        self.stats.update(status="answering", rss=ev.resident_bytes, position=ev.position)
        self._refresh_stats()

    def _finish_reply(self, reply: Message, text: str) -> None:
        s = self.engine.last
        reply.update(text or "_(no answer)_")
        self.messages.append({"role": "assistant", "content": text})
        self.generating = False
        self.stats.update(status="stopped" if s.stopped == "cancelled" else "ready", tok_s=s.tok_s,
                          prefill_tok_s=s.prefill_tok_s, tokens=len(s.tokens), rss=s.peak_rss_bytes,
                          flash=s.flash_read_bytes, position=len(self.engine.cached))
        self._refresh_stats()
        self.query_one("#chat", VerticalScroll).scroll_end(animate=False)

    def _refresh_stats(self) -> None:
        s = self.stats
        lines = [f"[b]{s.get('status', '')}[/b]", ""]
        if "model" in s:
            lines += [f"model    {s['model']}", f"arch     {s['arch']}", f"backend  {s['backend']}",
                      f"weights  {format_size(s['weights'])} in RAM", f"KV cache {format_size(s['kv'])}"]
        if "budget" in s:
            lines += [f"budget   {format_size(s['budget'])}",
                      f"FFN      {format_size(s['cache'])} cached ({s['cached']} clusters/layer)"]
        if "tok_s" in s:
            lines += ["", f"decode   {s['tok_s']:.1f} tok/s", f"prefill  {s['prefill_tok_s']:.1f} tok/s",
                      f"last     {s['tokens']} tokens", f"flash    {format_size(s['flash'])} read"]
        if "rss" in s:
            lines += [f"RSS      {format_size(s['rss'])}"]
        if "position" in s:
            lines += [f"context  {s['position']}/{s.get('ctx', '?')}"]
        self.query_one("#stats", StatsPanel).update("\n".join(lines))
        self.query_one("#speed", Sparkline).data = list(self.speeds)

    def action_stop(self) -> None:
        if self.generating:
            self._stop.set()

    def action_new_chat(self) -> None:
        if self.generating:
            self._stop.set()
        self.messages.clear()
        self.query_one("#chat", VerticalScroll).remove_children()


def run_chat(args) -> int:
    from edge.cli import budget_options, sampler_config

    ChatApp(args.model, system=args.system, n_ctx=args.ctx, sampler=sampler_config(args), max_tokens=args.max_tokens,
            backend=args.backend, threads=args.threads, engine_options=budget_options(args)).run()
    return 0
