"""The reports `edge info` and `edge devices` print: what a model holds, and the device profiles."""

from __future__ import annotations

from collections import Counter

import numpy as np

from edge import profile, quants
from edge.bitstack import StackInfo
from edge.sizes import format_size, power_of_two_size
from edge.sparse import PREDICTOR
from edge.store import ffn_part


def print_info(args, src, plan=None, note: str | None = None) -> int:
    """`edge info`: what a model holds, by part and format; a store's bundles, calibration and stack; with --ram,
    the plan (`edge.cli.cmd_info` makes it before this module is imported, as a run would)."""
    path = src.path
    cfg = src.config
    parts: Counter = Counter()
    formats: Counter = Counter()
    is_store = src.kind == "edge store"
    store_moe = is_store and cfg.n_experts
    names = src.tensor_names() + ([f"blk.{i}.{n}.weight" for i in range(cfg.n_layers)
                                   for n in ("ffn_gate", "ffn_up", "ffn_down")]
                                  if is_store and not cfg.n_experts else [])
    for name in names:
        t = src.tensor(name)
        part = ("ffn bundles (stream)" if ffn_part(name) else "embeddings (row lookup)" if name == "token_embd.weight"
                else "head" if name == "output.weight" else "experts (paged)" if "_exps." in name
                else "routers" if "gate_inp" in name else "resident (attention, norms)")
        parts[part] += t.nbytes
        formats[quants.type_name(t.type_id)] += t.nbytes
    for i in range(cfg.n_layers if store_moe else 0):  # each expert in its chosen bitwidth (edge expert-bits)
        for t in (t for ex in src.expert_tensors(i) for t in ex):
            parts["experts (paged)"] += t.nbytes
            formats[quants.type_name(t.type_id)] += t.nbytes
    print(f"{path}  [{src.kind}]")
    print(f"{cfg.arch}: {cfg.n_layers} layers, dim {cfg.dim}, ffn {cfg.hidden_dim}, heads {cfg.n_heads}/"
          f"{cfg.n_kv_heads} x {cfg.head_dim}, vocab {cfg.vocab_size}, context {cfg.context_length}"
          + (f", {cfg.n_experts} experts of width {cfg.expert_hidden}, {cfg.n_experts_used} per token"
             if cfg.n_experts else ""))
    if "output.weight" not in names:
        print("head: tied to the token embedding")
    for part, n in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {part:30} {format_size(n):>9}")
    print(f"  {'total':30} {format_size(sum(parts.values())):>9}")
    print("quant formats: " + ", ".join(f"{k} {format_size(v)}" for k, v in formats.most_common()))
    print("compute: ggml, llama.cpp's kernels on the weights as stored (`--backend ort`: onnxruntime, ~10% faster "
          "here at 2-3x the RAM)")
    from edge.ggml import devices

    print("compute devices (ggml's backend registry): " + "; ".join(
        f"{name} ({kind}: {desc}, {format_size(memory)})" for name, desc, kind, memory in devices()))
    if is_store:
        print(f"reads from flash: {src.read_mode()}")
    if is_store and cfg.n_experts:
        lay = src.expert_layouts[0]
        print(
            f"experts: one record each, layer 0 expert "
            f"{format_size(lay['gate_bytes'] + lay['up_bytes'] + lay['down_bytes'])}; "
            f"source {src.source['file']} sha256 {src.source['sha256'][:12]}"
        )
        bits = src.bits
        if bits:
            kinds = Counter(k for row in bits["choice"] for k in row)
            print(
                f"expert bitwidths (edge expert-bits --bits {bits['target_bits']:g}): "
                f"{bits['bits_per_weight']:.2f} bits "
                "per weight, "
                + ", ".join(f"{n} {k if k != 'keep' else 'in the source type'}" for k, n in kinds.most_common())
            )
    elif is_store:
        clusters = Counter(lay["cluster"] for lay in src.ffn_layouts)
        lay = src.ffn_layouts[0]
        bundle = lay["gate_bytes"] + lay["up_bytes"] + lay["down_bytes"]
        print(
            f"ffn bundles: clusters of {', '.join(map(str, clusters))} neurons, layer 0 bundle "
            f"{format_size(bundle)}; source {src.source['file']} sha256 {src.source['sha256'][:12]}"
        )
        _info_calibration(src)
        _info_stack(src)
    if plan is not None:
        print(f"with --ram {args.ram} and --ctx {plan.context}:")
        for line in plan.lines() + ([note] if note else []):
            print("  " + line)
    return 0


