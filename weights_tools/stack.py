"""`edge stack`: a store's linear weights as BitStack residual stacks (Wang et al. 2024), in the same store.

1. Activation-aware scaling: the dense model runs over `calib` tokens of calibration text in windows of 256
   (each starting with BOS when the model wants one);
   for each group of linears sharing an input (q/k/v, attention output, gate/up, down) and each input channel
   j, s_j = mean over windows of the L2 norm of channel j over the window's tokens, plus 1e-3. Weight columns
   are multiplied by s, the runtime divides the group's input by s (edge.bitstack).
2. Decomposition (edge.bitstack.decompose): `iters` blocks per linear, sign times rank-k magnitude of the
   residual; rank by default scaled to the matrix (16 on 4096 x 4096, 1-3 on SmolLM2's 576-wide matrices,
   so the factors cost ~1/8 bit per weight as in the paper).
3. The FFN's blocks regrouped by the store's clusters of neurons (`stack/ffn.<i>`, edge.bitstack.StackedFFN
   streams them under `--strategy bitstack-stream`); the same bytes, a second copy on flash.
4. Universal order (the paper's "average" sorting): every linear keeps its first block. For each level
   l = 1..iters-1, every linear at l blocks; each linear alone gets block l+1 and the perplexity over one
   window of `order_tokens` held-out calibration tokens is measured; the linears of the level are sorted by it, best
   first. The order is level 1's list, then level 2's, ... Each evaluation reruns only the layers from the
   changed linear's on (the inputs of earlier layers are kept per level). Non-finite perplexities sort last.

Resumable: everything goes into `stack.partial/` inside the store with a marker per finished linear and the
scores per finished level; a rerun with the same settings continues there. The last step renames it to
`stack/` and writes the attributes (the commit point); a store without them loads as before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edge import quants
from edge.bitstack import GROUP_OF, GROUPS, LINEARS, auto_rank, block_bytes, decompose, split_block, unpack_signs
from edge.errors import EdgeError

WINDOW = 256


def _windows(store, calib: int, order_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Calibration text as windows of WINDOW tokens (scales) and one held-out window (order), each starting
    with BOS when the model wants one (Gemma without it is another model)."""
    from edge.evaluate import calibration_text, windows
    from edge.tokenizer import Tokenizer

    tok = Tokenizer(store.tokenizer_path, store.config.arch, store.chat_template)
    ids = tok.encode(calibration_text(), add_bos=False)
    if len(ids) < calib + order_tokens:
        raise EdgeError(f"the calibration text has {len(ids)} tokens, {calib + order_tokens} needed; lower "
                        "--calib-tokens or --order-tokens")
    bos = tok.bos_id if tok.add_bos else None
    width = min(WINDOW, store.config.context_length)
    return windows(ids[:calib], width, None, bos), windows(ids[calib:], order_tokens, 1, bos)[0]


def activation_scales(store, wins: list[list[int]], threads: int | None) -> dict[tuple[int, str], np.ndarray]:
    """s per (layer, group): the mean over windows of each input channel's L2 norm over the window, + 1e-3."""
    from edge.model import Transformer

    model = Transformer(store, max(len(w) for w in wins), backend="ort", threads=threads)
    sums: dict[tuple[int, str], np.ndarray] = {}
    window: dict[tuple[int, str], np.ndarray] = {}

    def trace(i, point, x):
        if point not in GROUPS:  # the inputs of the linear groups only
            return
        sq = np.square(x, dtype=np.float64).sum(axis=0)
        window[(i, point)] = window.get((i, point), 0.0) + sq

    model.trace = trace
    for w in wins:
        window.clear()
        model.forward(np.asarray(w), 0)
        for key, sq in window.items():
            sums[key] = sums.get(key, 0.0) + np.sqrt(sq)
    return {key: (v / len(wins) + 1e-3).astype(np.float32) for key, v in sums.items()}


def _linear_names(cfg) -> list[str]:
    return [f"blk.{i}.{name}.weight" for i in range(cfg.n_layers) for name in LINEARS]


def _split(name: str) -> tuple[int, str]:
    _, i, lin, _ = name.split(".")
    return int(i), lin


