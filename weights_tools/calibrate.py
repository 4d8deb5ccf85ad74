"""`edge convert --calibrate`: what the budgeted runtime needs, measured on calibration text, into the store.

Runs the dense model over `edge.evaluate.calibration_text()` and records, per layer, the FFN input x and the
hidden activation h = act(gate(x)) * up(x). From those:

- two trained low-rank predictors per layer (LLM in a flash, section 3.1, adapted to clusters): from the
  layer's FFN input x they estimate each cluster's log importance, log sum_j |h_j| * |down[:, j]| (how much
  the cluster adds to the FFN output), one for this layer (which clusters to skip) and one for the next
  layer (which to read ahead while this one computes). Each is a reduced-rank least-squares fit on
  calibration activations: a ridge regression W over [x, 1], truncated to rank `rank` along the top singular
  vectors of its fitted outputs; stored as A (dim x r), B (r x clusters) and a bias. Measured on SmolLM2
  (4096 tokens, 25% sparsity): held-out recall/precision 0.89/0.91 (next layer's recall 0.87); perplexity
  with skipping under --ram 140MiB 33.2 (dense 20.1), where the closed-form predictor before it (SVD of
  the gate outputs, importance |act(g)| * mean|up|) gave 134.9 (benchmarks/README.md). Clusters are the
  store's FFN bundles;
- thresholds: for each target sparsity s, the predicted-importance quantile below which a cluster is
  skipped, with recall and precision of that choice on held-out text (the last quarter of the tokens);
- the head's low-rank copy `sparse/head` (Q4_0 blocks): logits ~ (h @ V) @ L.T with V the top eigenvectors
  of the final hidden states' second moment plus HEAD_MIX of the head's own (each scaled to trace 1), turned
  by a fixed random rotation; the runtime rescores the top candidates with exact rows. The states are half
  the calibration text's and half the model's own sampled answers to chat prompts (`generated_states`): the
  calibration text (Python's documentation) alone fits its directions too closely. Its rank is the
  smallest from 256 in steps of 32 at which, on the held-out text and the held-out chat answers both, the
  runtime's head (the 128 candidates, then the second stage below) picks the exact head's greedy token on
  HEAD_TARGET of their tokens (`--head-rank` sets it; measured with the candidates alone it was 288 for
  SmolLM2, see below). Measured on
  the model's greedy answers to six other chat prompts (576 tokens): SmolLM2's text-only basis at rank 256
  left the full head's token outside the candidates on 21 (96.4%), with chat answers mixed in 12; the
  measured rank is 288: 8 (98.6%); 320: 1, at 0.9MB more, which at --ram 140MB no longer leaves every FFN
  cluster cached (45 -> 25 tok/s). Gemma 3 keeps rank 256: 5 -> 0 of 576. A story (tests/test_budget.py):
  SmolLM2 98.0% -> 100%, Gemma 3 100% -> 99.5%. The runtime's second stage (`sparse/head_miss`, see
  edge.head.ApproxHead) then takes SmolLM2's greedy choices on those answers from 569 to 574 of 576
  (99.65%), rescoring 8 more rows per token (Gemma 3: 576 of 576 either way, 0.7 rows). Measured with the
  second stage on, and with llama.cpp's kernel for the exact logits as the runtime has them (onnxruntime's
  had turned near-ties), the rank is 256 for both: SmolLM2 575 of 576 on six such prompts (9.6 rows per
  token; 288: 576, 4.7 rows), 0.9MB less in RAM. Earlier (text
  only): without the rotation, Q4_0 blocks mixed the head's large directions with the states' small ones
  (94%); rank 128 Q8_0 95.1% (64 candidates) / 98.2% (128); a Q4_0 copy of the whole head 100% with 16, at
  2.3x the bytes of rank 256;
- what the basis leaves of each head row, |E_i (I - V V^T)| (`sparse/head_miss`, float32), the runtime's
  second-stage bound;
- the head rows most often among those candidates on the calibration text (`sparse/head_hot`, ids in
  `sparse/head_hot_ids`), one contiguous array the runtime reads into its row cache at start.

Written into `sparse.partial/` inside the store and renamed, then the attributes are updated (the commit
point): an interrupted calibration leaves the store as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edge import quants
from edge.errors import EdgeError
from edge.head import second_stage
from edge.sparse import PREDICTOR, SPARSITIES, pack_predictors, predict


def collect_activations(src, tok, tokens: int, threads: int | None, reduce=None, x_sink=None):
    """Run the dense model over calibration text: per layer the FFN input x (float16: Qwen2.5-1.5B's 28 layers
    x 4096 tokens are 352MB so) and activation h (or reduce(layer, h) in its place: h is the largest), and the
    final hidden states (normed). src: an opened GGUFFile or Store; tok: its edge.tokenizer.Tokenizer (opened
    before the model: a vocabulary read through llama.cpp peaks at ~700MB while it loads). The model runs on
    the `auto` backend (ggml for K-quants: onnxruntime would hold 3.1GB of Qwen2.5-1.5B's 1.1GB). x_sink(layer,
    x): given each chunk's FFN inputs instead of keeping them (then the returned dict of them is empty)."""
    from edge.evaluate import calibration_text
    from edge.model import Transformer, rms_norm

    cfg = src.config
    model = Transformer(src, min(256, cfg.context_length), threads=threads)
    ids = tok.encode(calibration_text())
    if len(ids) < tokens:
        raise EdgeError(f"calibration text has {len(ids)} tokens, {tokens} asked; lower --calib-tokens")
    xs: dict[int, list] = {i: [] for i in range(cfg.n_layers)}
    hs: dict[int, list] = {i: [] for i in range(cfg.n_layers)}
    finals: list = []

    def trace(i, point, x):
        if point == "ffn_in":
            if x_sink is not None:
                x_sink(i, x)
            else:
                xs[i].append(x.astype(np.float16))
        elif point == "ffn_h":
            hs[i].append(reduce(i, x) if reduce else x.astype(np.float32))

    model.trace = trace
    win = model.n_ctx
    for start in range(0, tokens, win):
        chunk = np.asarray(ids[start:start + win])
        model.forward(chunk, 0)  # the last position's logits only: the states are what is kept
        finals.append(model.last_hidden)
    model.trace = None
    return model, ({i: np.concatenate(v) for i, v in xs.items() if v}, {i: np.concatenate(v) for i, v in hs.items()},
                   rms_norm(np.concatenate(finals), model.output_norm, cfg.norm_eps))


