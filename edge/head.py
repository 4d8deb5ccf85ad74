"""The ends of the model: the embedding (token ids -> vectors) and the head (vectors -> logits), resident or
from flash.

Resident (`DenseEmbedding`, `DenseHead`): the tensors as stored, in RAM. Under a budget (`budget_ends`;
`budget_ends_bytes` is what stays resident) the embedding's rows come from flash through a `RowCache`; on a
calibrated store the head is scored by a low-rank copy whose best candidates are rescored with exact rows
(`ApproxHead`, one row cache with the embedding when tied), on an uncalibrated one it stays resident as stored,
or, when the budget cannot keep it, is read from flash in row blocks at every call (`StreamedHead`, exact).
Both kinds take the same calls: `embed(tokens)`, `head(x) -> (logits,)`, `head.nll(x, targets)`.
"""

from __future__ import annotations

import numpy as np

from edge import quants
from edge.errors import EdgeError
from edge.evaluate import target_nll
from edge.ggml import Weight
from edge.sampling import top_ids

ROW_CACHE = 4096  # head/embedding rows kept in RAM (RowCache)


def _embed_scale(cfg, x: np.ndarray) -> np.ndarray:
    return x * np.float32(cfg.embed_scale) if cfg.embed_scale != 1.0 else x


def head_name(src) -> str:
    """The head's tensor: its own, or the embedding's when tied."""
    return "output.weight" if src.has("output.weight") else "token_embd.weight"


def _check_ids(cfg, tokens: np.ndarray) -> None:
    if np.any(tokens < 0) or np.any(tokens >= cfg.vocab_size):
        raise EdgeError(f"token id out of range [0, {cfg.vocab_size})")


class DenseEmbedding:
    """The embedding table in RAM as stored; rows dequantized on lookup."""

    def __init__(self, src):
        cfg = src.config
        self.cfg = cfg
        self.table = src.tensor("token_embd.weight", (cfg.vocab_size, cfg.dim))

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """(T,) ids -> (T, dim)."""
        _check_ids(self.cfg, tokens)
        t = self.table
        return _embed_scale(self.cfg, quants.dequantize(t.raw[tokens], t.type_id, t.cols))


class FlashEmbedding:
    """Embedding rows read from flash through a row cache (the head's, when the head is tied)."""

    def __init__(self, store, rows: "RowCache"):
        self.cfg = store.config
        self.type_id = store.tensor_info("token_embd.weight")["type"]
        self.rows = rows

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        _check_ids(self.cfg, tokens)
        ids, back = np.unique(tokens, return_inverse=True)
        return _embed_scale(self.cfg, quants.dequantize(self.rows.get(ids)[back], self.type_id, self.cfg.dim))


