"""llama.cpp inside Python (llama-cpp-python) on the same GGUF: for logit parity tests only.

Its interpreter and bindings weigh 40-60MB that llama.cpp's own programs do not, so speed and memory are
compared with those (edge.native, `edge bench`), never with this."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge.tokenizer import quiet_stderr


class LlamaCpp:
    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int = 2, logits_all: bool = True,
                 f32_kv: bool = False):
        """f32_kv: keys and values in float32 and no flash attention, for exact comparisons on F32 files."""
        from llama_cpp import Llama

        extra = dict(type_k=0, type_v=0, flash_attn=False) if f32_kv else {}
        with quiet_stderr():
            self.llama = Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                               logits_all=logits_all, verbose=False, **extra)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(T, vocab) logits of every position, the whole sequence evaluated from an empty cache."""
        self.llama.reset()
        self.llama.eval(tokens)
        return np.array(self.llama.scores[: len(tokens)], dtype=np.float32)

    def last_logits(self) -> np.ndarray:
        """The last evaluated position's logits, read from llama.cpp's context: with logits_all=False
        llama-cpp-python never writes its `scores` buffer."""
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llama.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llama.n_vocab(),)).copy()

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], float, float]:
        """Greedy continuation: (ids, prefill seconds, decode seconds), argmax on the raw logits."""
        self.llama.reset()
        t0 = time.perf_counter()
        self.llama.eval(prompt)
        t1 = time.perf_counter()
        out = []
        for _ in range(n):
            tok = int(np.argmax(self.last_logits()))
            out.append(tok)
            self.llama.eval([tok])
        return out, t1 - t0, time.perf_counter() - t1
