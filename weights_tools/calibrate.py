"""`edge convert --calibrate`: what the budgeted runtime needs, measured on calibration text, into the store.

Runs the dense model over `edge.evaluate.calibration_text()` and records, per layer, the FFN input x and the
hidden activation h = act(gate(x)) * up(x). From those:

- a low-rank predictor per layer (LLM in a flash, section 3.1): g_hat = (x @ A) @ B approximates the gate
  pre-activation; B holds the top `rank` right singular vectors of the calibration gate outputs (so the
  approximation is best where activations actually lie) and A = W_gate.T @ B.T; a cluster's predicted
  importance is the sum over its neurons of |act(g_hat)| * mean|up|. Clusters are the store's FFN bundles;
- thresholds: for each target sparsity s, the predicted-importance quantile below which a cluster is
  skipped, with recall and precision of that choice on held-out text (the last quarter of the tokens);
- the head's low-rank copy `sparse/head` (Q4_0 blocks): logits ~ (h @ V) @ L.T with V the top `head_rank`
  principal directions of the final hidden states; the runtime rescores the top candidates with exact rows.
  Measured on SmolLM2 (held-out text, exact top-1 among the candidates): rank 128 Q8_0 95.1% (64 candidates)
  / 98.2% (128); rank 256 Q4_0 99.3% / 99.7%; a Q4_0 copy of the whole head 100% with 16, at 2.3x the bytes.

Written into `sparse.partial/` inside the store and renamed, then the attributes are updated (the commit
point): an interrupted calibration leaves the store as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edge import quants
from edge.errors import EdgeError

SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)


def _activation(cfg):
    from edge.model import ACTIVATIONS

    return ACTIVATIONS[cfg.activation]


def collect_activations(src, tokenizer_source, tokens: int, threads: int | None):
    """Run the dense model over calibration text: per layer the FFN input x and activation h, and the final
    hidden states (normed). src: an opened GGUFFile or Store; tokenizer_source: a GGUF with its vocabulary."""
    from edge.evaluate import calibration_text
    from edge.model import Transformer, rms_norm
    from edge.tokenizer import Tokenizer

    cfg = src.config
    model = Transformer(src, min(256, cfg.context_length), backend="ort", threads=threads)
    tok = Tokenizer(tokenizer_source, cfg.arch, src.chat_template)
    ids = tok.encode(calibration_text())
    if len(ids) < tokens:
        raise EdgeError(f"calibration text has {len(ids)} tokens, {tokens} asked; lower --calib-tokens")
    xs: dict[int, list] = {i: [] for i in range(cfg.n_layers)}
    hs: dict[int, list] = {i: [] for i in range(cfg.n_layers)}
    finals: list = []

    def trace(i, point, x):
        if point in ("ffn_in", "ffn_h"):
            (xs if point == "ffn_in" else hs)[i].append(x.astype(np.float32))

    model.trace = trace
    win = model.n_ctx
    for start in range(0, tokens, win):
        chunk = np.asarray(ids[start:start + win])
        model.forward(chunk, 0, all_logits=True)
        finals.append(model.last_hidden)
    model.trace = None
    return model, ({i: np.concatenate(v) for i, v in xs.items()}, {i: np.concatenate(v) for i, v in hs.items()},
                   rms_norm(np.concatenate(finals), model.output_norm, cfg.norm_eps))


def calibrate(store_path: str | Path, rank: int = 64, head_rank: int = 256, tokens: int = 1024,
              threads: int | None = None, progress=None) -> dict:
    """Calibrate a store in place; returns the summary written under attributes["edge"]["sparse"]."""
    import gguf
    import zarr
    from zarr.storage import LocalStore

    from weights_tools.convert import _write_array, commit_group

    from edge.store import Store

    store_path = Path(store_path)
    store = Store(store_path)
    if store.config.n_experts:
        raise EdgeError(f"{store_path}: a mixture of experts: its calibration is weights_tools.moe_traces "
                        "(`edge convert STORE --calibrate` runs it)")
    model, (X, H, Y) = collect_activations(store, store.tokenizer_path, tokens, threads)
    cfg = store.config
    act = _activation(cfg)
    if head_rank % 32:
        raise EdgeError(f"head rank {head_rank}: must be a multiple of 32 (Q4_0 blocks)")
    held = len(Y) * 3 // 4  # fit on the first three quarters, report on the rest
    partial = store_path / "sparse.partial"
    shutil.rmtree(partial, ignore_errors=True)
    group = zarr.create_group(LocalStore(partial))
    layers = []
    for i in range(cfg.n_layers):
        x, h = X[i], H[i]
        cluster = store.attrs["ffn"][i]["cluster"]
        p = f"blk.{i}."
        gt, ut = store.tensor(p + "ffn_gate.weight"), store.tensor(p + "ffn_up.weight")
        gate = quants.dequantize(gt.raw, gt.type_id, gt.cols)
        up = quants.dequantize(ut.raw, ut.type_id, ut.cols)
        g = x[:held] @ gate.T  # (n, hidden): the gate outputs the predictor must reproduce
        _, _, vt = np.linalg.svd(g, full_matrices=False)
        b = vt[:rank].astype(np.float16)  # (rank, hidden)
        a = (gate.T @ vt[:rank].T).astype(np.float16)  # (dim, rank)
        upmean = np.abs(x[:held] @ up.T).mean(axis=0).astype(np.float32)
        aux = np.concatenate([a.view(np.uint8).reshape(-1), b.view(np.uint8).reshape(-1), upmean.view(np.uint8)])
        _write_array(group, f"aux.{i}", aux.reshape(1, -1), 1)
        pred = _predict(x, a, b, upmean, act, cluster)
        true = np.abs(h).reshape(len(h), -1, cluster).sum(-1)
        entry = {"cluster": cluster, "thresholds": {}, "recall": {}, "precision": {}}
        for s in SPARSITIES:
            tau = float(np.quantile(pred[:held], s)) if s > 0 else 0.0
            need = true[held:] >= np.quantile(true[:held], s) if s > 0 else np.ones_like(true[held:], bool)
            chosen = pred[held:] >= tau
            hit = (need & chosen).sum()
            entry["thresholds"][str(s)] = tau
            entry["recall"][str(s)] = float(hit / max(1, need.sum()))
            entry["precision"][str(s)] = float(hit / max(1, chosen.sum()))
        layers.append(entry)
        if progress:
            progress(i + 1, cfg.n_layers + 1)
    # head: top principal directions of the final hidden states
    head_name = "output.weight" if store.has("output.weight") else "token_embd.weight"
    ht = store.tensor(head_name)
    e = quants.dequantize(ht.raw, ht.type_id, ht.cols)  # (vocab, dim)
    _, vecs = np.linalg.eigh(Y[:held].T @ Y[:held])
    v = np.ascontiguousarray(vecs[:, ::-1][:, :head_rank]).astype(np.float32)  # (dim, head_rank)
    low = gguf.quantize(e @ v, gguf.GGMLQuantizationType.Q4_0).view(np.uint8).reshape(len(e), -1)
    del e
    _write_array(group, "head", low, max(1, (1 << 20) // low.shape[1]))
    _write_array(group, "head_basis", v.view(np.uint8).reshape(1, -1), 1)
    head_check = _head_recall(model, Y[held:], v, low)
    summary = {"rank": rank, "head_rank": head_rank, "tokens": int(len(Y)), "layers": layers,
               "head": {"tensor": head_name, **head_check}}
    if progress:
        progress(cfg.n_layers + 1, cfg.n_layers + 1)
    commit_group(store_path, partial, "sparse", summary)
    return summary


def _predict(x, a, b, upmean, act, cluster):
    g = (x @ a.astype(np.float32)) @ b.astype(np.float32)
    p = np.abs(act(g)) * upmean
    return p.reshape(len(p), -1, cluster).sum(-1)


HEAD_CANDIDATES = 128  # rows rescored exactly per token (edge.sparse.ApproxHead)


def _head_recall(model, y, v, low) -> dict:
    """How often the exact head's top token is among the low-rank head's top candidates (held-out states)."""
    exact = model.output(y)[0]
    approx = (y @ v) @ quants.dequantize(low, quants.Q4_0, v.shape[1]).T
    top = np.argpartition(-approx, HEAD_CANDIDATES, axis=1)[:, :HEAD_CANDIDATES]
    best = exact.argmax(axis=1)
    inside = float(np.mean([b in t for b, t in zip(best, top)]))
    return {"candidates": HEAD_CANDIDATES, "top1_in_candidates": inside}


class LayerReplay:
    """The perplexity of one window of tokens after a change at one layer, rerunning only the layers from it on:
    `inputs()` runs the whole model and keeps every layer's input, `ppl_from(l)` reruns layers l.. from the
    kept input of layer l (BitStack's universal order, EdgeMoE's expert profile)."""

    def __init__(self, model, tokens):
        self.model = model
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.xs: list[np.ndarray] = []

    def inputs(self) -> list[np.ndarray]:
        """Run every layer; keep each one's input (and the last one's output, at index n_layers)."""
        m = self.model
        xs, x = [], m.embed(self.tokens)
        for j, layer in enumerate(m.layers):
            xs.append(x)
            x = m._block(j, layer, x, 0)
        self.xs = xs + [x]
        return self.xs

    def ppl_from(self, layer: int) -> float:
        from edge.evaluate import token_nll
        from edge.model import rms_norm

        m = self.model
        x = self.xs[layer]
        for j in range(layer, m.cfg.n_layers):
            x = m._block(j, m.layers[j], x, 0)
        (logits,) = m.output(rms_norm(x, m.output_norm, m.cfg.norm_eps))
        with np.errstate(all="ignore"):
            return float(np.exp(token_nll(logits, self.tokens).mean()))
