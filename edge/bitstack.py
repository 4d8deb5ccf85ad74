"""BitStack (Wang et al. 2024): weights as stacks of ~1-bit residual blocks, loaded as deep as the budget allows.

`edge stack` (weights_tools.stack) writes, for every linear of every layer (attention q, k, v, output; FFN
gate, up, down) of an activation-scaled model, `iters` residual blocks: block b is sign(R_b) * (u_b @ v_b), the
signs of the residual packed 1 bit per weight and u_b (rows x k), v_b (k x cols) a rank-k factorization of
|R_b| (fp16). A weight with n blocks loaded is the sum of its first n blocks; the input is divided by the
group's activation scale first (the paper's `no_fuse_scale` form: the same function as folding the scale into
the preceding op, without changing any other tensor).

Store layout (inside the model's store, written by `edge stack`):
- stack/<GGUF name>: (iters, block_bytes) uint8, one inner chunk per block: [signs | u fp16 | v fp16];
- stack/scale.<i>.<group>: the group's 1/s (float32) for groups attn_in, attn_out, ffn_in, ffn_h;
- attributes["edge"]["stack"]: iters, ranks and block sizes per linear, and the universal order: every
  linear's first block always, then (name, block) entries, best first; any prefix of the order is a model;
  `ffn_clusters`: the neurons per record of `stack/ffn.<i>` per layer (see below).

With `--strategy bitstack-stream` the FFN is not loaded whole: `edge stack` also writes its blocks regrouped
by the store's clusters of neurons (`stack/ffn.<i>`, one record per (block, cluster): the cluster's gate and
up sign rows, its 32-column blocks of the down signs, its rows of u and columns of v; `stack/ffn_shared.<i>`:
per block what every cluster shares, v of gate and up, u of down), and StackedFFN keeps part of every layer's
clusters in RAM and reads the others' records each token (LLM in a flash's streaming over BitStack's blocks).
The planner (edge.strategies.bitstack) then loads the deepest prefix that keeps STREAM_CACHED of the FFN
cached: more bits per weight in the same budget, for reads per token.

Sign bits are in ggml's Q4_0 nibble order, not row-major: each byte is the signs of elements (4t, 4t+16,
4t+1, 4t+17, 4t+2, 4t+18, 4t+3, 4t+19) of a 32-element block (t = 0..3), MSB first. So one byte of signs
becomes four Q4_0 code bytes (+1 -> 9, -1 -> 7, scale 1.0) by one table lookup, and llama.cpp's Q4_0 kernel
computes sign(R) @ (v * x) without a float copy of the signs: per block and token, T * k products with a
Q4_0 matrix that exists only in a scratch buffer while its group computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edge.errors import EdgeError
from edge.ggml import Weight

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
GROUPS = {"attn_in": ("attn_q", "attn_k", "attn_v"), "attn_out": ("attn_output",),
          "ffn_in": ("ffn_gate", "ffn_up"), "ffn_h": ("ffn_down",)}
GROUP_OF = {name: g for g, names in GROUPS.items() for name in names}
SCRATCH_BYTES = 4 << 20  # Q4_0 sign matrices one ggml graph holds at most (more: several graphs)
REBUILD_TOKENS = 16      # batches of at least this many tokens rebuild the weights in float32 bands (measured)
Q4_0, Q4_0_BYTES = 2, 18


def auto_rank(rows: int, cols: int) -> int:
    """The paper's ratio: rank 16 on 4096 x 4096 (factors ~1/8 bit per weight), for any shape."""
    return max(1, round(rows * cols / (128 * (rows + cols))))


def block_bytes(rows: int, cols: int, rank: int) -> int:
    return rows * cols // 8 + 2 * rank * (rows + cols)


