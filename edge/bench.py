"""`edge bench`: ours and llama.cpp on the same prompt and threads, each under a kernel memory cap of --ram.

Each side runs in its own process inside a fresh memory cgroup (edge.cgroup) with the page cache dropped
first; ours with `--ram` set to the same figure. Reported: decode tok/s, flash bytes read per token
(/proc/<pid>/io), the cgroup's peak, whether the kernel killed it, and the ratios. `--sweep` repeats over a
list of budgets and writes a CSV and an SVG plot (tok/s vs budget, both systems).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from edge.errors import EdgeError
from edge.sizes import format_size, parse_size

PROMPT = "Once upon a time, in a small village by the sea,"


def _peer_main(argv: list[str]) -> int:
    """Child side of the peer: llama.cpp greedy on a GGUF (mmap, as its users run it), one JSON line."""
    import argparse

    import psutil

    from edge.peer import LlamaCpp

    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--ctx", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("-n", type=int)
    ap.add_argument("-p")
    a = ap.parse_args(argv)
    proc = psutil.Process()
    io0 = proc.io_counters().read_bytes
    peer = LlamaCpp(a.gguf, n_ctx=a.ctx, threads=a.threads, logits_all=False)
    prompt = peer.llama.tokenize(a.p.encode())
    tokens, _, decode_s = peer.greedy(prompt, a.n)
    print(json.dumps({"tok_s": (a.n - 1) / decode_s if a.n > 1 else 0.0, "tokens": tokens,
                      "flash_read_bytes": proc.io_counters().read_bytes - io0,
                      "peak_rss_bytes": proc.memory_info().rss}))
    return 0


def _run_capped(cmd: list[str], limit: int, files: list[Path], name: str) -> dict:
    from edge.cgroup import MemoryCap, drop_page_cache

    dropped = drop_page_cache(files)
    cap, why = MemoryCap.make(limit, name)
    t0 = time.perf_counter()
    try:
        if cap is None:
            import subprocess

            proc = subprocess.run(cmd, capture_output=True, text=True)
        else:
            proc = cap.run(cmd)
        out = {"capped": cap is not None, "why_uncapped": why, "cache_dropped": dropped,
               "wall_s": time.perf_counter() - t0, "rc": proc.returncode,
               "cgroup_peak_bytes": cap.peak if cap else None, "killed": bool(cap and cap.oom_killed)}
    finally:
        if cap is not None:
            cap.close()
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if proc.returncode == 0 and line:
        out.update(json.loads(line))
    else:
        out["error"] = (proc.stderr.strip().splitlines() or ["killed" if proc.returncode < 0 else "failed"])[-1]
    return out


def bench_one(store: Path, gguf: Path | None, ram: int, n: int, ctx: int, threads: int, strategy: str,
              sparsity: float, prompt: str, device: str | None = None, emulate: bool = False) -> dict:
    ours_cmd = [sys.executable, "-m", "edge", "run", str(store), "--ram", str(ram), "--ctx", str(ctx), "--threads",
                str(threads), "-n", str(n), "-p", prompt, "--json", "--temp", "0", "--ignore-eos", "--strategy",
                strategy, "--sparsity", str(sparsity)]
    ours_cmd += ["--device", device] + (["--emulate"] if emulate else []) if device else []
    store_files = [f for f in store.rglob("*") if f.is_file()]
    row = {"ram": ram, "ours": _run_capped(ours_cmd, ram, store_files, "edge-bench")}
    if gguf is not None:
        peer_cmd = [sys.executable, "-m", "edge.bench", "peer", str(gguf), "--ctx", str(ctx), "--threads",
                    str(threads), "-n", str(n), "-p", prompt]
        row["peer"] = _run_capped(peer_cmd, ram, [gguf], "edge-bench-peer")
    return row


def _per_token(side: dict) -> float | None:
    toks = len(side.get("tokens", []))
    return side["flash_read_bytes"] / toks if toks and "flash_read_bytes" in side else None


def projection(side: dict, profile, gemv_here: float):
    """What this run would do on the device (edge.profile.project), from its decode figures."""
    from edge.profile import project

    steps = len(side.get("tokens", [])) - 1
    if steps < 1 or "decode_seconds" not in side:
        return None
    compute = max(0.0, side["decode_seconds"] - side["decode_wait_seconds"])
    return project(profile, steps, compute, side["decode_flash_model_seconds"], gemv_here)


def print_projection(p, emulated: bool) -> None:
    print(f"  projected on {p.device}: {p.tok_s:.2f} tok/s with reads and compute in turn, {p.tok_s_overlapped:.2f} "
          f"if they overlap fully (flash {1e3 * p.flash_s:.1f} ms/token on its curve, compute "
          f"{1e3 * p.compute_s:.1f} ms/token = here x {p.gemv_here:.1f}/{p.gemv_target:.1f} GB/s GEMV)"
          + ("" if emulated else "; reads here ran at this machine's speed (add --emulate to run at the device's)"))


def print_row(row: dict) -> None:
    def show(name: str, s: dict) -> str:
        if "error" in s:
            return f"  {name:10} {'killed by the cap' if s.get('killed') else s['error']}"
        per = _per_token(s)
        peak = s.get("cgroup_peak_bytes") or s.get("peak_rss_bytes") or 0
        return (f"  {name:10} {s['tok_s']:7.2f} tok/s  {format_size(per or 0):>8}/token read  "
                f"peak {format_size(peak)}{'' if s['capped'] else ' (no cap: ' + s['why_uncapped'] + ')'}")

    print(f"--ram {format_size(row['ram'])}")
    print(show("edge", row["ours"]))
    if "peer" in row:
        print(show("llama.cpp", row["peer"]))
        o, p = row["ours"].get("tok_s"), row["peer"].get("tok_s")
        if o and p:
            print(f"  ratio      {o / p:.2f}x tok/s")


def write_sweep(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["ram_bytes,edge_tok_s,edge_read_bytes_per_token,edge_peak_bytes,llama_cpp_tok_s,"
             "llama_cpp_read_bytes_per_token,llama_cpp_peak_bytes"]
    for r in rows:
        cells = [str(r["ram"])]
        for side in ("ours", "peer"):
            s = r.get(side, {})
            per = _per_token(s)
            cells += [f"{s['tok_s']:.3f}" if "tok_s" in s else "", f"{per:.0f}" if per else "",
                      str(s.get("cgroup_peak_bytes") or "")]
        lines.append(",".join(cells))
    out.with_suffix(".csv").write_text("\n".join(lines) + "\n")
    plot_sweep(out.with_suffix(".csv"))


def plot_sweep(csv_path: Path) -> None:
    """The sweep's plot, tok/s against the budget for both systems, from its CSV: beside it as .svg and .png."""
    import csv

    from edge.plot import write_plot

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    series = {name: [(float(r["ram_bytes"]), float(r[col]) if r[col] else None) for r in rows]
              for name, col in (("edge", "edge_tok_s"), ("llama.cpp", "llama_cpp_tok_s"))}
    write_plot(Path(csv_path).with_suffix(""), series, "RAM budget (memory cap)", "decode tok/s",
               x_fmt=lambda v: format_size(int(v)), y_fmt=lambda v: f"{v:.0f}")


