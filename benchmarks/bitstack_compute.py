"""BitStack compute: two ways to multiply by a weight held as blocks, per decode token, same blocks, same run.

    python benchmarks/bitstack_compute.py STORE.edge [--bits 3,4] [--threads 2] [--tokens 16]

- signs: what the runtime does (edge.bitstack.StackedGroup): per block, the packed signs become a Q4_0 +-1
  matrix in a scratch buffer (one table lookup per byte) and llama.cpp's kernel computes sign @ (v * x) for the
  k rank components; RAM holds only the blocks (~1 bit per weight each) and one group's scratch.
- rebuild: per linear, rebuild the float32 weight (sum of unpacked signs x u @ v) band by band in the scratch
  buffer, each band times x (what the runtime does for prompt batches); RAM holds the blocks and the scratch.
Prints ms per token for each and their ratio (decode, single tokens after an 8-token prompt). Then live
resize: from the first --bits, the budget grown and shrunk by 10% of the full stack's bytes through
`Engine.resize`, with its time and the bytes it read (expected: exactly the added blocks; none to shrink).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--bits", default="3,4", help="bits per weight to measure at (comma-separated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args(argv)

    from edge import bitstack
    from edge.engine import Engine
    from edge.strategies import Options

    eng = Engine(args.store, n_ctx=256, threads=args.threads, ram=1 << 40, options=Options(strategy="bitstack"))
    model, stack = eng.model, eng.model.parts.linears
    bits = 8 * stack.info.prefix_bytes() / stack.info.params()
    batch = bitstack.REBUILD_TOKENS

    def use(kind: str) -> None:  # the runtime's own switch: batches from REBUILD_TOKENS on are rebuilt
        bitstack.REBUILD_TOKENS = batch if kind == "signs" else 1

    def per_token() -> float:
        model.forward(np.arange(1, 9), 0)
        t0 = time.perf_counter()
        for i in range(args.tokens):
            model.forward(np.asarray([100 + i]), 8 + i)
        return (time.perf_counter() - t0) / args.tokens

    print(f"{Path(args.store).name}, {args.threads} threads, {args.tokens} decode tokens "
          f"({time.strftime('%Y-%m-%d %H:%M')})")
    for b in (float(v) for v in args.bits.split(",")):
        m = int(np.searchsorted(bits, b, side="right")) - 1
        stack.set_prefix(m)
        res = {}
        for kind in ("signs", "rebuild", "signs"):  # ours twice: before and after, for the noise
            use(kind)
            res.setdefault(kind, []).append(per_token())
        s, r = float(np.mean(res["signs"])), res["rebuild"][0]
        print(f"  {bits[m]:.2f} bits/weight: signs through Q4_0 {1e3 * s:.1f} ms/token ({1 / s:.1f} tok/s), "
              f"rebuild float32 + GEMV {1e3 * r:.1f} ms/token ({1 / r:.1f} tok/s): {r / s:.1f}x")
    use("signs")
    from edge.sizes import format_size

    sizes = stack.info.prefix_bytes()
    m = int(np.searchsorted(bits, float(args.bits.split(",")[0]), side="right")) - 1
    stack.set_prefix(m)
    base = eng.plan.minimum - stack.info.base_bytes  # everything but the stack
    step = int(0.1 * sizes[-1])
    for name, target in (("grow", int(sizes[m]) + step), ("shrink", int(sizes[m]))):
        before, read0 = stack.nbytes, stack.read_bytes
        t0 = time.perf_counter()
        eng.resize(base + target)
        took = time.perf_counter() - t0
        print(
            f"  resize {name} by 10% ({format_size(abs(stack.nbytes - before))} of blocks): {1e3 * took:.0f} ms, "
            f"read {format_size(stack.read_bytes - read0)} (blocks added: {format_size(max(0, stack.nbytes - before))})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