@lru_cache(maxsize=None)
def _order(cols: int) -> np.ndarray:
    """Position in a row of each packed bit, in storage order (see module doc); shared, not to be modified."""
    t, i, h = np.meshgrid(np.arange(4), np.arange(4), np.arange(2), indexing="ij")
    within = (4 * t + i + 16 * h).reshape(-1)  # 32 positions of one block, storage order
    return (np.arange(cols // 32)[:, None] * 32 + within[None]).reshape(-1)


def pack_signs(positive: np.ndarray) -> np.ndarray:
    """(rows, cols) bool (True: +1) -> (rows, cols / 8) uint8 in storage order."""
    rows, cols = positive.shape
    if cols % 32:
        raise EdgeError(f"BitStack needs input widths that are multiples of 32 (got {cols})")
    return np.ascontiguousarray(np.packbits(positive[:, _order(cols)], axis=1))


def unpack_signs(packed: np.ndarray, cols: int) -> np.ndarray:
    """The inverse of pack_signs as float32 +-1 (the reference path)."""
    bits = np.unpackbits(packed, axis=1)
    out = np.empty((packed.shape[0], cols), np.float32)
    out[:, _order(cols)] = bits.astype(np.float32) * 2 - 1
    return out


def _q4_table() -> np.ndarray:
    """Sign byte -> the four Q4_0 code bytes it becomes, as one little-endian uint32."""
    b = np.arange(256, dtype=np.uint32)
    bits = [(b >> (7 - j)) & 1 for j in range(8)]  # MSB first: e[4t], e[4t+16], e[4t+1], ...
    code = [7 + 2 * x for x in bits]  # 0 -> 7 (-1), 1 -> 9 (+1)
    out = np.zeros(256, np.uint32)
    for i in range(4):
        out |= (code[2 * i] | (code[2 * i + 1] << 4)) << (8 * i)
    return out


Q4_TABLE = _q4_table()
SIGN_F32 = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32) * 2 - 1  # byte -> 8 signs


def split_block(raw: np.ndarray, rows: int, cols: int, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stored block -> (packed signs (rows, cols/8) uint8, u (rows, rank) f16, v (rank, cols) f16)."""
    s = rows * cols // 8
    signs = raw[:s].reshape(rows, cols // 8)
    u = raw[s:s + 2 * rows * rank].view(np.float16).reshape(rows, rank)
    v = raw[s + 2 * rows * rank:s + 2 * rank * (rows + cols)].view(np.float16).reshape(rank, cols)
    return signs, u, v


def _as_bytes(parts) -> np.ndarray:
    """Arrays -> their bytes, one after another (a stored block, an FFN record)."""
    return np.concatenate([np.ascontiguousarray(a).view(np.uint8).reshape(-1) for a in parts])


def join_block(signs: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _as_bytes((signs, np.asarray(u, np.float16), np.asarray(v, np.float16)))


def top_abs_factors(a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """u (rows, k), v (k, cols) with u @ v the best rank-k approximation of a: U sqrt(S), sqrt(S) V^T (from the
    eigenvectors of the smaller Gram matrix, in float64)."""
    if a.shape[0] > a.shape[1]:
        v, u = top_abs_factors(a.T, rank)
        return u.T, v.T
    a64 = a.astype(np.float64)
    vals, vecs = np.linalg.eigh(a64 @ a64.T)
    vals, vecs = vals[::-1][:rank], vecs[:, ::-1][:, :rank]
    sig = np.sqrt(np.maximum(vals, 1e-30))
    u = vecs * np.sqrt(sig)
    v = (vecs.T @ a64) / np.sqrt(sig)[:, None]
    return u.astype(np.float32), v.astype(np.float32)


def decompose(w: np.ndarray, iters: int, rank: int):
    """Yield the blocks of w (float32, already scaled) as stored bytes, one per iteration: sign of the residual
    (zeros count as +1) times the rank-k approximation of its magnitude. The residual is updated with the fp16
    factors the runtime will use, so rounding is corrected by the next block."""
    r = np.array(w, np.float32, copy=True)
    for _ in range(iters):
        pos = r >= 0
        u, v = top_abs_factors(np.abs(r), rank)
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        approx = u16.astype(np.float32) @ v16.astype(np.float32)
        r -= np.where(pos, approx, -approx)
        yield join_block(pack_signs(pos), u16, v16)


def reconstruct(blocks: list[np.ndarray], rows: int, cols: int, rank: int) -> np.ndarray:
    """The sum of the blocks as a float32 matrix (reference; the runtime never builds it)."""
    lin = StackedLinear("blocks", rows, cols, rank)
    for raw in blocks:
        lin.push(raw)
    return lin.dense()


class StackedLinear:
    """One weight's loaded blocks (a prefix of its stack): signs and fp16 factors, exactly the stored bytes."""

    def __init__(self, name: str, rows: int, cols: int, rank: int):
        self.name, self.rows, self.cols, self.rank = name, rows, cols, rank
        self.block_bytes = block_bytes(rows, cols, rank)
        self.signs: list[np.ndarray] = []
        self.u: list[np.ndarray] = []
        self.v: list[np.ndarray] = []

    @property
    def depth(self) -> int:
        return len(self.signs)

    @property
    def nbytes(self) -> int:
        return self.depth * self.block_bytes

    def push(self, raw) -> None:
        raw = np.frombuffer(raw, np.uint8) if not isinstance(raw, np.ndarray) else raw
        if raw.nbytes != self.block_bytes:
            raise EdgeError(f"{self.name}: a stack block of {raw.nbytes} bytes, expected {self.block_bytes}")
        signs, u, v = split_block(raw, self.rows, self.cols, self.rank)
        self.signs.append(signs.copy())
        self.u.append(u.copy())  # fp16 as stored: RAM holds exactly the block's bytes
        self.v.append(v.copy())

    def pop(self) -> None:
        for lst in (self.signs, self.u, self.v):
            lst.pop()

    def dense(self) -> np.ndarray:
        """The sum of the loaded blocks as a float32 matrix (reference)."""
        w = np.zeros((self.rows, self.cols), np.float32)
        for s, u, v in zip(self.signs, self.u, self.v):
            w += unpack_signs(s, self.cols) * (u.astype(np.float32) @ v.astype(np.float32))
        return w


class StackedGroup:
    """Linears sharing one input, as a linear group (x -> (y1, y2, ...)): x is divided by the group's scale,
    then for each loaded block y += u * (sign @ (v * x)) with llama.cpp's Q4_0 kernel on the signs."""

    def __init__(self, linears: list[StackedLinear], inv_scale: np.ndarray, ggml):
        self.linears, self.inv_scale, self.ggml = linears, inv_scale, ggml

    def __call__(self, x: np.ndarray) -> tuple:
        xs = np.ascontiguousarray(x, np.float32) * self.inv_scale
        t = xs.shape[0]
        if t >= REBUILD_TOKENS:
            return tuple(_rebuilt_product(lin, xs) for lin in self.linears)
        outs = [np.zeros((t, lin.rows), np.float32) for lin in self.linears]
        blocks = [(j, b) for j, lin in enumerate(self.linears) for b in range(lin.depth)]
        jobs = [(self.linears[j].signs[b], _factor_input(xs, self.linears[j].v[b])) for j, b in blocks]
        for (j, b), y in zip(blocks, sign_products(self.ggml, jobs)):
            outs[j] += _factor_output(y, t, self.linears[j].u[b])
        return tuple(outs)


def _factor_input(xs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(t, cols) inputs times each of the k rows of v (k, cols): (t * k, cols), what the sign matrix multiplies."""
    t, cols = xs.shape
    return (xs[:, None, :] * v.astype(np.float32)[None]).reshape(t * len(v), cols)


def _factor_output(y: np.ndarray, t: int, u: np.ndarray) -> np.ndarray:
    """(t * k, rows) sign products combined by u (rows, k): (t, rows)."""
    return np.einsum("tkm,mk->tm", y.reshape(t, u.shape[1], u.shape[0]), u.astype(np.float32))


def sign_products(ggml, jobs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """z @ S.T for each (packed signs S (rows, cols / 8), z (m, cols)): each S expanded into a Q4_0 +-1 matrix in
    the shared scratch (as many as SCRATCH_BYTES holds per ggml graph) and multiplied by llama.cpp's kernel."""
    out, i = [], 0
    while i < len(jobs):
        batch, used = [], 0
        while i < len(jobs) and (not batch or used + _q4_bytes(jobs[i][0]) <= SCRATCH_BYTES):
            batch.append(jobs[i])
            used += _q4_bytes(jobs[i][0])
            i += 1
        scratch = _scratch(used)
        pairs, offset = [], 0
        for signs, z in batch:
            rows, cols = signs.shape[0], 8 * signs.shape[1]
            n = _q4_bytes(signs)
            fill_q4(scratch[offset:offset + n], signs, rows, cols)
            pairs.append((z, Weight(scratch[offset:offset + n], Q4_0, rows, cols)))
            offset += n
        out += ggml.products(pairs)
    return out


def _q4_bytes(signs: np.ndarray) -> int:
    return signs.shape[0] * signs.shape[1] * 8 // 32 * Q4_0_BYTES


def _rebuilt_product(lin: StackedLinear, xs: np.ndarray) -> np.ndarray:
    """xs @ W.T with W rebuilt in float32, a band of rows at a time in the scratch buffer (no full copy). The
    rebuilt columns are in the signs' storage order, so xs and v are permuted to it instead of W."""
    t, n = xs.shape
    perm = _order(n)
    xp = np.ascontiguousarray(xs[:, perm])
    band = max(1, SCRATCH_BYTES // (12 * n))
    buf = _scratch(3 * band * n * 4).view(np.float32)
    out = np.empty((t, lin.rows), np.float32)
    vps = [v.astype(np.float32)[:, perm] for v in lin.v]
    for r0 in range(0, lin.rows, band):
        r1 = min(lin.rows, r0 + band)
        k = (r1 - r0) * n
        w, mag, sign = (
            buf[:k].reshape(-1, n),
            buf[band * n : band * n + k].reshape(-1, n),
            buf[2 * band * n : 2 * band * n + k],
        )
        w[:] = 0
        for b in range(lin.depth):
            np.matmul(lin.u[b][r0:r1].astype(np.float32), vps[b], out=mag)
            np.take(SIGN_F32, lin.signs[b][r0:r1], axis=0, out=sign.reshape(r1 - r0, n // 8, 8))
            mag *= sign.reshape(-1, n)
            w += mag
        np.matmul(xp, w.T, out=out[:, r0:r1])
    return out


_SCRATCH = np.zeros(0, np.uint8)


def _scratch(n: int) -> np.ndarray:
    """One process-wide buffer for the Q4_0 sign matrices of the group computing now (groups run one at a time,
    under the engine's step lock)."""
    global _SCRATCH
    if _SCRATCH.nbytes < n:
        _SCRATCH = np.zeros(n, np.uint8)
    return _SCRATCH


Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "<u4", (4,))])  # 18 bytes, unaligned: scale, 32 4-bit codes


def fill_q4(buf: np.ndarray, signs: np.ndarray, rows: int, cols: int) -> None:
    """The signs as Q4_0 blocks of +-1 (scale 1.0): one table lookup per sign byte, written in place."""
    blocks = buf.view(Q4_0_BLOCK).reshape(rows, cols // 32)
    blocks["d"] = 1.0
    np.take(Q4_TABLE, signs.reshape(rows, cols // 32, 4), out=blocks["qs"], mode="wrap")


@dataclass(frozen=True)
class StackInfo:
    """The stack's attributes: per linear (rows, cols, rank, block bytes), the universal order."""

    iters: int
    linears: dict      # name -> {"rows", "cols", "rank", "block_bytes"}
    order: list        # [name, block] entries after every linear's first block, best first
    clusters: tuple = ()  # per layer, the neurons of a cluster in `stack/ffn.<i>` (0: none); empty: an older stack

    @classmethod
    def of(cls, store) -> "StackInfo":
        attrs = store.stack
        if attrs is None:
            raise EdgeError(f"{store.path}: no BitStack blocks; run `edge stack {store.path}` first")
        return cls(attrs["iters"], attrs["linears"], [tuple(e) for e in attrs["order"]],
                   tuple(attrs.get("ffn_clusters", ())))

    @property
    def streams_ffn(self) -> bool:
        """The FFN's blocks are also stored by clusters of neurons (StackedFFN can stream them)."""
        return bool(self.clusters) and all(self.clusters)

    @property
    def base_bytes(self) -> int:
        return sum(lin["block_bytes"] for lin in self.linears.values())

    def prefix_bytes(self) -> np.ndarray:
        """Bytes of blocks loaded with the first m order entries, m = 0..len(order)."""
        sizes = [self.linears[name]["block_bytes"] for name, _ in self.order]
        return self.base_bytes + np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def depths(self, m: int) -> dict[str, int]:
        d = {name: 1 for name in self.linears}
        for name, _ in self.order[:m]:
            d[name] += 1
        return d

    def params(self) -> int:
        return sum(lin["rows"] * lin["cols"] for lin in self.linears.values())


class Stack:
    """The loaded part of a store's stack: every linear's first blocks, as many as a prefix of the universal
    order gives, and the groups' scales. `set_prefix(m)` grows (reads only the added blocks) or shrinks (drops
    the last blocks) in place."""

    def __init__(self, store, ggml, prefix: int, ffn: bool = True):
        """ffn=False: the FFN's linears are left out (StackedFFN streams them)."""
        self.store, self.info, self.ggml = store, StackInfo.of(store), ggml
        self.linears = {name: StackedLinear(name, lin["rows"], lin["cols"], lin["rank"])
                        for name, lin in self.info.linears.items() if ffn or name.split(".")[2] not in FFN}
        self.prefix = 0
        self.read_bytes = 0
        self.set_prefix(prefix)

    def group(self, layer: int, group: str) -> StackedGroup:
        inv = np.frombuffer(self.store.read_array(f"stack/scale.{layer}.{group}").tobytes(), np.float32).copy()
        return StackedGroup([self.linears[f"blk.{layer}.{n}.weight"] for n in GROUPS[group]], inv, self.ggml)

    @property
    def nbytes(self) -> int:
        return sum(lin.nbytes for lin in self.linears.values())

    def resize(self, plan) -> None:
        """Follow a new plan (edge.strategies.bitstack): its prefix of the order."""
        self.set_prefix(plan.detail.prefix)

    def set_prefix(self, prefix: int) -> int:
        """Load the blocks of the first `prefix` order entries (on top of one per linear); returns bytes read."""
        prefix = max(0, min(prefix, len(self.info.order)))
        want = self.info.depths(prefix)
        read = 0
        for name, lin in self.linears.items():
            while lin.depth > want[name]:
                lin.pop()
            if lin.depth < want[name]:
                arr = self.store.array(f"stack/{name}")
                for raw in self.store.read_chunks(arr, list(range(lin.depth, want[name]))):
                    lin.push(np.frombuffer(raw, np.uint8)[:lin.block_bytes])
                    read += lin.block_bytes
        self.prefix = prefix
        self.read_bytes += read
        return read


FFN = ("ffn_gate", "ffn_up", "ffn_down")


def ffn_record(sg, su, sd, ug, uu, vd, n0: int, n1: int) -> np.ndarray:
    """Neurons n0..n1 (multiples of 32) of one block of a layer's gate, up and down (split_block's signs, u, v)
    as a record of `stack/ffn.<i>` (FfnRecord.split reads it): gate and up sign rows, down sign columns (whole
    32-column sign blocks of every row), gate and up u rows, down v columns."""
    return _as_bytes((sg[n0:n1], su[n0:n1], sd[:, n0 // 8:n1 // 8], ug[n0:n1], uu[n0:n1], vd[:, n0:n1]))


def ffn_shared(vg, vu, ud) -> np.ndarray:
    """What every cluster of one block shares, a chunk of `stack/ffn_shared.<i>` (FfnRecord.split_shared)."""
    return _as_bytes((vg, vu, ud))


class FfnRecord:
    """The bytes of one (block, cluster) record for c neurons of width dim, ranks (gate, up, down)."""

    def __init__(self, c: int, dim: int, ranks: tuple[int, int, int]):
        self.c, self.dim, self.ranks = c, dim, ranks
        s = c * dim // 8
        self.offsets = np.cumsum([0, s, s, s, 2 * c * ranks[0], 2 * c * ranks[1], 2 * c * ranks[2]])
        self.nbytes = int(self.offsets[-1])
        self.shared_nbytes = 2 * dim * sum(ranks)  # per block: v of gate and up, u of down (fp16)

    def split_shared(self, raw) -> tuple:
        """A chunk of ffn_shared -> (v of gate (kg, dim), v of up (ku, dim), u of down (dim, kd))."""
        (kg, ku, kd), dim = self.ranks, self.dim
        f = np.frombuffer(raw, np.float16)
        return (f[:kg * dim].reshape(kg, dim), f[kg * dim:(kg + ku) * dim].reshape(ku, dim),
                f[(kg + ku) * dim:(kg + ku + kd) * dim].reshape(dim, kd))

    def empty(self, k: int) -> tuple:
        """The six parts for k clusters side by side (what a block of k records joins into)."""
        c, dim, (kg, ku, kd) = self.c, self.dim, self.ranks
        u8, f16 = np.uint8, np.float16
        return (np.empty((k * c, dim // 8), u8), np.empty((k * c, dim // 8), u8), np.empty((dim, k * c // 8), u8),
                np.empty((k * c, kg), f16), np.empty((k * c, ku), f16), np.empty((kd, k * c), f16))

    def place(self, parts: tuple, j: int, rec: np.ndarray) -> None:
        """Copy one record into the j-th cluster's place of `parts` (from empty)."""
        c = self.c
        for axis, dst, src in zip((0, 0, 1, 0, 0, 1), parts, self.split(rec)):
            if axis == 0:
                dst[j * c:(j + 1) * c] = src
            else:
                w = src.shape[1]
                dst[:, j * w:(j + 1) * w] = src

    def split(self, rec: np.ndarray) -> tuple:
        o, c, dim = self.offsets, self.c, self.dim
        part = [rec[o[j]:o[j + 1]] for j in range(6)]
        return (part[0].reshape(c, dim // 8), part[1].reshape(c, dim // 8), part[2].reshape(dim, c // 8),
                part[3].view(np.float16).reshape(c, -1), part[4].view(np.float16).reshape(c, -1),
                part[5].view(np.float16).reshape(-1, c))


class _FfnLayer:
    """One layer of StackedFFN: record layout, depths of gate, up and down, what every cluster shares (v of
    gate and up, u of down, per block), the groups' input scales, and the cached clusters' joined parts."""

    def __init__(self, store, info: StackInfo, i: int, depths: dict, old: "_FfnLayer | None" = None):
        """old: this layer at another depth, whose shared factors and scales are kept (not read again)."""
        cfg = store.config
        names = [f"blk.{i}.{n}.weight" for n in FFN]
        ranks = tuple(info.linears[n]["rank"] for n in names)
        self.i, self.rec = i, FfnRecord(info.clusters[i], cfg.dim, ranks)
        self.n = cfg.hidden_dim // self.rec.c
        self.depth = tuple(depths[n] for n in names)
        d = max(self.depth)
        self.shared = old.shared[:d] if old else []
        self.shared_read = max(0, d - len(self.shared)) * self.rec.shared_nbytes
        for raw in store.read_chunks(store.array(f"stack/ffn_shared.{i}"), list(range(len(self.shared), d))):
            self.shared.append(self.rec.split_shared(raw))
        if old:
            self.inv_in, self.inv_h = old.inv_in, old.inv_h
        else:
            self.inv_in, self.inv_h = (np.frombuffer(store.read_array(f"stack/scale.{i}.{g}").tobytes(),
                                                     np.float32).copy() for g in ("ffn_in", "ffn_h"))
        self.cached: list = []  # per block: the joined parts of clusters 0..slots-1

    def read(self, store, clusters: range, blocks: range | None = None) -> tuple[list, int]:
        """The joined parts of these clusters for each block (default: all of the layer's depth), read from
        flash; and the bytes read."""
        blocks, rec = blocks if blocks is not None else range(max(self.depth)), self.rec
        parts = [rec.empty(len(clusters)) for _ in blocks]
        ids = [b * self.n + c for b in blocks for c in clusters]
        for chunk, view in store.each_chunk(store.array(f"stack/ffn.{self.i}"), ids):
            b, c = divmod(chunk, self.n)
            rec.place(parts[b - blocks.start], c - clusters.start, np.frombuffer(view, np.uint8)[:rec.nbytes])
        return parts, len(ids) * rec.nbytes


_AXES = (0, 0, 1, 0, 0, 1)  # the cluster axis of each part of a record


def _clusters(rec: FfnRecord, parts: tuple, k: int) -> tuple:
    """The first k clusters of joined parts (a copy when fewer: the rest is freed)."""
    held = parts[0].shape[0] // rec.c
    if held == k:
        return parts
    return tuple((p[:k * (p.shape[0] // held)] if axis == 0 else p[:, :k * (p.shape[1] // held)]).copy()
                 for axis, p in zip(_AXES, parts))


def _joined(a: tuple, b: tuple) -> tuple:
    return tuple(np.concatenate([x, y], axis=ax) for ax, x, y in zip(_AXES, a, b))


class StackedFFN:
    """A stacked model's FFN streamed by clusters of neurons (LLM in a flash's neuron cache over BitStack's
    blocks; `--strategy bitstack-stream`): per layer the first `slots` clusters stay in RAM at the layer's
    depth (their records of `stack/ffn.<i>`), the others are read from flash every token (every cluster is
    needed: the FFN is dense). Each block computes as StackedGroup does, the sign rows of the neurons at hand
    through llama.cpp's Q4_0 kernel: gate and up give those neurons, the down signs' columns for them give
    their part of the output. The same blocks as the resident stack: the same function."""

    def __init__(self, store, ggml, act, depths: dict, slots: int):
        self.store, self.ggml, self.act = store, ggml, act
        self.info = StackInfo.of(store)
        self.layers: list[_FfnLayer] = []
        self.slots = 0
        self.read_bytes = 0  # streamed records, while computing
        self.load_bytes = 0  # records and shared factors read by configure (load, resize)
        self.configure(depths, slots)

    def configure(self, depths: dict, slots: int) -> None:
        """The layers at these depths with the first `slots` clusters of each in RAM. What was cached and is
        still wanted stays; only the records of added blocks and added clusters are read."""
        old, self.layers = self.layers, []
        for i in range(self.store.config.n_layers):
            lay = _FfnLayer(self.store, self.info, i, depths, old[i] if old else None)
            n = min(slots, lay.n)
            kept = old[i].cached if old else []
            have = min(self.slots, n)
            d = max(lay.depth)
            parts = [_clusters(lay.rec, p, have) for p in kept[:d]]
            self.load_bytes += lay.shared_read
            if have < n and parts:  # more clusters at the blocks kept
                more, nbytes = lay.read(self.store, range(have, n), range(len(parts)))
                parts = [_joined(p, q) for p, q in zip(parts, more)]
                self.load_bytes += nbytes
            if len(parts) < d and n:  # deeper: the added blocks of every cached cluster
                more, nbytes = lay.read(self.store, range(n), range(len(parts), d))
                parts += more
                self.load_bytes += nbytes
            lay.cached = parts if n else []
            self.layers.append(lay)
            if old:
                old[i] = None  # its records go as this layer's are placed
        self.slots = min(slots, min(lay.n for lay in self.layers))

    # the FFN contract (edge.parts.FFN): its reads go through the store's engine, counted there
    kind = "FFN clusters"
    per_position = False
    trace = None
    engines: list = []
    wait_seconds = 0.0

    def resize(self, plan) -> None:
        """Follow a new plan (edge.strategies.bitstack): the depth of its prefix, its cached clusters."""
        self.configure(self.info.depths(plan.detail.prefix), plan.detail.ffn_slots)

    def stats(self, tokens: int) -> dict | None:
        return None

    def reset(self) -> None:
        pass

    def __call__(self, i: int, x: np.ndarray, resid: np.ndarray | None = None) -> np.ndarray:
        lay = self.layers[i]
        xs = np.ascontiguousarray(x, np.float32) * lay.inv_in
        c = lay.rec.c
        out = self._neurons(lay, lay.cached, xs, 0) if self.slots else np.zeros((len(xs), lay.rec.dim), np.float32)
        if self.slots < lay.n:
            parts, nbytes = lay.read(self.store, range(self.slots, lay.n))
            self.read_bytes += nbytes
            out += self._neurons(lay, parts, xs, self.slots * c)
        return out

    def _neurons(self, lay: _FfnLayer, parts: list, xs: np.ndarray, n0: int) -> np.ndarray:
        """The FFN output of the neurons n0.. that `parts` (joined records per block) hold."""
        t = len(xs)
        dg, du, dd = lay.depth
        m = parts[0][0].shape[0]
        jobs = [(parts[b][0], _factor_input(xs, lay.shared[b][0])) for b in range(dg)]
        jobs += [(parts[b][1], _factor_input(xs, lay.shared[b][1])) for b in range(du)]
        ys = sign_products(self.ggml, jobs)
        gate = sum(_factor_output(ys[b], t, parts[b][3]) for b in range(dg))
        up = sum(_factor_output(ys[dg + b], t, parts[b][4]) for b in range(du))
        h = (self.act(gate) * up * lay.inv_h[n0:n0 + m]).astype(np.float32)
        jobs = [(parts[b][2], _factor_input(h, parts[b][5])) for b in range(dd)]
        return sum(_factor_output(y, t, lay.shared[b][2]) for b, y in enumerate(sign_products(self.ggml, jobs)))
