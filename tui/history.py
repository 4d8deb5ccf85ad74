"""Saved conversations: one append-only JSON-lines file per chat in the user's data dir (XDG).

Every message, and every piece of an answer as it streams, is one line written through to the OS at once,
so a crash or a kill loses at most the line being written; a torn last line is skipped on load.

    {"type": "meta", "created": "...", "model": "...", "system": "..."}
    {"role": "user", "content": "..."}
    {"role": "assistant", "delta": "..."}            (one per streamed piece)
    {"role": "assistant", "end": "eog" | "length" | "cancelled" | ...}
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


def chats_dir() -> Path:
    from edge.dirs import data_dir

    return data_dir() / "chats"


@dataclass(frozen=True)
class SavedChat:
    path: Path
    created: str
    model: str
    system: str | None
    messages: tuple[dict, ...]

    @property
    def id(self) -> str:
        return self.path.stem

    @property
    def title(self) -> str:
        first = next((m["content"] for m in self.messages if m["role"] == "user"), "(empty)")
        return " ".join(first.split())[:60]


class ChatLog:
    """The file of one conversation, appended to as it happens."""

    def __init__(self, path: Path):
        self.path = path
        self._f = None

    @classmethod
    def new(cls, model: str, system: str | None) -> "ChatLog":
        d = chats_dir()
        d.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = d / f"{stamp}.jsonl"
        n = 1
        while path.exists():
            n += 1
            path = d / f"{stamp}-{n}.jsonl"
        log = cls(path)
        log._write({"type": "meta", "created": time.strftime("%Y-%m-%d %H:%M:%S"), "model": model, "system": system})
        return log

    def _write(self, record: dict) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()  # to the OS now: a killed process loses nothing written

    def user(self, text: str) -> None:
        self._write({"role": "user", "content": text})

    def delta(self, text: str) -> None:
        if text:
            self._write({"role": "assistant", "delta": text})

    def end(self, stopped: str) -> None:
        self._write({"role": "assistant", "end": stopped})

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def load(path: Path) -> SavedChat:
    """A saved chat; an answer cut off by a crash keeps what was written."""
    meta: dict = {}
    messages: list[dict] = []
    answering = False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if rec.get("type") == "meta":
            meta = rec
        elif rec.get("role") == "user":
            messages.append({"role": "user", "content": rec.get("content", "")})
            answering = False
        elif rec.get("role") == "assistant":
            if not answering:
                messages.append({"role": "assistant", "content": ""})
                answering = True
            messages[-1]["content"] += rec.get("delta", "")
            if "end" in rec:
                answering = False
    return SavedChat(path, meta.get("created", ""), meta.get("model", ""), meta.get("system"), tuple(messages))


def saved_chats() -> list[SavedChat]:
    """Newest first."""
    d = chats_dir()
    return [load(p) for p in sorted(d.glob("*.jsonl"), reverse=True)] if d.is_dir() else []


def find(ident: str) -> SavedChat:
    """A chat by id (file name without .jsonl), a unique prefix of it, or 'last'."""
    from edge.errors import EdgeError

    chats = saved_chats()
    if not chats:
        raise EdgeError(f"--resume {ident}: no saved chats in {chats_dir()}")
    if ident == "last":
        return chats[0]
    hits = [c for c in chats if c.id.startswith(ident)]
    if len(hits) != 1:
        raise EdgeError(f"--resume {ident}: {'no' if not hits else 'more than one'} saved chat matches; "
                        "`edge chat --list` shows them")
    return hits[0]
