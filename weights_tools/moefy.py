"""MoEfication: a dense model's FFN split into experts with a router (`python -m weights_tools moefy MODEL.gguf
--experts 8 --top-k 2`). A llama model becomes a Mixtral-style GGUF that llama.cpp and edge both run; a gemma3
model keeps its architecture with `gemma3.expert_count` added, which edge runs and llama.cpp does not (it has no
gemma3 mixture of experts).

Per layer, from activations on calibration text (edge.evaluate.calibration_text):
- experts: the FFN's neurons split into `experts` equal groups that fire together (balanced k-means on each
  neuron's |activation| profile over the calibration tokens, as MoEfication groups co-activated neurons);
- router: a linear map from the FFN input to each expert's log activation mass (least squares), so its top-k
  picks the experts that matter most for the token;
- the dense FFN is the sum of all its experts; llama.cpp's Mixtral-style MoE weights the top-k experts by their
  renormalized softmax. The router's logits are scaled down until that softmax is flat (weights 1/k to within
  0.1%) and each expert's down matrix is scaled by k, so the MoE computes the plain sum of the chosen experts
  (with every expert chosen, the dense FFN).

Gate and up rows keep their quantized blocks (a row moves whole); down columns move between blocks, so down is
re-quantized (Q8_0). Reported: routing recall of the true top-k experts on held-out tokens; `edge eval` gives
the perplexity cost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from edge import quants
from edge.errors import EdgeError

ROUTER_SCALE = 1e-3  # router logits this small give a flat softmax over the chosen experts


def _balanced_kmeans(features: np.ndarray, k: int, iters: int = 12, seed: int = 0) -> np.ndarray:
    """Rows of `features` into k groups of equal size, by cosine similarity to the groups' centroids."""
    n = len(features)
    size = n // k
    f = features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-9)
    rng = np.random.default_rng(seed)
    centroids = f[rng.choice(n, k, replace=False)]
    assign = np.zeros(n, np.int64)
    for _ in range(iters):
        score = f @ centroids.T  # (n, k)
        order = np.argsort(-score, axis=None)  # best (neuron, group) pairs first
        before, assign = assign, np.full(n, -1, np.int64)
        room = np.full(k, size)
        left = n
        for flat in order.tolist():
            i, g = divmod(flat, k)
            if assign[i] < 0 and room[g] > 0:
                assign[i] = g
                room[g] -= 1
                left -= 1
                if not left:
                    break
        if np.array_equal(assign, before):
            break  # converged: the same groups give the same centroids
        centroids = np.stack([f[assign == g].mean(axis=0) for g in range(k)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-9
    return assign


def moefy(src_path: str | Path, dst: str | Path, experts: int = 8, top_k: int = 2, tokens: int = 1024,
          threads: int | None = None) -> dict:
    """Write the MoE GGUF; returns {"recall": per-layer routing recall of the true top-k, ...}."""
    import gguf

    from edge.gguf_file import GGUFFile
    from edge.tokenizer import Tokenizer
    from weights_tools.calibrate import collect_activations
    from weights_tools.gguf_meta import copy_fields, finish

    src_path, dst = Path(src_path), Path(dst)
    src = GGUFFile(src_path)
    cfg = src.config
    if cfg.arch not in ("llama", "gemma3") or cfg.n_experts:
        raise EdgeError(f"{src_path}: moefy takes a dense llama or gemma3 model (this is {cfg.arch}"
                        f"{' with experts' if cfg.n_experts else ''})")
    hidden = cfg.hidden_dim
    if not 0 < top_k <= experts or hidden % experts or (hidden // experts) % 32:
        raise EdgeError(f"--experts {experts} --top-k {top_k}: the FFN's {hidden} neurons must split into experts "
                        "of a multiple of 32 neurons, and 0 < top-k <= experts")
    if dst.exists():
        raise EdgeError(f"{dst}: already exists; remove it or give another --out")
    width = hidden // experts
    X, H, _ = collect_activations(src, Tokenizer(src_path, cfg.arch, src.chat_template), tokens, threads)
    held = len(X[0]) * 3 // 4  # fit on three quarters, report recall on the rest

    tmp = dst.with_name(dst.name + ".partial")
    w = gguf.GGUFWriter(tmp, arch=cfg.arch)
    copy_fields(src.fields(), w, keep=lambda key: key not in (f"{cfg.arch}.feed_forward_length", "general.file_type"))
    w.add_feed_forward_length(width)
    w.add_expert_count(experts)
    w.add_expert_used_count(top_k)
    recalls = []
    ffn = {f"blk.{i}.ffn_{p}.weight" for i in range(cfg.n_layers) for p in ("gate", "up", "down")}
    for name in src.tensor_names():
        if name not in ffn:
            t = src.tensor(name)
            w.add_tensor(name, t.raw.reshape(*t.shape[:-1], -1) if len(t.shape) > 1 else t.raw.reshape(-1),
                         raw_dtype=gguf.GGMLQuantizationType(t.type_id))
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        x, a = X[i].astype(np.float32), np.abs(H[i])
        assign = _balanced_kmeans(a[:held].T, experts, seed=i)
        perm = np.concatenate([np.flatnonzero(assign == e) for e in range(experts)])  # expert e's neurons, in turn
        mass = np.log(a.reshape(len(a), -1)[:, perm].reshape(len(a), experts, width).sum(-1) + 1e-6)  # (T, E)
        xf = x[:held].astype(np.float64)
        gram = xf.T @ xf
        # least squares, no bias (llama.cpp's router has none), a trace-relative ridge for fewer tokens than dims
        coef = np.linalg.solve(gram + np.eye(len(gram)) * (1e-4 * np.trace(gram) / len(gram)), xf.T @ mass[:held])
        router = coef.T.astype(np.float32)  # (E, dim)
        pred = x[held:] @ router.T
        true_top = np.argsort(-mass[held:], axis=1)[:, :top_k]
        pred_top = np.argsort(-pred, axis=1)[:, :top_k]
        recalls.append(float(np.mean([len(set(t) & set(q)) / top_k for t, q in zip(true_top, pred_top)])))
        w.add_tensor(p + "ffn_gate_inp.weight", router * np.float32(ROUTER_SCALE / max(1e-9, np.abs(pred).max())))
        for part in ("gate", "up"):
            t = src.tensor(p + f"ffn_{part}.weight")
            w.add_tensor(p + f"ffn_{part}_exps.weight", np.ascontiguousarray(t.raw[perm]).reshape(experts, width, -1),
                         raw_dtype=gguf.GGMLQuantizationType(t.type_id))
        t = src.tensor(p + "ffn_down.weight")
        down = quants.dequantize(t.raw, t.type_id, t.cols).reshape(cfg.dim, hidden)[:, perm] * np.float32(top_k)
        stacked = np.ascontiguousarray(down.reshape(cfg.dim, experts, width).transpose(1, 0, 2))  # (E, dim, width)
        w.add_tensor(p + "ffn_down_exps.weight", gguf.quantize(stacked, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    finish(w)
    tmp.replace(dst)
    return {"experts": experts, "top_k": top_k, "recall": recalls}


EXAMPLES = """examples:
  python -m weights_tools moefy SmolLM2-135M-Instruct.Q4_1.gguf --experts 8 --top-k 4 --out smollm2-moe.gguf
  edge eval smollm2-moe.gguf                  # the quality cost against `edge eval` of the dense model
  python -m weights_tools moefy gemma-3-270m-q4_k_m.gguf --experts 8 --top-k 4 --out gemma3-moe.gguf
"""


def register(sub) -> None:
    p = sub.add_parser("moefy", help="split a dense model's FFN into experts with a router (MoEfication)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="a dense llama or gemma3 GGUF (default: SmolLM2)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--calib-tokens", type=int, default=1024)
    p.add_argument("--out", required=True)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from edge.models import resolve_model

    r = moefy(resolve_model(args.model), args.out, args.experts, args.top_k, args.calib_tokens)
    print(f"wrote {args.out}: {r['experts']} experts, top {r['top_k']}; routing recall of the true top-{r['top_k']} "
          f"on held-out tokens {min(r['recall']):.2f}-{max(r['recall']):.2f} (mean {np.mean(r['recall']):.2f})",
          file=sys.stderr)
    return 0
