"""Under a RAM budget, each run in a kernel memory cap of that budget: tok/s, flash MB per token, perplexity,
and greedy top-1 agreement with the dense model, for budgets x sparsity targets x strategies.

    python benchmarks/budget_table.py STORE [STORE...]           # calibrated stores (edge convert --calibrate)
    python benchmarks/budget_table.py STORE --budgets 140MiB,200MiB --sparsity 0,0.25,0.5 -n 32

tok/s and MB/token come from `edge run --json` (greedy, --ignore-eos), perplexity from `edge eval` (ctx 256,
2 windows; positions one at a time when predictors skip clusters), both capped by `edge bench`'s cgroup
helper. Agreement: teacher-forced over 256 tokens of the evaluation text, the budgeted model's top-1 against
the dense model's (llama.cpp's kernels, all in RAM).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from edge.bench import PROMPT, run_json
from edge.sizes import format_size, parse_size


def agreement(store_path: Path, budget: int, sparsity: float, strategy: str, n: int = 256) -> float:
    from edge import strategies
    from edge.evaluate import eval_text
    from edge.model import PREFILL_CHUNK, Transformer
    from edge.store import Store
    from edge.tokenizer import Tokenizer

    store = Store(store_path)
    tok = Tokenizer(store.tokenizer_path, store.config.arch, store.chat_template)
    toks = np.array(tok.encode(eval_text()[:30000])[:n])
    dense = Transformer(store, n, backend="ggml", threads=2)
    ref = np.concatenate([dense.forward(toks[i:i + PREFILL_CHUNK], i, all_logits=True)
                          for i in range(0, n, PREFILL_CHUNK)])
    del dense
    options = strategies.Options(strategy=strategy, sparsity=sparsity)
    plan = strategies.get(strategy).plan(store, budget, 70 << 20, n, options)  # a fresh process's baseline
    model = strategies.load(store, n, plan, threads=2)
    ours = np.concatenate([model.forward(toks[i:i + 1], i) [None] for i in range(n)])  # token by token
    return float((ours.argmax(1) == ref.argmax(1)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--budgets", default=None, help="comma-separated (default: 140MiB,200MiB for SmolLM2, "
                                                    "300MiB,400MiB otherwise)")
    ap.add_argument("--sparsity", default="0,0.25,0.5")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive rows")
    args = ap.parse_args()
    print(f"({time.strftime('%Y-%m-%d %H:%M')}, 2 threads, ctx 256, prompt {PROMPT!r}, {args.n} tokens)")
    print("| model | budget | strategy | sparsity | tok/s | flash MB/token | cache % | ppl | top-1 vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for store in map(Path, args.stores):
        default = "140MiB,200MiB" if "SmolLM2" in store.name else "300MiB,400MiB"
        for budget in [parse_size(b) for b in (args.budgets or default).split(",")]:
            configs = [("sparse", float(s)) for s in args.sparsity.split(",")] + [("naive", 0.0)] * (not args.no_naive)
            for strategy, sparsity in configs:
                common = ["--ram", str(budget), "--ctx", "256", "--threads", "2", "--strategy", strategy,
                          "--sparsity", str(sparsity)]
                cmd = [sys.executable, "-m", "edge", "run", str(store), "-p", PROMPT, "--raw", "-n", str(args.n),
                       "--json", "--temp", "0", "--ignore-eos", *common]
                run = run_json(cmd, budget, [], "edge-table")
                ev = run_json([sys.executable, "-m", "edge", "eval", str(store), "--chunks", "2", "--json",
                                  *common], budget, [], "edge-table")
                if "error" in run or "error" in ev:
                    print(f"| {store.stem} | {format_size(budget)} | {strategy} | {sparsity:g} | "
                          f"{run.get('error') or ev.get('error')} |")
                    continue
                agree = agreement(store, budget, sparsity, strategy)
                per = run["cache"]["read_bytes_per_token"] / 1e6
                print(f"| {store.stem} | {format_size(budget)} | {strategy} | {sparsity:g} | {run['tok_s']:.1f} | "
                      f"{per:.1f} | {100 * run['plan']['cached_fraction']:.0f} | {ev['ppl']:.3f} | "
                      f"{100 * agree:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
