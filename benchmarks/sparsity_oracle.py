"""How much FFN sparsity a model tolerates, by granularity and by who chooses: perplexity when, per token and
layer, the least important FFN units are zeroed.

    python benchmarks/sparsity_oracle.py STORE [--sparsity 0.1,0.25,0.5] [--windows 2]

STORE is a calibrated store (`edge convert MODEL --calibrate`). A unit's importance is what it adds to the FFN
output at most, |h_j| * |down[:, j]| summed over its neurons (h = act(gate) * up). Rows:

- neuron oracle: each token drops its least important neurons (the ideal of a per-neuron read);
- cluster oracle, store order: each token drops its least important clusters of the store's bundles (what
  the runtime reads and skips);
- cluster oracle, hot-first order: the same with neurons regrouped by mean importance on calibration text
  (what a neuron permutation at convert time would give; down's quant blocks would be rewritten);
- static: the same store clusters dropped for every token (the least important on average);
- predictor: the store's trained predictors choose per token, as `--sparsity` does, without the cache;
- cats: CATS (Lee et al. 2024): per layer a threshold on |act(gate)|, the s-quantile on calibration text; each
  token drops the neurons under it (gate rows are read whole, up rows and down columns only for the rest:
  a read of 1/3 + 2/3 (1 - s) of the FFN's bytes);
- wcats: the same on |act(gate_j)| * E|up_j| * |down[:, j]| (E|up_j| measured on the calibration text): the
  oracle's importance with up replaced by its mean, still chosen from the gate alone.

The dense model runs resident (edge.model.Transformer, --backend: auto picks ggml for K-quants); windows of 256
tokens of edge eval's text.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    from edge import quants
    from edge.evaluate import eval_text, token_nll, windows
    from edge.model import Transformer
    from edge.sparse import predict, unpack_predictors
    from edge.store import Store
    from edge.tokenizer import Tokenizer
    from weights_tools.calibrate import collect_activations

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--sparsity", default="0.1,0.25,0.5")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--calib-tokens", type=int, default=1024, help="tokens for the hot-first order")
    ap.add_argument("--cluster", type=int, default=0,
                    help="neurons per cluster of the cluster columns (default: the store's bundles)")
    ap.add_argument("--backend", default="auto", help="compute backend of the dense model (default auto)")
    ap.add_argument("--kinds", default="neuron,oracle,hot,static,predictor,cats,wcats",
                    help="the columns to measure (default all)")
    args = ap.parse_args()

    store = Store(args.store)
    cfg, info = store.config, store.sparse
    cluster = args.cluster or store.ffn_layouts[0]["cluster"]
    norms = []
    for i in range(cfg.n_layers):
        t = store.tensor(f"blk.{i}.ffn_down.weight")
        norms.append(np.linalg.norm(quants.dequantize(t.raw, t.type_id, t.cols), axis=0))
    _, mean_imp, _ = collect_activations(store, Tokenizer(store.tokenizer_path, cfg.arch, store.chat_template),
                                              args.calib_tokens, None,
                                              lambda i, h: (np.abs(h) * norms[i]).mean(0, keepdims=True))
    hot = [np.argsort(-mean_imp[i].mean(0)) for i in range(cfg.n_layers)]
    store_order = [np.arange(cfg.hidden_dim)] * cfg.n_layers
    n = [lay["hidden"] // lay["cluster"] for lay in store.ffn_layouts]
    preds = [unpack_predictors(store.read_array(f"sparse/aux.{i}").reshape(-1), cfg.dim, info["rank"], n[i], None)[0]
             for i in range(cfg.n_layers)]

    model = Transformer(store, 256, backend=args.backend)
    tok = Tokenizer(store.tokenizer_path, cfg.arch, store.chat_template)
    wins = windows(tok.encode(eval_text()), 256, args.windows, None)
    rule: dict = {}
    ffn_in: dict = {}
    gates: dict = {}
    levels = [float(v) for v in args.sparsity.split(",")]
    taus, wtaus, weight = cats_thresholds(model, tok, args.calib_tokens, levels, norms) if "cats" in args.kinds \
        else ({}, {}, [])

    def trace(i, point, x):
        if point == "ffn_in":
            ffn_in[i] = x
        if point == "ffn_gate":
            gates[i] = x
        if point != "ffn_h" or not rule:
            return
        s, kind, order = rule["s"], rule["kind"], rule.get("order")
        if kind == "cats":
            x[np.abs(gates[i]) < taus[s][i]] = 0
            return
        if kind == "wcats":
            x[np.abs(gates[i]) * weight[i] < wtaus[s][i]] = 0
            return
        imp = np.abs(x) * norms[i]
        if kind == "neuron":
            np.put_along_axis(x, np.argsort(imp, axis=1)[:, :int(round(x.shape[1] * s))], 0, axis=1)
            return
        groups = order[i].reshape(-1, cluster) if order is not None else np.arange(x.shape[1]).reshape(-1, cluster)
        drop = int(round(len(groups) * s))
        if kind == "static":
            x[:, groups[np.argsort(mean_imp[i].mean(0)[groups].sum(-1))[:drop]].reshape(-1)] = 0
            return
        score = imp[:, groups].sum(-1) if kind == "oracle" else predict(preds[i], ffn_in[i])
        for t, low in enumerate(np.argsort(score, axis=1)[:, :drop]):
            x[t, groups[low].reshape(-1)] = 0

    model.trace = trace

    def ppl() -> float:
        nll = [token_nll(model.forward(np.asarray(w), 0, all_logits=True), w) for w in wins]
        return float(np.exp(np.concatenate(nll).mean()))

    dense = ppl()
    print(f"{args.store}: dense ppl {dense:.3f} ({args.windows} windows of 256 tokens), clusters of {cluster}")
    columns = {"neuron": ("neuron oracle", "neuron", None), "oracle": ("cluster oracle, store order", "oracle",
                                                                      store_order),
               "hot": ("cluster oracle, hot-first", "oracle", hot), "static": ("static", "static", store_order),
               "predictor": ("predictor", "predictor", store_order), "cats": ("CATS |act(gate)|", "cats", None),
               "wcats": ("|act(gate)| E|up| |down|", "wcats", None)}
    chosen = [columns[k] for k in args.kinds.split(",")]
    print("| sparsity | " + " | ".join(title for title, _, _ in chosen) + " |")
    print("|---|" + "---|" * len(chosen))
    for s in levels:
        row = []
        for _, kind, order in chosen:
            rule.update(s=s, kind=kind, order=order)
            p = ppl()
            row.append(f"{p:.2f} ({100 * (p / dense - 1):+.1f}%)")
        rule.clear()
        print(f"| {s:g} | " + " | ".join(row) + " |", flush=True)


def cats_thresholds(model, tok, tokens: int, levels: list[float], norms: list[np.ndarray]):
    """Per sparsity s and layer, the s-quantiles of |act(gate)| and of |act(gate)| * weight over `tokens` of
    calibration text (a sample of every token's neurons), and per layer weight = E|up| * |down column|."""
    from edge.evaluate import calibration_text

    gates: dict[int, list] = {}
    ups: dict[int, np.ndarray] = {}
    last: dict[int, np.ndarray] = {}

    def trace(i, point, x):
        if point == "ffn_gate":
            gates.setdefault(i, []).append(x[:, ::7].copy())
            last[i] = x
        elif point == "ffn_h":
            g = last[i]
            up = np.divide(np.abs(x), np.abs(g), out=np.zeros_like(x), where=np.abs(g) > 1e-6)
            ups[i] = ups.get(i, 0.0) + up.sum(axis=0)

    ids = tok.encode(calibration_text())[:tokens]
    model.trace = trace
    for start in range(0, len(ids), model.n_ctx):
        model.forward(np.asarray(ids[start:start + model.n_ctx]), 0)
    model.trace = None
    layers = sorted(gates)
    weight = [ups[i] / len(ids) * norms[i] for i in layers]
    g = [np.abs(np.concatenate(gates[i])) for i in layers]
    wg = [v * weight[i][::7] for i, v in zip(layers, g)]
    taus = {s: [float(np.quantile(v, s)) for v in g] for s in levels}
    wtaus = {s: [float(np.quantile(v, s)) for v in wg] for s in levels}
    return taus, wtaus, weight


if __name__ == "__main__":
    main()
