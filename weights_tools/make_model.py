"""Random-weight GGUF models of any size, loadable by llama.cpp: `python -m weights_tools make-model`.

Written with gguf.GGUFWriter, one tensor at a time (a 7B-class file never sits in RAM). Small tensors are
normal floats quantized by gguf's reference quantizer; large Q4_0/Q8_0 tensors are random blocks with a
scale that gives the same spread (quantizing billions of floats in numpy would take many minutes). The
vocabulary and chat template come from a real model (default: SmolLM2), so both runtimes tokenize and run it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

DIRECT_ABOVE = 1 << 22  # elements: above this, Q4_0/Q8_0 tensors are written as random blocks
_BLOCK_STD = {"Q4_0": (18, 32, 4.61), "Q8_0": (34, 32, 73.3)}  # block bytes, weights, std of the codes


def _random_blocks(rng, qtype: str, rows: int, cols: int, std: float) -> np.ndarray:
    block_bytes, per_block, code_std = _BLOCK_STD[qtype]
    n = rows * cols // per_block
    blocks = rng.integers(0, 256, (n, block_bytes), np.uint8)
    blocks[:, :2] = np.frombuffer(np.float16(std / code_std).tobytes(), np.uint8)
    if qtype == "Q8_0":  # int8 codes: avoid -128, which llama.cpp's quantizer never writes
        codes = blocks[:, 2:].view(np.int8)
        codes[codes == -128] = -127
    return blocks.reshape(rows, -1)


def write_random_model(path: str | Path, arch: str = "llama", layers: int = 2, dim: int = 64, hidden: int = 128,
                       heads: int = 4, kv_heads: int = 2, vocab: int = 96, quant: str = "Q8_0", seed: int = 0,
                       context: int = 256, tokenizer_from: Path | None = None, rope_base: float = 10000.0,
                       untied_output: bool = False, extra_tensors: dict | None = None, std: float | None = None,
                       experts: int = 0, top_k: int = 2, expert_hidden: int | None = None,
                       progress=None) -> Path:
    """A random-weight model: llama (with `experts`, Mixtral-style), qwen2 (llama with q/k/v biases), or the
    mixtures qwen3moe (per-head q/k norms), qwen2moe, olmoe (experts required). tokenizer_from: a GGUF whose
    vocabulary and template to copy (then `vocab` is its size). std: of the matrices' weights (default
    0.64/sqrt(dim)). extra_tensors: name -> (raw array, ggml type), replacing a tensor or added.
    progress(done, total): after each tensor."""
    import gguf

    from weights_tools.gguf_meta import copy_fields

    path = Path(path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch=arch)
    from edge.config import MOE_ARCHS

    if arch in MOE_ARCHS and not experts:
        raise ValueError(f"{arch} needs experts")
    untied_output = untied_output or arch in ("qwen2moe", "olmoe")  # llama.cpp requires their output matrix
    expert_hidden = expert_hidden or hidden
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(expert_hidden if experts else hidden)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(top_k)
        w.add_expert_feed_forward_length(expert_hidden)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(rope_base)
    if tokenizer_from is not None:
        from edge.gguf_file import GGUFFile

        fields = GGUFFile(tokenizer_from).fields()
        copy_fields(fields, w, keep=lambda key: key.startswith("tokenizer."))
        vocab = len(fields["tokenizer.ggml.tokens"].value)
    qt = gguf.GGMLQuantizationType[quant]
    overrides = dict(extra_tensors or {})
    std = std or 0.64 / float(np.sqrt(dim))  # 0.08 at dim 64: a tame random model at any width

    head_dim = dim // heads
    # (name, shape, kind): "matrix" in the quant type, "norm" (1 + noise, float32), "f32" (a float32 matrix),
    # "bias" (float32 noise)
    plan: list[tuple[str, tuple, str]] = [("token_embd.weight", (vocab, dim), "matrix"),
                                          ("output_norm.weight", (dim,), "norm")]
    if untied_output:
        plan.append(("output.weight", (vocab, dim), "matrix"))
    for i in range(layers):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (dim,), "norm"), (p + "ffn_norm.weight", (dim,), "norm"),
                 (p + "attn_q.weight", (heads * head_dim, dim), "matrix"),
                 (p + "attn_k.weight", (kv_heads * head_dim, dim), "matrix"),
                 (p + "attn_v.weight", (kv_heads * head_dim, dim), "matrix"),
                 (p + "attn_output.weight", (dim, heads * head_dim), "matrix")]
        if arch == "qwen3moe":
            plan += [(p + "attn_q_norm.weight", (head_dim,), "norm"), (p + "attn_k_norm.weight", (head_dim,), "norm")]
        if arch == "olmoe":  # one norm over all of q, one over all of k
            plan += [(p + "attn_q_norm.weight", (heads * head_dim,), "norm"),
                     (p + "attn_k_norm.weight", (kv_heads * head_dim,), "norm")]
        if arch in ("qwen2", "qwen2moe"):
            plan += [
                (p + "attn_q.bias", (heads * head_dim,), "bias"),
                (p + "attn_k.bias", (kv_heads * head_dim,), "bias"),
                (p + "attn_v.bias", (kv_heads * head_dim,), "bias"),
            ]
        if arch == "qwen2moe":
            plan += [(p + "ffn_gate_inp_shexp.weight", (dim,), "bias"),
                     (p + "ffn_gate_shexp.weight", (hidden, dim), "matrix"),
                     (p + "ffn_up_shexp.weight", (hidden, dim), "matrix"),
                     (p + "ffn_down_shexp.weight", (dim, hidden), "matrix")]
        if experts:
            plan += [(p + "ffn_gate_inp.weight", (experts, dim), "f32"),
                     (p + "ffn_gate_exps.weight", (experts, expert_hidden, dim), "matrix"),
                     (p + "ffn_up_exps.weight", (experts, expert_hidden, dim), "matrix"),
                     (p + "ffn_down_exps.weight", (experts, dim, expert_hidden), "matrix")]
        else:
            plan += [(p + "ffn_gate.weight", (hidden, dim), "matrix"), (p + "ffn_up.weight", (hidden, dim), "matrix"),
                     (p + "ffn_down.weight", (dim, hidden), "matrix")]

    def make(name: str, shape: tuple, kind: str) -> tuple[np.ndarray, object]:
        if name in overrides:
            return overrides.pop(name)
        rows = int(np.prod(shape[:-1]))
        if kind == "matrix" and qt.name in _BLOCK_STD and rows * shape[-1] > DIRECT_ABOVE:
            return _random_blocks(rng, qt.name, rows, shape[-1], std).reshape(*shape[:-1], -1), qt
        x = rng.standard_normal(shape).astype(np.float32) * (std if kind != "norm" else 0.1)
        if kind == "norm":
            return 1.0 + x, None
        if kind in ("f32", "bias") or qt == gguf.GGMLQuantizationType.F32:
            return x, None
        return gguf.quantize(x, qt), qt

    # tensor infos first (they need each tensor's byte size), then the data, generated one tensor at a time
    def info(name: str, shape: tuple, kind: str) -> None:
        if name in overrides:
            array, raw = overrides[name]
            w.add_tensor_info(name, array.shape, array.dtype, array.nbytes, raw_dtype=raw)
            return
        if kind != "matrix" or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
            return
        per, block = gguf.GGML_QUANT_SIZES[qt]
        byte_shape = (*shape[:-1], shape[-1] // per * block)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qt)

    for entry in plan:
        info(*entry)
    extra = list(overrides.items())
    for name, (array, raw) in extra:
        if name not in {e[0] for e in plan}:
            w.add_tensor_info(name, array.shape, array.dtype, array.nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for k, (name, shape, kind) in enumerate(plan):
        array, _ = make(name, shape, kind)
        w.write_tensor_data(array)
        if progress:
            progress(k + 1, len(plan))
    for name, (array, _) in overrides.items():
        w.write_tensor_data(array)
    w.close()
    return path


EXAMPLES = """examples:
  python -m weights_tools make-model --layers 32 --dim 4096 --ffn 11008 --heads 32 --kv-heads 32 --out llama7b.gguf
  python -m weights_tools make-model --layers 2 --dim 64 --ffn 128 --quant Q8_0 --out tiny.gguf
  python -m weights_tools make-model --arch qwen3moe --experts 8 --top-k 2 --dim 256 --ffn 128 --out moe.gguf
  python -m weights_tools make-model --experts 8 --top-k 2 --layers 32 --dim 4096 --ffn 14336 --out mixtral.gguf
