"""What a neuron-granular FFN record costs: the down projection requantized along the model dimension.

    python benchmarks/neuron_layout.py MODEL.gguf [--formats Q8_0,Q5_0,Q4_0] [--windows 2]

A per-neuron record is the neuron's gate row, its up row and its down column. In K-quant files the down
projection's blocks run along the neurons (256 of them per block), so a column cannot be cut out of the
source's bytes: it has to be requantized as a row of down transposed (blocks along the model dimension). This
measures what that costs, per format: perplexity of the dense model whose down matrices went through the
round trip (everything else as stored, llama.cpp's kernels; the down product in float32 from the round-tripped
values), and the bytes of one neuron's record against the source's bytes per neuron.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    import gguf

    from edge import quants
    from edge.evaluate import eval_text, token_nll, windows
    from edge.gguf_file import GGUFFile
    from edge.head import DenseEmbedding, DenseHead
    from edge.kernels import make_backend
    from edge.model import Transformer
    from edge.parts import ACTIVATIONS, DenseFFN, Parts, StoredLinears
    from edge.sizes import format_size
    from edge.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a GGUF file")
    ap.add_argument("--formats", default="Q8_0,Q5_0,Q4_0", help="formats of down's rows (gguf can quantize them)")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    src = GGUFFile(args.model)
    cfg = src.config
    tok = Tokenizer(src.tokenizer_path, cfg.arch, src.chat_template)
    wins = windows(tok.encode(eval_text()), 256, args.windows, None)
    backend = make_backend("ggml", args.threads)
    act = ACTIVATIONS[cfg.activation]
    stored = StoredLinears(src, backend)

    class RoundTripped:
        """The stored linears, but down from float32 values given per layer."""

        def __init__(self, downs):
            self.downs = downs

        def group(self, i, name):
            if name != "ffn_h":
                return stored.group(i, name)
            w = self.downs[i]  # (hidden, dim): down transposed
            return lambda x: (x @ w,)

        def resize(self, plan):
            pass

    def ppl(linears) -> float:
        parts = Parts(linears, DenseFFN(linears, cfg.n_layers, act), DenseEmbedding(src), DenseHead(src, backend))
        model = Transformer(src, 256, backend=backend, parts=parts)
        nll = [token_nll(model.forward(np.asarray(w), 0, all_logits=True), w) for w in wins]
        return float(np.exp(np.concatenate(nll).mean()))

    def down_t(i: int) -> np.ndarray:
        t = src.tensor(f"blk.{i}.ffn_down.weight")
        return np.ascontiguousarray(quants.dequantize(t.raw, t.type_id, t.cols).reshape(cfg.dim, cfg.hidden_dim).T)

    per_neuron_src = 0
    for i in range(cfg.n_layers):
        g, u, d = (src.tensor(f"blk.{i}.ffn_{k}.weight") for k in ("gate", "up", "down"))
        per_neuron_src += g.raw.shape[1] + u.raw.shape[1] + d.nbytes // cfg.hidden_dim
    per_neuron_src /= cfg.n_layers
    dense = ppl(stored)
    exact = ppl(RoundTripped([down_t(i) for i in range(cfg.n_layers)]))
    print(f"{args.model}: dense ppl {dense:.4f} (down as stored, float32 product: {exact:.4f}); {args.windows} "
          f"windows of 256 tokens; mean bytes per neuron in the source (gate + up rows, down's share) "
          f"{per_neuron_src:.0f}")
    print("| down's rows in | ppl | vs stored | record bytes per neuron | vs source | FFN per layer |")
    print("|---|---|---|---|---|---|")
    for name in args.formats.split(","):
        qt = getattr(gguf.GGMLQuantizationType, name)
        downs, record = [], 0
        for i in range(cfg.n_layers):
            w = down_t(i)
            q = gguf.quants.quantize(w, qt)
            downs.append(gguf.quants.dequantize(q, qt).reshape(w.shape).astype(np.float32))
            g, u = src.tensor(f"blk.{i}.ffn_gate.weight"), src.tensor(f"blk.{i}.ffn_up.weight")
            record += g.raw.shape[1] + u.raw.shape[1] + q.shape[1]
        record /= cfg.n_layers
        p = ppl(RoundTripped(downs))
        print(f"| {name} | {p:.4f} | {100 * (p / exact - 1):+.2f}% | {record:.0f} | "
              f"{100 * (record / per_neuron_src - 1):+.1f}% | {format_size(int(record * cfg.hidden_dim))} |",
              flush=True)


if __name__ == "__main__":
    main()
