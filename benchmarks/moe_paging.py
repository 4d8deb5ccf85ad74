"""Expert paging side by side: eviction policy x prefetch on one mixture-of-experts store, one process, one
prompt, the expert cache holding a given fraction of the experts (EdgeMoE's ablation, on our runtime).

    python benchmarks/moe_paging.py MODEL.edge --cache 0.5 -n 64 --out benchmarks/moe_smollm2
    python benchmarks/moe_paging.py MODEL.edge --cache 0.5 --device rpi5-microsd --emulate

Each configuration gets its own Engine (its own store handle and I/O engines; reads bypass the page cache)
under a budget whose plan caches that fraction; the first greedy tokens of every run must agree (paging never
changes what is computed). Reported per run: decode tok/s, expert hit rate (hits + late hits over routed
experts), misses (on-demand reads), prediction precision and recall, MB read per token, seconds waited for
reads. Writes OUT.csv and OUT.md.
"""

from __future__ import annotations

import argparse
import csv
import gc
import sys
from pathlib import Path

# (eviction, prefetch depth (None: a token's k), predictor, cached, label); the first is the paper's baseline:
# every expert loaded when routed to, nothing kept past its layer (the cache at its minimum)
CONFIGS = (("lru", 0, "pregate", False, "on demand, no cache (baseline)"),
           ("lru", 0, "pregate", True, "on demand, LRU"), ("score", 0, "pregate", True, "on demand, EdgeMoE eviction"),
           ("lru", None, "pregate", True, "pre-gated prefetch, LRU"),
           ("score", None, "pregate", True, "pre-gated prefetch, EdgeMoE eviction"))
TRACED = (("score", None, "trace", True, "trace prefetch, EdgeMoE eviction"),)  # with `edge convert --calibrate`
PROMPT = "Explain in a few sentences why the sky is blue, then give three tips for a good night's sleep."


def run(store: Path, cache: float, n: int, threads: int, device: str | None, emulate: bool,
        depth: int | None = None) -> list[dict]:
    from edge.engine import Engine
    from edge.store import Store
    from edge.strategies import Options
    from edge.sampling import Sampler, SamplerConfig

    traced = Store(store).moe is not None
    rows = []
    for evict, prefetch, predict, cached, label in CONFIGS + (TRACED if traced else ()):
        options = Options(evict=evict, prefetch=(depth or _k(store)) if prefetch is None else prefetch,
                          predict=predict)
        engine = Engine(store, n_ctx=256, threads=threads, ram=1 << 40, options=options, device=device,
                        emulate=emulate)
        plan = engine.plan
        d = plan.detail
        slots = max(d.min_slots, round(cache * d.n_experts)) if cached else d.min_slots
        engine.resize(plan.minimum + plan.detail.extra_for(slots))
        prompt = engine.chat_tokens([{"role": "user", "content": PROMPT}])
        events = list(engine.generate(prompt, n, Sampler(SamplerConfig(temperature=0.0)), stop_at_end=False))
        st, last = engine.stats().cache, engine.last
        rows.append({"config": label, "evict": evict, "prefetch": engine.plan.detail.prefetch, "slots": slots,
                     "experts": d.n_experts, "tok_s": round(last.tok_s, 3),
                     "hit_rate": st["hit_rate"], "misses": st["misses"], "late": st["late"],
                     "precision": st["precision"], "recall": st["recall"],
                     "mb_per_token": round(st["read_bytes_per_token"] / 1e6, 3),
                     "wait_s": round(last.decode_wait_seconds, 3), "decode_s": round(last.decode_seconds, 3),
                     "tokens": [e.token for e in events if e.token >= 0]})
        print(f"{label:<40} {rows[-1]['tok_s']:7.2f} tok/s  hit {st['hit_rate']:.3f}  recall {st['recall']:.3f}  "
              f"{rows[-1]['mb_per_token']:.2f} MB/token", file=sys.stderr)
        engine.model.parts.ffn.experts.close()
        del engine
        gc.collect()
    return rows


def _k(store: Path) -> int:
    from edge.store import Store

    return Store(store).config.n_experts_used


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("--cache", type=float, default=0.5, help="fraction of all experts the cache holds (default 0.5)")
    ap.add_argument("-n", type=int, default=64, help="tokens to generate (default 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=None, help="depth of the prefetch rows (default: a token's k)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--emulate", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.csv and OUT.md")
    a = ap.parse_args(argv)
    rows = run(a.store, a.cache, a.n, a.threads, a.device, a.emulate, a.prefetch)
    agree = min(_common_prefix(r["tokens"], rows[0]["tokens"]) for r in rows)
    base = rows[0]["tok_s"] or 1.0
    head = ["config", "tok_s", "speedup", "hit_rate", "misses", "late", "precision", "recall", "mb_per_token", "wait_s"]
    lines = [
        f"`python benchmarks/moe_paging.py {a.store.name} --cache {a.cache} -n {a.n} --threads {a.threads}"
        + (f" --prefetch {a.prefetch}" if a.prefetch is not None else "")
        + (f" --device {a.device}" if a.device else "")
        + (" --emulate" if a.emulate else "")
        + "`",
        f"cache {rows[-1]['slots']}/{rows[-1]['experts']} experts (baseline: {rows[0]['slots']}); tokens identical "
        "across runs for the first "
        f"{agree} of {a.n}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        r["speedup"] = round(r["tok_s"] / base, 2)
        lines.append("| " + " | ".join(str(r[h]) for h in head) + " |")
    print("\n".join(lines))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with open(a.out.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=head + ["evict", "prefetch", "slots", "experts", "decode_s"],
                               extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
