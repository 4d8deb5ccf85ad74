"""Expert-wise bitwidth adaptation (EdgeMoE section 3.3): model size vs perplexity, uniform bitwidths against
adapted mixes of the same size, on one mixture-of-experts store, one process.

    python benchmarks/expert_bits.py MOE.edge --windows 8 --out benchmarks/expert_bits_smollm2

Uniform: every expert at q4_0, q4_1, q5_0, q5_1 and the source's type. Adapted (`edge expert-bits`, its
profile measured once per pair of bounds on held-out calibration text): at each uniform size between the
bounds, the least sensitive experts at the lower bitwidth; as a control, the same number of experts chosen at
random (seed 0) instead of by sensitivity. Perplexity on `edge eval`'s text (other text than the profile's),
WINDOWS windows of 256 tokens. Writes OUT.csv and OUT.svg.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from edge.evaluate import eval_text, windows
    from edge.plot import write_plot
    from edge.store import Store
    from edge.tokenizer import Tokenizer
    from weights_tools.expert_bits import (Variants, adapt, choice_bytes, expert_params, format_bits, kind_bits,
                                          variant_types)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--pairs", default="q4_0/keep,q4_0/q5_0", help="bounds to adapt between, LOW/HIGH,...")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="expert_bits")
    args = ap.parse_args(argv)

    path = Path(args.store)
    pairs = [tuple(p.split("/")) for p in args.pairs.split(",")]
    for low, high in pairs:  # the variants and each pair's profile (reused when already in the store)
        adapt(path, format_bits(Store(path), low), threads=args.threads, pair=(low, high))
    store = Store(path)
    cfg = store.config
    layouts = store.bits["types"]
    kinds = ["keep", *variant_types(store)]
    tok = Tokenizer(store.tokenizer_path, cfg.arch, store.chat_template)
    wins = windows(tok.encode(eval_text(), add_bos=False), 256, args.windows, tok.bos_id if tok.add_bos else None)
    var = Variants(store, kinds, 256, args.threads)
    n_weights = cfg.n_layers * cfg.n_experts * expert_params(cfg)
    rows = []

    def measure(label: str, series: str, choice) -> None:
        size = choice_bytes(store, choice, layouts)
        ppl = var.perplexity(choice, wins)
        rows.append({"config": label, "series": series, "bits_per_weight": round(8 * size / n_weights, 3),
                     "expert_MB": round(size / 1e6, 2), "ppl": round(ppl, 4)})
        print(rows[-1], file=sys.stderr, flush=True)

    every = lambda kind: [[kind] * cfg.n_experts for _ in range(cfg.n_layers)]  # noqa: E731
    for kind in sorted(kinds, key=lambda k: kind_bits(store, k, layouts)):
        measure(f"uniform {kind}", "uniform", every(kind))
    rng = np.random.default_rng(0)
    for low, high in pairs:
        prof = store.bits["profiles"][f"{low}/{high}"]
        scores = np.array(prof["scores"])
        lo_b, hi_b = kind_bits(store, low, layouts), kind_bits(store, high, layouts)
        for kind in kinds:
            b = kind_bits(store, kind, layouts)
            if not lo_b < b < hi_b:
                continue
            attrs = adapt(path, b, threads=args.threads, pair=(low, high))
            measure(f"adapted {low}/{high} at {kind}'s size", f"adapted {low}/{high}", attrs["choice"])
            k = sum(row.count(low) for row in attrs["choice"])
            pick = rng.permutation(scores.size)[:k]
            rand = every(high)
            for flat in pick:
                rand[flat // cfg.n_experts][flat % cfg.n_experts] = low
            measure(f"random {low}/{high} at {kind}'s size", f"random {low}/{high}", rand)
    out = Path(args.out)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    series: dict = {}
    for r in rows:
        series.setdefault(r["series"], []).append((r["bits_per_weight"], r["ppl"]))
    write_plot(out, series, "bits per expert weight", "perplexity", log_y=True, x_fmt=lambda v: f"{v:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
