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
- predictor: the store's trained predictors choose per token, as `--sparsity` does, without the cache.

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
    ap.add_argument("--backend", default="auto", help="compute backend of the dense model (default auto)")
    args = ap.parse_args()

    store = Store(args.store)
    cfg, info = store.config, store.sparse
    cluster = store.ffn_layouts[0]["cluster"]
    norms = []
    for i in range(cfg.n_layers):
        t = store.tensor(f"blk.{i}.ffn_down.weight")
        norms.append(np.linalg.norm(quants.dequantize(t.raw, t.type_id, t.cols), axis=0))
    _, (_, mean_imp, _) = collect_activations(store, Tokenizer(store.tokenizer_path, cfg.arch, store.chat_template),
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

    def trace(i, point, x):
        if point == "ffn_in":
            ffn_in[i] = x
        if point != "ffn_h" or not rule:
            return
        s, kind, order = rule["s"], rule["kind"], rule.get("order")
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
    print("| sparsity | neuron oracle | cluster oracle, store order | cluster oracle, hot-first | static | "
          "predictor |")
    print("|---|---|---|---|---|---|")
    for s in [float(v) for v in args.sparsity.split(",")]:
        row = []
        for kind, order in (("neuron", None), ("oracle", store_order), ("oracle", hot), ("static", store_order),
                            ("predictor", store_order)):
            rule.update(s=s, kind=kind, order=order)
            p = ppl()
            row.append(f"{p:.2f} ({100 * (p / dense - 1):+.0f}%)")
        rule.clear()
        print(f"| {s:g} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
