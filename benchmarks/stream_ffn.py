"""Streaming every FFN bundle of one layer per "token" through the I/O engine, with and without coalescing.

    python benchmarks/stream_ffn.py STORE.edge [--threads 4] [--tokens 30]

Reports MB/s and the bundle size, to compare with `edge probe-flash` at that chunk size (random reads, same
thread count). Reads are O_DIRECT, so the page cache does not help either way.
"""

from __future__ import annotations

import argparse
import time

from edge.flash import IOEngine
from edge.store import Store


def stream(store: Store, engine: IOEngine, tokens: int, coalesced: bool) -> tuple[float, int]:
    layers = store.config.n_layers
    total, t0 = 0, time.perf_counter()
    for tok in range(tokens):
        arr = store.array(f"ffn/blk.{tok % layers}")
        f = store._file(arr)
        views = engine.read(f, [(int(o), int(n)) for o, n in zip(arr.offsets, arr.lengths)], coalesced=coalesced)
        total += sum(len(v) for v in views)
    return total / (time.perf_counter() - t0) / 1e6, int(arr.lengths[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=30, help="layers streamed (one per step, cycling)")
    args = ap.parse_args()
    store = Store(args.store)
    for coalesced in (False, True, False, True):
        engine = IOEngine(threads=args.threads, buffer_bytes=64 << 20, max_read=1 << 20)
        mb_s, bundle = stream(store, engine, args.tokens, coalesced)
        print(f"coalesced={coalesced!s:5} bundle={bundle >> 10} KiB reads={engine.stats.reads:5} {mb_s:7.0f} MB/s")
        engine.close()


if __name__ == "__main__":
    main()
