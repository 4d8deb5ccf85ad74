"""Open a GGUF file through the `gguf` package: validated header, metadata, config, raw tensor views.

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


def _scalar_metadata(reader) -> dict:
    """Scalars and strings of the metadata (arrays are skipped; callers ask for the few they need)."""
    from gguf import GGUFValueType

    meta = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        part = field.parts[field.data[0]]
        if field.types[0] == GGUFValueType.STRING:
            meta[key] = bytes(part).decode("utf-8", errors="replace")
        else:
            meta[key] = part.tolist()[0]
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
        from gguf import GGUFReader

        try:
            self._reader = GGUFReader(self.path, "r")
        except Exception as exc:  # the reader raises many types on damaged files
            raise EdgeError(f"{self.path}: cannot read GGUF ({type(exc).__name__}: {exc}); the file is truncated "
                            "or corrupt") from None
        self.metadata = _scalar_metadata(self._reader)
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._check_tensors()
        self.config: ModelConfig = config_from_metadata(self.metadata, str(self.path), self._vocab_size())
        # The reader holds a numpy view per metadata part (~100MB for a 49k-token vocabulary): keep only the
        # tensors' data views; `fields()` re-reads the metadata when a tool needs all of it.
        self._reader = None

    def fields(self) -> dict:
        """Every metadata field as the `gguf` reader gives them (arrays included)."""
        from gguf import GGUFReader

        return GGUFReader(self.path, "r").fields

    def _vocab_size(self) -> int:
        field = self._reader.fields.get("tokenizer.ggml.tokens")
        if field is not None:
            return len(field.data)
        return self.tensor("token_embd.weight").rows

    def _check_tensors(self) -> None:
        size = self.path.stat().st_size
        for t in self._tensors.values():
            if not quants.is_supported(int(t.tensor_type)):
                continue  # only an error if the model needs it (see tensor())
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != int(t.n_bytes):
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
        if shape and shape[-1] % fmt.block_size:
            raise EdgeError(f"{self.path}: tensor '{name}' has rows of {shape[-1]} values, not a whole number of "
                            f"{fmt.name} blocks; the file is corrupt")
        if expected is not None and tuple(d for d in shape if d != 1) != tuple(d for d in expected if d != 1):
            raise EdgeError(f"{self.path}: tensor '{name}' has shape {shape}, expected {expected}; the file "
                            "does not match its own metadata")
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        raw = np.asarray(t.data).view(np.uint8).reshape(rows, -1)
        return Tensor(name, type_id, shape, raw)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")
