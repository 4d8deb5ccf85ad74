"""Projected decode tok/s of each device profile for several models, from runs measured here.

For every (model, budget) the budgeted runtime runs here once per device profile, in a kernel memory cap of
the budget (as `edge bench --device NAME --vs none`): its reads are timed on the profile's flash curve and
its compute (decode time not spent waiting for reads) is scaled by the ratio of matrix-vector throughput.
One emulated run (reads really slowed to the curve) checks the projection against a measurement.

    python benchmarks/device_projection.py MODEL.edge:BUDGET [MODEL.edge:BUDGET ...] [--out STEM] [-n 12]

writes STEM.csv and STEM.md (default benchmarks/device_projection).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from edge import profile
from edge.bench import bench_one, projection
from edge.sizes import format_size, parse_size
from edge.strategies import Options

PROMPT = "Once upon a time, in a small village by the sea,"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="STORE:BUDGET, e.g. SmolLM2.edge:140MB")
    ap.add_argument("--devices", default=",".join(n for n in profile.names() if n != "this-machine"))
    ap.add_argument("--emulate", default="rpi5-nvme", help="the device whose flash one run really emulates")
    ap.add_argument("-n", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/device_projection")
    args = ap.parse_args()
    gemv_here = profile.measure_gemv(args.threads)
    print(f"this machine: GEMV {gemv_here:.1f} GB/s with {args.threads} threads ({time.strftime('%Y-%m-%d %H:%M')})")
    rows = []
    for spec in args.runs:
        store, _, budget = spec.rpartition(":")
        ram = parse_size(budget, "budget")
        for name in args.devices.split(","):
            dev = profile.load(name)
            for emulate in ([False, True] if name == args.emulate else [False]):
                row = bench_one(Path(store), None, ram, args.n, 256, args.threads, Options(), PROMPT, name,
                                emulate)
                ours = row["ours"]
                if "error" in ours:
                    print(f"{Path(store).name} {name}: {ours['error']}")
                    continue
                p = projection(ours, dev, gemv_here)
                per_token = ours["flash_read_bytes"] / max(1, len(ours["tokens"]))
                rows.append({"model": Path(store).stem, "budget": format_size(ram), "device": name,
                             "emulated": emulate, "here_tok_s": ours["tok_s"], "read_per_token": per_token,
                             "flash_ms": 1e3 * p.flash_s, "compute_ms": 1e3 * p.compute_s, "tok_s": p.tok_s,
                             "tok_s_overlapped": p.tok_s_overlapped})
                r = rows[-1]
                print(f"{r['model']:28} {r['budget']:>7} {name:17} {'emulated' if emulate else '        '} "
                      f"here {r['here_tok_s']:6.2f} tok/s  read {format_size(per_token):>7}/token  "
                      f"projected {r['tok_s']:6.2f}-{r['tok_s_overlapped']:6.2f} tok/s "
                      f"(flash {r['flash_ms']:7.1f} ms, compute {r['compute_ms']:6.1f} ms)")
    out = Path(args.out)
    keys = list(rows[0])
    out.with_suffix(".csv").write_text("\n".join([",".join(keys)] + [",".join(
        f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) for r in rows]) + "\n")
    md = ["| model | budget | device | measured here (tok/s) | flash read / token | flash ms | compute ms | "
          "projected tok/s (serial - overlapped) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['budget']} | {r['device']}{' (emulated)' if r['emulated'] else ''} | "
                  f"{r['here_tok_s']:.2f} | {format_size(r['read_per_token'])} | {r['flash_ms']:.1f} | "
                  f"{r['compute_ms']:.1f} | {r['tok_s']:.2f} - {r['tok_s_overlapped']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
