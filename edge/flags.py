"""The flags commands share, defined once: the model and its budget (`add_model_args`), the strategy
(`add_strategy_args`, parsed into one edge.strategies.Options), sampling; and the Engine they describe."""

from __future__ import annotations

import argparse
import sys

from edge.errors import EdgeError, one_line


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (what was wrong, where help is), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog.split()[0]}: error: {one_line(message)} (see {self.prog} --help)\n")


def whole(minimum: int):
    """An argparse type: a whole number >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


def number(low: float, high: float = float("inf"), low_open: bool = False):
    """An argparse type: a number in [low, high] ((low, high] with low_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > low if low_open else value >= low) or value > high or value != value:
            where = f"{'above' if low_open else 'at least'} {low:g}" + (f" and at most {high:g}" if high < float("inf")
                                                                       else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a number {where}")
        return value
    return parse


MODEL_HELP = ("a GGUF file, a .edge store or a name from `edge models` (qwen2.5-coder-1.5b, ...); omitted: the "
              "embedded default, SmolLM2-135M-Instruct")


CTX_HELP = ("context length in tokens (default: 4096, or the model's own when smaller; under --ram the largest of "
            "those the budget holds; the KV cache grows with the conversation)")


def add_model_args(p: argparse.ArgumentParser, ctx_default: int | None = None, ctx_help: str = CTX_HELP) -> None:
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("-m", "--model", dest="model_flag", default=None, metavar="MODEL",
                   help="the model as a flag, as llama.cpp spells it (instead of the argument)")
    p.add_argument("-c", "--ctx", type=whole(16), default=ctx_default, metavar="N", help=ctx_help)
    p.add_argument("-t", "--threads", type=whole(1), default=None, metavar="N",
                   help="compute threads (default: all available cores)")
    p.add_argument("--backend", choices=("auto", "ort", "ggml", "numpy"), default="auto",
                   help="compute backend: ggml (llama.cpp's kernels on the weights as stored: the least RAM; what "
                        "--ram uses), ort (onnxruntime: ~10%% faster here, 2-3x the RAM), numpy (float32 reference); "
                        "auto (default): ggml")
    p.add_argument("--verify-reads", choices=("first", "always", "never"), default="first",
                   help="check store chunks against their crc32c: the first time each is read (default), always, never")
    b = p.add_argument_group("RAM budget (a store, `edge convert MODEL`; with --calibrate it needs less RAM)")
    b.add_argument("--ram", default=None, metavar="SIZE",
                   help="budget for the whole process, like 2GB, 512MiB or 140MB: what does not fit streams from flash")
    add_strategy_args(p)
    d = p.add_argument_group("target device (profiles: `edge devices`)")
    d.add_argument("--device", default=None, metavar="NAME",
                   help="a device profile: its compute and read threads, and its default --ram")
    d.add_argument("--emulate", action="store_true",
                   help="reads take the time the --device's flash curve gives them (compute is not emulated)")


def add_strategy_args(p: argparse.ArgumentParser, title: str = "RAM budget: strategy") -> None:
    """The strategy flags, one definition for every command that plans a budget (run, eval, chat, info, bench),
    grouped in --help by the strategy they tune."""
    from edge.sparse import SPARSITIES
    from edge.strategies import NAMES, help_text

    p.add_argument_group(title).add_argument("--strategy", choices=NAMES, default="auto", help=help_text())
    sparse = p.add_argument_group("sparse strategy (dense models; --sparsity needs `edge convert --calibrate`)")
    sparse.add_argument("--sparsity", type=float, choices=SPARSITIES, default=0.0, metavar="S",
                        help="fraction of FFN clusters the predictors may skip per token, one of "
                             f"{', '.join(f'{v:g}' for v in SPARSITIES)} (default 0: exact)")
    sparse.add_argument("--window", type=whole(1), default=5, metavar="N",
                        help="tokens whose clusters are the last to leave the cache (default 5)")
    sparse.add_argument("--prefetch", type=whole(0), default=0, metavar="N",
                        help="with --sparsity > 0, N > 0 reads ahead the clusters the next layer's predictor names; "
                             "for experts, see below")
    experts = p.add_argument_group("experts strategy (mixtures of experts)")
    experts.add_argument("--evict", choices=("score", "lru"), default="score",
                         help="which cached expert leaves first: score (EdgeMoE: rare and far from its next use; "
                              "default) or lru")
    experts.add_argument("--predict", choices=("pregate", "trace"), default="pregate",
                         help="how the next layer's experts are guessed: pregate (its router on this layer's state; "
                              "default) or trace (routing tables from `edge convert --calibrate`)")
    gpu = p.add_argument_group("GPU (a build with CUDA, Vulkan or Metal: `make gpu`; `edge info` lists devices)")
    gpu.add_argument("--gpu", default="", metavar="NAME",
                     help="compute the attention (its KV cache too) and the hottest FFN weights on this device: "
                          "auto (the first GPU), CUDA0, Vulkan0, ...; the rest as --ram plans it")
    gpu.add_argument("--gpu-mem", default=None, metavar="SIZE",
                     help="the device memory to fill, like 512MB (default: 80%% of it; on unified memory, "
                          "part of --ram)")
    experts.description = ("--prefetch N: experts predicted and read ahead per layer (default 0: load on demand, "
                           "measured faster on 2 cores; try the k a token uses with spare cores)")


def strategy_options(args):
    """The strategy flags as one edge.strategies.Options."""
    from edge.strategies import Options

    from edge.sizes import parse_size

    if args.gpu_mem and not args.gpu:
        raise EdgeError("--gpu-mem needs --gpu: the device whose memory it is")
    return Options(strategy=args.strategy, sparsity=args.sparsity, window=args.window, prefetch=args.prefetch,
                   evict=args.evict, predict=args.predict, gpu=args.gpu,
                   gpu_mem=parse_size(args.gpu_mem, flag="--gpu-mem") if args.gpu_mem else 0)


def strategy_flags(options) -> list[str]:
    """The flags that give `options` back (a child `edge run`)."""
    return ["--strategy", options.strategy, "--sparsity", str(options.sparsity), "--window", str(options.window),
            "--prefetch", str(options.prefetch), "--evict", options.evict, "--predict", options.predict] + (
                ["--gpu", options.gpu] + (["--gpu-mem", str(options.gpu_mem)] if options.gpu_mem else [])
                if options.gpu else [])


def budget_options(args) -> dict:
    """Engine keywords of the shared read and budget flags (a budget above physical RAM is warned about)."""
    from edge.memory import warn_above_physical
    from edge.sizes import parse_size

    ram = parse_size(args.ram, flag="--ram") if args.ram else None
    if ram is None and args.device:
        from edge.profile import load

        ram = load(args.device).ram  # the device's default budget
    if ram is None and args.sparsity > 0:
        raise EdgeError(f"--sparsity {args.sparsity:g} needs --ram: it chooses what a budget skips reading")
    if ram is not None and (msg := warn_above_physical(ram)):
        print(f"warning: {msg}", file=sys.stderr)
    return dict(verify=args.verify_reads, ram=ram, options=strategy_options(args), device=args.device,
                emulate=args.emulate)


def make_engine(args):
    """The Engine the shared model flags describe."""
    from edge.engine import Engine

    engine = Engine(model_arg(args), n_ctx=args.ctx, backend=args.backend, threads=args.threads,
                    **budget_options(args))
    for w in engine.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return engine


def model_arg(args) -> str | None:
    """The model the user named: `-m MODEL` or the argument (both: an error)."""
    if args.model_flag is not None and args.model is not None:
        raise EdgeError(f"two models given ({args.model_flag} with -m and {args.model}); give one")
    return args.model_flag if args.model_flag is not None else args.model


def add_sampling_args(p: argparse.ArgumentParser, temp_default: float) -> None:
    p.add_argument("-n", "--max-tokens", type=whole(0), default=128, metavar="N",
                   help="tokens to generate (default 128)")
    p.add_argument("--temp", type=number(0.0), default=temp_default, metavar="T",
                   help=f"temperature; 0 is greedy (default {temp_default})")
    p.add_argument("--top-k", type=whole(0), default=40, metavar="K",
                   help="sample among the k most likely tokens (default 40; 0: all)")
    p.add_argument("--top-p", type=number(0.0, 1.0, low_open=True), default=0.95, metavar="P",
                   help="nucleus sampling mass, in (0, 1] (default 0.95; 1: off)")
    p.add_argument("--repeat-penalty", type=number(0.0, low_open=True), default=1.0, metavar="R",
                   help="penalty for recent tokens (default 1.0: off)")
    p.add_argument("-s", "--seed", type=int, default=None, metavar="N", help="random seed for sampling")


def sampler_config(args):
    from edge.sampling import SamplerConfig

    return SamplerConfig(temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                         repeat_penalty=args.repeat_penalty, seed=args.seed)
