"""`edge bench`: ours and native llama.cpp on the same prompt and threads, each under a kernel memory cap of --ram.

Each side runs alone in its own process inside a fresh memory cgroup (edge.cgroup) with the page cache dropped
first; ours with `--ram` set to the same figure, the peer is llama.cpp's own `llama-bench` (edge.native) with
each of its load options (`--repack 1`, `--repack 0`), the better one reported. Reported: decode tok/s, bytes
read from storage per decoded token (/proc/PID/io over the decode window), the cgroup's peak, whether the
kernel killed it, and the ratio. Without --ram both run uncapped (all resident). `--sweep` repeats over a list
of budgets and writes a CSV and an SVG plot (tok/s vs budget, both systems).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from edge.errors import EdgeError
from edge.flags import strategy_flags, strategy_options
from edge.sizes import format_size, parse_size
from edge.store import Store, is_complete
from edge.strategies import Options

PROMPT = "Once upon a time, in a small village by the sea,"


def run_capped(cmd: list[str], limit: int | None, files: list[Path], name: str) -> dict:
    """Run cmd alone in a fresh memory cgroup of `limit` bytes (None: no cap) after dropping the page cache;
    its /proc/PID/io read_bytes is sampled every 20 ms (`io`: (seconds since start, bytes) pairs)."""
    import subprocess
    import tempfile

    from edge.cgroup import MemoryCap, drop_page_cache

    dropped = drop_page_cache(files)
    cap, why = MemoryCap.make(limit, name) if limit else (None, "no --ram")
    samples: list[tuple[float, int]] = []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        try:
            proc = cap.popen(cmd, stdout=out, stderr=err) if cap else subprocess.Popen(cmd, stdout=out, stderr=err)
            io = Path(f"/proc/{proc.pid}/io")
            while proc.poll() is None:
                try:
                    line = next(ln for ln in io.read_text().splitlines() if ln.startswith("read_bytes:"))
                    samples.append((time.perf_counter() - t0, int(line.split()[1])))
                except (OSError, StopIteration, ValueError):
                    pass
                time.sleep(0.02)
            rc = proc.returncode
            side = {"capped": cap is not None, "why_uncapped": why, "cache_dropped": dropped,
                    "wall_s": time.perf_counter() - t0, "rc": rc, "io": samples,
                    "cgroup_peak_bytes": cap.peak if cap else None, "killed": bool(cap and cap.oom_killed)}
        finally:
            if cap is not None:
                cap.close()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    side["stdout"] = stdout
    if rc != 0:
        side["error"] = "killed by the cap" if side["killed"] else (
            stderr.strip().splitlines() or ["killed" if rc < 0 else "failed"])[-1]
    return side


def run_json(cmd: list[str], limit: int | None, files: list[Path], name: str) -> dict:
    """`run_capped` of a command that ends with one JSON line (edge's --json): that object merged in."""
    side = run_capped(cmd, limit, files, name)
    stdout = side.pop("stdout")
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith("{")), None)
    if "error" not in side:
        if line:
            side.update(json.loads(line))
        else:
            side["error"] = "printed no result"
    return side


def _read_in_last(samples: list[tuple[float, int]], seconds: float) -> int | None:
    """Bytes read over the last `seconds` of the samples (the decode window, which ends a llama-bench run)."""
    if len(samples) < 2:
        return None
    end_t, end_b = samples[-1]
    before = [b for t, b in samples if t <= end_t - seconds]
    return end_b - (before[-1] if before else samples[0][1])


def run_ours(store: Path, ram: int | None, n: int, ctx: int, threads: int, options: Options, prompt: str,
             device: str | None = None, emulate: bool = False) -> dict:
    """`edge run --json` greedy in the cap: tok/s over its decode window, MB read in that window."""
    cmd = [sys.executable, "-m", "edge", "run", str(store), "--ctx", str(ctx), "--threads", str(threads), "-n",
           str(n), "-p", prompt, "--raw", "--json", "--temp", "0", "--ignore-eos", *strategy_flags(options)] \
        + (["--ram", str(ram)] if ram else [])
    cmd += ["--device", device] + (["--emulate"] if emulate else []) if device else []
    side = run_json(cmd, ram, [f for f in store.rglob("*") if f.is_file()], "edge-bench")
    if "error" not in side:
        side["read_per_token"] = side["decode_read_bytes"] / max(1, len(side["tokens"]) - 1)
    return side


