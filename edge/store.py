"""The flash store: a zarr v3 group whose arrays are raw bytes (only the `bytes` codec, inside sharding).

zarr writes it (weights_tools.convert) and holds the metadata; the runtime reads inner chunks itself, by
offset, through the I/O engine: each shard's index is read once at open, every chunk is checked against its
crc32c the first time it is used.

Layout of NAME.edge/ (format version 1):
- zarr.json: group attributes under "edge": format_version, config, source, tensors (GGUF name -> type, shape),
  ffn (per layer: cluster size, bundle layout, quant types), chat_template, name.
- tokenizer.gguf: the source's metadata without tensors (vocabulary and template for llama.cpp's tokenizer).
- t/<GGUF name>: one array per resident tensor, (rows, row_bytes) uint8, one shard file.
- ffn/blk.<i>: the layer's FFN as row-column bundles, (n_clusters, bundle_bytes) uint8, one inner chunk per
  cluster of `cluster` neurons: [gate rows | up rows | down blocks (dim, cluster / block * block_bytes)].
  Down's quantized blocks run along the hidden axis, so a cluster is a whole number of down blocks and every
  byte is the source's (bit-identical results).
- experts/blk.<i> (mixture-of-experts models): the layer's experts, (n_experts, record_bytes) uint8, one inner
  chunk per expert: [gate rows | up rows | down rows] of that expert, in the source's types (one read brings an
  expert; `experts` attribute: per layer its byte layout).
- bits/<type>/blk.<i> (`edge expert-bits`): the layer's experts requantized to another type, laid out like
  experts/; `bits` attribute: per type the layouts, the sensitivity profiles and the chosen type per expert.
- crc/<array path>: uint32 crc32c of every inner chunk of that array.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np

from edge import quants
from edge.config import SUPPORTED_ARCHS, ModelConfig
from edge.errors import EdgeError
from edge.flash import FlashFile, IOEngine
from edge.gguf_file import Tensor

FORMAT_VERSION = 1
FFN_NAMES = ("ffn_gate", "ffn_up", "ffn_down")


def crc32c(data) -> int:
    import google_crc32c

    view = memoryview(data).cast("B")  # in 1 MiB copies: an expert record is tens of MB
    crc = 0
    for i in range(0, len(view), 1 << 20):
        crc = google_crc32c.extend(crc, bytes(view[i:i + (1 << 20)]))
    return crc


def ffn_part(name: str) -> tuple[int, str] | None:
    """'blk.3.ffn_up.weight' -> (3, 'ffn_up'); None for tensors that are not bundled."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in FFN_NAMES:
        return int(parts[1]), parts[2]
    return None


