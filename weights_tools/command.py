"""`edge convert`, registered through the `edge.commands` entry point."""

import argparse
import sys

EXAMPLES = """examples:
  edge convert model.gguf                      # writes model.edge/ beside it
  edge convert model.gguf -o /mnt/nvme/model.edge --cluster 64
  edge convert model.gguf --device rpi5-microsd  # bundles sized for that device's flash
  edge convert model.gguf --quant Q8_0           # requantize every matrix to Q8_0
  edge convert ./SmolLM2-hf --tokenizer-pre smollm --quant Q8_0   # a Hugging Face directory
  edge convert model.gguf --calibrate          # convert, then calibrate for --ram runs
  edge convert model.edge --calibrate          # calibrate an existing store in place
  edge convert --calibrate                     # the default model, for `edge run --ram 150MB`
  edge convert qwen2.5-coder-1.5b --calibrate --ram 600MB   # calibration under 600MB (more RAM: faster)
  edge convert mixtral.gguf --calibrate        # a mixture of experts: routing traces for --predict trace
"""


def register(sub) -> None:
    p = sub.add_parser("convert", help="write a GGUF as a flash store (row-column bundled FFN)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", default=None,
                   help="a GGUF model file, a model name from `edge models` (its store goes beside it in the cache "
                        "dir), or a Hugging Face directory (config.json, *.safetensors, tokenizer.json); "
                        "omitted: the default model, into the cache dir (what --ram without MODEL runs)")
    p.add_argument("-o", "--out", default=None, help="the store directory to write (default: SRC with .edge)")
    p.add_argument("--cluster", type=int, default=None,
                   help="neurons per FFN bundle (a multiple of the down projection's block; default from size)")
    p.add_argument("--device", default=None, metavar="NAME",
                   help="size the FFN bundles for this device profile's flash (`edge devices`; default: this "
                        "machine's `edge probe-flash` curve, else 32KiB)")
    p.add_argument("--quant", default="keep", type=str.lower,
                   choices=("keep", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16"),
                   metavar="{keep,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,F16}",
                   help="keep the source's quant types (default; bit-identical results) or requantize the matrices "
                        "to one type (any case)")
    p.add_argument("--tokenizer-pre", default="default",
                   help="Hugging Face sources: llama.cpp's pre-tokenizer name (smollm, llama-bpe, qwen2, ...)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure neuron order, sparsity thresholds, predictors and the head's low-rank copy on "
                        "calibration text (under --ram the head then leaves RAM, and --sparsity works); on a "
                        "mixture of experts, record routing traces (for --predict trace and eviction); SRC may be "
                        "an existing store. It needs one layer in RAM at a time (Qwen2.5-Coder-1.5B: 458MB, ~7 min "
                        "on 2 cores) and keeps more layers where --ram allows (4.5 min with all of them)")
    p.add_argument("--ram", default=None, metavar="SIZE",
                   help="--calibrate stays under this much memory: at least what one layer at a time takes (said "
                        "when below); more keeps layers in RAM, which is faster (default: up to half the memory "
                        "free)")
    p.add_argument("--rank", type=int, default=64, help="rank of the per-layer predictors (default 64)")
    p.add_argument("--calib-tokens", type=int, default=None,
                   help="calibration tokens (default 4096; routing traces of a mixture of experts: 1024)")
    p.add_argument("--head-rank", type=int, default=None,
                   help="rank of the head's low-rank copy, a multiple of 32 (default: the smallest from 256 that "
                        "keeps the full head's greedy token among its candidates on 99%% of held-out text and "
                        "chat answers); higher agrees more often and takes more RAM")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress-lines", action="store_true", help=argparse.SUPPRESS)  # "FRACTION LABEL" lines (chat UI)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    import time

    from pathlib import Path

    from edge.dirs import bytes_under
    from edge.models import CATALOGUE, resolve_model
    from edge.sizes import format_size
    from edge.store import Store, is_store
    from weights_tools.convert import Progress, convert

    from edge.errors import EdgeError
    from edge.sizes import parse_size

    ram = parse_size(args.ram, flag="--ram") if args.ram else None
    if ram is not None and not args.calibrate:
        raise EdgeError("--ram bounds calibration's memory: give it with --calibrate (converting holds one tensor "
                        "at a time)")
    t0 = time.perf_counter()
    named = args.src is None or (args.src in CATALOGUE and not Path(args.src).exists())
    if named and args.out is None:
        progress = Progress(1, 1, args.quiet or args.progress_lines)

        def tell(f: float, label: str) -> None:
            progress.advance_to(int(1000 * f), 1000, label, unit=None)
            if args.progress_lines:
                print(f"{f:.3f} {label}", file=sys.stderr, flush=True)

        try:
            out = prepare_store(args.src, tell, calibrate=args.calibrate, force=args.calibrate, warn=_warn, ram=ram)
        finally:
            progress.close()
        print(f"prepared {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        return 0
    src = resolve_model(args.src)  # None: the default model; a name: its pulled GGUF
    args.src = str(src)
    if args.calibrate and is_store(src) and src.is_dir():
        out = src
    else:
        out = convert(args.src, args.out, cluster=args.cluster, quiet=args.quiet, quant=args.quant,
                      tokenizer_pre=args.tokenizer_pre, device=args.device)
    if args.calibrate and Store(out).is_moe:
        from weights_tools.moe_traces import calibrate_experts

        if ram is not None:
            raise EdgeError(f"--ram: {out} is a mixture of experts, whose routing traces hold the model while "
                            f"they run; calibrate it without --ram")
        t1 = time.perf_counter()
        progress = Progress(1, 1, args.quiet)
        try:
            summary = calibrate_experts(out, tokens=args.calib_tokens or 1024, progress=lambda done, total:
                                        progress.advance_to(done, total, "route traces", "layers"))
        finally:
            progress.close()
        rec = summary["table_recall"]
        print(f"recorded routing traces of {out} in {time.perf_counter() - t1:.1f}s ({summary['tokens']} tokens): "
              f"held-out recall of the trace predictor {min(rec):.2f}-{max(rec):.2f} "
              f"(mean {sum(rec) / len(rec):.2f})", file=sys.stderr)
    elif args.calibrate:
        from weights_tools.calibrate import calibrate

        t1 = time.perf_counter()
        progress = Progress(1, 1, args.quiet)
        try:
            summary = calibrate(
                out,
                rank=args.rank,
                head_rank=args.head_rank,
                tokens=args.calib_tokens or 4096,
                threads=None,
                progress=lambda done, total: progress.advance_to(done, total, "calibrate"),
                warn=_warn,
                ram=ram,
            )
        finally:
            progress.close()
        rec = [layer["recall"]["0.5"] for layer in summary["layers"]]
        print(f"calibrated {out} in {time.perf_counter() - t1:.1f}s: predictor recall at 50% sparsity "
              f"{min(rec):.2f}-{max(rec):.2f}; head rank {summary['head_rank']}, its greedy token the full "
              f"head's on held-out text {summary['head']['greedy']:.3f}, chat answers "
              f"{summary['head']['chat_greedy']:.3f}", file=sys.stderr)
    size = bytes_under(out)
    print(f"wrote {out} ({format_size(size)}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def prepare_store(name: str | None = None, on_progress=None, calibrate: bool = True, force: bool = False,
                  warn=None, ram: int | None = None):
    """A named model (None: the default, SmolLM2-135M-Instruct) as a store in the cache dir, what `--ram` with
    that name (or without a MODEL) runs: pulled if needed, converted once (seconds), with calibrate also
    calibrated (minutes: the head leaves RAM, --sparsity works), then reused. A complete store left by an
    interrupted run is calibrated, not converted again; force calibrates a calibrated one again.
    on_progress(fraction, label); warn(line), ram: calibration's (weights_tools.calibrate)."""
    import shutil

    from edge.models import pull, store_path
    from edge.store import is_calibrated, is_complete
    from weights_tools.calibrate import calibrate as run_calibration
    from weights_tools.convert import convert

    target = store_path(name, check=False)
    if not force and (is_calibrated(target) if calibrate else is_complete(target)):
        return target
    tell = on_progress or (lambda f, label: None)
    share = 0.1 if calibrate else 0.5  # of the progress: pulling, then converting, then calibrating
    if not is_complete(target):
        if target.exists():  # not a store edge wrote whole: start over
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        gguf = pull(name or "smollm2-135m", quiet=True, on_progress=lambda f: tell(share * f, "pulling"))
        convert(gguf, target, quiet=True, on_progress=lambda f, label: tell(share * (1 + f), "converting"))
    if calibrate:
        run_calibration(target, progress=lambda d, t: tell(2 * share + (1 - 2 * share) * d / t, "calibrating"),
                        warn=warn, ram=ram)
    return target


STACK_EXAMPLES = """examples:
  edge stack model.edge                        # 16 blocks per linear, rank scaled to each matrix
  edge stack model.edge --iters 8 --rank 4     # fewer, cheaper blocks
  edge run model.edge --ram 200MB              # then: as many blocks as 200MB allows
  edge eval model.edge --ram 150MB             # perplexity at that size
  edge info model.edge --ram 150MB             # the depth a budget gives

Interrupted? Run the same command again: it continues where it stopped.
"""


def register_stack(sub) -> None:
    p = sub.add_parser("stack", help="BitStack: decompose a store's weights into ~1-bit residual blocks, loadable "
                                     "at any size", epilog=STACK_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="a store written by `edge convert` (a .edge directory)")
    p.add_argument("--iters", type=int, default=16, help="residual blocks per linear (default 16)")
    p.add_argument("--rank", type=int, default=None,
                   help="rank of each block's magnitude factors (default: scaled to the matrix, 16 on 4096 x 4096)")
    p.add_argument(
        "--calib-tokens", type=int, default=1024,
        help="calibration tokens for the activation scales (default 1024; as convert's --calib-tokens)"
    )
    p.add_argument("--order-tokens", type=int, default=128,
                   help="held-out tokens each perplexity of the universal order is measured on (default 128)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_stack)


def _store_dir(arg: str, then: str = ""):
    """The store directory a tool works on in place, or a one-line error saying how to make one."""
    from pathlib import Path

    from edge.errors import EdgeError
    from edge.store import is_store

    path = Path(arg)
    if not (path.is_dir() and is_store(path)):
        raise EdgeError(f"{arg}: not an edge store; run `edge convert {arg}` first{then}")
    return path


def _run_stack(args) -> int:
    import time

    from edge.sizes import format_size
    from weights_tools.convert import Progress
    from weights_tools.stack import stack

    path = _store_dir(args.store, " and stack the .edge directory")
    t0 = time.perf_counter()
    progress = Progress(1, 1, args.quiet)
    try:
        attrs = stack(path, iters=args.iters, rank=args.rank, calib=args.calib_tokens, order_tokens=args.order_tokens,
                      threads=args.threads, progress=lambda d, t, label: progress.advance_to(d, t, label))
    finally:
        progress.close()
    from edge.bitstack import StackInfo
    from edge.store import Store

    info = StackInfo.of(Store(path))
    sizes = info.prefix_bytes()
    print(f"stacked {path} in {time.perf_counter() - t0:.1f}s: {info.iters} blocks per linear, "
          f"{format_size(int(sizes[0]))} to {format_size(int(sizes[-1]))}; calibration perplexity by depth "
          + ", ".join(f"{p:.2f}" for p in attrs["level_ppl"]), file=sys.stderr)
    return 0


BITS_EXAMPLES = """examples:
  edge expert-bits moe.edge --bits 5.5         # experts at 5.5 bits per weight on average
  edge expert-bits moe.edge --bits 8.5         # back to the source's bitwidth (q8_0)
  edge run moe.edge --ram 1GB -p "Hello"       # runs the chosen bitwidths, paged or resident

Each expert gets one of two bitwidths, by default the smallest variant (q4_0) and the source's own type; the
least sensitive experts (perplexity rise when each alone goes lower) go lower first until the average meets
--bits. Interrupted? Run it again: it continues.
"""


def register_expert_bits(sub) -> None:
    p = sub.add_parser("expert-bits", help="EdgeMoE: choose each expert's bitwidth for a size target, by its "
                                           "measured sensitivity", epilog=BITS_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="a mixture-of-experts store written by `edge convert` (a .edge directory)")
    p.add_argument("--bits", type=float, required=True,
                   help="average bits per expert weight (q4_0 is 4.5, q5_0 5.5, q8_0 8.5); non-expert weights stay")
    p.add_argument("--bounds", default=None, metavar="LOW,HIGH",
                   help="the two bitwidths to mix (q4_0, q4_1, q5_0, q5_1, q8_0 or keep: the source's); default: "
                        "the smallest variant and keep")
    p.add_argument("--calib-tokens", type=int, default=128,
                   help="held-out calibration tokens each expert's sensitivity is measured on (default 128)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_expert_bits)


def _run_expert_bits(args) -> int:
    import time
    from collections import Counter

    from edge.errors import EdgeError
    from edge.sizes import format_size
    from weights_tools.convert import Progress
    from weights_tools.expert_bits import adapt

    path = _store_dir(args.store)
    pair = None
    if args.bounds:
        pair = tuple(k.strip().lower() for k in args.bounds.split(","))
        if len(pair) != 2:
            raise EdgeError(f"--bounds {args.bounds}: give two bitwidths, LOW,HIGH (e.g. q4_0,keep)")
    t0 = time.perf_counter()
    progress = Progress(1, 1, args.quiet)
    try:
        attrs = adapt(path, args.bits, tokens=args.calib_tokens, threads=args.threads, pair=pair,
                      progress=lambda d, t, label: progress.advance_to(d, t, label))
    finally:
        progress.close()
    def name(kind: str) -> str:
        return "the source's type" if kind == "keep" else kind

    counts = Counter(k for row in attrs["choice"] for k in row)
    mix = ", ".join(f"{n} at {name(k)}" for k, n in counts.most_common())
    line = (f"experts of {path}: {attrs['bits_per_weight']:.2f} bits per weight "
            f"({format_size(attrs['expert_bytes'])}): {mix}")
    if attrs["bounds"]:
        low, high = attrs["bounds"]
        prof = attrs["profiles"][f"{low}/{high}"]
        line += (f"; calibration perplexity with all at {name(high)}: {prof['base']:.3f}, all at {name(low)}: "
                 f"{prof['low']:.3f} ({prof['tokens']} tokens)")
    print(line + f" [{time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    return 0