def stack(store_path: str | Path, iters: int = 16, rank: int | None = None, calib: int = 1024,
          order_tokens: int = 128, threads: int | None = None, progress=None) -> dict:
    """Build the stack in place; returns the attributes written under attributes["edge"]["stack"].
    progress(done, total, label) is told of every linear decomposed and every perplexity measured."""
    import zarr
    from zarr.storage import LocalStore

    from edge.store import Store
    from weights_tools.convert import write_array, commit_group

    store_path = Path(store_path)
    store = Store(store_path)
    cfg = store.config
    if cfg.n_experts:
        raise EdgeError(f"{store_path}: a mixture-of-experts model; BitStack covers dense models only")
    if iters < 1 or (rank is not None and rank < 1):
        raise EdgeError("--iters and --rank must be at least 1")
    names = _linear_names(cfg)
    scale_wins, order_ids = _windows(store, calib, order_tokens)  # bad settings fail before anything is written
    params = {"iters": iters, "rank": rank, "calib": calib, "source": store.source["sha256"], "version": 2}
    partial = store_path / "stack.partial"
    if partial.exists():
        try:
            old = json.loads((partial / "params.json").read_text())
        except (OSError, ValueError):
            old = None
        if old is None or {k: v for k, v in old.items() if k != "order_tokens"} != params:
            shutil.rmtree(partial)  # other blocks: start over
        elif old.get("order_tokens") != order_tokens:
            (partial / "order.json").unlink(missing_ok=True)  # same blocks, another order measurement
    params["order_tokens"] = order_tokens
    group = zarr.open_group(LocalStore(partial), mode="a")
    (partial / "params.json").write_text(json.dumps(params))
    (partial / "done").mkdir(exist_ok=True)
    total = len(names) + (iters - 1) * len(names)
    tell = progress or (lambda done, total, label: None)

    # 1. scales
    scale_path = partial / "scales.npz"
    if scale_path.exists():
        with np.load(scale_path) as z:
            scales = {(int(k.split(".")[0]), k.split(".")[1]): z[k] for k in z.files}
    else:
        tell(0, total, "activation scales")
        scales = activation_scales(store, scale_wins, threads)
        tmp = partial / "scales.tmp.npz"
        np.savez(tmp, **{f"{i}.{g}": s for (i, g), s in scales.items()})
        tmp.replace(scale_path)
    for i in range(cfg.n_layers):
        for g in GROUPS:
            key = f"scale.{i}.{g}"
            if not (partial / "done" / key).exists():
                write_array(group, key, (1.0 / scales[(i, g)]).astype(np.float32).view(np.uint8).reshape(1, -1), 1)
                (partial / "done" / key).touch()

    # 2. decomposition
    linears = {}
    for done, name in enumerate(names):
        i, lin = _split(name)
        rows, cols = _shape(cfg, lin)
        k = rank or auto_rank(rows, cols)
        linears[name] = {"rows": rows, "cols": cols, "rank": k, "block_bytes": block_bytes(rows, cols, k)}
        if (partial / "done" / name).exists():
            continue
        t = store.tensor(name, (rows, cols))
        w = quants.dequantize(t.raw, t.type_id, t.cols).reshape(rows, cols) * scales[(i, GROUP_OF[lin])][None, :]
        blocks = np.stack(list(decompose(w, iters, k)))
        write_array(group, name, blocks, 1)
        (partial / "done" / name).touch()
        tell(done + 1, total, f"decompose {name}")

    # 3. the FFN's blocks again, by clusters of neurons (edge.bitstack.StackedFFN streams them)
    clusters = _write_ffn_bundles(store, group, partial, linears, iters)

    # 4. universal order
    order, level_ppl = _universal_order(store, partial, group, names, linears, scales, iters, order_ids, threads,
                                        lambda d, label: tell(len(names) + d, total, label))
    attrs = {"iters": iters, "calib_tokens": calib, "order_tokens": order_tokens, "linears": linears,
             "order": order, "level_ppl": level_ppl, "ffn_clusters": clusters}
    for f in ("params.json", "scales.npz", "order.json"):
        (partial / f).unlink(missing_ok=True)
    shutil.rmtree(partial / "done")
    commit_group(store_path, partial, "stack", attrs)
    return attrs


