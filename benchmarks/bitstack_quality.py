"""BitStack size/quality: perplexity of a stacked store at every ~0.25 bit per weight of its linears, against
llama.cpp's own quantizer on the same weights.

    python benchmarks/bitstack_quality.py STORE.edge --gguf SOURCE.gguf [--ctx 256 --windows 8] [--out STEM]

- BitStack: one engine, `Stack.set_prefix` to each size (the loaded blocks of the universal order's prefix),
  perplexity with our runtime over `edge eval`'s text;
- llama.cpp: the source dequantized to an F32 GGUF, quantized by llama_model_quantize to Q2_K, Q3_K_S, Q4_0,
  Q4_K_M with the token embedding kept at the source's type (so only the linears differ), perplexity from
  llama.cpp's logits on the same windows; the source itself by both runtimes (they agree: parity).
- bits per weight: bytes of the 7 linears of every layer (q, k, v, o, gate, up, down) x 8 / their weights.

Writes STEM.csv, STEM.md (table) and STEM.svg (perplexity vs bits per weight, log scale).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUANTS = ("Q2_K", "Q3_K_S", "Q4_0", "Q4_K_M")


def linear_bits(path: Path) -> tuple[float, str]:
    """Bits per weight of a GGUF's layer matrices, and their types."""
    import gguf

    from collections import Counter

    r = gguf.GGUFReader(str(path))
    nbytes = n = 0
    types: Counter = Counter()
    for t in r.tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2:
            nbytes += int(t.n_bytes)
            n += int(t.n_elements)
            types[t.tensor_type.name] += int(t.n_elements)
    mix = ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in types.most_common())
    return 8 * nbytes / n, mix


def peer_ppl(path: Path, wins, ctx: int, threads: int) -> float:
    from edge.evaluate import perplexity, token_nll
    from edge.peer import LlamaCpp

    peer = LlamaCpp(path, n_ctx=ctx, threads=threads)
    return perplexity(lambda w: token_nll(peer.logits(w), w), wins).ppl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--gguf", required=True, help="the GGUF the store was converted from")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--step", type=float, default=0.25, help="bits per weight between BitStack points")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/bitstack_<store name>)")
    args = ap.parse_args(argv)

    from edge.engine import Engine
    from edge.strategies import Options
    from edge.evaluate import eval_text, perplexity, windows
    from edge.sizes import format_size
    from weights_tools.dequant_gguf import quantize_with_llama_cpp, write_dequantized
    from edge.gguf_file import GGUFFile

    eng = Engine(args.store, n_ctx=args.ctx, threads=args.threads, ram=1 << 40,
                 options=Options(strategy="bitstack"))
    tok = eng.tokenizer
    wins = windows(tok.encode(eval_text(), add_bos=False), args.ctx, args.windows, tok.bos_id if tok.add_bos else None)
    stack = eng.model.parts.linears
    sizes, params = stack.info.prefix_bytes(), stack.info.params()
    bits = 8 * sizes / params
    rows = []
    targets = np.arange(np.ceil(bits[0] / args.step) * args.step, bits[-1] + 1e-9, args.step)
    prefixes = sorted({int(np.searchsorted(bits, b, side="right")) - 1 for b in targets} | {0, len(bits) - 1})
    for m in prefixes:
        stack.set_prefix(m)
        t0 = time.perf_counter()
        p = perplexity(eng.model.nll, wins).ppl
        rows.append(dict(system="BitStack", bits=float(bits[m]), linear_bytes=int(sizes[m]), ppl=p,
                         detail=f"{m}/{len(stack.info.order)} blocks past the base"))
        print(f"BitStack {bits[m]:.2f} bpw {format_size(int(sizes[m]))}: ppl {p:.3f} ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    src = Path(args.gguf)
    src_bits, src_mix = linear_bits(src)
    ours_src = perplexity(Engine(src, n_ctx=args.ctx, threads=args.threads).model.nll, wins).ppl
    rows.append(dict(system="source (ours)", bits=src_bits, linear_bytes=int(src_bits * params / 8), ppl=ours_src,
                     detail=src_mix))
    rows.append(dict(system="source (llama.cpp)", bits=src_bits, linear_bytes=int(src_bits * params / 8),
                     ppl=peer_ppl(src, wins, args.ctx, args.threads), detail=src_mix))
    embd_type = GGUFFile(src).tensor("token_embd.weight").type_id
    with tempfile.TemporaryDirectory() as tmp:
        f32 = write_dequantized(src, Path(tmp) / "f32.gguf")
        for q in QUANTS:
            path = quantize_with_llama_cpp(f32, Path(tmp) / f"{q}.gguf", q, token_embedding_type=embd_type,
                                           threads=args.threads)
            b, mix = linear_bits(path)
            p = peer_ppl(path, wins, args.ctx, args.threads)
            rows.append(dict(system=f"llama.cpp {q}", bits=b, linear_bytes=int(b * params / 8), ppl=p, detail=mix))
            print(f"llama.cpp {q} {b:.2f} bpw ({mix}): ppl {p:.3f}", flush=True)
    out = Path(args.out or f"benchmarks/bitstack_{Path(args.store).stem}")
    write(rows, out, f"{Path(args.store).name}, {len(wins)} windows of {args.ctx} tokens of `edge eval`'s text, "
                     f"{params / 1e6:.1f}M weights in the stacked linears ({time.strftime('%Y-%m-%d')})")
    return 0


def write(rows: list[dict], out: Path, title: str) -> None:
    from edge.plot import write_plot

    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["system,bits_per_weight,linear_bytes,ppl,detail"]
    lines += [f"{r['system']},{r['bits']:.4f},{r['linear_bytes']},{r['ppl']:.4f},\"{r['detail']}\"" for r in rows]
    out.with_suffix(".csv").write_text("\n".join(lines) + "\n")
    md = [f"{title}", "", "| system | bits/weight (linears) | linears | perplexity | detail |", "|---|---|---|---|---|"]
    from edge.sizes import format_size

    md += [f"| {r['system']} | {r['bits']:.2f} | {format_size(r['linear_bytes'])} | {r['ppl']:.2f} | {r['detail']} |"
           for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    series = {
        "BitStack": [(r["bits"], r["ppl"]) for r in rows if r["system"] == "BitStack"],
        "llama.cpp quantizer": sorted((r["bits"], r["ppl"]) for r in rows if r["system"].startswith("llama.cpp ")),
        "source": [(r["bits"], r["ppl"]) for r in rows if r["system"] == "source (ours)"],
    }
    write_plot(out, series, "bits per weight (layer linears)", "perplexity (log)", log_y=True,
               points_only=("source",))


if __name__ == "__main__":
    raise SystemExit(main())