def run_native(bins: Path, gguf: Path, ram: int | None, n: int, threads: int, repack: int, ngl: int = 0) -> dict:
    """llama.cpp's own `llama-bench -p 0 -n N -r 1` in the cap with one load option (and `-ngl`: its last ngl
    layers on the GPU): tok/s is its average (decode calls only; llama-bench samples nothing); MB read per
    token is the process's read_bytes over the last tok_s-derived decode seconds of the run, divided by N."""
    cmd = [str(bins / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(n), "-t", str(threads), "-r", "1",
           "--repack", str(repack), "-ngl", str(ngl), "-o", "json"]
    side = run_capped(cmd, ram, [gguf], "edge-bench-peer")
    side["repack"], side["ngl"] = repack, ngl
    if "error" not in side:
        try:
            result = json.loads(side.pop("stdout"))[0]
        except (ValueError, IndexError, KeyError):
            side["error"] = "llama-bench printed no result"
            return side
        side["tok_s"] = float(result["avg_ts"])
        read = _read_in_last(side["io"], n / side["tok_s"])
        side["read_per_token"] = read / n if read is not None else None
    return side


def run_completion(bins: Path, gguf: Path, ram: int | None, n: int, ctx: int, threads: int, repack: int,
                   prompt: str, ngl: int = 0) -> dict:
    """llama.cpp's own `llama-completion`, greedy, in the cap: its text, to set beside ours."""
    cmd = [str(bins / "llama-completion"), "-m", str(gguf), "-p", prompt, "-n", str(n), "-c", str(ctx), "-t",
           str(threads), "--temp", "0", "--ignore-eos", "-no-cnv", "--no-display-prompt", "--simple-io",
           "--no-warmup", "-ngl", str(ngl)] + ([] if repack else ["--no-repack"])
    side = run_capped(cmd, ram, [gguf], "edge-bench-peer")
    side["text"] = side.pop("stdout")
    return side


def bench_one(store: Path, gguf: Path | None, ram: int | None, n: int, ctx: int, threads: int, options: Options,
              prompt: str, device: str | None = None, emulate: bool = False,
              bins: Path | None = None, text: bool = True) -> dict:
    """One budget: ours, then (with bins) native llama.cpp with each load option, the better one as `peer`."""
    row = {"ram": ram, "ours": run_ours(store, ram, n, ctx, threads, options, prompt, device, emulate)}
    if bins is not None and gguf is not None:
        ngl = peer_gpu_layers(gguf, options)
        peers = [run_native(bins, gguf, ram, n, threads, repack, ngl) for repack in (1, 0)]
        row["peer_options"] = peers
        row["peer"] = max(peers, key=lambda s: s.get("tok_s", -1.0))
        if text and "tok_s" in row["peer"]:
            row["peer_text"] = run_completion(bins, gguf, ram, n, ctx, threads, row["peer"]["repack"],
                                              prompt, ngl).get("text", "")
    return row


def peer_gpu_layers(gguf: Path, options: Options) -> int:
    """llama.cpp's partial offload at our --gpu-mem: the most layers whose weights fit in it (`-ngl N` puts the
    last N there, their KV cache too; its output layer only with every layer). 0 without --gpu."""
    if not options.gpu:
        return 0
    from edge.gguf_file import GGUFFile
    from edge.offload import find_device, gpu_budget

    src = GGUFFile(gguf)
    sizes = [0] * src.config.n_layers
    for name in src.tensor_names():
        if name.startswith("blk."):
            sizes[int(name.split(".")[1])] += src.tensor(name).raw.nbytes
    room, k = gpu_budget(options, find_device(options.gpu)[3]), 0
    while k < len(sizes) and sizes[-1 - k] <= room:
        room -= sizes[-1 - k]
        k += 1
    return k


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
            return f"  {name:22} {s['error']}"
        per = s.get("read_per_token")
        peak = s.get("cgroup_peak_bytes") or s.get("peak_rss_bytes") or 0
        return (f"  {name:22} {s['tok_s']:7.2f} tok/s  {format_size(per or 0):>8}/token read  "
                f"peak {format_size(peak)}{'' if s['capped'] else ' (no cap: ' + s['why_uncapped'] + ')'}")

    print(f"--ram {format_size(row['ram'])}" if row["ram"] else "no --ram, no cap (all resident)")
    print(show("edge", row["ours"]))
    for opt in row.get("peer_options", []):
        print(show(f"llama.cpp --repack {opt['repack']}" + (f" -ngl {opt['ngl']}" if opt.get("ngl") else ""), opt))
    if "peer" in row:
        o, p = row["ours"].get("tok_s"), row["peer"].get("tok_s")
        if o and p:
            print(f"  ratio                  {o / p:.2f}x tok/s against llama.cpp's better option (--repack "
                  f"{row['peer']['repack']})")
    if "peer_text" in row and "text" in row["ours"]:
        ours, theirs = row["ours"]["text"], row["peer_text"]
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        print(f"  text                   the same for {same} characters (edge {len(ours)}, llama-completion "
              f"{len(theirs)}): {ours[:60]!r}")


def write_sweep(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["ram_bytes,edge_tok_s,edge_read_bytes_per_token,edge_peak_bytes,llama_cpp_tok_s,"
             "llama_cpp_read_bytes_per_token,llama_cpp_peak_bytes"]
    for r in rows:
        cells = [str(r["ram"] or "")]
        for side in ("ours", "peer"):
            s = r.get(side, {})
            per = s.get("read_per_token")
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
    from edge.models import CATALOGUE, resolve_model

    store = resolve_model(args.model, store=True)
    if not is_complete(store):
        raise EdgeError(f"{store}: bench runs from a store; run `edge convert MODEL.gguf` (--calibrate: the head "
                        "leaves RAM)")
    gguf = bins = None
    if args.vs == "llama.cpp":
        if args.gguf:
            gguf = Path(args.gguf)
        elif args.model in CATALOGUE:
            gguf = resolve_model(args.model)
        else:
            gguf = store.parent / Store(store).source["file"]
        if not gguf.is_file():
            raise EdgeError(f"{gguf}: the GGUF for llama.cpp is not there; give it with --gguf")
        from edge.native import backend_of, ensure
        from edge.offload import find_device

        backend = backend_of(find_device(args.gpu)[0]) if args.gpu else ""
        bins = ensure(args.llama_bin, quiet=False, backend=backend)
    profile = None
    if args.emulate and not args.device:
        raise EdgeError("--emulate needs --device NAME: the device whose flash to emulate")
    if args.device:
        from edge.profile import load

        profile = load(args.device)
    ram_text = args.ram or (None if profile is None or profile.ram is None else str(profile.ram))
    if args.sweep:
        sizes = [None if s.strip() in ("none", "0") else parse_size(s, flag="--sweep") for s in args.sweep.split(",")]
    else:
        sizes = [parse_size(ram_text, flag="--ram") if ram_text else None]
    threads = args.threads or 2
    options = strategy_options(args)
    print(f"edge bench {store.name}: prompt {args.prompt!r}, {args.n} tokens, ctx {args.ctx}, {threads} threads, "
          f"{options} ({time.strftime('%Y-%m-%d %H:%M')})")
    if bins is not None:
        print(f"peer: llama.cpp's own llama-bench -p 0 -n {args.n} -r 1 (its context holds its {args.n} tokens) with "
              f"--repack 1 and 0, and llama-completion for the text, from {bins}"
              + ("; with --gpu, -ngl: the layers its weights fit in --gpu-mem" if args.gpu else ""))
    gemv_here = None
    if profile is not None:
        from edge.profile import measure_gemv

        gemv_here = measure_gemv(threads)
        print(f"device {profile.name}: {profile.title}; {'flash emulated' if args.emulate else 'flash not emulated'}"
              f"; this machine's GEMV {gemv_here:.1f} GB/s with {threads} threads"
              + ("; llama.cpp reads through mmap at this machine's speed (not emulated)" if gguf else ""))
    rows = []
    for ram in sizes:
        row = bench_one(store, gguf, ram, args.n, args.ctx, threads, options, args.prompt,
                        args.device, args.emulate, bins)
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
        for row in rows:
            for side in [row["ours"], *row.get("peer_options", [])]:
                side.pop("io", None)
        print(json.dumps(rows))
    return 0