"""


def register(sub) -> None:
    p = sub.add_parser(
        "make-model",
        help="write a random-weight GGUF of any size (llama, Mixtral-style llama, qwen2, qwen3moe, qwen2moe, olmoe)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", default="llama", choices=("llama", "qwen2", "qwen3moe", "qwen2moe", "olmoe"),
                   help="architecture (default llama; with --experts, Mixtral-style)")
    p.add_argument("--experts", type=int, default=0, help="experts per layer (0: a dense FFN)")
    p.add_argument("--top-k", type=int, default=2, help="experts each token goes to (default 2)")
    p.add_argument("--expert-ffn", type=int, default=None, help="FFN width of one expert (default --ffn)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=None, help="FFN width (default 4 x dim)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default dim / 64, at least 1)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--quant", default="Q4_0", type=str.upper,
                   help="ggml type of the matrices, any case (default Q4_0)")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--tokenizer-from", default=None,
                   help="a GGUF to take the vocabulary and chat template from (default: SmolLM2's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the GGUF file to write")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    import gguf

    from edge.errors import EdgeError
    from edge.models import default_model_path
    from edge.sizes import format_size
    from weights_tools.convert import Progress

    heads = args.heads or max(1, args.dim // 64)
    if args.arch != "llama" and not args.experts:
        raise EdgeError(f"--arch {args.arch} is a mixture of experts: give --experts (and --top-k)")
    if args.arch == "olmoe" and args.kv_heads not in (None, heads):
        raise EdgeError("--arch olmoe has as many key/value heads as heads (its k norm spans them all)")
    if args.experts and not 0 < args.top_k <= args.experts:
        raise EdgeError(f"--top-k {args.top_k}: between 1 and --experts {args.experts}")
    if args.dim % heads:
        raise EdgeError(f"--dim {args.dim} is not a multiple of --heads {heads}")
    if args.quant not in gguf.GGMLQuantizationType.__members__:
        raise EdgeError(f"--quant {args.quant}: not a ggml type; try Q4_0, Q8_0, Q4_K or F16")
    out = Path(args.out)
    if out.exists():
        raise EdgeError(f"{out}: already exists; remove it or give another --out")
    progress = Progress(1, 1, False)
    partial = out.with_name(out.name + ".partial")
    try:
        write_random_model(partial, args.arch, args.layers, args.dim, args.ffn or 4 * args.dim, heads,
                           args.kv_heads or heads, quant=args.quant, seed=args.seed, context=args.context,
                           experts=args.experts, top_k=args.top_k, expert_hidden=args.expert_ffn,
                           tokenizer_from=Path(args.tokenizer_from) if args.tokenizer_from else default_model_path(),
                           progress=lambda d, t: progress.advance_to(d, t, "writing", "tensors"))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        progress.close()
    partial.replace(out)
    print(f"wrote {out} ({format_size(out.stat().st_size)})", file=sys.stderr)
    return 0

