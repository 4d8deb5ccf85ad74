"""Parity of our logits with llama.cpp's on the same GGUF: prompts x (prompt + generated tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]


@dataclass
class Parity:
    top1: list[float]          # per prompt: fraction of positions where our argmax equals llama.cpp's
    mean_abs: float
    max_abs: float
    same_greedy: list[int]     # per prompt: leading greedy tokens identical to llama.cpp's
    tie_margins: list[float]   # per prompt: llama.cpp's logit margin between its and our token where we diverge


def measure(path, backend: str, n_gen: int = 64, n_greedy: int = 32, peer_kwargs: dict | None = None) -> Parity:
    from edge.engine import Engine
    from edge.peer import LlamaCpp

    engine = Engine(path, n_ctx=512, backend=backend, threads=2)
    peer = LlamaCpp(path, n_ctx=512, threads=2, **(peer_kwargs or {}))
    top1, diffs, same, margins = [], [], [], []
    for text in PROMPTS:
        prompt = engine.tokenizer.encode(text)
        cont, _, _ = peer.greedy(prompt, n_gen)
        seq = prompt + cont
        ref = peer.logits(seq)
        ours = engine.model.forward(np.asarray(seq), 0, all_logits=True)
        top1.append(float(np.mean(ours.argmax(-1) == ref.argmax(-1))))
        diffs.append(np.abs(ours - ref).ravel())
        engine.cached = []
        mine = list(engine.generate(prompt, n_greedy, stop_at_end=False))
        mine = [e.token for e in mine if e.token >= 0]
        n_same = next((i for i, (a, b) in enumerate(zip(mine, cont)) if a != b), min(len(mine), n_greedy))
        same.append(n_same)
        if n_same < n_greedy:
            row = ref[len(prompt) - 1 + n_same]
            margins.append(float(row[cont[n_same]] - row[mine[n_same]]))
        else:
            margins.append(0.0)
    d = np.concatenate(diffs)
    return Parity(top1, float(d.mean()), float(d.max()), same, margins)
