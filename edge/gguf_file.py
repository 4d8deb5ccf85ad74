"""Open a GGUF file: validated header, metadata, config, raw tensor views, and every metadata field with its
type for tools that copy them.

The file is memory-mapped once; tensors are zero-copy uint8 views of their rows of blocks.
Anything wrong with the file becomes an EdgeError naming the file and the problem.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge import quants
from edge.config import ModelConfig, config_from_metadata
from edge.errors import EdgeError

GGUF_MAGIC = b"GGUF"
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset


@dataclass(frozen=True)
class Tensor:
    """One tensor: GGUF name, ggml type, logical shape (rows, cols) and its raw bytes (rows, row_bytes)."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    raw: np.ndarray

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes


def check_header(path: Path) -> None:
    """Reject what is not a GGUF, or whose counts cannot fit in the file, before the reader allocates."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise EdgeError(f"{path}: not a GGUF file (no GGUF magic at the start); give a .gguf model file")
    if len(head) < 24:
        raise EdgeError(f"{path}: GGUF header is truncated ({size} bytes); the file is incomplete, download it again")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise EdgeError(f"{path}: GGUF version {version} is not supported (2 or 3 expected)")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > size or n_kv * 12 > size:
        raise EdgeError(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} metadata keys, more than "
                        f"a {size}-byte file can hold; the file is corrupt")


# value types of GGUF metadata: struct format of the fixed-size ones (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class _TensorInfo:
    name: str
    tensor_type: int
    shape: tuple[int, ...]  # ggml order: ne0 (the row length) first
    data_offset: int
    n_bytes: int


@dataclass(frozen=True)
class Strings:
    """A GGUF string array without a Python object per string: the strings' bytes end to end and where each
    starts (Gemma 3's 262144-token vocabulary as Python strings is ~20MB; this is ~3MB)."""

    blob: np.ndarray     # uint8
    offsets: np.ndarray  # int32 (int64 past 2GB), one more than there are strings

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes()


@dataclass(frozen=True)
class Field:
    """One metadata value with its GGUF value type (and an array's element type), as gguf.GGUFWriter takes them."""

    value: object
    vtype: int
    sub_type: int | None = None


def _parse(buf, arrays: bool = False, compact: frozenset[str] = frozenset(),
           tensors: bool = True) -> tuple[dict, int | None, list[_TensorInfo]]:
    """Metadata, the vocabulary's length, and the tensor infos of a GGUF held in `buf`. Metadata maps each key
    to its value; arrays are skipped without building them (the `gguf` reader makes a numpy view per element:
    ~25s for Gemma 3's 262144-token vocabulary) unless `arrays`, which maps each key to a Field with arrays
    as lists (strings that are not UTF-8 stay bytes), or the key is in `compact`: then a string array becomes
    `Strings` and a numeric one a numpy array. Without `tensors`, the tensor infos are not read. Raises
    struct.error / ValueError on a damaged file."""
    size = len(buf)
    unpack = struct.unpack_from
    _, _, n_tensors, n_kv = unpack("<4sIQQ", buf, 0)
    at = 24

    def string(at: int, text: bool = True) -> tuple[str | bytes, int]:
        (n,) = unpack("<Q", buf, at)
        if at + 8 + n > size:
            raise ValueError(f"a string of {n} bytes at byte {at} runs past the end")
        raw = bytes(buf[at + 8:at + 8 + n])
        if text:
            return raw.decode("utf-8", errors="replace"), at + 8 + n
        try:
            return raw.decode("utf-8"), at + 8 + n
        except UnicodeDecodeError:
            return raw, at + 8 + n

    def array(at: int, packed: bool = False) -> tuple[int, int, int, object]:
        """(end, element type, count, the elements if `arrays` or `packed`: as Strings or numpy if packed)."""
        kind, count = unpack("<IQ", buf, at)
        at += 12
        items = None
        if kind in _SCALARS:
            fmt = _SCALARS[kind]
            end = at + count * struct.calcsize(fmt)
            if end > size:
                raise ValueError("an array runs past the end")
            if packed:
                items = np.frombuffer(buf, np.dtype("<" + fmt), count, at).copy()
            elif arrays:
                items = np.frombuffer(buf, np.dtype("<" + fmt), count, at).tolist()
            at = end
        elif kind == 8:
            if count * 8 > size - at:
                raise ValueError(f"an array of {count} strings cannot fit in the file")
            if packed:
                starts = np.empty(count, np.int64)
                for i in range(count):
                    (n,) = unpack("<Q", buf, at)
                    starts[i] = at + 8
                    at += 8 + n
                if at > size:
                    raise ValueError("a string array runs past the end")
                first = int(starts[0]) - 8 if count else at
                keep = np.ones(at - first, bool)  # the region without each string's 8-byte length
                keep[(starts[:, None] - 8 - first + np.arange(8)).ravel()] = False
                blob = np.frombuffer(buf, np.uint8, at - first, first)[keep]
                lengths = np.diff(np.append(starts, at + 8)) - 8
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                items = Strings(blob, offsets.astype(np.int32 if len(blob) < 2**31 else np.int64))
            elif arrays:
                items = []
                for _ in range(count):
                    item, at = string(at, text=False)
                    items.append(item)
            else:
                for _ in range(count):
                    (n,) = unpack("<Q", buf, at)
                    at += 8 + n
        elif kind == 9:
            if count > size - at:
                raise ValueError(f"an array of {count} arrays cannot fit in the file")
            items = [] if arrays else None
            for _ in range(count):
                at, _, _, inner = array(at)
                if arrays:
                    items.append(inner)
        else:
            raise ValueError(f"unknown metadata value type {kind}")
        if at > size:
            raise ValueError("an array runs past the end")
        return at, kind, count, items

    meta: dict = {}
    vocab = None
    for _ in range(n_kv):
        key, at = string(at)
        (kind,) = unpack("<I", buf, at)
        at += 4
        sub = None
        if kind in _SCALARS:
            (value,) = unpack("<" + _SCALARS[kind], buf, at)
            at += struct.calcsize(_SCALARS[kind])
        elif kind == 8:
            value, at = string(at)
        elif kind == 9:
            at, sub, count, value = array(at, packed=key in compact)
            if key == "tokenizer.ggml.tokens":
                vocab = count
            if not arrays and key not in compact:
                continue
        else:
            raise ValueError(f"unknown metadata value type {kind} for '{key}'")
        meta[key] = Field(value, kind, sub) if arrays and key not in compact else value
    infos = []
    if not tensors:
        return meta, vocab, infos
    from gguf.constants import GGML_QUANT_SIZES

    for _ in range(n_tensors):
        name, at = string(at)
        (n_dims,) = unpack("<I", buf, at)
        if n_dims > 4:
            raise ValueError(f"tensor '{name}' has {n_dims} dimensions")
        dims = unpack(f"<{n_dims}Q", buf, at + 4)
        at += 4 + 8 * n_dims
        type_id, offset = unpack("<IQ", buf, at)
        at += 12
        block, block_bytes = GGML_QUANT_SIZES.get(type_id, (0, 0))  # keyed by an IntEnum: plain ints find it
        n = int(np.prod(dims, dtype=np.float64)) if dims else 1
        infos.append(_TensorInfo(name, type_id, tuple(int(d) for d in dims), offset,
                                 n // block * block_bytes if block else 0))
    align = meta.get("general.alignment", 32)
    align = int(align.value if isinstance(align, Field) else align) or 32
    start = -(-at // align) * align
    for t in infos:
        t.data_offset += start
    return meta, vocab, infos


TOKENIZER_ARRAYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                              "tokenizer.ggml.token_type"})


def read_tokenizer(path: str | os.PathLike) -> dict:
    """A GGUF's metadata with its tokenizer arrays packed (Strings for tokens and merges, numpy for scores and
    token types): what edge.tokenizer keeps, read without a Python object per token."""
    path = Path(path)
    if not path.is_file():
        raise EdgeError(f"{path}: no such file; the model's tokenizer is missing (convert the model again)")
    check_header(path)
    try:
        buf = np.memmap(path, np.uint8, "r").view(np.ndarray)
        meta = _parse(buf, compact=TOKENIZER_ARRAYS, tensors=False)[0]  # (without importing gguf: ~5MB)
        del buf
    except Exception as exc:
        raise EdgeError(f"{path}: cannot read GGUF ({type(exc).__name__}: {exc}); the file is truncated or "
                        "corrupt") from None
    return meta


class GGUFFile:
    """A validated, memory-mapped GGUF model: `config`, `metadata`, `tensor(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise EdgeError(f"{self.path}: no such file; give a path to a .gguf model (or omit it for the default)")
        if self.path.is_dir():
            raise EdgeError(f"{self.path}: is a directory, not a GGUF file")
        check_header(self.path)
        try:
            self._map = np.memmap(self.path, np.uint8, "r").view(np.ndarray)  # plain views: slicing stays cheap
            self.metadata, self._vocab, infos = _parse(self._map)
        except Exception as exc:  # struct.error, ValueError, OverflowError, UnicodeError, ... on damaged files
            raise EdgeError(f"{self.path}: cannot read GGUF ({type(exc).__name__}: {exc}); the file is truncated "
                            "or corrupt") from None
        self._tensors = {t.name: t for t in infos}
        self._check_tensors()
        self.config: ModelConfig = config_from_metadata(self.metadata, str(self.path), self._vocab_size())

    def fields(self) -> dict[str, Field]:
        """Every metadata field with its value type, arrays included (for tools that copy them)."""
        try:
            return _parse(self._map, arrays=True)[0]
        except Exception as exc:
            raise EdgeError(f"{self.path}: cannot read GGUF metadata ({type(exc).__name__}: {exc}); the file is "
                            "corrupt") from None

    def _vocab_size(self) -> int:
        if self._vocab is not None:
            return self._vocab
        return self.tensor("token_embd.weight").rows

    def _check_tensors(self) -> None:
        size = self.path.stat().st_size
        for t in self._tensors.values():
            if not quants.is_supported(int(t.tensor_type)):
                continue  # only an error if the model needs it (see tensor())
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise EdgeError(f"{self.path}: tensor '{t.name}' ends at byte {end} but the file has {size}; "
                                "the file is truncated, download it again")

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str, expected: tuple[int, ...] | None = None) -> Tensor:
        """The tensor `name`; with `expected`, an EdgeError unless it has exactly that logical shape."""
        t = self._tensors.get(name)
        if t is None:
            arch = self.metadata.get("general.architecture", "?")
            raise EdgeError(f"{self.path}: tensor '{name}' is missing; the file is not a complete {arch} model")
        type_id = int(t.tensor_type)
        if not quants.is_supported(type_id):
            raise EdgeError(f"{self.path}: tensor '{name}' uses quant type {quants.type_name(type_id)}, which "
                            f"is not supported (supported: {', '.join(f.name for f in quants.FORMATS.values())})")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists ne0 (the row length) first
        fmt = quants.FORMATS[type_id]
        if 0 in shape:
            raise EdgeError(f"{self.path}: tensor '{name}' has shape {shape}, with no values; the file is corrupt")
        if shape and shape[-1] % fmt.block_size:
            raise EdgeError(f"{self.path}: tensor '{name}' has rows of {shape[-1]} values, not a whole number of "
                            f"{fmt.name} blocks; the file is corrupt")
        if expected is not None and tuple(d for d in shape if d != 1) != tuple(d for d in expected if d != 1):
            raise EdgeError(f"{self.path}: tensor '{name}' has shape {shape}, expected {expected}; the file "
                            "does not match its own metadata")
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        raw = self._map[t.data_offset:t.data_offset + t.n_bytes].reshape(rows, -1)
        return Tensor(name, type_id, shape, raw)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def expert_tensors(self, layer: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        return slice_experts(self, layer)

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def tokenizer_path(self) -> Path:
        return self.path

    kind = "GGUF"


def slice_experts(src, layer: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Gate, up and down of each of a layer's experts, sliced out of its stacked 3-D tensors (GGUF's layout)."""
    cfg = src.config
    if not cfg.n_experts:
        raise EdgeError(f"{src.path}: not a mixture of experts; it has no experts")
    n, dim, hidden = cfg.n_experts, cfg.dim, cfg.expert_hidden
    p = f"blk.{layer}.ffn_"
    stacks = [src.tensor(p + f"{k}_exps.weight", shape) for k, shape in
              (("gate", (n, hidden, dim)), ("up", (n, hidden, dim)), ("down", (n, dim, hidden)))]

    def one(t: Tensor, e: int) -> Tensor:
        rows, cols = t.shape[1], t.shape[2]
        return Tensor(f"{t.name}[{e}]", t.type_id, (rows, cols), t.raw[e * rows:(e + 1) * rows])

    return [tuple(one(t, e) for t in stacks) for e in range(n)]
