"""The headline table of benchmarks/README.md: edge against native llama.cpp, each alone in the same kernel cap.

Each row is one `edge bench MODEL --ram CAP -n 32 --json` (ours, then llama.cpp's own llama-bench with
`--repack 1` and `--repack 0`, the better one reported, and llama-completion for the text) and one capped
`edge eval MODEL --ram CAP --ctx 512 --chunks 1` for edge's perplexity with the settings of that run.

    python benchmarks/headline.py smollm2-135m:140MB,120MB,100MB,80MB,none gemma3-270m:300MB,200MB,none \\
        qwen2.5-coder-1.5b:800MB,600MB,400MB,none STORE.edge=GGUF:500MB,700MB,none

A model is a name from `edge models` (its store prepared with `edge convert NAME --calibrate`; without
--calibrate the head stays resident) or STORE=GGUF; `none` is the uncapped, all-resident row. Prints one
markdown row per cap as it goes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from edge.bench import run_json
from edge.sizes import format_size, parse_size


def bench(model: str, gguf: str | None, cap: int | None) -> dict:
    cmd = [sys.executable, "-m", "edge", "bench", model, "-n", "32", "--json"]
    cmd += (["--ram", str(cap)] if cap else []) + (["--gguf", gguf] if gguf else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("[")), None)
    if line is None:
        raise SystemExit(f"edge bench failed: {out.stderr.strip()[-400:]}")
    return json.loads(line)[0]


def perplexity(model: str, cap: int | None) -> str:
    cmd = [sys.executable, "-m", "edge", "eval", model, "--ctx", "512", "--chunks", "1", "--threads", "2",
           "--json"] + (["--ram", str(cap)] if cap else [])
    side = run_json(cmd, cap, [], "edge-headline")
    return f"{side['ppl']:.3f}" if "ppl" in side else side.get("error", "?")


def cell(side: dict, key: str, fmt) -> str:
    value = side.get(key)
    return fmt(value) if value is not None else "-"


def main() -> None:
    print(f"({time.strftime('%Y-%m-%d %H:%M')}, 2 threads, greedy, 32 tokens, ctx 512, prompt "
          f"'Once upon a time, in a small village by the sea,')")
    print("| model | cap | edge tok/s | llama.cpp tok/s (best of --repack 1/0) | ratio | MB read/token edge / "
          "llama.cpp | peak edge / llama.cpp | edge ppl | command |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        model, _, caps = arg.rpartition(":")
        model, _, gguf = model.partition("=")
        for text in caps.split(","):
            cap = None if text == "none" else parse_size(text)
            row = bench(model, gguf or None, cap)
            ours, peer = row["ours"], row.get("peer", {})
            opts = " / ".join(f"{o['tok_s']:.2f}" if "tok_s" in o else ("killed" if o.get("killed") else "failed")
                              for o in row.get("peer_options", []))
            ratio = f"{ours['tok_s'] / peer['tok_s']:.2f}" if "tok_s" in ours and "tok_s" in peer else "-"
            mb = f"{cell(ours, 'read_per_token', lambda v: f'{v / 1e6:.1f}')} / " \
                 f"{cell(peer, 'read_per_token', lambda v: f'{v / 1e6:.1f}')}"
            peak = f"{cell(ours, 'cgroup_peak_bytes', format_size)} / {cell(peer, 'cgroup_peak_bytes', format_size)}"
            edge_speed = f"{ours['tok_s']:.2f}" if "tok_s" in ours else ours.get("error", "?")
            name = Path(model).name
            command = f"`edge bench {model}{' --gguf ' + gguf if gguf else ''}{' --ram ' + text if cap else ''} -n 32`"
            print(f"| {name} | {text if cap else 'none (resident)'} | {edge_speed} | {opts} | {ratio} | {mb} | "
                  f"{peak} | {perplexity(model, cap)} | {command} |", flush=True)


if __name__ == "__main__":
    main()
