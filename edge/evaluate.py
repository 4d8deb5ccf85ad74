"""Perplexity over a text: non-overlapping windows of `ctx` tokens, every token after a window's first scored.

The default text is a fixed slice of `pydoc_data.topics`, which ships with CPython (English prose about
Python); calibration uses a disjoint slice (`calibration_text`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EVAL_CHARS = 60_000  # the evaluation slice: the first 60k characters of the topics in key order


def _topics_text() -> str:
    """Python's own help topics, joined; the module is dropped again (a budgeted eval keeps only its slice)."""
    import importlib
    import sys

    was_loaded = "pydoc_data.topics" in sys.modules
    topics = importlib.import_module("pydoc_data.topics").topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    if not was_loaded:  # the module and the package's reference to it
        del sys.modules["pydoc_data.topics"]
        del sys.modules["pydoc_data"].topics
    return text


def eval_text() -> str:
    return _topics_text()[:EVAL_CHARS]


def calibration_text() -> str:
    return _topics_text()[EVAL_CHARS:]


@dataclass(frozen=True)
class Perplexity:
    tokens_scored: int
    nll: float  # mean negative log-likelihood (nats)

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))


def windows(tokens: list[int], ctx: int, max_windows: int | None, bos: int | None) -> list[list[int]]:
    """Split into windows of ctx tokens; each starts with BOS when the model wants one."""
    step = ctx - (1 if bos is not None else 0)
    out = []
    for i in range(0, len(tokens) - step + 1, step):
        w = tokens[i:i + step]
        out.append([bos] + w if bos is not None else w)
        if max_windows and len(out) >= max_windows:
            break
    return out


def token_nll(logits: np.ndarray, window: list[int]) -> np.ndarray:
    """-log p(window[t+1] | window[:t+1]) for every t, from logits (T, vocab) in float64."""
    return target_nll(logits[:-1], np.asarray(window[1:]))


def target_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=-1))
    return logz - z[np.arange(len(targets)), targets]


def perplexity(nll_fn, wins: list[list[int]]) -> Perplexity:
    """nll_fn(window) -> (T - 1,) negative log-likelihoods: ours (Transformer.nll) or, through token_nll, the
    peer's logits."""
    nll = np.concatenate([nll_fn(w) for w in wins])
    return Perplexity(len(nll), float(nll.mean()))