EXPERT_NAMES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def expert_part(name: str) -> tuple[int, str] | None:
    """'blk.3.ffn_up_exps.weight' -> (3, 'ffn_up_exps'); None for other tensors."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in EXPERT_NAMES:
        return int(parts[1]), parts[2]
    return None


def expert_layout(gate: Tensor, up: Tensor, down: Tensor, n: int) -> dict:
    """Byte sizes of one expert's record (gate, up, down of one expert, each its rows in full)."""
    return {"n": n, "gate_bytes": gate.raw.nbytes // n, "up_bytes": up.raw.nbytes // n,
            "down_bytes": down.raw.nbytes // n, "types": [gate.type_id, up.type_id, down.type_id],
            "dim": gate.shape[-1], "hidden": gate.raw.shape[0] // n}


def bundle_layout(gate: Tensor, up: Tensor, down: Tensor, cluster: int) -> dict:
    """Byte sizes of one cluster's bundle: gate rows, up rows, down blocks."""
    fmt_down = quants.FORMATS[down.type_id]
    return {"cluster": cluster, "gate_bytes": cluster * gate.raw.shape[1], "up_bytes": cluster * up.raw.shape[1],
            "down_bytes": down.rows * cluster // fmt_down.block_size * fmt_down.block_bytes,
            "types": [gate.type_id, up.type_id, down.type_id], "dim": gate.cols, "hidden": gate.rows}


class _Array:
    """One sharded array on disk: shard file, inner chunk shape, chunk offsets from the shard index."""

    def __init__(self, root: Path, path: str):
        meta_path = root / path / "zarr.json"
        try:
            meta = json.loads(meta_path.read_text())
            self.shape = tuple(meta["shape"])
            shard = meta["codecs"][0]
            if shard["name"] != "sharding_indexed" or [c["name"] for c in shard["configuration"]["codecs"]] != [
                "bytes"
            ]:
                raise EdgeError(f"{meta_path}: array is not raw sharded bytes; the store was not written by edge")
            self.chunk_shape = tuple(shard["configuration"]["chunk_shape"])
            self.shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise EdgeError(f"{meta_path}: missing or unreadable array metadata ({exc}); convert the model "
                            "again") from None
        if self.shard_shape[0] < self.shape[0] or self.shard_shape[1:] != self.shape[1:]:
            raise EdgeError(f"{meta_path}: expected one shard per array")
        self.n_chunks = -(-self.shape[0] // self.chunk_shape[0])
        self.chunk_bytes = self.chunk_shape[0] * self.shape[1]
        self.file = root / path / "c" / "0" / "0"
        self.path = path
        self._read_index()

    def _read_index(self) -> None:
        index_bytes = self.n_chunks * 16 + 4
        try:
            size = self.file.stat().st_size
            with open(self.file, "rb") as f:
                f.seek(max(0, size - index_bytes))
                tail = f.read(index_bytes)
        except OSError:
            raise EdgeError(f"{self.file}: shard file is missing; the store is incomplete, convert again") from None
        if len(tail) != index_bytes or crc32c(tail[:-4]) != struct.unpack("<I", tail[-4:])[0]:
            raise EdgeError(f"{self.file}: shard index is damaged (truncated or corrupt file); convert again")
        idx = np.frombuffer(tail[:-4], "<u8").reshape(self.n_chunks, 2)
        if np.any(idx[:, 0] + idx[:, 1] > size - index_bytes):
            raise EdgeError(f"{self.file}: shard index points past the end of the file; convert again")
        self.offsets = idx[:, 0].astype(np.int64)
        self.lengths = idx[:, 1].astype(np.int64)


def check_attributes(attrs: dict, where: Path) -> ModelConfig:
    """The store's model config, after checking what every run reads of its attributes (the config, the
    tensors' types and shapes, the FFN bundles' layouts): a value of the wrong kind is an EdgeError naming it,
    not a failure later."""
    def bad(key: str, value) -> EdgeError:
        return EdgeError(f"{where}: damaged metadata, {key} is {str(value)[:60]!r}; convert the model again")

    def whole(key: str, value, low: int = 1) -> int:
        if type(value) is not int or value < low:
            raise bad(key, value)
        return value

    def known_type(t) -> bool:
        return type(t) is int and quants.is_supported(t)

    def table(key: str, value, kind=dict):
        if not isinstance(value, kind):
            raise bad(key, value)
        return value

    cfg = table("config", attrs.get("config"))
    known = {f.name: f.type for f in fields(ModelConfig)}
    optional = {f.name for f in fields(ModelConfig) if f.default is not MISSING}
    if set(known) - set(cfg) - optional:
        raise bad("config", sorted(set(known) - set(cfg) - optional))
    values = {k: v for k, v in cfg.items() if k in known}
    for k, v in values.items():
        kind = known[k]
        if kind == "int":
            whole(f"config.{k}", v, 0 if k in optional or k == "sliding_window" else 1)
        elif kind == "float" and (type(v) not in (int, float) or v != v):
            raise bad(f"config.{k}", v)
        elif kind == "bool" and type(v) is not bool:
            raise bad(f"config.{k}", v)
    if values["arch"] not in SUPPORTED_ARCHS or values["activation"] not in ("silu", "gelu_tanh"):
        raise bad("config.arch/activation", (values["arch"], values["activation"]))
    local = table("config.local_layers", values["local_layers"], list)
    if len(local) != values["n_layers"] or any(type(b) is not bool for b in local) or \
            values["n_heads"] % values["n_kv_heads"] or values["rope_dims"] > values["head_dim"]:
        raise bad("config", "layers, heads or rope dimensions that do not agree")
    values["local_layers"] = tuple(local)
    for name, info in table("tensors", attrs.get("tensors")).items():
        info = table(f"tensors.{name}", info)
        shape = table(f"tensors.{name}.shape", info.get("shape"), list)
        matrix = name in ("token_embd.weight", "output.weight") or (
            name.endswith(".weight") and name.split(".")[-2] in ("attn_q", "attn_k", "attn_v", "attn_output"))
        if not known_type(info.get("type")) or not (len(shape) == 2 if matrix else 1 <= len(shape) <= 2):
            raise bad(f"tensors.{name}", info)
        for d in shape:
            whole(f"tensors.{name}.shape", d)
        if shape[-1] % quants.FORMATS[info["type"]].block_size:
            raise bad(f"tensors.{name}.shape", shape)
    ffn = table("ffn", attrs.get("ffn", []), list)
    if len(ffn) != (0 if values.get("n_experts") else values["n_layers"]):  # a dense store: a layout per layer
        raise bad("ffn", f"{len(ffn)} layers")
    for i, lay in enumerate(ffn):
        lay = table(f"ffn.{i}", lay)
        for k in ("cluster", "dim", "hidden", "gate_bytes", "up_bytes", "down_bytes"):
            whole(f"ffn.{i}.{k}", lay.get(k))
        types = table(f"ffn.{i}.types", lay.get("types"), list)
        if len(types) != 3 or not all(map(known_type, types)) or lay["hidden"] % lay["cluster"] \
                or lay["down_bytes"] % lay["dim"]:
            raise bad(f"ffn.{i}", lay)
    return ModelConfig(**values)


class Store:
    """An opened store: a weight source (edge.source.WeightSource) like GGUFFile, plus FFN bundles, reads by
    chunk through its I/O engine, and its metadata through typed accessors (nothing else reads its attributes)."""

    kind = "edge store"

    def __init__(self, path: str | os.PathLike, engine: IOEngine | None = None, verify: str = "first"):
        self.path = Path(path)
        meta_path = self.path / "zarr.json"
        if not meta_path.is_file():
            raise EdgeError(f"{self.path}: not an edge store (no zarr.json); give a GGUF file, a model name or a "
                            "store made by `edge convert MODEL.gguf`")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise EdgeError(f"{meta_path}: damaged (not valid JSON: {exc.msg} at line {exc.lineno}); convert the "
                            "model again") from None
        try:
            attrs = meta["attributes"]["edge"]
        except (KeyError, TypeError):
            attrs = None
        if not isinstance(attrs, dict):
            raise EdgeError(f"{meta_path}: not an edge store (no 'edge' attributes)")
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise EdgeError(f"{self.path}: store format version {version}, this edge reads version "
                            f"{FORMAT_VERSION}; convert the model again with this version")
        self._attrs = attrs
        self.config = check_attributes(attrs, meta_path)
        self.metadata = {"general.name": attrs.get("name"), "tokenizer.chat_template": attrs.get("chat_template")}
        self.chat_template = attrs.get("chat_template")
        self.tokenizer_path = self.path / "tokenizer.gguf"
        self.engine = engine or IOEngine(threads=4, buffer_bytes=64 << 20)
        self.verify = verify
        self._verified: set[tuple[str, int]] = set()
        self._arrays: dict[str, _Array] = {}
        self._files: dict[str, FlashFile] = {}
        self._crc_cache: dict[str, np.ndarray] = {}
        self._ffn_cache: dict = {}  # one layer's reassembled FFN (or experts) tensors

    def array(self, path: str) -> _Array:
        if path not in self._arrays:
            self._arrays[path] = _Array(self.path, path)
        return self._arrays[path]

    def _file(self, arr: _Array) -> FlashFile:
        if arr.path not in self._files:
            self._files[arr.path] = FlashFile(arr.file)
        return self._files[arr.path]

    def read_mode(self, name: str = "t/token_embd.weight") -> str:
        """How reads of this store bypass the page cache on this platform and file system (edge.system)."""
        return self._file(self.array(name)).mode

    def _crcs(self, arr: _Array, engine: IOEngine, append: bool = False) -> np.ndarray:
        """The array's chunk checksums, read once per array (append: after the engine's last read)."""
        if arr.path not in self._crc_cache:
            head, _, tail = arr.path.partition("/")  # sparse/, moe/ (calibration), stack/, bits/ keep their crc/ inside
            crc = self.array(f"{head}/crc/{tail}" if head in ("sparse", "stack", "moe", "bits") else "crc/" + arr.path)
            raw = self.read_views(crc, [0], False, engine, append)[0]
            self._crc_cache[arr.path] = np.frombuffer(bytes(raw), "<u4")
        return self._crc_cache[arr.path]

    def read_chunks(
        self, arr: _Array, chunks: list[int], check: bool = True, engine: IOEngine | None = None
    ) -> list[bytes]:
        """Inner chunks' bytes (copied out of the engine's buffer, in batches it holds), verified against their
        crc32c. engine: another I/O engine (its own buffer), for reads issued from another thread (prefetch)."""
        return [bytes(v) for _, v in self._batched(arr, chunks, check, engine or self.engine)]

    def each_chunk(self, arr: _Array, chunks: list[int]):
        """(chunk, view) for each chunk, verified, read in batches the engine's buffer holds; a view is valid
        until the next item of the next batch (copy what is kept)."""
        return self._batched(arr, chunks, True, self.engine)

    def _batched(self, arr: _Array, chunks: list[int], check: bool, engine: IOEngine):
        """(chunk, view) for each chunk, read in batches the engine's buffer holds; a view is valid until the
        next item of the next batch."""
        batch = max(1, (len(engine.buffer) // 2) // max(1, arr.chunk_bytes + 8192))
        for i in range(0, len(chunks), batch):
            yield from zip(chunks[i:i + batch], self.read_views(arr, chunks[i:i + batch], check, engine))

    def read_views(self, arr: _Array, chunks: list[int], check: bool = True,
                   engine: IOEngine | None = None, append: bool = False) -> list[memoryview]:
        """Inner chunks as views into the engine's buffer, verified; valid until its next read (append: placed
        after the engine's last read, whose views stay valid)."""
        engine = engine or self.engine
        crcs = self._crcs(arr, engine, append) if check and self.verify != "never" else None
        views = engine.read(self._file(arr), [(int(arr.offsets[c]), int(arr.lengths[c])) for c in chunks],
                            append=append)
        if crcs is not None:
            for c, v in zip(chunks, views):
                if self.verify == "always" or (arr.path, c) not in self._verified:
                    if crc32c(v) != int(crcs[c]):
                        raise EdgeError(f"{arr.file}: chunk {c} of array '{arr.path}' fails its checksum (corrupt "
                                        "store); convert the model again")
                    self._verified.add((arr.path, c))
        return views

    def read_array(self, path: str) -> np.ndarray:
        """The whole array, read batch by batch into one preallocated array (a list of chunks joined would hold
        it twice: a 38MB low-rank head took 75MB while loading)."""
        arr = self.array(path)
        return self.read_into(path, np.empty(arr.shape[0] * arr.shape[1], np.uint8)).reshape(arr.shape)

    def read_into(self, path: str, out: np.ndarray, chunks: range | None = None) -> np.ndarray:
        """The array's bytes into `out` (uint8), verified: the whole array (out exactly its size: rows x row
        bytes), or the run of inner chunks `chunks` (out at least their rows' bytes; the array's last chunk holds
        only the rows left)."""
        arr = self.array(path)
        size, n = arr.chunk_bytes, arr.shape[0] * arr.shape[1]
        whole, chunks = chunks is None, chunks if chunks is not None else range(arr.n_chunks)
        need = min(n, chunks.stop * size) - chunks.start * size
        if out.nbytes != need if whole else out.nbytes < need:
            raise ValueError(f"{path}: {need} bytes do not fit a buffer of {out.nbytes}")
        for c, view in self._batched(arr, list(chunks), True, self.engine):
            at, k = (c - chunks.start) * size, min(size, n - c * size)
            out[at:at + k] = np.frombuffer(view, np.uint8, k)
        return out

    def row_blocks(self, name: str, rows: int):
        """(first row, its block's rows (n, row bytes) uint8) for each block of `rows` rows (whole inner chunks,
        at least one) of a stored tensor, in order, read into one buffer: a block is valid until the next."""
        arr = self.array("t/" + name)
        per = arr.chunk_shape[0]
        run = max(1, rows // per)
        buf = np.empty(run * arr.chunk_bytes, np.uint8)
        for c in range(0, arr.n_chunks, run):
            chunks = range(c, min(c + run, arr.n_chunks))
            self.read_into("t/" + name, buf, chunks)
            n = min(len(chunks) * per, arr.shape[0] - c * per)
            yield c * per, buf[:n * arr.shape[1]].reshape(n, arr.shape[1])

    def has(self, name: str) -> bool:
        if expert_part(name) is not None:
            return "experts" in self._attrs
        return name in self._attrs["tensors"] or ffn_part(name) is not None

    def tensor_names(self) -> list[str]:
        return list(self._attrs["tensors"])

    def tensor(self, name: str, expected: tuple[int, ...] | None = None) -> Tensor:
        part = ffn_part(name)
        if part is not None:
            t = self._ffn_tensors(part[0])[part[1]]
        elif expert_part(name) is not None and "experts" in self._attrs:
            layer, key = expert_part(name)
            t = self._expert_tensors(layer)[key]
        else:
            info = self.tensor_info(name, expected)
            return Tensor(name, info["type"], tuple(info["shape"]), self.read_array("t/" + name))
        self._check_shape(name, t.shape, expected)
        return t

    def _check_shape(self, name: str, shape, expected: tuple[int, ...] | None) -> None:
        if expected is not None and tuple(d for d in shape if d != 1) != tuple(d for d in expected if d != 1):
            raise EdgeError(f"{self.path}: tensor '{name}' has shape {tuple(shape)}, expected {expected}")

    def _ffn_tensors(self, layer: int) -> dict[str, Tensor]:
        """Gate, up and down of one layer reassembled from its bundles, byte for byte the source's."""
        if layer not in self._ffn_cache:
            self._ffn_cache = {layer: self._assemble_ffn(layer)}  # one layer at a time
        return self._ffn_cache[layer]

    def _assemble_ffn(self, layer: int) -> dict[str, Tensor]:
        lay = self._attrs["ffn"][layer]
        bundles = self.read_array(f"ffn/blk.{layer}")  # (n_clusters, bundle_bytes)
        n, g, u = bundles.shape[0], lay["gate_bytes"], lay["up_bytes"]
        c, dim, hidden = lay["cluster"], lay["dim"], lay["hidden"]
        gate = bundles[:, :g].reshape(n * c, -1)
        up = bundles[:, g:g + u].reshape(n * c, -1)
        down = bundles[:, g + u:g + u + lay["down_bytes"]].reshape(n, dim, -1).transpose(1, 0, 2).reshape(dim, -1)
        tg, tu, td = lay["types"]
        p = f"blk.{layer}."
        return {"ffn_gate": Tensor(p + "ffn_gate.weight", tg, (hidden, dim), np.ascontiguousarray(gate)),
                "ffn_up": Tensor(p + "ffn_up.weight", tu, (hidden, dim), np.ascontiguousarray(up)),
                "ffn_down": Tensor(p + "ffn_down.weight", td, (dim, hidden), np.ascontiguousarray(down))}

    # -- experts: the source's records, or other bitwidths chosen per expert (`edge expert-bits`) -----------

    def expert_kind(self, layer: int, e: int) -> str:
        """The variant expert e of `layer` runs in: "keep" (the source's record) or a type of `bits/`."""
        choice = self._attrs.get("bits", {}).get("choice")
        return choice[layer][e] if choice else "keep"

    def expert_source(self, layer: int, kind: str) -> tuple[_Array, dict]:
        """The array holding the layer's experts in `kind`, and their record layout."""
        if kind == "keep":
            return self.array(f"experts/blk.{layer}"), self._attrs["experts"][layer]
        return self.array(f"bits/{kind}/blk.{layer}"), self._attrs["bits"]["types"][kind][layer]

    def expert_tensors(self, layer: int, kind: str | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Gate, up and down of each of the layer's experts, each in its chosen variant (or all in `kind`)."""
        if not self.is_moe:
            raise EdgeError(f"{self.path}: not a mixture of experts; it has no experts")
        kinds = [kind or self.expert_kind(layer, e) for e in range(self.config.n_experts)]
        out = []
        for e, kind in enumerate(kinds):
            arr, lay = self.expert_source(layer, kind)
            (rec,) = self.read_chunks(arr, [e])
            rec = np.frombuffer(rec, np.uint8)
            parts, at, p = [], 0, f"blk.{layer}.ffn_"
            for k, (key, rows, cols) in enumerate(
                (
                    ("gate", lay["hidden"], lay["dim"]),
                    ("up", lay["hidden"], lay["dim"]),
                    ("down", lay["dim"], lay["hidden"]),
                )
            ):
                size = lay[key + "_bytes"]
                parts.append(Tensor(f"{p}{key}_exps.weight[{e}]", lay["types"][k], (rows, cols),
                                    rec[at:at + size].reshape(rows, -1)))
                at += size
            out.append(tuple(parts))
        return out

    def _expert_tensors(self, layer: int) -> dict[str, Tensor]:
        """The layer's 3-D expert tensors (experts of one type only), as GGUFFile gives them."""
        if ("experts", layer) not in self._ffn_cache:
            per = self.expert_tensors(layer)
            if len({tuple(t.type_id for t in ex) for ex in per}) > 1:
                raise EdgeError(f"{self.path}: layer {layer}'s experts have different bitwidths (edge expert-bits); "
                                "they load one by one")
            out = {}
            for k, key in enumerate(EXPERT_NAMES):
                t0 = per[0][k]
                out[key] = Tensor(f"blk.{layer}.{key}.weight", t0.type_id, (len(per), *t0.shape),
                                  np.concatenate([ex[k].raw for ex in per]))
            self._ffn_cache = {("experts", layer): out}  # one layer at a time
        return self._ffn_cache[("experts", layer)]

    # -- metadata: the store's attributes, read here only -------------------------------------------------

    @property
    def sparse(self) -> dict | None:
        """The calibration summary (`edge convert --calibrate`), or None."""
        return self._attrs.get("sparse")

    def tensor_info(self, name: str, expected: tuple[int, ...] | None = None) -> dict:
        """A resident tensor's {"type", "shape"} as stored (the FFN's are in `ffn_layouts`); with `expected`, an
        EdgeError unless it has that logical shape."""
        info = self._attrs["tensors"].get(name)
        if info is None:
            raise EdgeError(f"{self.path}: tensor '{name}' is missing; the store is incomplete, convert again")
        self._check_shape(name, info["shape"], expected)
        return info

    @property
    def tensor_infos(self) -> dict[str, dict]:
        """Every resident tensor's {"type", "shape"}, by GGUF name."""
        return dict(self._attrs["tensors"])

    @property
    def ffn_layouts(self) -> list[dict]:
        """Per layer, the FFN bundle's layout (cluster, dim, hidden, types, gate/up/down bytes); [] for a
        mixture of experts."""
        return list(self._attrs.get("ffn", []))

    @property
    def expert_layouts(self) -> list[dict]:
        """Per layer, the expert record's layout in the source's types; [] unless a mixture of experts."""
        return list(self._attrs.get("experts", []))

    @property
    def is_moe(self) -> bool:
        return "experts" in self._attrs

    @property
    def source(self) -> dict:
        """The GGUF it was converted from: file name and sha256."""
        return self._attrs["source"]

    @property
    def stack(self) -> dict | None:
        """The BitStack (`edge stack`): iters, linears, order, level_ppl, ffn_clusters; or None."""
        return self._attrs.get("stack")

    @property
    def bits(self) -> dict | None:
        """Per-expert bitwidths (`edge expert-bits`): types, profiles, choice, bounds; or None."""
        return self._attrs.get("bits")

    @property
    def moe(self) -> dict | None:
        """The routing traces' summary (`edge convert --calibrate` on a mixture of experts), or None."""
        return self._attrs.get("moe")

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows of a resident tensor's array read from flash (the chunks that hold them), (len(ids), row_bytes)."""
        arr = self.array("t/" + name)
        per = arr.chunk_shape[0]
        chunks = sorted({int(i) // per for i in ids})
        data = dict(zip(chunks, self.read_chunks(arr, chunks)))
        width = arr.shape[1]
        out = np.empty((len(ids), width), np.uint8)
        for k, i in enumerate(ids):
            c, r = divmod(int(i), per)
            out[k] = np.frombuffer(data[c], np.uint8, width, r * width)
        return out

    @property
    def flash_read_bytes(self) -> int:
        return self.engine.stats.bytes


def is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").exists() or path.suffix == ".edge"


def is_calibrated(path: Path) -> bool:
    """A complete store with a calibration (`edge convert --calibrate`), read without opening its arrays."""
    try:
        return '"sparse"' in (Path(path) / "zarr.json").read_text() and is_complete(path)
    except OSError:
        return False


def is_complete(path: Path) -> bool:
    """A store that edge finished writing: its attributes are written last (`edge convert`'s commit point)."""
    try:
        return '"edge"' in (Path(path) / "zarr.json").read_text()
    except OSError:
        return False
