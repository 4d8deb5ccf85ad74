"""llama.cpp's own CPU kernels (ggml, shipped inside llama-cpp-python) for quantized matrix products.

The weights stay in the GGML block format the file or store holds (Q4_1, Q4_K, Q6_K, ...), in numpy buffers we
own and may rewrite in place (the neuron cache); ggml multiplies them with activations it quantizes to Q8 the
way llama.cpp does. Each call builds a tiny graph of `ggml_mul_mat` nodes over our buffers (no_alloc: ggml
owns no tensor memory) and runs it on one persistent ggml thread pool.

Only the C ABI is used: functions exported by libggml-base / libggml-cpu and three structs from ggml.h and
ggml-cpu.h (init params, thread pool params, compute plan). The offset of `data` in `struct ggml_tensor` is
found at start by asking ggml where it put one tensor's data, not assumed.
"""

from __future__ import annotations

import ctypes
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from edge.errors import EdgeError

F32 = 0
MAX_N_THREADS = 512
GRAPH_NODES = 512  # mul_mat nodes one computation may hold (a layer's streamed clusters are one node each)


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _ThreadpoolParams(ctypes.Structure):
    _fields_ = [("cpumask", ctypes.c_bool * MAX_N_THREADS), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


class _Cplan(ctypes.Structure):
    _fields_ = [("work_size", ctypes.c_size_t), ("work_data", ctypes.c_void_p), ("n_threads", ctypes.c_int),
                ("threadpool", ctypes.c_void_p), ("abort_callback", ctypes.c_void_p),
                ("abort_callback_data", ctypes.c_void_p), ("use_ref", ctypes.c_bool)]


def _library_dir() -> Path:
    spec = find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeError("llama-cpp-python is not installed; run `make` or `pip install llama-cpp-python`")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def _load(name: str) -> ctypes.CDLL:
    d = _library_dir()
    ext = {"darwin": "dylib", "win32": "dll"}.get(sys.platform, "so")
    for cand in (d / f"lib{name}.{ext}", d / f"{name}.{ext}"):
        if cand.exists():
            return ctypes.CDLL(str(cand), mode=ctypes.RTLD_GLOBAL)
    raise EdgeError(f"{d}: no {name} library in llama-cpp-python; reinstall it")


class Weight:
    """A matrix in GGML blocks: `rows` x `cols`, row r at byte offset + r * row_stride of `buf` (a numpy array or
    a writable buffer we own). With batches > 1, a stack of such matrices `batch_stride` bytes apart, multiplied
    by an input of shape (batches, T, cols)."""

    __slots__ = ("buf", "address", "type_id", "rows", "cols", "row_stride", "offset", "batches", "batch_stride")

    def __init__(self, buf, type_id: int, rows: int, cols: int, row_stride: int | None = None,
                 offset: int = 0, batches: int = 1, batch_stride: int = 0):
        from edge import quants

        self.buf, self.type_id, self.rows, self.cols = buf, type_id, rows, cols
        self.row_stride = row_stride or quants.FORMATS[type_id].row_bytes(cols)
        self.offset, self.batches, self.batch_stride = offset, batches, batch_stride
        arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
        self.address = arr.ctypes.data + offset
        end = offset + (batches - 1) * batch_stride + (rows - 1) * self.row_stride + quants.FORMATS[type_id].row_bytes(cols)
        if end > arr.nbytes:
            raise ValueError("weight extends past its buffer")


class Ggml:
    def __init__(self, threads: int):
        base, cpu = _load("ggml-base"), _load("ggml-cpu")
        self._base, self._cpu = base, cpu
        vp, i64, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
        sig = {
            (base, "ggml_init"): (vp, [_InitParams]), (base, "ggml_free"): (None, [vp]),
            (base, "ggml_new_tensor_2d"): (vp, [vp, ctypes.c_int, i64, i64]),
            (base, "ggml_view_2d"): (vp, [vp, vp, i64, i64, sz, sz]),
            (base, "ggml_new_tensor_1d"): (vp, [vp, ctypes.c_int, i64]),
            (base, "ggml_new_tensor_3d"): (vp, [vp, ctypes.c_int, i64, i64, i64]),
            (base, "ggml_view_3d"): (vp, [vp, vp, i64, i64, i64, sz, sz, sz]),
            (base, "ggml_mul_mat"): (vp, [vp, vp, vp]),
            (base, "ggml_new_graph_custom"): (vp, [vp, sz, ctypes.c_bool]),
            (base, "ggml_build_forward_expand"): (None, [vp, vp]),
            (base, "ggml_tensor_overhead"): (sz, []), (base, "ggml_graph_overhead_custom"): (sz, [sz, ctypes.c_bool]),
            (base, "ggml_get_data"): (vp, [vp]),
            (cpu, "ggml_graph_plan"): (_Cplan, [vp, ctypes.c_int, vp]),
            (cpu, "ggml_graph_compute"): (ctypes.c_int, [vp, ctypes.POINTER(_Cplan)]),
            (cpu, "ggml_threadpool_new"): (vp, [ctypes.POINTER(_ThreadpoolParams)]),
            (cpu, "ggml_threadpool_free"): (None, [vp]),
            (cpu, "ggml_cpu_init"): (None, []),
        }
        for (lib, name), (res, args) in sig.items():
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
            setattr(self, name, f)
        self.ggml_cpu_init()
        self.threads = threads
        params = _ThreadpoolParams()
        params.n_threads, params.prio, params.poll = threads, 0, 0  # no spinning between calls
        self._pool = self.ggml_threadpool_new(ctypes.byref(params))
        self._meta_size = (4 * GRAPH_NODES * self.ggml_tensor_overhead()
                           + self.ggml_graph_overhead_custom(GRAPH_NODES, False) + 4096)
        self._meta = np.zeros(self._meta_size, np.uint8)
        self._work = np.zeros(1 << 20, np.uint8)
        self._data_offset = self._find_data_offset()

    def _find_data_offset(self) -> int:
        buf = np.zeros(4 * self.ggml_tensor_overhead() + 4096, np.uint8)
        ctx = self.ggml_init(_InitParams(buf.nbytes, buf.ctypes.data, False))
        try:
            t = self.ggml_new_tensor_2d(ctx, F32, 4, 1)
            want = self.ggml_get_data(t)
            raw = (ctypes.c_uint64 * 64).from_address(t)
            for i in range(64):
                if raw[i] == want:
                    return 8 * i
        finally:
            self.ggml_free(ctx)
        raise EdgeError("cannot locate the data pointer in ggml's tensor struct (unexpected ggml version)")

    def _set_data(self, tensor: int, address: int) -> None:
        ctypes.c_uint64.from_address(tensor + self._data_offset).value = address

    def matmul(self, x: np.ndarray, weights: list[Weight]) -> list[np.ndarray]:
        """[x @ W.T for W in weights]: x (T, cols) float32 -> (T, rows) float32 each, one graph computation."""
        return self.products([(x, w) for w in weights])

    def products(self, pairs: list[tuple[np.ndarray, Weight]]) -> list[np.ndarray]:
        """[x @ W.T for x, W in pairs] in one graph computation (inputs shared by identity are given once)."""
        inputs: dict[int, np.ndarray] = {}
        for x, _ in pairs:
            if id(x) not in inputs:
                inputs[id(x)] = np.ascontiguousarray(x if x.ndim >= 2 else x[None], dtype=np.float32)
        outs = [np.empty(inputs[id(x)].shape[:-1] + (w.rows,), np.float32) for x, w in pairs]
        ctx = self.ggml_init(_InitParams(self._meta_size, self._meta.ctypes.data, True))
        try:
            tensors = {}
            for key, x in inputs.items():
                if x.ndim == 3:
                    tensors[key] = self.ggml_new_tensor_3d(ctx, F32, x.shape[2], x.shape[1], x.shape[0])
                else:
                    tensors[key] = self.ggml_new_tensor_2d(ctx, F32, x.shape[1], x.shape[0])
                self._set_data(tensors[key], x.ctypes.data)
            graph = self.ggml_new_graph_custom(ctx, GRAPH_NODES, False)
            for (x, w), out in zip(pairs, outs):
                xin = inputs[id(x)]
                if w.cols != xin.shape[-1] or (w.batches > 1) != (xin.ndim == 3):
                    raise ValueError(f"weight ({w.batches} x {w.rows} x {w.cols}) does not fit input {xin.shape}")
                full = self._full_cols(w)
                if w.batches > 1:  # a strided stack: a flat base tensor and a 3-D view of it
                    from edge import quants

                    fmt = quants.FORMATS[w.type_id]
                    span = (w.batches - 1) * w.batch_stride + w.rows * w.row_stride
                    base = self.ggml_new_tensor_1d(ctx, w.type_id, -(-span // fmt.block_bytes) * fmt.block_size)
                    self._set_data(base, w.address)
                    wt = self.ggml_view_3d(ctx, base, w.cols, w.rows, w.batches, w.row_stride, w.batch_stride, 0)
                else:
                    wt = self.ggml_new_tensor_2d(ctx, w.type_id, full, w.rows)
                    self._set_data(wt, w.address)
                    if full != w.cols:  # the first `cols` of longer rows (the down cache's used prefix)
                        wt = self.ggml_view_2d(ctx, wt, w.cols, w.rows, w.row_stride, 0)
                y = self.ggml_mul_mat(ctx, wt, tensors[id(x)])
                self._set_data(y, out.ctypes.data)
                self.ggml_build_forward_expand(graph, y)
            plan = self.ggml_graph_plan(graph, self.threads, self._pool)
            if plan.work_size > self._work.nbytes:
                self._work = np.zeros(plan.work_size, np.uint8)
            plan.work_data = self._work.ctypes.data
            status = self.ggml_graph_compute(graph, ctypes.byref(plan))
            if status != 0:
                raise EdgeError(f"ggml graph computation failed (status {status})")
        finally:
            self.ggml_free(ctx)
        return outs

    @staticmethod
    def _full_cols(w: Weight) -> int:
        from edge import quants

        fmt = quants.FORMATS[w.type_id]
        if w.batches > 1:
            return w.cols
        if w.row_stride % fmt.block_bytes:
            raise ValueError("row stride is not a whole number of blocks")
        return w.row_stride // fmt.block_bytes * fmt.block_size


_INSTANCES: dict[int, Ggml] = {}


def ggml(threads: int) -> Ggml:
    """The process's ggml runtime for this many threads (one thread pool each; idle pools sleep)."""
    if threads not in _INSTANCES:
        _INSTANCES[threads] = Ggml(threads)
    return _INSTANCES[threads]
