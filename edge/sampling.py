"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty, seed.

Lives outside the model: the model turns ids into logits, the sampler turns logits into an id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.0   # 0: greedy
    top_k: int = 40            # 0: off
    top_p: float = 0.95        # 1.0: off
    repeat_penalty: float = 1.0  # 1.0: off; as llama.cpp: divide positive logits, multiply negative ones
    repeat_last_n: int = 64
    seed: int | None = None


def top_ids(z: np.ndarray, k: int, step: int = 64) -> np.ndarray:
    """The ids of the k largest values of z (unordered), as np.argpartition finds them, in a fifth of its time
    on a large vocabulary: a threshold from every step-th value keeps a few hundred, partitioned (exact: when
    fewer than k pass, the whole of z)."""
    sample = z[::step]
    j = k // step + 8  # the j-th largest of the sample: ~j * step values pass
    if len(sample) > 4 * j:
        thr = np.partition(sample, len(sample) - j)[len(sample) - j]
        passed = np.flatnonzero(z >= thr)
        if len(passed) >= k:
            return passed[np.argpartition(-z[passed], k - 1)[:k]]
    return np.argpartition(-z, k - 1)[:k]


class Sampler:
    def __init__(self, cfg: SamplerConfig = SamplerConfig()):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        cfg = self.cfg
        logits = np.asarray(logits, dtype=np.float32)
        if cfg.repeat_penalty != 1.0 and history:
            recent = np.unique(np.asarray(history[-cfg.repeat_last_n:], dtype=np.int64))
            logits = logits.copy()
            vals = logits[recent]
            logits[recent] = np.where(vals > 0, vals / cfg.repeat_penalty, vals * cfg.repeat_penalty)
        if cfg.temperature <= 0:
            return int(np.argmax(logits))
        ids = np.arange(logits.shape[0])
        if 0 < cfg.top_k < logits.shape[0]:
            ids = top_ids(logits, cfg.top_k)
        scores = logits[ids] / np.float32(cfg.temperature)
        order = np.argsort(-scores, kind="stable")
        ids, scores = ids[order], scores[order]
        probs = np.exp(scores - scores[0])
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), cfg.top_p) + 1)
            ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
        return int(ids[self.rng.choice(len(ids), p=probs)])