def _info_calibration(src) -> None:
    info = src.sparse
    if info is None:
        print("calibration: none (under --ram the head is exact: resident, or read whole at every token when the "
              "budget cannot keep it; `edge convert MODEL --calibrate` replaces it by a low-rank copy and enables "
              "--sparsity)")
        return
    layers = info["layers"]
    parts = []
    for s in sorted(layers[0]["recall"], key=float):
        if float(s) > 0:
            rec = np.mean([lay["recall"][s] for lay in layers])
            prec = np.mean([lay["precision"][s] for lay in layers])
            parts.append(f"{float(s):g}: {rec:.2f}/{prec:.2f}")
    print(f"calibration: {info['tokens']} tokens; predictors rank {info['rank']}, cluster recall/precision by "
          f"sparsity on held-out text: {', '.join(parts)}")
    if info.get("predictor") != PREDICTOR:
        print(f"  predictors from an older edge: `edge convert {src.path} --calibrate` again to use --sparsity")
    else:
        nxt = [f"{float(s):g}: {np.mean([lay['next_recall'][s] for lay in layers[:-1]]):.2f}"
               for s in sorted(layers[0]["next_recall"], key=float) if float(s) > 0]
        print(f"  next layer's clusters predicted from this layer's input (read ahead), recall: {', '.join(nxt)}")
    head = info["head"]
    chat = head.get("chat_top1_in_candidates")
    chat = f", of its own chat answers' {100 * chat:.1f}%" if chat is not None else ""
    print(f"  head: low-rank copy rank {info['head_rank']}, exact top-1 within its {head['candidates']} "
          f"candidates on {100 * head['top1_in_candidates']:.1f}% of held-out text tokens{chat}"
          + (f"; its row cache starts with the {head['hot_rows']} most frequent" if head.get("hot_rows") else ""))
    if "greedy" in head:  # calibrated by this version: the rank is chosen on the runtime head's greedy choices
        print(f"  head: greedy token the full head's on {100 * head['greedy']:.1f}% of held-out text and "
              f"{100 * head['chat_greedy']:.1f}% of its own chat answers, with the second stage rescoring "
              f"{head['second_stage_rows']:.1f} more rows per token")


def _info_stack(src) -> None:
    if src.stack is None:
        print("BitStack: none (`edge stack MODEL.edge` builds one)")
        return
    info, a = StackInfo.of(src), src.stack
    sizes = info.prefix_bytes()
    bpw = 8 / info.params()
    ranks = sorted({lin["rank"] for lin in info.linears.values()})
    print(f"BitStack: {info.iters} blocks per linear (rank {', '.join(map(str, ranks))}), "
          f"{format_size(int(sizes[0]))} ({bpw * sizes[0]:.2f} bits/weight) to {format_size(int(sizes[-1]))} "
          f"({bpw * sizes[-1]:.2f}) in {len(info.order)} steps")
    print("  calibration perplexity with every linear at n blocks: "
          + ", ".join(f"{n}: {p:.2f}" for n, p in enumerate(a["level_ppl"], 1)))
    print(f"  FFN also by clusters of {info.clusters[0]} neurons: `--strategy bitstack-stream` streams it"
          if info.streams_ffn else "  FFN not stored by clusters (`edge stack` again for --strategy bitstack-stream)")


def as_sold(ram_bytes: int) -> str:
    """Device RAM as it is sold: 16 GiB reads 16GB (binary units, decimal names, as vendors write it)."""
    gib = ram_bytes / (1 << 30)
    return f"{gib:g}GB" if gib >= 1 else f"{ram_bytes / (1 << 20):g}MB"


def print_devices(name: str | None) -> int:
    """`edge devices`: the profiles as a table, or one profile's figures and sources."""
    if name is None:
        print(f"{'name':18} {'RAM':>7} {'cores':>5} {'flash':>10} {'GEMV':>9} {'--ram':>7}  title")
        for n in profile.names():
            p = profile.load(n)
            print(
                f"{n:18} {as_sold(p.ram_bytes):>7} {p.cores:>5} {p.flash.mb_s(1 << 20, p.read_threads):>5.0f}MB/s "
                f"{(f'{p.gemv_gb_s:.1f}GB/s' if p.gemv_gb_s else '-'):>9} {format_size(p.ram) if p.ram else '-':>7}  "
                f"{p.title}"
            )
        return 0
    p = profile.load(name, asked_by="edge devices")
    print(f"{p.name}: {p.title}  [{p.path}]")
    print(f"  RAM {as_sold(p.ram_bytes)}, {p.cores} cores{f' ({p.cpu})' if p.cpu else ''}"
          f"{', GPU ' + p.gpu if p.gpu else ''}")
    print(f"  defaults: --threads {p.threads or 'all'}, {p.read_threads} read threads, --ram "
          f"{format_size(p.ram) if p.ram else 'none'}, bundles of {power_of_two_size(p.cluster_bytes)} for convert")
    if p.gemv_gb_s:
        print(f"  compute: {p.gemv_gb_s:.1f} GB/s of weights per decode step ({p.compute_basis})")
    print(f"  flash: {p.flash_kind}; by read size and queue depth, MB/s | mean latency of a read in ms:")
    print("  " + "chunk".rjust(8) + "".join(f"{'QD' + str(q):>7}" for q in profile.DEPTHS) + "  |"
          + "".join(f"{'QD' + str(q):>7}" for q in profile.DEPTHS))
    for c in profile.CHUNKS:
        label = power_of_two_size(c)
        rates = [p.flash.mb_s(c, q) for q in profile.DEPTHS]
        print("  " + label.rjust(8) + "".join(f"{r:7.0f}" for r in rates) + "  |"
              + "".join(f"{q * c / (r * 1e3):7.2f}" for q, r in zip(profile.DEPTHS, rates)))
    for src in p.sources:
        print(f"  source: {src.get('what', '')} <{src.get('url', '')}>")
    return 0