CHAT_PROMPTS = (  # what a chat asks: the states the head scores in a chat are the model's own answers to such
    "Tell me a short story about a fox who wants to fly.",
    "What should I pack for a weekend hiking trip?",
    "Explain why the sky is blue to a ten year old.",
    "Write a friendly email inviting my neighbours to a garden party.",
    "What is the difference between a virus and a bacterium?",
    "Give me three ideas for a vegetarian dinner.",
    "How do I say thank you in French, Spanish and German?",
    "Summarize the plot of a mystery novel in a few sentences.",
    "Why do cats purr?",  # the last CHAT_HELD: held out, to measure the chosen rank on
    "Write a haiku about the first snow of winter.",
    "What are the pros and cons of working from home?",
    "How does a bicycle stay upright when it moves?",
)
CHAT_HELD = 4
CHAT_TOKENS = 96  # of each answer


def generated_states(model, tok, seed: int = 0, done=None) -> tuple[np.ndarray, np.ndarray]:
    """Final hidden states (normed) while the model answers CHAT_PROMPTS itself, sampled (temperature 0.8,
    top-k 40, fixed seed): (fit, held out) by prompt. The calibration text (documentation) alone left 49% of
    the state norm of SmolLM2's own chat answers outside the basis, and the full head's token outside its 128
    candidates on 3.6% of the tokens."""
    from edge.model import rms_norm
    from edge.sampling import Sampler, SamplerConfig

    sampler = Sampler(SamplerConfig(temperature=0.8, top_k=40, top_p=0.95, seed=seed))
    per_prompt = []
    for prompt in CHAT_PROMPTS:
        ids = tok.encode_chat([{"role": "user", "content": prompt}])[:model.n_ctx // 2]
        logits = model.forward(np.asarray(ids), 0)
        states = []
        for pos in range(len(ids), min(len(ids) + CHAT_TOKENS, model.n_ctx)):
            states.append(model.last_hidden[-1:])
            token = sampler(logits, ids)
            if tok.is_end(token):
                break
            ids.append(token)
            logits = model.forward(np.asarray([token]), pos)
        per_prompt.append(rms_norm(np.concatenate(states), model.output_norm, model.cfg.norm_eps))
        if done:
            done(len(per_prompt))
    return np.concatenate(per_prompt[:-CHAT_HELD]), np.concatenate(per_prompt[-CHAT_HELD:])


def calibration_memory(model_bytes: int) -> int:
    """About the peak memory of `calibrate` for a model of this size: the model resident while activations are
    collected and chat answers generated, and their buffers. Measured peak RSS: SmolLM2-135M (98MB) 318MB,
    Qwen2.5-Coder-1.5B (1.12GB) 1.55GB."""
    return int(1.25 * model_bytes) + (200 << 20)


def calibration_memory_warning(model_bytes: int) -> str | None:
    """What to tell the user before calibrating, when this process's memory limit (its cgroup's) or the
    memory free now is below what calibration takes; None when it fits."""
    from edge.memory import probe_memory
    from edge.sizes import format_size

    need = calibration_memory(model_bytes)
    available, limit = probe_memory()
    room, what = (limit, "this process's memory limit") if limit is not None and limit < available else (
        available, "the memory free now")
    if room >= need:
        return None
    return (f"calibration holds the whole model: it needs about {format_size(need)} and {what} is "
            f"{format_size(room)}; it may be killed or swap (calibrate where more is free; the store runs "
            "under --ram without it)")


def calibrate(store_path: str | Path, rank: int = 64, head_rank: int | None = None, tokens: int = 4096,
              threads: int | None = None, progress=None) -> dict:
    """Calibrate a store in place; returns the summary written under attributes["edge"]["sparse"]. head_rank:
    the low-rank head's rank (a multiple of 32); None measures it (head_ranks, HEAD_TARGET)."""
    import zarr
    from zarr.storage import LocalStore

    from weights_tools.convert import write_array, commit_group

    from edge.ggml import Weight, ggml
    from edge.kernels import default_threads
    from edge.memory import release_free_memory
    from edge.store import Store
    from edge.tokenizer import Tokenizer

    store_path = Path(store_path)
    store = Store(store_path)
    cfg = store.config
    if cfg.n_experts:
        raise EdgeError(f"{store_path}: a mixture of experts: its calibration is weights_tools.moe_traces "
                        "(`edge convert STORE --calibrate` runs it)")
    if head_rank is not None and (head_rank % 32 or head_rank <= 0):
        raise EdgeError(f"--head-rank {head_rank}: must be a positive multiple of 32 (Q4_0 blocks of the copy)")
    clusters = [lay["cluster"] for lay in store.ffn_layouts]
    steps = cfg.n_layers + len(CHAT_PROMPTS) + 1  # progress: chat answers, layers, the head
    down_norms = []
    for i in range(cfg.n_layers):
        dt = store.tensor(f"blk.{i}.ffn_down.weight")
        down_norms.append(np.linalg.norm(quants.dequantize(dt.raw, dt.type_id, dt.cols), axis=0))

    def importance(i, h):  # (T, clusters): log of what each cluster adds to the FFN output, at most
        c = (np.abs(h.astype(np.float32)) * down_norms[i]).reshape(len(h), -1, clusters[i]).sum(-1)
        return np.log(c + 1e-6).astype(np.float32)

    if progress:
        progress(0, steps)  # said at once: collecting activations takes minutes on a 1.5B model
    tok = Tokenizer(store.tokenizer_path, cfg.arch, store.chat_template)
    # the FFN inputs go to files in the store until their layer's predictors are fitted: in RAM they sat beside
    # the whole model through collection and the chat answers (Qwen2.5-1.5B: 352MB in float16)
    spill, partial = store_path / "calibrate.spill", store_path / "sparse.partial"
    shutil.rmtree(spill, ignore_errors=True)  # an interrupted calibration's
    spill.mkdir()

    def x_sink(i, x):
        with open(spill / f"x.{i}", "ab") as f:
            f.write(x.astype(np.float16).tobytes())

    try:
        model, (_, imp, Y) = collect_activations(store, tok, tokens, threads, importance, x_sink)
        chat_fit, chat_held = generated_states(model, tok, done=lambda k: progress and progress(k, steps))
        del model  # the rest needs no model (with it, Qwen2.5-1.5B's calibration peaked at 5.6GB)
        release_free_memory()  # glibc keeps the freed model's heap pages otherwise (Qwen2.5-1.5B: 750MB of 1.1GB)
        held = len(Y) * 3 // 4  # fit on the first three quarters, report on the rest
        shutil.rmtree(partial, ignore_errors=True)
        group = zarr.create_group(LocalStore(partial))
        layers = []
        for i in range(cfg.n_layers):
            x, true = np.fromfile(spill / f"x.{i}", np.float16).reshape(-1, cfg.dim).astype(np.float32), imp[i]
            (spill / f"x.{i}").unlink()
            this = fit_predictor(x[:held], true[:held], rank)
            nxt = fit_predictor(x[:held], imp[i + 1][:held], rank) if i + 1 < cfg.n_layers else None
            write_array(group, f"aux.{i}", pack_predictors(this, nxt).reshape(1, -1), 1)
            pred = predict(this, x)
            nxt_pred = predict(nxt, x) if nxt is not None else None
            entry = {"cluster": clusters[i], "thresholds": {}, "recall": {}, "precision": {}}
            if nxt is not None:
                entry.update(next_thresholds={}, next_recall={})
            for s in SPARSITIES:
                tau, entry["recall"][str(s)], entry["precision"][str(s)] = _choice(pred, true, held, s)
                entry["thresholds"][str(s)] = tau
                if nxt is not None:  # the next layer's clusters chosen from this layer's input
                    tau, entry["next_recall"][str(s)], _ = _choice(nxt_pred, imp[i + 1], held, s)
                    entry["next_thresholds"][str(s)] = tau
            layers.append(entry)
            if progress:
                progress(len(CHAT_PROMPTS) + i + 1, steps)
        del imp
        # head: top principal directions of the final hidden states (calibration text and the model's own chat
        # answers), with a tenth of the head's own row covariance; the rank is measured (head_ranks, HEAD_TARGET)
        head_name = "output.weight" if store.has("output.weight") else "token_embd.weight"
        ht = store.tensor(head_name)
        rows = sum(e.T @ e for _, e in _head_rows(ht))
        states, answers = Y[:held].T @ Y[:held], chat_fit.T @ chat_fit
        mixed = (1 - CHAT_MIX) * states / np.trace(states) + CHAT_MIX * answers / np.trace(answers)
        _, vecs = np.linalg.eigh((1 - HEAD_MIX) * mixed + HEAD_MIX * rows / np.trace(rows))
        checks = {"text": Y[held:], "chat": chat_held}
        gg = ggml(threads or default_threads())
        exact = Weight(ht.raw, ht.type_id, ht.rows, ht.cols)
        ranks, tried = [head_rank] if head_rank else head_ranks(cfg.dim), {}
        for r in ranks:
            v, low, approx = _low_rank_head(ht, vecs, r)
            miss = _head_miss(ht, v)
            copy = Weight(low, quants.Q4_0, len(low), r)
            tried[r] = {k: runtime_head_agreement(y, v, copy, miss, exact, gg) for k, y in checks.items()}
            if min(g for g, _, _ in tried[r].values()) >= HEAD_TARGET:
                break
        head_rank = r
        write_array(group, "head", low, max(1, (1 << 20) // low.shape[1]))
        write_array(group, "head_basis", v.view(np.uint8).reshape(1, -1), 1)
        write_array(group, "head_miss", miss.view(np.uint8).reshape(1, -1), 1)
        (text, text_in, text_rows), (chat, chat_in, chat_rows) = tried[r]["text"], tried[r]["chat"]
        head_check = {"candidates": HEAD_CANDIDATES, "miss": True, "greedy": text, "chat_greedy": chat,
                      "top1_in_candidates": text_in, "chat_top1_in_candidates": chat_in,
                      "second_stage_rows": (text_rows + chat_rows) / 2,
                      "ranks_tried": {str(k): {c: g for c, (g, _, _) in t.items()} for k, t in tried.items()}}
        hot = _hot_rows(np.concatenate([Y[:held], chat_fit]), v, approx)
        write_array(group, "head_hot_ids", hot.astype("<i4").view(np.uint8).reshape(1, -1), 1)
        write_array(group, "head_hot", np.ascontiguousarray(ht.raw[hot]), max(1, (1 << 20) // ht.raw.shape[1]))
        head_check["hot_rows"] = len(hot)
        summary = {"predictor": PREDICTOR, "rank": rank, "head_rank": head_rank, "tokens": int(len(Y)),
                   "layers": layers, "head": {"tensor": head_name, **head_check}}
        if progress:
            progress(steps, steps)
        commit_group(store_path, partial, "sparse", summary)
    finally:  # after the commit, partial is gone (renamed to sparse)
        shutil.rmtree(spill, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
    return summary


def _choice(pred: np.ndarray, true: np.ndarray, held: int, s: float) -> tuple:
    """At sparsity s: the threshold on predicted importance (the s quantile on the fitting tokens; None at 0),
    and recall and precision on the held-out tokens of choosing what passes it, against the clusters whose
    true importance passes its own s quantile."""
    if s == 0:
        return None, 1.0, 1.0
    tau = float(np.quantile(pred[:held], s))
    need = true[held:] >= np.quantile(true[:held], s)
    chosen = pred[held:] >= tau
    hit = (need & chosen).sum()
    return tau, float(hit / max(1, need.sum())), float(hit / max(1, chosen.sum()))


def fit_predictor(x: np.ndarray, y: np.ndarray, rank: int, ridge: float = 1e-3):
    """Reduced-rank ridge regression of y (T, clusters) on [x, 1]: (A (dim, r), B (r, clusters), bias)."""
    xa = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1).astype(np.float64)
    g = xa.T @ xa
    w = np.linalg.solve(g + ridge * np.trace(g) / len(g) * np.eye(len(g)), xa.T @ y)  # (dim + 1, clusters)
    r = min(rank, y.shape[1])
    _, _, vt = np.linalg.svd(xa @ w, full_matrices=False)
    proj = vt[:r]  # (r, clusters): the fitted outputs' top directions
    a = w[:-1] @ proj.T
    bias = w[-1] @ proj.T @ proj
    return a.astype(np.float16), proj.astype(np.float16), bias.astype(np.float32)


HEAD_CANDIDATES = 128  # rows rescored exactly per token (edge.head.ApproxHead)
HEAD_MIX = 0.1  # the head's row covariance in the low-rank basis (the rest: the final states'), see above
CHAT_MIX = 0.5  # of the states' part: the model's own answers to chat prompts (the rest: the calibration text)
HEAD_TARGET = 0.99  # held-out text and chat answers: the runtime head's greedy choice is the exact head's


def _candidates(y, v, approx, batch: int = 64) -> np.ndarray:
    """The low-rank head's top candidates for each state of y, (T, HEAD_CANDIDATES), in batches of states (a
    (T, vocab) block of logits at once would be 4GB for Gemma 3 at 4096 tokens)."""
    out = []
    for i in range(0, len(y), batch):
        z = (y[i:i + batch] @ v) @ approx.T
        # a copy: the slice is a view whose base, every row's (T, vocab) int64 indices, would be kept (Qwen2.5's
        # 60 batches held 4.7GB so)
        out.append(np.argpartition(-z, HEAD_CANDIDATES, axis=1)[:, :HEAD_CANDIDATES].copy())
    return np.concatenate(out)


def runtime_head_agreement(y, v, low, miss, head, gg, batch: int = 64) -> tuple[float, float, float]:
    """The runtime's head (edge.head.ApproxHead: the candidates, then the second stage) on each state of y:
    how often its greedy choice is the exact head's, how often that token is among the candidates, and the
    rows the second stage rescores per state. Logits by llama.cpp's kernels as the runtime has them: the
    low-rank copy's (`low`) and the exact head's stored bytes (`head`), both edge.ggml.Weight (float rows, or
    another backend's kernel, differ in the last digits and turned near-ties on 2% of SmolLM2's tokens even
    at full rank)."""
    agree = inside = extra = 0
    for i in range(0, len(y), batch):
        h = np.ascontiguousarray(y[i:i + batch])
        (exact,) = gg.matmul(h, [head], keep=False)
        want = exact.argmax(1)
        p = h @ v
        (z,) = gg.matmul(p, [low], keep=False)
        top = np.argpartition(-z, HEAD_CANDIDATES, axis=1)[:, :HEAD_CANDIDATES]
        inside += int((top == want[:, None]).any(1).sum())
        at = np.arange(len(h))[:, None]
        z[at, top] = exact[at, top]
        for t in range(len(h)):
            more = second_stage(z[t], top[t], miss, h[t], p[t])
            z[t, more] = exact[t, more]
            extra += len(more)
        agree += int((z.argmax(1) == want).sum())
    return agree / len(y), inside / len(y), extra / len(y)


def head_ranks(dim: int) -> list[int]:
    """The low-rank head's ranks calibration tries, smallest first: from 256 (or the model's width) in steps of
    32 up to the model's width (a rank equal to the width is the whole head, turned, in Q4_0)."""
    top = max(32, dim // 32 * 32)
    return list(range(min(256, top), top + 1, 32))


def _head_rows(ht, batch: int = 16384):
    """(first row, rows of E dequantized to float32) in batches: the whole head in float32 is 933MB for
    Qwen2.5-1.5B's 151936 x 1536."""
    for i in range(0, ht.rows, batch):
        yield i, quants.dequantize(ht.raw[i:i + batch], ht.type_id, ht.cols)


def _low_rank_head(ht, vecs, r: int):
    """The rank-r copy: basis V (dim, r), the first r eigenvectors turned by a fixed random rotation (the
    product is the same, and every Q4_0 block of the copy holds coordinates of like size: the head's own
    directions are far larger than the states' and took the blocks' scales, 94% of calibration tokens' top-1
    among the candidates instead of 100%, SmolLM2), and E @ V in Q4_0 (stored bytes and dequantized)."""
    import gguf

    turn = np.linalg.qr(np.random.default_rng(0).standard_normal((r, r)))[0]
    v = np.ascontiguousarray(vecs[:, ::-1][:, :r] @ turn).astype(np.float32)  # (dim, r)
    low = np.concatenate([gguf.quantize(e @ v, gguf.GGMLQuantizationType.Q4_0).view(np.uint8).reshape(len(e), -1)
                          for _, e in _head_rows(ht)])
    return v, low, quants.dequantize(low, quants.Q4_0, r)


def _head_miss(ht, v) -> np.ndarray:
    """|E_i (I - V V^T)| per row (V orthonormal): what the basis leaves of each head row, the runtime's
    second-stage bound (edge.head.ApproxHead)."""
    out = np.empty(ht.rows, np.float32)
    for i, rows in _head_rows(ht):
        out[i:i + len(rows)] = np.sqrt(np.maximum(0, (rows * rows).sum(1) - ((rows @ v) ** 2).sum(1)))
    return out


def _hot_rows(y, v, approx) -> np.ndarray:
    """The head rows rescored most often on calibration text, most frequent first, as many as the runtime's
    row cache holds: stored as one array the runtime reads at start (a cold cache missed 41 of 128 rows per
    token over SmolLM2's first 64 tokens, 190us a read here; see edge.head.RowCache.fill)."""
    from edge.head import ROW_CACHE

    counts = np.bincount(_candidates(y, v, approx).reshape(-1), minlength=len(approx))
    order = np.argsort(-counts, kind="stable")[:ROW_CACHE]
    return order[counts[order] > 0]


class LayerReplay:
    """The perplexity of one window of tokens after a change at one layer, rerunning only the layers from it on:
    `inputs()` runs the whole model and keeps every layer's input, `ppl_from(l)` reruns layers l.. from the
    kept input of layer l (BitStack's universal order, EdgeMoE's expert profile)."""

    def __init__(self, model, tokens):
        self.model = model
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.xs: list[np.ndarray] = []

    def inputs(self) -> list[np.ndarray]:
        """Run every layer; keep each one's input (and the last one's output, at index n_layers)."""
        m = self.model
        xs, x = [], m.embed(self.tokens)
        for j in range(m.cfg.n_layers):
            xs.append(x)
            x = m.block(j, x, 0)
        self.xs = xs + [x]
        return self.xs

    def ppl_from(self, layer: int) -> float:
        from edge.evaluate import token_nll
        from edge.model import rms_norm

        m = self.model
        x = self.xs[layer]
        for j in range(layer, m.cfg.n_layers):
            x = m.block(j, x, 0)
        (logits,) = m.parts.head(rms_norm(x, m.output_norm, m.cfg.norm_eps))
        with np.errstate(all="ignore"):
            return float(np.exp(token_nll(logits, self.tokens).mean()))
