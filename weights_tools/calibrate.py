"""`edge convert --calibrate`: what the budgeted runtime needs, measured on calibration text, into the store.

Runs the dense model over `edge.evaluate.calibration_text()` and records, per layer, the FFN input x and the
hidden activation h = act(gate(x)) * up(x). The model runs a layer at a time (`calibration_model`, `layer_pass`):
every calibration token goes through layer i before layer i + 1 is read, and the model's own chat answers
advance together, one layer at a time (`generated_states`); the head is read in row blocks. So the memory is a
layer's weights and the calibration's states, not the model (Qwen2.5-Coder-1.5B: 458MB peak RSS, was 1.55GB
with the model resident), and layers are kept in RAM only as far as `--ram` allows. From those:

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
- each layer's clusters hottest first (`hot`): by how often the predictor chooses them, summed over the
  sparsities, then by mean importance; `--gpu` puts the first of them on the device;
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
from edge.sampling import top_ids
from edge.sparse import PREDICTOR, SPARSITIES, pack_predictors, predict


class LayerByLayer:
    """Linear groups of one layer at a time: a layer's weights are read from the source when one of its
    products first runs, those of the layer before dropped. A model run a layer at a time over every position
    (`layer_pass`) holds one layer's weights, not the model's. hold: bytes of layers kept once read (the first
    ones that fit; steps that go through every layer, calibration's chat answers, then read only the rest)."""

    def __init__(self, src, backend, hold: int = 0):
        self.src, self.backend, self.hold = src, backend, hold
        self.layer, self.groups = -1, {}
        self.held: dict[int, dict] = {}
        self.held_bytes = 0

    def group(self, i: int, name: str):
        def run(x: np.ndarray) -> tuple:
            if self.layer != i:
                self._load(i)
            return self.groups[name](x)

        return run

    def _load(self, i: int) -> None:
        from edge.memory import release_free_memory
        from edge.parts import ATTENTION, StoredLinears

        if self.layer not in self.held:
            self.groups = {}
            release_free_memory()  # the layer before's pages back to the OS, not kept in glibc's heap
        self.layer = -1
        if i in self.held:
            self.groups = self.held[i]
        else:
            before = self.backend.resident_bytes
            stored = StoredLinears(self.src, self.backend)
            self.groups = {name: stored.group(i, name) for name in (*ATTENTION, "ffn_in", "ffn_h")}
            size = self.backend.resident_bytes - before
            if self.held_bytes + size <= self.hold:
                self.held[i], self.held_bytes = self.groups, self.held_bytes + size
        self.layer = i

    def resize(self, plan) -> None:
        pass


def calibration_model(src, threads: int | None, n_ctx: int = 256, hold: int = 0):
    """The dense model over `src` (an opened Store or GGUFFile) holding one layer's weights at a time, and
    `hold` bytes of layers besides (LayerByLayer, llama.cpp's kernels on the weights as stored), the
    embedding's rows read as looked up and the head read in row blocks at each call (a store; a GGUF file's
    are mapped)."""
    from edge.head import DenseEmbedding, DenseHead, FlashEmbedding, RowCache, StreamedHead
    from edge.kernels import make_backend
    from edge.model import Transformer
    from edge.parts import ACTIVATIONS, DenseFFN, Parts
    from edge.store import Store

    cfg = src.config
    backend = make_backend("ggml", threads)
    linears = LayerByLayer(src, backend, hold)
    if isinstance(src, Store):
        ends = FlashEmbedding(src, RowCache(src, "token_embd.weight")), StreamedHead(src, backend.ggml)
    else:
        ends = DenseEmbedding(src), DenseHead(src, backend)
    parts = Parts(linears, DenseFFN(linears, cfg.n_layers, ACTIVATIONS[cfg.activation]), *ends)
    return Transformer(src, min(n_ctx, cfg.context_length), backend=backend, parts=parts)


def layer_pass(model, ids: list[int], sink) -> np.ndarray:
    """The model over `ids` in windows of model.n_ctx positions (each from position 0), one layer at a time
    over every window: sink(layer, x, h) with each window's FFN input x and activation h, in order. Returns
    the final hidden states (normed), (len(ids), dim)."""
    from edge.model import rms_norm

    def trace(i, point, v):
        if point == "ffn_in":
            pending.append(v)
        elif point == "ffn_h":
            sink(i, pending.pop(), v)

    pending: list = []
    win = model.n_ctx
    xs = [model.embed(np.asarray(ids[s:s + win])) for s in range(0, len(ids), win)]
    model.trace = trace
    try:
        for i in range(model.cfg.n_layers):
            for k, x in enumerate(xs):  # in place: one window's states twice at a time, not every window's
                xs[k] = model.block(i, x, 0)
    finally:
        model.trace = None
    return rms_norm(np.concatenate(xs), model.output_norm, model.cfg.norm_eps)


def calibration_ids(tok, tokens: int) -> list[int]:
    """The first `tokens` of the calibration text."""
    from edge.evaluate import calibration_text

    ids = tok.encode(calibration_text())
    if len(ids) < tokens:
        raise EdgeError(f"calibration text has {len(ids)} tokens, {tokens} asked; lower --calib-tokens")
    return ids[:tokens]


def collect_activations(src, tok, tokens: int, threads: int | None, reduce=None):
    """Every layer's FFN input x (float16) and activation h (or reduce(layer, h) in its place: h is the
    largest), and the final hidden states (normed), over `tokens` of calibration text (calibration_model,
    layer_pass): ({layer: x}, {layer: h}, finals)."""
    xs: dict[int, list] = {i: [] for i in range(src.config.n_layers)}
    hs: dict[int, list] = {i: [] for i in range(src.config.n_layers)}

    def sink(i, x, h):
        xs[i].append(x.astype(np.float16))
        hs[i].append(reduce(i, h) if reduce else h.astype(np.float32))

    finals = layer_pass(calibration_model(src, threads), calibration_ids(tok, tokens), sink)
    return {i: np.concatenate(v) for i, v in xs.items()}, {i: np.concatenate(v) for i, v in hs.items()}, finals


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
    top-k 40, a fixed seed per prompt): (fit, held out) by prompt. The calibration text (documentation) alone
    left 49% of the state norm of SmolLM2's own chat answers outside the basis, and the full head's token
    outside its 128 candidates on 3.6% of the tokens. Every answer advances one token per step, one layer at
    a time over all of them (Transformer.block_batch, each answer with its own KV cache): a step reads each
    layer's weights once, and the head once, for all answers. done(step) after each step."""
    from edge.model import KVCache, rms_norm
    from edge.sampling import Sampler, SamplerConfig

    cfg, n_ctx = model.cfg, model.n_ctx
    samplers = [Sampler(SamplerConfig(temperature=0.8, top_k=40, top_p=0.95, seed=seed + k))
                for k in range(len(CHAT_PROMPTS))]
    ids = [tok.encode_chat([{"role": "user", "content": p}])[:n_ctx // 2] for p in CHAT_PROMPTS]
    kvs = [KVCache(cfg, n_ctx) for _ in CHAT_PROMPTS]
    xs = [model.embed(np.asarray(a)) for a in ids]  # the prompts first, then one token each
    at = [0] * len(ids)  # each answer's position
    states: list[list] = [[] for _ in CHAT_PROMPTS]
    live = list(range(len(ids)))
    step = 0
    while live:
        for i in range(cfg.n_layers):
            for k, x in zip(live, model.block_batch(i, [xs[k] for k in live], [at[k] for k in live],
                                                    [kvs[k] for k in live])):
                xs[k] = x
        finals = rms_norm(np.concatenate([xs[k][-1:] for k in live]), model.output_norm, cfg.norm_eps)
        (logits,) = model.parts.head(finals)
        for k, state, z in zip(list(live), finals, logits):
            states[k].append(state)
            at[k] += len(xs[k])
            token = samplers[k](z, ids[k])
            if len(states[k]) == CHAT_TOKENS or at[k] == n_ctx or tok.is_end(token):
                live.remove(k)
                continue
            ids[k].append(token)
            xs[k] = model.embed(np.asarray([token]))
        step += 1
        if done:
            done(step)
    per_prompt = [np.stack(s) for s in states]
    return np.concatenate(per_prompt[:-CHAT_HELD]), np.concatenate(per_prompt[-CHAT_HELD:])


CALIBRATION_FIXED = 80 << 20  # the interpreter, numpy, llama.cpp's library, the tokenizer, the I/O buffer


def calibration_memory(cfg, model_bytes: int, tokens: int = 4096) -> int:
    """About the peak memory of `calibrate` (one layer at a time), 15% over the sum of: a layer's weights,
    twice (the next one's FFN is reassembled from its bundles while the last is let go; a layer taken as the
    model's bytes over its layers, the embedding and head included), and the largest of its phases: the
    text's hidden states several times over (the windows, one layer's FFN inputs, the layer before's); the
    chat answers' KV caches; the head's: the final states, two low-rank copies (the rank tried and the one
    before, taken at a quarter of the width), a block of head rows dequantized with its temporaries, the
    eigenvectors, and a batch of exact and approximate logits. Measured peak RSS at 4096 tokens, one layer at
    a time (this says): SmolLM2-135M 160MB (201MB), Gemma 3 270M 371MB (408MB), Qwen2.5-Coder-1.5B 458MB
    (562MB); holding the model, calibration took 318MB, 1.20GB and 1.55GB."""
    from edge.model import KVCache

    states = tokens * cfg.dim * 4
    copies = 2 * cfg.vocab_size * quants.FORMATS[quants.Q4_0].row_bytes(max(32, cfg.dim // 4 // 32 * 32))
    head = states + copies + 4096 * cfg.dim * 16 + 24 * cfg.dim ** 2 + 2 * HEAD_BATCH * cfg.vocab_size * 4
    answers = len(CHAT_PROMPTS) * KVCache.bytes_for(cfg, 256)
    return int(1.15 * (CALIBRATION_FIXED + 2 * model_bytes // cfg.n_layers + max(4 * states, answers, head)))


def calibration_memory_warning(need: int) -> str | None:
    """What to tell the user before calibrating, when this process's memory limit (its cgroup's) or the
    memory free now is below `need` (calibration_memory); None when it fits."""
    from edge.memory import probe_memory
    from edge.sizes import format_size

    available, limit = probe_memory()
    room, what = (limit, "this process's memory limit") if limit is not None and limit < available else (
        available, "the memory free now")
    if room >= need:
        return None
    return (f"calibration needs about {format_size(need)} and {what} is {format_size(room)}; it may be killed "
            "or swap (calibrate where more is free; the store runs under --ram without it)")


def calibrate(store_path: str | Path, rank: int = 64, head_rank: int | None = None, tokens: int = 4096,
              threads: int | None = None, progress=None, warn=None, ram: int | None = None) -> dict:
    """Calibrate a store in place; returns the summary written under attributes["edge"]["sparse"]. head_rank:
    the low-rank head's rank (a multiple of 32); None measures it (head_ranks, HEAD_TARGET). One layer's weights
    are in RAM at a time (calibration_model), and the head in row blocks; what `ram` leaves beyond that
    (calibration_memory) holds layers, which the chat answers' steps then do not read again (None: half the
    memory free now, or of this process's limit). Below what it needs, `ram` is refused; without it, warn(line)
    is told before the work starts when the memory is not there (calibration_memory_warning)."""
    import zarr
    from zarr.storage import LocalStore

    from weights_tools.convert import write_array, commit_group

    from edge.dirs import bytes_under
    from edge.flash import IOEngine
    from edge.ggml import Weight, ggml
    from edge.head import HEAD_IO, StreamedHead, head_name
    from edge.kernels import default_threads
    from edge.memory import probe_memory
    from edge.sizes import format_size
    from edge.store import Store
    from edge.tokenizer import Tokenizer

    store_path = Path(store_path)
    store = Store(store_path, engine=IOEngine(threads=4, buffer_bytes=HEAD_IO))
    cfg = store.config
    if cfg.n_experts:
        raise EdgeError(f"{store_path}: a mixture of experts: its calibration is weights_tools.moe_traces "
                        "(`edge convert STORE --calibrate` runs it)")
    if head_rank is not None and (head_rank % 32 or head_rank <= 0):
        raise EdgeError(f"--head-rank {head_rank}: must be a positive multiple of 32 (Q4_0 blocks of the copy)")
    need = calibration_memory(cfg, bytes_under(store_path), tokens)
    available, limit = probe_memory()
    room = min(available, limit) if limit is not None else available
    if ram is not None and ram < need:
        raise EdgeError(f"--ram {format_size(ram)} is below what calibrating this model takes, about "
                        f"{format_size(need)} (one layer at a time); raise --ram")
    if ram is None and warn is not None and (short := calibration_memory_warning(need)) is not None:
        warn(short)
    hold = max(0, (min(ram, room) if ram is not None else room // 2) - need)
    clusters = [lay["cluster"] for lay in store.ffn_layouts]
    steps = cfg.n_layers + CHAT_TOKENS + 1  # progress: the layers over the text, the chat answers' steps, the head
    if progress:
        progress(0, steps)  # said at once: the first layer takes a while on a 1.5B model
    tok = Tokenizer(store.tokenizer_path, cfg.arch, store.chat_template)
    ids = calibration_ids(tok, tokens)
    held = len(ids) * 3 // 4  # fit on the first three quarters, report on the rest
    partial = store_path / "sparse.partial"
    layers: list[dict] = []
    found: dict[int, list] = {}  # per layer: its windows' (FFN inputs float16, cluster importances)
    before: list = []  # the layer before's (x, importance, this layer's predictor), for its next-layer predictor

    def importance(i, h):  # (T, clusters): log of what each cluster adds to the FFN output, at most
        if i not in down_norm:  # the layer the pass has just read: its FFN is the store's reassembled one
            down_norm.clear()
            down_norm[i] = _down_norm(store, i)
        c = (np.abs(h) * down_norm[i]).reshape(len(h), -1, clusters[i]).sum(-1)
        return np.log(c + 1e-6).astype(np.float32)

    def finish(i: int, x, imp, this, nxt_imp) -> None:
        """Layer i's predictors (the next layer's from nxt_imp, the importances of layer i + 1) and choices."""
        nxt = fit_predictor(x[:held], nxt_imp[:held], rank) if nxt_imp is not None else None
        write_array(group, f"aux.{i}", pack_predictors(this, nxt).reshape(1, -1), 1)
        pred = predict(this, x)
        entry = {"cluster": clusters[i], "thresholds": {}, "recall": {}, "precision": {}}
        if nxt is not None:
            nxt_pred = predict(nxt, x)
            entry.update(next_thresholds={}, next_recall={})
        chosen = np.zeros(pred.shape[1])
        for s in SPARSITIES:
            tau, entry["recall"][str(s)], entry["precision"][str(s)] = _choice(pred, imp, held, s)
            entry["thresholds"][str(s)] = tau
            chosen += (pred >= tau).mean(axis=0) if tau is not None else 0
            if nxt is not None:  # the next layer's clusters chosen from this layer's input
                tau, entry["next_recall"][str(s)], _ = _choice(nxt_pred, nxt_imp, held, s)
                entry["next_thresholds"][str(s)] = tau
        entry["hot"] = np.lexsort((-imp.mean(axis=0), -chosen)).tolist()  # the last key sorts first
        layers.append(entry)

    def sink(i, x, h):
        found.setdefault(i, []).append((x.astype(np.float16), importance(i, h)))
        if sum(len(v[0]) for v in found[i]) < len(ids):
            return
        x, imp = (np.concatenate(v) for v in zip(*found.pop(i)))
        x = x.astype(np.float32)
        this = fit_predictor(x[:held], imp[:held], rank)
        if before:
            finish(i - 1, *before, imp)
        before[:] = [x, imp, this]
        if progress:
            progress(i + 1, steps)

    down_norm: dict[int, np.ndarray] = {}  # the layer in the pass
    try:
        shutil.rmtree(partial, ignore_errors=True)  # an interrupted calibration's
        group = zarr.create_group(LocalStore(partial))
        model = calibration_model(store, threads, hold=hold)
        Y = layer_pass(model, ids, sink)
        finish(cfg.n_layers - 1, *before, None)
        before.clear()
        chat_fit, chat_held = generated_states(model, tok,
                                               done=lambda k: progress and progress(cfg.n_layers + k, steps))
        del model
        # head: top principal directions of the final hidden states (calibration text and the model's own chat
        # answers), with a tenth of the head's own row covariance; the rank is measured (head_ranks, HEAD_TARGET)
        name = head_name(store)
        rows = sum(e.T @ e for _, e in _head_rows(store, name))
        states, answers = Y[:held].T @ Y[:held], chat_fit.T @ chat_fit
        mixed = (1 - CHAT_MIX) * states / np.trace(states) + CHAT_MIX * answers / np.trace(answers)
        _, vecs = np.linalg.eigh((1 - HEAD_MIX) * mixed + HEAD_MIX * rows / np.trace(rows))
        checks = {"text": Y[held:], "chat": chat_held}
        gg = ggml(threads or default_threads())
        exact = StreamedHead(store, gg, name)
        ranks, tried = [head_rank] if head_rank else head_ranks(cfg.dim), {}
        for r in ranks:
            v, low, miss = _low_rank_head(store, name, vecs, r)
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
        hot = _hot_rows(np.concatenate([Y[:held], chat_fit]), v, copy, gg)
        write_array(group, "head_hot_ids", hot.astype("<i4").view(np.uint8).reshape(1, -1), 1)
        hot_rows = store.rows(name, hot)
        write_array(group, "head_hot", hot_rows, max(1, (1 << 20) // hot_rows.shape[1]))
        head_check["hot_rows"] = len(hot)
        summary = {"predictor": PREDICTOR, "rank": rank, "head_rank": head_rank, "tokens": int(len(Y)),
                   "layers": layers, "head": {"tensor": name, **head_check}}
        if progress:
            progress(steps, steps)
        commit_group(store_path, partial, "sparse", summary)
    finally:  # after the commit, partial is gone (renamed to sparse)
        shutil.rmtree(partial, ignore_errors=True)
    return summary


def _down_norm(store, i: int, rows: int = 256) -> np.ndarray:
    """The norm of each column of layer i's FFN down projection (what one neuron adds at most per unit of its
    activation), dequantized `rows` rows at a time."""
    dt = store.tensor(f"blk.{i}.ffn_down.weight")
    sq = np.zeros(dt.cols, np.float64)
    for r in range(0, dt.rows, rows):
        d = quants.dequantize(dt.raw[r:r + rows], dt.type_id, dt.cols)
        sq += (d * d).sum(0)
    return np.sqrt(sq).astype(np.float32)


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


def fit_predictor(x: np.ndarray, y: np.ndarray, rank: int, ridge: float = 1e-3, block: int = 512):
    """Reduced-rank ridge regression of y (T, clusters) on [x, 1]: (A (dim, r), B (r, clusters), bias). The
    float64 products are summed over `block` tokens at a time ([x, 1] whole in float64 was 50MB for
    Qwen2.5-1.5B's 4096 tokens)."""
    def with_one(a):
        return np.concatenate([a, np.ones((len(a), 1), a.dtype)], axis=1).astype(np.float64)

    n = x.shape[1] + 1
    g, xy = np.zeros((n, n)), np.zeros((n, y.shape[1]))
    for t in range(0, len(x), block):
        xa = with_one(x[t:t + block])
        g += xa.T @ xa
        xy += xa.T @ y[t:t + block]
    w = np.linalg.solve(g + ridge * np.trace(g) / n * np.eye(n), xy)  # (dim + 1, clusters)
    r = min(rank, y.shape[1])
    fitted = np.concatenate([with_one(x[t:t + block]) @ w for t in range(0, len(x), block)])
    _, _, vt = np.linalg.svd(fitted, full_matrices=False)
    proj = vt[:r]  # (r, clusters): the fitted outputs' top directions
    a = w[:-1] @ proj.T
    bias = w[-1] @ proj.T @ proj
    return a.astype(np.float16), proj.astype(np.float16), bias.astype(np.float32)


HEAD_CANDIDATES = 128  # rows rescored exactly per token (edge.head.ApproxHead)
HEAD_MIX = 0.1  # the head's row covariance in the low-rank basis (the rest: the final states'), see above
CHAT_MIX = 0.5  # of the states' part: the model's own answers to chat prompts (the rest: the calibration text)
HEAD_BATCH = 64  # states whose logits over the whole vocabulary are in RAM at once
HEAD_TARGET = 0.99  # held-out text and chat answers: the runtime head's greedy choice is the exact head's


def _candidates(y, v, low, gg, batch: int = HEAD_BATCH) -> np.ndarray:
    """The low-rank head's top candidates for each state of y, (T, HEAD_CANDIDATES), in batches of states (a
    (T, vocab) block of logits at once would be 4GB for Gemma 3 at 4096 tokens), by the runtime's kernel on
    the copy (`low`, edge.ggml.Weight)."""
    out = []
    for i in range(0, len(y), batch):
        (z,) = gg.matmul(np.ascontiguousarray(y[i:i + batch] @ v), [low], keep=False)
        out.extend(top_ids(row, HEAD_CANDIDATES) for row in z)
    return np.stack(out)


def runtime_head_agreement(y, v, low, miss, head, gg, batch: int = HEAD_BATCH) -> tuple[float, float, float]:
    """The runtime's head (edge.head.ApproxHead: the candidates, then the second stage) on each state of y:
    how often its greedy choice is the exact head's, how often that token is among the candidates, and the
    rows the second stage rescores per state. Logits by llama.cpp's kernels as the runtime has them: the
    low-rank copy's (`low`, an edge.ggml.Weight) and the exact head's (`head`, edge.head.StreamedHead: the
    stored bytes; float rows, or another backend's kernel, differ in the last digits and turned near-ties on
    2% of SmolLM2's tokens even at full rank)."""
    agree = inside = extra = 0
    for i in range(0, len(y), batch):
        h = np.ascontiguousarray(y[i:i + batch])
        (exact,) = head(h)
        want = exact.argmax(1)
        p = h @ v
        (z,) = gg.matmul(p, [low], keep=False)
        top = np.stack([top_ids(row, HEAD_CANDIDATES) for row in z])
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


def _head_rows(store, name: str, rows: int = 1024):
    """(first row, rows of the head dequantized to float32), read from the store `rows` rows at a time (the
    whole head in float32 is 933MB for Qwen2.5-1.5B's 151936 x 1536)."""
    t = store.tensor_info(name)
    for first, block in store.row_blocks(name, rows):
        yield first, quants.dequantize(block, t["type"], t["shape"][1])


def _low_rank_head(store, name: str, vecs, r: int):
    """The rank-r copy: basis V (dim, r), the first r eigenvectors turned by a fixed random rotation (the
    product is the same, and every Q4_0 block of the copy holds coordinates of like size: the head's own
    directions are far larger than the states' and took the blocks' scales, 94% of calibration tokens' top-1
    among the candidates instead of 100%, SmolLM2), E @ V in Q4_0 blocks, and in the same pass over the head
    |E_i (I - V V^T)| per row (V orthonormal): what the basis leaves of each row, the runtime's second-stage
    bound (edge.head.ApproxHead)."""
    import gguf

    turn = np.linalg.qr(np.random.default_rng(0).standard_normal((r, r)))[0]
    v = np.ascontiguousarray(vecs[:, ::-1][:, :r] @ turn).astype(np.float32)  # (dim, r)
    vocab = store.tensor_info(name)["shape"][0]
    low = np.empty((vocab, quants.FORMATS[quants.Q4_0].row_bytes(r)), np.uint8)
    miss = np.empty(vocab, np.float32)
    for i, e in _head_rows(store, name):
        p = e @ v
        low[i:i + len(e)] = gguf.quantize(p, gguf.GGMLQuantizationType.Q4_0).view(np.uint8).reshape(len(e), -1)
        miss[i:i + len(e)] = np.sqrt(np.maximum(0, (e * e).sum(1) - (p ** 2).sum(1)))
    return v, low, miss


def _hot_rows(y, v, low, gg) -> np.ndarray:
    """The head rows rescored most often on calibration text, most frequent first, as many as the runtime's
    row cache holds: stored as one array the runtime reads at start (a cold cache missed 41 of 128 rows per
    token over SmolLM2's first 64 tokens, 190us a read here; see edge.head.RowCache.fill)."""
    from edge.head import ROW_CACHE

    counts = np.bincount(_candidates(y, v, low, gg).reshape(-1), minlength=low.rows)
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
