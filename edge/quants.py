"""GGML quantization formats: unpack blocks into integer codes and per-group scales, dequantize.

Every supported type is described as one affine form per group of `group` weights:

    value = scale * (code - zero) + offset        # offset only where the format has a min

with integer codes in [0, 2**bits). The same unpacked form feeds the dequantizer (which must equal
`gguf.dequantize` bit for bit: the float operations below are the reference's, in the same order) and
the compute kernels (which take codes, scales and zero points, e.g. onnxruntime's MatMulNBits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256

# ggml type ids (ggml.h); names as llama.cpp prints them.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 10, 11, 12, 13, 14, 30

TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1",
              Q8_0: "Q8_0", Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K",
              BF16: "BF16"}


@dataclass(frozen=True)
class Format:
    """One block format: weights per block, bytes per block, code bits, weights per scale group."""

    type_id: int
    block_size: int
    block_bytes: int
    bits: int
    group: int

    @property
    def name(self) -> str:
        return TYPE_NAMES[self.type_id]

    def row_bytes(self, n_cols: int) -> int:
        return n_cols // self.block_size * self.block_bytes


FORMATS = {
    F32: Format(F32, 1, 4, 32, 1),
    F16: Format(F16, 1, 2, 16, 1),
    BF16: Format(BF16, 1, 2, 16, 1),
    Q4_0: Format(Q4_0, 32, 18, 4, 32),
    Q4_1: Format(Q4_1, 32, 20, 4, 32),
    Q5_0: Format(Q5_0, 32, 22, 5, 32),
    Q5_1: Format(Q5_1, 32, 24, 5, 32),
    Q8_0: Format(Q8_0, 32, 34, 8, 32),
    Q4_K: Format(Q4_K, QK_K, 144, 4, 32),
    Q6_K: Format(Q6_K, QK_K, 210, 6, 16),
}


def type_name(type_id: int) -> str:
    return TYPE_NAMES.get(type_id, f"type {type_id}")


def is_supported(type_id: int) -> bool:
    return type_id in FORMATS


@dataclass
class Unpacked:
    """Blocks as integer codes plus per-group affine parameters.

    codes: (n_blocks, block_size) uint8; scale, offset: (n_blocks, block_size // group) float32;
    zero: int subtracted from every code before scaling; offset None where the format has no min.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: int
    offset: np.ndarray | None
    group: int


def _f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, half: int) -> np.ndarray:
    """Low nibbles of `half` bytes then their high nibbles: (n, k*half) -> (n, 2*k*half)."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, half) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """Bit j of the little-endian uint32 as the fifth bit of weight j: (n, 4) bytes -> (n, 32)."""
    n = qh.shape[0]
    bits = qh.copy().view(np.uint32).reshape(n, 1) >> np.arange(32, dtype=np.uint32).reshape(1, 32)
    return (bits & np.uint32(1)).astype(np.uint8)


def _unpack_q4_0(b):
    return Unpacked(_nibbles(b[:, 2:], 16), _f16(b[:, :2]), 8, None, 32)


def _unpack_q4_1(b):
    return Unpacked(_nibbles(b[:, 4:], 16), _f16(b[:, :2]), 0, _f16(b[:, 2:4]), 32)


def _unpack_q5_0(b):
    codes = _nibbles(b[:, 6:], 16) | (_high_bits32(b[:, 2:6]) << np.uint8(4))
    return Unpacked(codes, _f16(b[:, :2]), 16, None, 32)


def _unpack_q5_1(b):
    codes = _nibbles(b[:, 8:], 16) | (_high_bits32(b[:, 4:8]) << np.uint8(4))
    return Unpacked(codes, _f16(b[:, :2]), 0, _f16(b[:, 2:4]), 32)


def _unpack_q8_0(b):
    codes = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return Unpacked(codes, _f16(b[:, :2]), 128, None, 32)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins packed in 12 bytes of a Q4_K/Q5_K block."""
    n = scales.shape[0]
    d, m, m_d = np.split(scales.reshape(n, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _unpack_q4_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    scale = d * sc.astype(np.float32)
    offset = -(dmin * mn.astype(np.float32))
    return Unpacked(_nibbles(b[:, 16:], 32), scale, 0, offset, 32)


def _unpack_q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
    low = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    high = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    codes = low.reshape(n, -1, 32) | (high.reshape(n, -1, 32) << np.uint8(4))
    return Unpacked(codes.reshape(n, QK_K), d * scales, 32, None, 16)


_UNPACK = {Q4_0: _unpack_q4_0, Q4_1: _unpack_q4_1, Q5_0: _unpack_q5_0, Q5_1: _unpack_q5_1,
           Q8_0: _unpack_q8_0, Q4_K: _unpack_q4_k, Q6_K: _unpack_q6_k}


def unpack(raw: np.ndarray, type_id: int) -> Unpacked:
    """Unpack raw block bytes (any shape whose last axis is whole blocks) of a block-quantized type."""
    fmt = FORMATS[type_id]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, fmt.block_bytes)
    return _UNPACK[type_id](blocks)


def _combine(u: Unpacked) -> np.ndarray:
    n, bs = u.codes.shape
    q = u.codes.reshape(n, -1, u.group)
    if u.zero:
        q = q.astype(np.int16) - np.int16(u.zero)
    values = u.scale[:, :, None] * q.astype(np.float32)
    if u.offset is not None:
        values = values + u.offset[:, :, None]
    return values.reshape(n, bs)


def dequantize(raw: np.ndarray, type_id: int, n_cols: int | None = None) -> np.ndarray:
    """Raw bytes of rows -> float32 array (rows, n_cols); equal bit for bit to gguf.dequantize."""
    raw = np.asarray(raw)
    if type_id == F32:
        out = raw.view(np.float32)
    elif type_id == F16:
        out = raw.view(np.float16).astype(np.float32)
    elif type_id == BF16:
        out = (raw.view(np.int16).astype(np.int32) << 16).view(np.float32)
    elif type_id in _UNPACK:
        fmt = FORMATS[type_id]
        rows = raw.reshape(-1, raw.shape[-1])
        out = np.empty((rows.shape[0], rows.shape[1] // fmt.block_bytes * fmt.block_size), np.float32)
        step = max(1, (1 << 20) // max(1, rows.shape[1]))  # bound the temporaries to ~1 MiB of input
        for i in range(0, rows.shape[0], step):
            out[i:i + step] = _combine(unpack(rows[i:i + step], type_id)).reshape(-1, out.shape[1])
        out = out.reshape(*raw.shape[:-1], out.shape[1])
    else:
        raise NotImplementedError(f"quant type {type_name(type_id)} is not supported")
    if n_cols is not None:
        out = out.reshape(-1, n_cols)
    return out