def cmd_bench(args) -> int:
    store = Path(args.model)
    if not (store / "zarr.json").is_file():
        raise EdgeError(f"{store}: bench runs from a calibrated store; run `edge convert MODEL.gguf --calibrate`")
    gguf = None
    if args.vs == "llama.cpp":
        gguf = Path(args.gguf) if args.gguf else store.parent / json.loads(
            (store / "zarr.json").read_text())["attributes"]["edge"]["source"]["file"]
        if not gguf.is_file():
            raise EdgeError(f"{gguf}: the GGUF for llama.cpp is not there; give it with --gguf")
    profile = None
    if args.emulate and not args.device:
        raise EdgeError("--emulate needs --device NAME: the device whose flash to emulate")
    if args.device:
        from edge.profile import load

        profile = load(args.device)
    ram_text = args.ram or (None if profile is None or profile.ram is None else str(profile.ram)) or "2GB"
    sizes = [parse_size(s, flag="--sweep") for s in args.sweep.split(",")] if args.sweep else [
        parse_size(ram_text, flag="--ram")]
    threads = args.threads or 2
    print(f"edge bench {store.name}: prompt {args.prompt!r}, {args.n} tokens, ctx {args.ctx}, {threads} threads, "
          f"strategy {args.strategy}, sparsity {args.sparsity} ({time.strftime('%Y-%m-%d %H:%M')})")
    gemv_here = None
    if profile is not None:
        from edge.profile import measure_gemv

        gemv_here = measure_gemv(threads)
        print(f"device {profile.name}: {profile.title}; {'flash emulated' if args.emulate else 'flash not emulated'}"
              f"; this machine's GEMV {gemv_here:.1f} GB/s with {threads} threads"
              + ("; llama.cpp reads through mmap at this machine's speed (not emulated)" if gguf else ""))
    rows = []
    for ram in sizes:
        row = bench_one(store, gguf, ram, args.n, args.ctx, threads, args.strategy, args.sparsity, args.prompt,
                        args.device, args.emulate)
        print_row(row)
        if profile is not None and (proj := projection(row["ours"], profile, gemv_here)) is not None:
            print_projection(proj, args.emulate)
            row["projection"] = {"device": proj.device, "tok_s": proj.tok_s, "tok_s_overlapped": proj.tok_s_overlapped,
                                 "flash_s_per_token": proj.flash_s, "compute_s_per_token": proj.compute_s,
                                 "gemv_here_gb_s": proj.gemv_here, "gemv_target_gb_s": proj.gemv_target}
        rows.append(row)
    if args.sweep:
        out = Path(args.out)
        write_sweep(rows, out)
        print(f"wrote {out.with_suffix('.csv')}, {out.with_suffix('.svg')} and {out.with_suffix('.png')}")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        sys.exit(_peer_main(sys.argv[2:]))