def _write_ffn_bundles(store, group, partial: Path, linears: dict, iters: int) -> list[int]:
    """Per layer, `ffn.<i>`: one record per (block b, cluster c) of the store's FFN clusters (chunk b * n + c):
    the cluster's gate and up sign rows, its columns of the down signs (whole 32-column sign blocks), its rows
    of u for gate and up and its columns of v for down; `ffn_shared.<i>`, one chunk per block: v of gate and
    up, u of down (what every cluster shares). The same bytes as the blocks, regrouped so that a cluster's
    part of a block is one read. Returns the cluster size per layer (0: not a multiple of 32, no records)."""
    from edge.bitstack import ffn_record, ffn_shared
    from weights_tools.convert import write_array

    cfg = store.config
    sizes = []
    for i in range(cfg.n_layers):
        c = store.ffn_layouts[i]["cluster"] if store.ffn_layouts else 0
        if not c or c % 32:
            sizes.append(0)
            continue
        sizes.append(c)
        if (partial / "done" / f"ffn.{i}").exists():
            continue
        names = [f"blk.{i}.ffn_{n}.weight" for n in ("gate", "up", "down")]
        records, shared = [], []
        for b in range(iters):
            blocks = [split_block(np.asarray(group[n][b]), linears[n]["rows"], linears[n]["cols"], linears[n]["rank"])
                      for n in names]
            (sg, ug, vg), (su, uu, vu), (sd, ud, vd) = blocks
            shared.append(ffn_shared(vg, vu, ud))
            records += [ffn_record(sg, su, sd, ug, uu, vd, k * c, (k + 1) * c) for k in range(cfg.hidden_dim // c)]
        write_array(group, f"ffn.{i}", np.stack(records), 1)
        write_array(group, f"ffn_shared.{i}", np.stack(shared), 1)
        (partial / "done" / f"ffn.{i}").touch()
    return sizes


def _shape(cfg, linear: str) -> tuple[int, int]:
    """(rows, cols) of a layer's linear, as the forward pass loads it."""
    return {"attn_q": (cfg.q_dim, cfg.dim), "attn_k": (cfg.kv_dim, cfg.dim), "attn_v": (cfg.kv_dim, cfg.dim),
            "attn_output": (cfg.dim, cfg.q_dim), "ffn_gate": (cfg.hidden_dim, cfg.dim),
            "ffn_up": (cfg.hidden_dim, cfg.dim), "ffn_down": (cfg.dim, cfg.hidden_dim)}[linear]


class _OrderGroup:
    """A linear group of dense float32 reconstructions at the current level; `tested` (one linear) uses its
    next block too."""

    def __init__(self, names: list[str], state: dict, inv_scale: np.ndarray):
        self.names, self.state, self.inv_scale = names, state, inv_scale

    def __call__(self, x: np.ndarray) -> tuple:
        xs = x * self.inv_scale
        out = []
        for name in self.names:
            w = self.state["w"][name]
            if name == self.state["tested"]:
                w = w + self.state["next"][name]
            out.append(xs @ w.T)
        return tuple(out)


class _OrderLinears:
    """Every linear group as the order search has it now (its _OrderGroup), for a Transformer's parts."""

    def __init__(self, state: dict, scales: dict):
        self.state, self.scales = state, scales

    def group(self, i: int, name: str) -> "_OrderGroup":
        return _OrderGroup([f"blk.{i}.{n}.weight" for n in GROUPS[name]], self.state, 1.0 / self.scales[(i, name)])

    def resize(self, plan) -> None:
        pass


def _universal_order(store, partial: Path, group, names, linears, scales, iters, ids, threads, tell):
    from edge.head import DenseEmbedding, DenseHead
    from edge.kernels import make_backend
    from edge.model import Transformer
    from edge.parts import ACTIVATIONS, DenseFFN, Parts
    from weights_tools.calibrate import LayerReplay

    cfg = store.config
    scores_path = partial / "order.json"
    scores = json.loads(scores_path.read_text()) if scores_path.exists() else {}
    arrays = {name: group[name] for name in names}

    def block(name: str, b: int) -> np.ndarray:
        lin = linears[name]
        raw = np.asarray(arrays[name][b])
        signs, u, v = split_block(raw, lin["rows"], lin["cols"], lin["rank"])
        return unpack_signs(signs, lin["cols"]) * (u.astype(np.float32) @ v.astype(np.float32))

    state = {"w": {}, "next": {}, "tested": None}
    backend = make_backend("numpy", threads)
    searched = _OrderLinears(state, scales)
    act = ACTIVATIONS[cfg.activation]
    parts = Parts(searched, DenseFFN(searched, cfg.n_layers, act), DenseEmbedding(store), DenseHead(store, backend))
    model = Transformer(store, len(ids), backend=backend, parts=parts)
    replay = LayerReplay(model, ids)

    order, level_ppl, done = [], [], 0
    for name in names:
        state["w"][name] = block(name, 0)
    for level in range(1, iters):  # every linear at `level` blocks; try each one's block level + 1
        for name in names:
            state["next"][name] = block(name, level)
        key = str(level)
        if key not in scores:
            replay.inputs()
            level_scores = {}
            for name in names:
                state["tested"] = name
                level_scores[name] = replay.ppl_from(_split(name)[0])
                done += 1
                tell(done, f"order level {level}: {name}")
            state["tested"] = None
            base = replay.ppl_from(cfg.n_layers)
            scores[key] = {"base": base, "linears": level_scores}
            tmp = scores_path.with_name("order.tmp.json")
            tmp.write_text(json.dumps(scores))
            tmp.replace(scores_path)
        else:
            done += len(names)
        level_ppl.append(scores[key]["base"])
        ranked = sorted(names, key=lambda n: _finite(scores[key]["linears"][n]))
        order += [[name, level] for name in ranked]
        for name in names:
            state["w"][name] += state["next"].pop(name)
    state["tested"] = None
    replay.inputs()
    level_ppl.append(replay.ppl_from(cfg.n_layers))
    return order, level_ppl


def _finite(x: float) -> float:
    return x if np.isfinite(x) else float("inf")
