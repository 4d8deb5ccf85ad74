"""Decode speed with the whole model in RAM: edge vs llama.cpp, same GGUF, prompt, threads, greedy.

Runs both in one process, interleaved (edge, llama.cpp, edge, llama.cpp, ...), and reports medians and the
ratio, so machine noise hits both sides alike.

    python benchmarks/decode_vs_llamacpp.py                # both real models, 2 threads, 64 tokens, 3 rounds
    python benchmarks/decode_vs_llamacpp.py --threads 4 -n 128 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

from edge.engine import Engine
from edge.models import default_model_path, gemma3_270m_path
from edge.peer import LlamaCpp

PROMPT = "Once upon a time, in a small village by the sea,"


def bench_model(path, threads: int, n: int, rounds: int) -> dict:
    engine = Engine(path, n_ctx=512, threads=threads)
    peer = LlamaCpp(path, n_ctx=512, threads=threads, logits_all=False)
    prompt = engine.tokenizer.encode(PROMPT)
    ours, theirs, ours_pf, theirs_pf = [], [], [], []
    for _ in range(rounds):
        engine.cached = []
        for _ev in engine.generate(prompt, n, stop_at_end=False):
            pass
        ours.append(engine.last.tok_s)
        ours_pf.append(engine.last.prefill_tok_s)
        time.sleep(0.5)  # let idle worker threads (ORT's pool, llama.cpp's OpenMP) stop spinning between sides
        _, prefill_s, decode_s = peer.greedy(prompt, n)
        theirs.append(n / decode_s)
        theirs_pf.append(len(prompt) / prefill_s)
        time.sleep(0.5)
    o, t = statistics.median(ours), statistics.median(theirs)
    return {"model": engine.name, "edge_tok_s": o, "llama_cpp_tok_s": t, "ratio": o / t,
            "edge_prefill_tok_s": statistics.median(ours_pf), "llama_cpp_prefill_tok_s": statistics.median(theirs_pf)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=64, help="tokens decoded per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"threads={args.threads} n={args.n} rounds={args.rounds} prompt={PROMPT!r}  "
          f"({time.strftime('%Y-%m-%d %H:%M')})")
    print(f"{'model':34} {'edge tok/s':>10} {'llama.cpp':>10} {'ratio':>6} {'edge pf':>8} {'l.cpp pf':>8}")
    for path in (default_model_path(), gemma3_270m_path()):
        r = bench_model(path, args.threads, args.n, args.rounds)
        print(f"{r['model'][:34]:34} {r['edge_tok_s']:10.1f} {r['llama_cpp_tok_s']:10.1f} {r['ratio']:6.2f} "
              f"{r['edge_prefill_tok_s']:8.0f} {r['llama_cpp_prefill_tok_s']:8.0f}")


if __name__ == "__main__":
    main()
