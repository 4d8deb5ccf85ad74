"""`edge convert`: a GGUF into a flash store (see edge/store.py for the layout), atomically.

Everything is written into `OUT.partial/` and renamed to OUT at the end, so an interrupted conversion never
leaves something that opens as a model; a re-run removes the stale partial directory and starts over.
"""

from __future__ import annotations

import dataclasses
import json
import errno
import hashlib
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from edge import quants
from edge.errors import EdgeError
from edge.sizes import format_size
from edge.gguf_file import GGUFFile, Tensor
from edge.store import (
    EXPERT_NAMES,
    FFN_NAMES,
    FORMAT_VERSION,
    bundle_layout,
    crc32c,
    expert_layout,
    expert_part,
    ffn_part,
)
from weights_tools.gguf_meta import copy_fields, finish

CHUNK_TARGET = 64 << 10  # inner chunk size of resident tensors; the embedding uses ~8 KiB for row lookups


class Progress:
    """Bytes and tensors done (or steps of other work), with time left, on one terminal line; silent when quiet
    or not a TTY.

    Also where Ctrl+C lands: SIGINT only sets a flag, and `step` raises KeyboardInterrupt between tensors,
    never inside zarr's writer threads (which would leave their tasks dangling)."""

    def __init__(self, total_bytes: int, total_items: int, quiet: bool, on_step=None):
        """on_step(fraction, label): also told of every step (the chat UI shows it)."""
        import signal
        import threading

        self.interrupted = False
        self._old_handler = None
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        self.total_bytes, self.total_items = total_bytes, total_items
        self.done_bytes = self.done_items = 0
        self.show = not quiet and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.on_step = on_step
        self.unit: str | None = "tensors"
        self.by_bytes = True  # bytes counted: MB/s shown

    def _on_sigint(self, signum, frame) -> None:
        self.interrupted = True

    def check(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    def step(self, n_bytes: int, label: str) -> None:
        self.check()
        self.done_bytes += n_bytes
        self.done_items += 1
        if self.on_step is not None:
            self.on_step(self.done_bytes / max(1, self.total_bytes), label)
        if self.show:
            sys.stderr.write("\r" + self.line(label))
            sys.stderr.flush()

    def line(self, label: str) -> str:
        """The progress line: bar, percent, what is counted (bytes: MB/s too), time left, the current item."""
        frac = self.done_bytes / max(1, self.total_bytes)
        elapsed = time.perf_counter() - self.t0
        parts = [f"[{'#' * int(30 * frac):<30}] {frac:4.0%}"]
        if self.unit:
            parts.append(f"{self.done_items}/{self.total_items} {self.unit}")
        if self.by_bytes:
            parts.append(f"{self.done_bytes / max(1e-9, elapsed) / 1e6:5.0f} MB/s")
        if 0.02 < frac < 1 and elapsed > 1:
            left = int(elapsed * (1 - frac) / frac)
            parts.append(f"{left // 60}m{left % 60:02d}s left" if left >= 60 else f"{left}s left")
        return " ".join(parts) + f" {label[:28]:<28}"

    def advance_to(self, done: int, total: int, label: str, unit: str | None = "steps") -> None:
        """For work counted in steps of its own (calibration's steps, layers, tensors of a written model): no
        MB/s; unit None: the percent alone."""
        self.by_bytes, self.unit = False, unit
        self.total_bytes = total
        self.done_items, self.total_items = done - 1, total  # step() counts this one
        self.step(done - self.done_bytes, label)

    def close(self) -> None:
        if self._old_handler is not None:
            import signal

            signal.signal(signal.SIGINT, self._old_handler)
        if self.show:
            sys.stderr.write("\n")


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def write_array(group, path: str, data: np.ndarray, rows_per_chunk: int) -> None:
    """One sharded raw-bytes array plus the crc32c of each inner chunk."""
    rows, width = data.shape
    n = -(-rows // rows_per_chunk)
    arr = group.create_array(path, shape=data.shape, chunks=(rows_per_chunk, width), shards=(n * rows_per_chunk, width),
                             dtype="uint8", compressors=None, filters=None, fill_value=0)
    arr[:] = data
    crcs = np.empty(n, "<u4")
    flat = np.ascontiguousarray(data).reshape(-1)
    step = rows_per_chunk * width
    for i in range(n):  # the last inner chunk is zero-padded to full size, as zarr writes it
        part = flat[i * step:(i + 1) * step].tobytes()
        crcs[i] = crc32c(part + bytes(step - len(part)))
    c = group.create_array("crc/" + path, shape=(1, n * 4), chunks=(1, n * 4), shards=(1, n * 4), dtype="uint8",
                           compressors=None, filters=None, fill_value=0)
    c[:] = crcs.view(np.uint8).reshape(1, -1)


def commit_group(store_path: Path, partial: Path, key: str, attrs: dict) -> None:
    """Put a finished part of a store in place: `partial` renamed to STORE/KEY, then attributes["edge"][KEY]
    written by an atomic rename of zarr.json (the commit point: before it the store loads as it was)."""
    import shutil

    final = store_path / key
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    write_attrs(store_path, key, attrs)


def write_attrs(store_path: Path, key: str, attrs: dict | None) -> None:
    """attributes["edge"][KEY] = attrs (None: removed), by an atomic rename of zarr.json."""
    meta_path = Path(store_path) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    if attrs is None:
        meta["attributes"]["edge"].pop(key, None)
    else:
        meta["attributes"]["edge"][key] = attrs
    tmp = meta_path.with_name("zarr.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_path)


def _write_tokenizer(src, dst: Path) -> None:
    """The source's metadata with no tensors: llama.cpp's tokenizer loads it (vocab_only)."""
    import gguf

    if not isinstance(src, GGUFFile):
        src.write_tokenizer(dst)
        return
    w = gguf.GGUFWriter(dst, arch=src.config.arch)
    copy_fields(src.fields(), w)
    finish(w)


def default_cluster(down: Tensor, gate: Tensor, target: int | None = None) -> int:
    """Neurons per bundle: a whole number of down's blocks, grown until a bundle is >= `target` bytes: from
    this machine's saved flash curve (`edge probe-flash`: the smallest read reaching half the best throughput
    with 4 readers), else 32 KiB (on the curve probed here, reads of 32-64 KiB reach a third or more of the
    sequential bandwidth with a few threads)."""
    if target is None:
        from edge.profile import bundle_target

        target = bundle_target() or 32 << 10
    fmt = quants.FORMATS[down.type_id]
    cluster = fmt.block_size

    def size(c: int) -> int:
        lay = bundle_layout(gate, gate, down, c)
        return lay["gate_bytes"] * 2 + lay["down_bytes"]

    while gate.rows % (cluster * 2) == 0 and size(cluster) < target:
        cluster *= 2
    return cluster


QUANTS = {"keep": None, "q8_0": quants.Q8_0, "q4_0": quants.Q4_0, "q4_1": quants.Q4_1, "q5_0": quants.Q5_0,
          "q5_1": quants.Q5_1, "f16": quants.F16}


def requantize(t: Tensor, type_id: int | None) -> Tensor:
    """The tensor in another GGML type (gguf's reference quantizer); 1-D tensors (norms) stay as they are."""
    if type_id is None or type_id == t.type_id or len(t.shape) < 2:
        return t
    import gguf

    fmt = quants.FORMATS[type_id]
    if t.cols % fmt.block_size:
        return t
    w = quants.dequantize(t.raw, t.type_id, t.cols)
    raw = gguf.quantize(w, gguf.GGMLQuantizationType(type_id)).view(np.uint8).reshape(t.rows, -1)
    return Tensor(t.name, type_id, t.shape, raw)


def _requantize_experts(t: Tensor, type_id: int | None) -> Tensor:
    """A 3-D expert tensor (n, rows, cols) requantized expert by expert."""
    if type_id is None or type_id == t.type_id:
        return t
    n, rows, cols = t.shape
    parts = [requantize(Tensor(t.name, t.type_id, (rows, cols), t.raw[e * rows:(e + 1) * rows]), type_id)
             for e in range(n)]
    return Tensor(t.name, parts[0].type_id, t.shape, np.concatenate([p.raw for p in parts]))


def convert(src_path: str | Path, out: str | Path | None = None, cluster: int | None = None,
            quiet: bool = False, quant: str = "keep", tokenizer_pre: str = "default", device: str | None = None,
            on_progress=None) -> Path:
    import zarr
    from zarr.storage import LocalStore

    if quant not in QUANTS:
        raise EdgeError(f"--quant {quant}: unknown; choose one of {', '.join(QUANTS)}")
    target = QUANTS[quant]
    src_path = Path(src_path)
    if src_path.is_dir():
        from weights_tools.hf import HFSource

        src = HFSource(src_path, tokenizer_pre)
        source_files = src.source_files()
    else:
        src, source_files = GGUFFile(src_path), [src_path]
    cfg = src.config
    out = Path(out) if out else src_path.with_suffix(".edge")
    if out.exists():
        raise EdgeError(f"{out}: already exists; remove it or give another -o")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a stale, interrupted conversion: start over
    names = src.tensor_names()
    ffn = {n for n in names if ffn_part(n) or expert_part(n)}
    from edge.profile import bundle_target

    bundle_bytes = bundle_target(device) or 32 << 10  # from the --device's or this machine's flash curve
    progress = Progress(sum(src.tensor(n).nbytes for n in names), len(names), quiet, on_progress)
    try:
        partial.mkdir(parents=True)
        group = zarr.create_group(LocalStore(partial))
        tensors = {}
        for name in names:
            if name in ffn:
                continue
            t = requantize(src.tensor(name), target)
            row_bytes = t.raw.shape[1]
            chunk = 8 << 10 if name == "token_embd.weight" else CHUNK_TARGET
            write_array(group, "t/" + name, t.raw, max(1, min(t.rows, chunk // max(1, row_bytes))))
            tensors[name] = {"type": t.type_id, "shape": list(t.shape)}
            progress.step(t.nbytes, name)
        layouts, experts = [], []
        for i in range(cfg.n_layers if cfg.n_experts else 0):
            parts = [_requantize_experts(src.tensor(f"blk.{i}.{n}.weight"), target) for n in EXPERT_NAMES]
            experts.append(expert_layout(*parts, cfg.n_experts))
            records = np.concatenate([t.raw.reshape(cfg.n_experts, -1) for t in parts], axis=1)
            write_array(group, f"experts/blk.{i}", records, 1)
            for t in parts:
                progress.step(t.nbytes, t.name)
        for i in range(0 if cfg.n_experts else cfg.n_layers):
            gate, up, down = (requantize(src.tensor(f"blk.{i}.{n}.weight"), target) for n in FFN_NAMES)
            c = cluster or default_cluster(down, gate, bundle_bytes)
            fmt = quants.FORMATS[down.type_id]
            if c % fmt.block_size or gate.rows % c:
                raise EdgeError(f"--cluster {c}: must divide {gate.rows} neurons and be a multiple of the down "
                                f"projection's {fmt.name} block of {fmt.block_size}")
            layouts.append(bundle_layout(gate, up, down, c))  # per layer: mixed quants (Q4_K_M) differ
            n = gate.rows // c
            down_blocks = down.raw.reshape(down.rows, n, -1).transpose(1, 0, 2).reshape(n, -1)
            bundles = np.concatenate([gate.raw.reshape(n, -1), up.raw.reshape(n, -1), down_blocks], axis=1)
            write_array(group, f"ffn/blk.{i}", bundles, 1)
            for t in (gate, up, down):
                progress.step(t.nbytes, t.name)
        _write_tokenizer(src, partial / "tokenizer.gguf")
        attrs = {
            "format_version": FORMAT_VERSION,
            "config": dataclasses.asdict(cfg),
            "tensors": tensors,
            "ffn": layouts,
            **({"experts": experts} if experts else {}),
            "name": src.metadata.get("general.name") or src_path.stem,
            "chat_template": src.chat_template,
            "quant": quant,
            "source": {
                "file": src_path.name,
                "sha256": _sha256(source_files),
                "bytes": sum(f.stat().st_size for f in source_files),
            },
        }
        progress.check()
        group.attrs["edge"] = attrs  # written last: a store without it does not open
        partial.rename(out)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            need = format_size(sum(f.stat().st_size for f in source_files))
            raise EdgeError(f"{out}: disk full while converting (needs about {need} free); free space and "
                            "run again") from None
        raise EdgeError(f"{out}: cannot write the store ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        progress.close()
    return out
