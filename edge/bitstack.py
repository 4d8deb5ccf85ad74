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
  linear's first block always, then (name, block) entries, best first; any prefix of the order is a model.

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
SIGN_F32 = (np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32) * 2 - 1)  # byte -> 8 signs


def split_block(raw: np.ndarray, rows: int, cols: int, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stored block -> (packed signs (rows, cols/8) uint8, u (rows, rank) f16, v (rank, cols) f16)."""
    s = rows * cols // 8
    signs = raw[:s].reshape(rows, cols // 8)
    u = raw[s:s + 2 * rows * rank].view(np.float16).reshape(rows, rank)
    v = raw[s + 2 * rows * rank:s + 2 * rank * (rows + cols)].view(np.float16).reshape(rank, cols)
    return signs, u, v


def join_block(signs: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.concatenate([signs.reshape(-1), np.ascontiguousarray(u, np.float16).view(np.uint8).reshape(-1),
                           np.ascontiguousarray(v, np.float16).view(np.uint8).reshape(-1)])


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
        from edge.ggml import Weight

        xs = np.ascontiguousarray(x, np.float32) * self.inv_scale
        t = xs.shape[0]
        if t >= REBUILD_TOKENS:
            return tuple(_rebuilt_product(lin, xs) for lin in self.linears)
        outs = [np.zeros((t, lin.rows), np.float32) for lin in self.linears]
        jobs = [(j, b) for j, lin in enumerate(self.linears) for b in range(lin.depth)]
        while jobs:
            batch, used = [], 0
            while jobs and (not batch or used + _scratch_bytes(self.linears[jobs[0][0]]) <= SCRATCH_BYTES):
                batch.append(jobs.pop(0))
                used += _scratch_bytes(self.linears[batch[-1][0]])
            scratch = _scratch(used)
            pairs, offset = [], 0
            for j, b in batch:
                lin = self.linears[j]
                n = _scratch_bytes(lin)
                buf = scratch[offset:offset + n]
                _fill_q4(buf, lin.signs[b], lin.rows, lin.cols)
                z = (xs[:, None, :] * lin.v[b].astype(np.float32)[None]).reshape(t * lin.rank, lin.cols)
                pairs.append((z, Weight(buf, Q4_0, lin.rows, lin.cols)))
                offset += n
            for (j, b), y in zip(batch, self.ggml.products(pairs)):
                lin = self.linears[j]
                outs[j] += np.einsum("tkm,mk->tm", y.reshape(t, lin.rank, lin.rows), lin.u[b].astype(np.float32))
        return tuple(outs)


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
        w, mag, sign = buf[:k].reshape(-1, n), buf[band * n:band * n + k].reshape(-1, n), buf[2 * band * n:2 * band * n + k]
        w[:] = 0
        for b in range(lin.depth):
            np.matmul(lin.u[b][r0:r1].astype(np.float32), vps[b], out=mag)
            np.take(SIGN_F32, lin.signs[b][r0:r1], axis=0, out=sign.reshape(r1 - r0, n // 8, 8))
            mag *= sign.reshape(-1, n)
            w += mag
        np.matmul(xp, w.T, out=out[:, r0:r1])
    return out


def _scratch_bytes(lin: StackedLinear) -> int:
    return lin.rows * lin.cols // 32 * Q4_0_BYTES


_SCRATCH = np.zeros(0, np.uint8)


def _scratch(n: int) -> np.ndarray:
    """One process-wide buffer for the Q4_0 sign matrices of the group computing now (groups run one at a time,
    under the engine's step lock)."""
    global _SCRATCH
    if _SCRATCH.nbytes < n:
        _SCRATCH = np.zeros(n, np.uint8)
    return _SCRATCH


Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "<u4", (4,))])  # 18 bytes, unaligned: scale, 32 4-bit codes


def _fill_q4(buf: np.ndarray, signs: np.ndarray, rows: int, cols: int) -> None:
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

    @classmethod
    def of(cls, store) -> "StackInfo":
        attrs = store.attrs.get("stack")
        if attrs is None:
            raise EdgeError(f"{store.path}: no BitStack blocks; run `edge stack {store.path}` first")
        return cls(attrs["iters"], attrs["linears"], [tuple(e) for e in attrs["order"]])

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

    def __init__(self, store, ggml, prefix: int):
        self.store, self.info, self.ggml = store, StackInfo.of(store), ggml
        self.linears = {name: StackedLinear(name, lin["rows"], lin["cols"], lin["rank"])
                        for name, lin in self.info.linears.items()}
        self.prefix = 0
        self.read_bytes = 0
        self.set_prefix(prefix)

    def group(self, layer: int, group: str) -> StackedGroup:
        inv = np.frombuffer(self.store.read_array(f"stack/scale.{layer}.{group}").tobytes(), np.float32).copy()
        return StackedGroup([self.linears[f"blk.{layer}.{n}.weight"] for n in GROUPS[group]], inv, self.ggml)

    @property
    def nbytes(self) -> int:
        return sum(lin.nbytes for lin in self.linears.values())

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