class DenseHead:
    """The output projection in RAM as stored (the embedding's when tied), one linear group; or uploaded to a
    device (`device`: an edge.ggml.Accelerator, `--gpu`) and computed there."""

    def __init__(self, src, backend, device=None):
        cfg = src.config
        t = src.tensor(head_name(src), (cfg.vocab_size, cfg.dim))
        if device is None:
            self.group = backend.linear_group([t])
        else:
            (w,) = device.upload([Weight.of(t)])
            self.group = lambda x: tuple(device.products([(x, w)]))

    def __call__(self, x: np.ndarray) -> tuple:
        return self.group(x)

    def nll(self, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """-log softmax(x @ E.T)[target] per row."""
        (logits,) = self.group(x)
        return target_nll(logits, targets)

    def stats(self) -> dict:
        return {}


HEAD_IO = 8 << 20  # the store's I/O buffer when the head streams: blocks of 2-4MB of rows (Store.read_views)


def budget_ends_bytes(store) -> int:
    """What the embedding and head keep resident under a budget (`budget_ends`): on a calibrated store the
    low-rank copy, its basis and bounds, and the row caches (ApproxHead, RowCache); uncalibrated, the head as
    stored (`head_bytes`, which a plan that streams it takes back) and the embedding's row cache."""
    cfg, info = store.config, store.sparse
    if info is None:
        return head_bytes(store) + _row_cache_bytes(store, "token_embd.weight")
    total = 0
    vocab, r = store.tensor_info(info["head"]["tensor"])["shape"][0], info["head_rank"]
    total += vocab * quants.FORMATS[quants.Q4_0].row_bytes(r) + 4 * cfg.dim * r  # low-rank head, basis
    if info["head"].get("miss"):
        total += 2 * 4 * vocab  # the second stage's per-row bound, and its temporary per token
    for name in {info["head"]["tensor"], "token_embd.weight"}:  # one row cache when the head is tied
        total += _row_cache_bytes(store, name)
    return total


def head_bytes(store) -> int:
    """The head as stored."""
    t = store.tensor_info(head_name(store))
    return t["shape"][0] * quants.FORMATS[t["type"]].row_bytes(t["shape"][1])


def _row_cache_bytes(store, name: str) -> int:
    t = store.tensor_info(name)
    return ROW_CACHE * quants.FORMATS[t["type"]].row_bytes(t["shape"][1]) + 4 * t["shape"][0] + 16 * ROW_CACHE


def budget_ends(store, backend, stream_head: bool = False) -> tuple[FlashEmbedding, object]:
    """The embedding and head under a budget: embedding rows read from flash into a row cache; the head scored
    by its low-rank copy with exact rows from flash on a calibrated store (one row cache when they are one
    tensor), else exact: resident as stored, or read from flash at every call (stream_head; the store's I/O
    buffer holds HEAD_IO). `edge convert STORE --calibrate` takes it out of RAM at a fraction of the reads."""
    if store.sparse is None:
        head = StreamedHead(store, backend.ggml) if stream_head else DenseHead(store, backend)
        return FlashEmbedding(store, RowCache(store, "token_embd.weight")), head
    head = ApproxHead(store, backend.ggml)
    rows = head.row_cache if head.name == "token_embd.weight" else RowCache(store, "token_embd.weight")
    return FlashEmbedding(store, rows), head


class RowCache:
    """Recently used rows of one stored tensor (the head's candidates, the embedding's lookups; one cache when
    they are the same tensor), least recently used out. Common tokens come back every few steps, so most
    lookups need no read."""

    def __init__(self, store, name: str, capacity: int = ROW_CACHE):
        t = store.tensor_info(name)
        arr = store.array("t/" + name)
        self.store, self.name = store, name
        self.rows = np.zeros((capacity, arr.shape[1]), np.uint8)
        self.slot = np.full(t["shape"][0], -1, np.int32)
        self.owner = np.full(capacity, -1, np.int64)
        self.last = np.zeros(capacity, np.int64)
        self.clock = 0
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.slot.nbytes + self.owner.nbytes + self.last.nbytes

    def fill(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Start with these rows (most wanted first; those past the capacity are left out), as least recently
        used: the calibration's most frequent head candidates, read at start in one sequential read instead
        of one random read per row on the first tokens."""
        n = min(len(ids), len(self.rows))
        ids = np.asarray(ids[:n], np.int64)
        self.slot[self.owner[self.owner >= 0]] = -1
        self.owner[:] = -1
        self.rows[:n] = rows[:n]
        self.owner[:n] = ids
        self.slot[ids] = np.arange(n)
        self.last[:] = 0

    def get(self, ids: np.ndarray) -> np.ndarray:
        """The rows of ids (distinct), (len(ids), row_bytes)."""
        self.clock += 1
        slots = self.slot[ids]
        miss = np.flatnonzero(slots < 0)
        self.hits += len(ids) - len(miss)
        self.misses += len(miss)
        if len(miss):
            fetched = self.store.rows(self.name, ids[miss])
            keep = self.last.copy()
            keep[slots[slots >= 0]] = self.clock  # never evict a row this call returns
            victims = np.argsort(keep, kind="stable")[:len(miss)]
            gone = self.owner[victims]
            self.slot[gone[gone >= 0]] = -1
            self.owner[victims] = ids[miss]
            self.slot[ids[miss]] = victims
            self.rows[victims] = fetched
            slots = self.slot[ids]
        self.last[slots] = self.clock
        return self.rows[slots]


# The second stage of ApproxHead, measured on SmolLM2's greedy answers to six chat prompts (576 tokens, rank
# 288; full head's token outside the candidates on 8): slack 0.2 / at most 32 rows: 5 left, 1.1 rows rescored
# per token; 0.25 / 64: 1 left, 8.1 rows; 0.3 / 128: 0 left, 32 rows. Gemma 3 (0 left either way): 0.7 rows.
HEAD_SLACK = 0.25  # of the Cauchy-Schwarz bound on what the basis leaves out
HEAD_EXTRA = 64    # rows the second stage rescores at most per token


def second_stage(z: np.ndarray, top: np.ndarray, miss: np.ndarray, h: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The rows ApproxHead rescores after its candidates `top` (z: one state's logits, the candidates' exact):
    those whose approximate logit + HEAD_SLACK * m_i * |h (I - V V^T)| reaches the best exact one, at most
    HEAD_EXTRA, highest bound first; sorted. p = h @ V (V orthonormal: |h (I - V V^T)|^2 = |h|^2 - |p|^2)."""
    left = float(np.sqrt(max(0.0, float(h @ h) - float(p @ p))))
    bound = miss * np.float32(HEAD_SLACK * left)
    bound += z
    bound[top] = -np.inf
    more = np.flatnonzero(bound >= z[top].max())
    if len(more) > HEAD_EXTRA:
        more = more[np.argpartition(-bound[more], HEAD_EXTRA)[:HEAD_EXTRA]]
    more.sort()
    return more


class StreamedHead:
    """The head as stored, read from flash in blocks of rows at every call and scored exactly by llama.cpp's
    kernel (the dense head's): an uncalibrated store's head under a budget that cannot keep it, where every
    token reads the whole head; and a calibrated store's logits of several positions and its perplexity.
    Only a block's rows are in RAM at a time; `nll` keeps a running log-sum-exp instead of (T, vocab) logits."""

    def __init__(self, store, ggml, name: str | None = None):
        self.store, self.ggml = store, ggml
        self.name = name or head_name(store)
        t = store.tensor_info(self.name, (store.config.vocab_size, store.config.dim))
        self.type_id, self.vocab, self.cols = t["type"], t["shape"][0], t["shape"][1]

    def __call__(self, x: np.ndarray) -> tuple:
        z = np.empty((len(x), self.vocab), np.float32)
        for r0, block in self.blocks(x):
            z[:, r0:r0 + block.shape[1]] = block
        return (z,)

    def stats(self) -> dict:
        return {}

    def blocks(self, x: np.ndarray):
        """(first row, x @ E[rows].T) for every block of head rows (half the store's I/O buffer), each row read
        from flash once."""
        arr = self.store.array("t/" + self.name)
        chunks = max(1, (len(self.store.engine.buffer) // 2) // (arr.chunk_bytes + 8192))
        for r0, rows in self.store.row_blocks(self.name, chunks * arr.chunk_shape[0]):
            (z,) = self.ggml.matmul(x, [Weight(rows, self.type_id, len(rows), self.cols)], keep=False)
            yield r0, z

    def nll(self, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """-log softmax(x @ E.T)[target] per row, exact, with a running log-sum-exp over the head's row blocks."""
        peak = np.full(len(x), -np.inf)
        total = np.zeros(len(x))
        target = np.zeros(len(x))
        for r0, z in self.blocks(x):
            inside = (targets >= r0) & (targets < r0 + z.shape[1])
            target[inside] = z[inside, targets[inside] - r0]
            new = np.maximum(peak, z.max(axis=1))
            z -= new[:, None].astype(np.float32)
            np.exp(z, out=z)
            total = total * np.exp(peak - new) + z.sum(axis=1, dtype=np.float64)
            peak = new
        return peak + np.log(total) - target


class ApproxHead:
    """Logits from a low-rank Q4_0 copy of the head, the top candidates rescored with exact rows from flash.

    logits ~ (h @ V) @ L.T for every token; the `candidates` best are replaced by h @ E[row] with the exact
    rows of the head read from the store, by the same kernel as the dense head. Then a second stage (stores
    calibrated with `sparse/head_miss`, m_i = |E_i (I - V V^T)|, what the basis leaves of each row): a token
    whose approximate logit plus HEAD_SLACK * m_i * |h (I - V V^T)| (Cauchy-Schwarz at HEAD_SLACK = 1; the
    measured slack is far smaller) reaches the best exact logit is rescored too, at most HEAD_EXTRA of them,
    highest bound first. The other logits stay approximate, which a perplexity would feel: `nll` (eval)
    streams the exact head from flash in row blocks with a running log-sum-exp, as do logits of several
    positions at once."""

    def __init__(self, store, ggml, rows: RowCache | None = None):
        info = store.sparse
        self.store, self.ggml = store, ggml
        self.name = info["head"]["tensor"]
        t = store.tensor_info(self.name)
        self.type_id, self.vocab, self.cols = t["type"], t["shape"][0], t["shape"][1]
        r = info["head_rank"]
        self.low = Weight(store.read_array("sparse/head"), quants.Q4_0, self.vocab, r)
        self.basis = store.read_array("sparse/head_basis").reshape(-1).view(np.float32).reshape(self.cols, r).copy()
        head = info["head"]
        self.candidates = head["candidates"]
        self.miss = store.read_array("sparse/head_miss").reshape(-1).view("<f4").copy() if head.get("miss") else None
        self.extra = 0  # rows rescored by the second stage
        self.row_cache = rows or RowCache(store, self.name)
        self.exact = StreamedHead(store, ggml, self.name)
        if head.get("hot_rows"):  # calibrated by this version: start with the most wanted rows
            ids = store.read_array("sparse/head_hot_ids").reshape(-1).view("<i4")
            self.row_cache.fill(ids, store.read_array("sparse/head_hot"))

    @property
    def nbytes(self) -> int:
        miss = 0 if self.miss is None else self.miss.nbytes
        return self.low.buf.nbytes + self.basis.nbytes + self.row_cache.nbytes + miss

    def __call__(self, x: np.ndarray) -> tuple:
        if len(x) > 1:  # logits of several positions: the exact head, streamed in row blocks
            return self.exact(x)
        p = x @ self.basis
        (z,) = self.ggml.matmul(p, [self.low])  # (1, vocab)
        top = np.sort(top_ids(z[0], self.candidates))
        z[0, top] = self._exact(x, top)
        if self.miss is not None:
            more = second_stage(z[0], top, self.miss, x[0], p[0])
            if len(more):
                z[0, more] = self._exact(x, more)
                self.extra += len(more)
        return (z,)

    def stats(self) -> dict:
        """The row cache: head candidates and embedding rows found in RAM, and read; rows the second stage
        rescored beyond the candidates."""
        rows = self.row_cache
        return {"head_rows_cached": rows.hits, "head_rows_read": rows.misses, "head_rows_second_stage": self.extra}

    def _exact(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """x @ E[ids].T with the exact rows (row cache, else flash), by the same kernel as the dense head, so
        greedy choices agree."""
        rows = self.row_cache.get(ids)
        (exact,) = self.ggml.matmul(x, [Weight(rows, self.type_id, len(ids), self.cols)], keep=False)
        return exact[0]

    def nll(self, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """-log softmax(x @ E.T)[target] per row, exact (StreamedHead.nll)."""
        return self.exact.nll(x, targets)
