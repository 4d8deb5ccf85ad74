"""`edge convert MOE --calibrate`: routing traces of a mixture-of-experts store, for expert prediction and eviction.

EdgeMoE (Yi et al. 2023) profiles which experts a model routes to on calibration text and keeps a table from the
experts chosen at the previous two MoE layers to the probability of each expert at the next one. The full key
(the sets chosen at two layers) has C(E, k)^2 values, far more than calibration tokens (784 for 8 experts, top 2;
1024 tokens), so the table is kept factored: per layer j, counts of expert e at j given expert a at j-1 (C1)
and given expert b at j-2 (C2). The runtime (edge.experts, `--predict trace`) scores e by the mean of
P(e | a) over the experts a chosen at j-1 plus the mean of P(e | b) over those at j-2. (The per-layer routing
frequencies are stored too; as an eviction prior they measured worse than the run's own counts.)

The model runs through the paged runtime itself (edge.experts, half the available memory as its budget), so a
model larger than RAM calibrates too. Counts come from the first three quarters of the tokens; the last
quarter measures the table's recall (share of the routed experts among its top-k guesses), stored with it.

Written into `moe.partial/` in the store and committed as attributes["edge"]["moe"] (edge.store: `moe/counts`,
float32 (n_layers, 1 + 2 E, E): frequencies, C1, C2).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.experts import trace_scores


def route_traces(store, tokens: int, threads: int | None = None, progress=None) -> np.ndarray:
    """The experts every calibration token is routed to: (tokens, n_layers, k) int16."""
    import psutil

    from edge import strategies
    from edge.evaluate import calibration_text, windows
    from edge.memory import Meter
    from edge.tokenizer import Tokenizer

    cfg = store.config
    tok = Tokenizer(store.tokenizer_path, cfg.arch, store.chat_template)
    ids = tok.encode(calibration_text(), add_bos=False)
    n_ctx = min(256, cfg.context_length)
    wins = windows(ids, n_ctx, None, tok.bos_id)
    if sum(len(w) for w in wins) < tokens:
        raise EdgeError(f"calibration text has {len(ids)} tokens, {tokens} asked; lower --calib-tokens")
    plan = strategies.get("experts").plan(store, max(psutil.virtual_memory().available // 2, 1 << 30),
                                               Meter().rss(), n_ctx, strategies.Options(strategy="experts"))
    model = strategies.load(store, n_ctx, plan, threads)
    per_layer: list[list[np.ndarray]] = [[] for _ in range(cfg.n_layers)]

    def trace(i, point, x):
        if point == "experts":
            per_layer[i].append(x.astype(np.int16))

    model.trace = trace
    done = 0
    for w in wins:
        if done >= tokens:
            break
        model.forward(np.asarray(w[:tokens - done]), 0)
        done += len(w[:tokens - done])
        if progress:
            progress(done, tokens)
    model.parts.ffn.experts.close()
    return np.stack([np.concatenate(parts) for parts in per_layer], axis=1)  # (T, L, k)


def count_tables(tops: np.ndarray, n_experts: int) -> np.ndarray:
    """(n_layers, 1 + 2 E, E) float32: per layer the routing counts of each expert, then C1[a, e] (a at the
    layer before, e here, same token) and C2[b, e] (b two layers before)."""
    t, n_layers, k = tops.shape
    e = n_experts
    out = np.zeros((n_layers, 1 + 2 * e, e), np.float32)
    for j in range(n_layers):
        np.add.at(out[j, 0], tops[:, j].reshape(-1), 1.0)
        for back, row in ((1, 1), (2, 1 + e)):
            if j >= back:
                a = np.repeat(tops[:, j - back], k, axis=1).reshape(-1)  # every (earlier, now) pair of a token
                b = np.tile(tops[:, j], (1, k)).reshape(-1)
                np.add.at(out[j, row:row + e], (a, b), 1.0)
    return out


def table_recall(tables: np.ndarray, tops: np.ndarray) -> list[float]:
    """Per layer (from the second): share of the routed experts among the table's top-k guesses."""
    t, n_layers, k = tops.shape
    out = []
    for j in range(1, n_layers):
        hit = 0
        for n in range(t):
            s = trace_scores(tables, j, tops[n, j - 1], tops[n, j - 2] if j >= 2 else None)
            guess = np.argsort(-s, kind="stable")[:k]
            hit += len(set(guess.tolist()) & set(tops[n, j].tolist()))
        out.append(hit / (t * k))
    return out


def calibrate_experts(store_path: str | Path, tokens: int = 1024, threads: int | None = None, progress=None) -> dict:
    """Record the routing traces of a mixture-of-experts store in place; returns the summary committed under
    attributes["edge"]["moe"]."""
    import zarr
    from zarr.storage import LocalStore

    from edge.store import Store
    from weights_tools.convert import write_array, commit_group

    store_path = Path(store_path)
    store = Store(store_path)
    cfg = store.config
    tops = route_traces(store, tokens, threads, progress)
    held = len(tops) * 3 // 4
    tables = count_tables(tops[:held], cfg.n_experts)
    recall = table_recall(tables, tops[held:])
    tables = count_tables(tops, cfg.n_experts)  # the stored table uses every token
    partial = store_path / "moe.partial"
    shutil.rmtree(partial, ignore_errors=True)
    group = zarr.create_group(LocalStore(partial))
    write_array(group, "counts", tables.view(np.uint8).reshape(1, -1), 1)
    summary = {"tokens": int(len(tops)), "held_out": int(len(tops) - held),
               "table_recall": [round(r, 4) for r in recall]}
    commit_group(store_path, partial, "moe", summary)
    return summary
