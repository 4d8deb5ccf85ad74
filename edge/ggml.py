"""llama.cpp's own kernels (ggml, shipped inside llama-cpp-python) for quantized matrix products: the CPU's on
buffers we own (`Ggml`), and any device of ggml's backend registry on weights uploaded to it (`Accelerator`,
for `--gpu`: CUDA, Vulkan or Metal in a build that has them, edge.offload).

The weights stay in the GGML block format the file or store holds (Q4_1, Q4_K, Q6_K, ...), in numpy buffers we
own and may rewrite in place (the neuron cache); ggml multiplies them with activations it quantizes to Q8 the
way llama.cpp does. Each call builds a tiny graph of `ggml_mul_mat` nodes over our buffers (no_alloc: ggml
owns no tensor memory) and runs it on the CPU device of ggml's backend registry (`ggml_backend_dev_by_type`,
`ggml_backend_graph_compute`: the path CUDA, Vulkan and Metal devices take too), with one persistent ggml
thread pool that does not spin between calls.

Only the C ABI is used: functions exported by libggml / libggml-base / libggml-cpu and two structs from ggml.h
and ggml-cpu.h (init params, thread pool params). The offset of `data` in `struct ggml_tensor` is found at start
by asking ggml where it put one tensor's data, not assumed.
"""

from __future__ import annotations

import ctypes
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from edge import quants
from edge.errors import EdgeError

F32 = 0
MAX_N_THREADS = 512
GRAPH_NODES = 512  # mul_mat nodes one computation may hold (a layer's streamed clusters are one node each)
GRAPH_CACHE = 640 << 10  # bytes of kept graphs (Ggml.products); a decode step of SmolLM2 keeps 527KB (120 graphs)
GRAPH_ROWS = 16384  # kept graphs' inputs and outputs, each at most this many floats (not a head's logits)


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _ThreadpoolParams(ctypes.Structure):
    _fields_ = [("cpumask", ctypes.c_bool * MAX_N_THREADS), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


DEVICE_CPU = 0  # enum ggml_backend_dev_type


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

    __slots__ = ("buf", "address", "type_id", "rows", "cols", "row_stride", "offset", "batches", "batch_stride",
                 "full_cols", "block_elements")

    def __init__(self, buf, type_id: int, rows: int, cols: int, row_stride: int | None = None,
                 offset: int = 0, batches: int = 1, batch_stride: int = 0):
        fmt = quants.FORMATS[type_id]
        self.buf, self.type_id, self.rows, self.cols = buf, type_id, rows, cols
        self.row_stride = row_stride or fmt.row_bytes(cols)
        self.offset, self.batches, self.batch_stride = offset, batches, batch_stride
        arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
        self.address = arr.ctypes.data + offset
        end = offset + (batches - 1) * batch_stride + (rows - 1) * self.row_stride + fmt.row_bytes(cols)
        if end > arr.nbytes:
            raise ValueError("weight extends past its buffer")
        # the row length ggml is told: the stride in elements (a view takes the first `cols` of longer rows)
        if batches > 1:
            self.full_cols = cols
        elif self.row_stride % fmt.block_bytes:
            raise ValueError("row stride is not a whole number of blocks")
        else:
            self.full_cols = self.row_stride // fmt.block_bytes * fmt.block_size
        self.block_elements = (
            -(-((batches - 1) * batch_stride + rows * self.row_stride) // fmt.block_bytes) * fmt.block_size
        )

    @classmethod
    def of(cls, t) -> "Weight":
        """A stored tensor (edge.gguf_file.Tensor) as a weight over its bytes (a contiguous copy where they are
        not)."""
        return cls(np.ascontiguousarray(t.raw), t.type_id, t.rows, t.cols)


def _distinct_inputs(pairs: list[tuple]) -> tuple[dict[int, int], list[np.ndarray]]:
    """The inputs of (x, weight) pairs, each once (by identity), and each input's place among them."""
    slot: dict[int, int] = {}
    xs: list[np.ndarray] = []
    for x, _ in pairs:
        if id(x) not in slot:
            slot[id(x)] = len(xs)
            xs.append(x)
    return slot, xs


class Ggml:
    def __init__(self, threads: int):
        base, cpu, reg = _load("ggml-base"), _load("ggml-cpu"), _load("ggml")
        self._base, self._cpu, self._reg = base, cpu, reg
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
            (base, "ggml_soft_max_ext"): (vp, [vp, vp, vp, ctypes.c_float, ctypes.c_float]),
            (base, "ggml_cont"): (vp, [vp, vp]), (base, "ggml_transpose"): (vp, [vp, vp]),
            (reg, "ggml_backend_dev_by_type"): (vp, [ctypes.c_int]),
            (base, "ggml_backend_dev_init"): (vp, [vp, ctypes.c_char_p]),
            (base, "ggml_backend_dev_name"): (ctypes.c_char_p, [vp]),
            (base, "ggml_backend_graph_compute"): (ctypes.c_int, [vp, vp]),
            (cpu, "ggml_backend_cpu_set_n_threads"): (None, [vp, ctypes.c_int]),
            (cpu, "ggml_backend_cpu_set_threadpool"): (None, [vp, vp]),
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
        device = self.ggml_backend_dev_by_type(DEVICE_CPU)
        self._backend = self.ggml_backend_dev_init(device, None) if device else None
        if not self._backend:
            raise EdgeError("ggml's backend registry has no CPU device (an unexpected llama-cpp-python build); "
                            "reinstall it")
        self.device = self.ggml_backend_dev_name(device).decode()
        self.ggml_backend_cpu_set_n_threads(self._backend, threads)
        self.ggml_backend_cpu_set_threadpool(self._backend, self._pool)
        self._meta_size = (4 * GRAPH_NODES * self.ggml_tensor_overhead()
                           + self.ggml_graph_overhead_custom(GRAPH_NODES, False) + 4096)
        self._meta = np.zeros(self._meta_size, np.uint8)
        self._meta_address = self._meta.ctypes.data
        self._graphs: dict[tuple, Graph] = {}  # insertion order: least recently used first
        self._graph_bytes = 0
        self._clock = 0
        self._graph_in = np.zeros(GRAPH_ROWS, np.float32)  # every kept graph's inputs, and outputs
        self._graph_out = np.zeros(GRAPH_ROWS, np.float32)
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

    def matmul(self, x: np.ndarray, weights: list[Weight], keep: bool = True) -> list[np.ndarray]:
        """[x @ W.T for W in weights]: x (T, cols) float32 -> (T, rows) float32 each, one graph computation."""
        return self.products([(x, w) for w in weights], keep)

    def products(self, pairs: list[tuple[np.ndarray, Weight]], keep: bool = True) -> list[np.ndarray]:
        """[x @ W.T for x, W in pairs] in one graph computation (inputs shared by identity are given once).

        One token's products (inputs of one position) run a graph built once for these weights and kept
        (`Graph`): the inputs are copied in, the outputs copied out. A decode step makes ~120
        such calls; building each graph anew (~15 ctypes calls) cost ~40us of Python apiece (15 instead of 43us
        per call of a tiny product here). keep=False: weights that will not be seen again (rows just read)."""
        slot, xs = _distinct_inputs(pairs)
        if keep and all(x.ndim == 1 or x.shape[-2] == 1 for x in xs):
            shapes = [x.shape if x.ndim >= 2 else (1,) + x.shape for x in xs]
            key = (tuple(shapes), tuple((slot[id(x)], w.address, w.type_id, w.rows, w.cols, w.row_stride, w.batches,
                                         w.batch_stride) for x, w in pairs))
            g = self._kept(key, shapes, [(slot[id(x)], w) for x, w in pairs])
            if g is not None:
                for buf, x in zip(g.inputs, xs):
                    buf[...] = x.reshape(buf.shape)
                self._compute(g.graph)
                return [o.copy() for o in g.outputs]
        inputs = [np.ascontiguousarray(x if x.ndim >= 2 else x[None], dtype=np.float32) for x in xs]
        outs = [np.empty(inputs[slot[id(x)]].shape[:-1] + (w.rows,), np.float32) for x, w in pairs]
        ctx = self.ggml_init(_InitParams(self._meta_size, self._meta_address, True))
        try:
            graph = self._build(ctx, GRAPH_NODES, inputs, [(slot[id(x)], w) for x, w in pairs], outs)
            self._compute(graph)
        finally:
            self.ggml_free(ctx)
        return outs

    def _build(self, ctx: int, size: int, inputs: list[np.ndarray], pairs: list[tuple[int, Weight]],
               outs: list[np.ndarray]) -> int:
        """A graph in ctx of inputs[k] @ W.T into outs, for (k, W) in pairs, over the arrays' own memory."""
        new_1d, new_2d, view_2d, view_3d = (self.ggml_new_tensor_1d, self.ggml_new_tensor_2d, self.ggml_view_2d,
                                            self.ggml_view_3d)
        mul_mat, expand, set_data = self.ggml_mul_mat, self.ggml_build_forward_expand, self._set_data
        tensors = []
        for x in inputs:
            if x.ndim == 3:
                tensors.append(self.ggml_new_tensor_3d(ctx, F32, x.shape[2], x.shape[1], x.shape[0]))
            else:
                tensors.append(new_2d(ctx, F32, x.shape[1], x.shape[0]))
            set_data(tensors[-1], x.ctypes.data)
        graph = self.ggml_new_graph_custom(ctx, size, False)
        for (k, w), out in zip(pairs, outs):
            x = inputs[k]
            if w.cols != x.shape[-1] or (w.batches > 1) != (x.ndim == 3):
                raise ValueError(f"weight ({w.batches} x {w.rows} x {w.cols}) does not fit input {x.shape}")
            if w.batches > 1:  # a strided stack: a flat base tensor and a 3-D view of it
                base = new_1d(ctx, w.type_id, w.block_elements)
                set_data(base, w.address)
                wt = view_3d(ctx, base, w.cols, w.rows, w.batches, w.row_stride, w.batch_stride, 0)
            else:
                wt = new_2d(ctx, w.type_id, w.full_cols, w.rows)
                set_data(wt, w.address)
                if w.full_cols != w.cols:  # the first `cols` of longer rows (the down cache's used prefix)
                    wt = view_2d(ctx, wt, w.cols, w.rows, w.row_stride, 0)
            y = mul_mat(ctx, wt, tensors[k])
            set_data(y, out.ctypes.data)
            expand(graph, y)
        return graph

    def _compute(self, graph: int) -> None:
        self.compute_on(self._backend, graph)

    def compute_on(self, backend: int, graph: int) -> None:
        """Run a graph on a backend (the CPU's, or an Accelerator's)."""
        status = self.ggml_backend_graph_compute(backend, graph)
        if status != 0:
            raise EdgeError(f"ggml graph computation failed (status {status})")

    def _kept(self, key: tuple, shapes: list[tuple], pairs: list[tuple[int, Weight]]) -> "Graph | None":
        """The kept graph for these products, built if there is room (None if not: built and freed per call).

        Room: GRAPH_CACHE bytes, made by dropping graphs unused for twice as many calls as are kept (a decode
        step's graphs recur every step; those of weights that changed, such as a neuron cache's used prefix
        as it fills, do not). A model whose step needs more than fits keeps what fits, not a cycle of misses."""
        self._clock += 1
        g = self._graphs.pop(key, None)
        if g is None:
            if not Graph.fits(shapes, pairs):
                return None  # a large product (a head): building its graph is a small part of its time
            nbytes = Graph.bytes_for(self, shapes, pairs)
            while self._graph_bytes + nbytes > GRAPH_CACHE and self._graphs:
                oldest = next(iter(self._graphs))
                if self._graphs[oldest].last >= self._clock - 2 * len(self._graphs):
                    return None
                self._graph_bytes -= self._graphs.pop(oldest).close()
            if self._graph_bytes + nbytes > GRAPH_CACHE:
                return None
            g = Graph(self, shapes, pairs)
            self._graph_bytes += g.nbytes
        g.last = self._clock
        self._graphs[key] = g  # most recently used last
        return g


class Graph:
    """A kept graph of one position's products: its own ggml context (tensor and graph metadata, ~4KB).
    Inputs and outputs live in the runtime's two GRAPH_ROWS buffers, shared by every kept graph (one computes
    at a time; its outputs are copied out at once)."""

    def __init__(self, gg: Ggml, shapes: list[tuple], pairs: list[tuple[int, Weight]]):
        self.gg, self.last = gg, 0
        self.inputs = self._views(gg._graph_in, shapes)
        self.outputs = self._views(gg._graph_out, self._out_shapes(shapes, pairs))
        size = self._size(shapes, pairs)
        self.meta = np.zeros(self.bytes_for(gg, shapes, pairs), np.uint8)
        self.ctx = gg.ggml_init(_InitParams(self.meta.nbytes, self.meta.ctypes.data, True))
        self.graph = gg._build(self.ctx, size, self.inputs, pairs, self.outputs)
        self.nbytes = self.meta.nbytes

    @staticmethod
    def _out_shapes(shapes: list[tuple], pairs: list) -> list[tuple]:
        return [shapes[k][:-1] + (w.rows,) for k, w in pairs]

    @staticmethod
    def _views(buf: np.ndarray, shapes: list[tuple]) -> list[np.ndarray]:
        sizes = [int(np.prod(s)) for s in shapes]
        at = np.cumsum([0] + sizes)
        return [buf[a:a + n].reshape(s) for a, n, s in zip(at, sizes, shapes)]

    @classmethod
    def fits(cls, shapes: list[tuple], pairs: list) -> bool:
        return (sum(int(np.prod(s)) for s in shapes) <= GRAPH_ROWS
                and sum(int(np.prod(s)) for s in cls._out_shapes(shapes, pairs)) <= GRAPH_ROWS)

    @staticmethod
    def _size(shapes: list[tuple], pairs: list) -> int:
        return 2 * len(pairs) + len(shapes) + 8  # nodes: products and views; leafs: inputs and weights

    @classmethod
    def bytes_for(cls, gg: Ggml, shapes: list[tuple], pairs: list) -> int:
        return ((len(shapes) + 3 * len(pairs)) * gg.ggml_tensor_overhead()
                + gg.ggml_graph_overhead_custom(cls._size(shapes, pairs), False) + 256)

    def close(self) -> int:
        self.gg.ggml_free(self.ctx)
        return self.nbytes


DEVICE_KINDS = {0: "CPU", 1: "GPU", 2: "integrated GPU", 3: "accelerator"}  # enum ggml_backend_dev_type
DEVICE_TENSOR = 64 << 20  # an activation on a device at most (Vulkan drivers may bind no more than 128MB at once:
                          # Mesa's lavapipe, many phones; larger outputs came back wrong past that)


class DeviceWeight:
    """A matrix uploaded to an `Accelerator`'s memory: `rows` x `cols` in GGML blocks of `type_id`. Its upload's
    buffer is freed when the last weight of that upload goes (`owner`)."""

    __slots__ = ("tensor", "type_id", "rows", "cols", "nbytes", "owner")

    def __init__(self, tensor: int, type_id: int, rows: int, cols: int, nbytes: int, owner: "_Upload"):
        self.tensor, self.type_id, self.rows, self.cols, self.nbytes = tensor, type_id, rows, cols, nbytes
        self.owner = owner


class _Upload:
    """One upload's device buffer and tensor metadata; frees them (and the kept graphs over its tensors) when
    its weights are gone."""

    def __init__(self, acc: "Accelerator", buf: int, nbytes: int, meta: np.ndarray, ctx: int, tensors: list[int]):
        self.acc, self.buf, self.nbytes, self.meta, self.ctx = acc, buf, nbytes, meta, ctx
        self.tensors = frozenset(tensors)

    def __del__(self):
        try:
            self.acc.release(self)
        except Exception:  # the interpreter is shutting down: the libraries may be gone already
            pass


class Accelerator:
    """A compute device of ggml's backend registry (CUDA, Vulkan, Metal; the CPU's too, which tests the path
    without a GPU) holding weights in its own memory: `upload` copies matrices there once
    (`ggml_backend_alloc_ctx_tensors`, `ggml_backend_tensor_set`); `products` multiplies them by activations
    copied in and out per call, through graphs kept per set of products like the CPU's (`Graph`).

    The device's memory in use is `used` bytes: the uploaded weights and the kept graphs' inputs and outputs
    (not what its driver keeps for itself: a CUDA context takes ~300MB more)."""

    def __init__(self, name: str, threads: int):
        """name: a device as ggml's registry names it (`devices()`: CUDA0, Vulkan0, CPU)."""
        gg = ggml(threads)  # the CPU runtime: the C functions, loaded once, and the CPU's thread pool
        self.gg = gg
        base = gg._base
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        for fname, res, args in (
                ("ggml_backend_alloc_ctx_tensors", vp, [vp, vp]), ("ggml_backend_buffer_get_size", sz, [vp]),
                ("ggml_backend_buffer_free", None, [vp]), ("ggml_backend_tensor_set", None, [vp, vp, sz, sz]),
                ("ggml_backend_tensor_get", None, [vp, vp, sz, sz]), ("ggml_nbytes", sz, [vp]),
                ("ggml_backend_graph_compute_async", ctypes.c_int, [vp, vp]),
                ("ggml_backend_synchronize", None, [vp]), ("ggml_backend_get_default_buffer_type", vp, [vp]),
                ("ggml_gallocr_new", vp, [vp]), ("ggml_gallocr_alloc_graph", ctypes.c_bool, [vp, vp]),
                ("ggml_gallocr_get_buffer_size", sz, [vp, ctypes.c_int]), ("ggml_gallocr_free", None, [vp]),
                ("ggml_backend_free", None, [vp]),
                ("ggml_set_input", None, [vp]), ("ggml_set_output", None, [vp])):
            f = getattr(base, fname)
            f.restype, f.argtypes = res, args
            setattr(self, fname, f)
        found = [d for d in devices() if d[0] == name]
        if not found:
            raise EdgeError(f"--gpu {name}: no such device in this build of llama-cpp-python")
        self.name, self.description, self.kind, self.memory = found[0]
        self.used = 0  # bytes of its memory in use: uploads, kept graphs, scratch buffers
        self.main = Compute(self)  # the products' backend: uploads, kept graphs, a prompt's products
        self.backend = self.main.backend
        self._graphs: dict[tuple, _DeviceGraph] = {}

    def upload(self, weights: list[Weight]) -> list[DeviceWeight]:
        """Copies of these matrices (whole rows: no views) in the device's memory, in one buffer."""
        gg = self.gg
        meta = np.zeros((len(weights) + 2) * gg.ggml_tensor_overhead(), np.uint8)
        ctx = gg.ggml_init(_InitParams(meta.nbytes, meta.ctypes.data, True))
        tensors = []
        for w in weights:
            if w.batches > 1 or w.full_cols != w.cols:
                raise ValueError("only whole matrices go to a device")
            tensors.append(gg.ggml_new_tensor_2d(ctx, w.type_id, w.cols, w.rows))
        buf, nbytes = self.allocate(ctx, f"{sum(w.rows * w.row_stride for w in weights)} bytes of weights")
        owner = _Upload(self, buf, nbytes, meta, ctx, tensors)
        out = []
        for w, t in zip(weights, tensors):
            n = self.ggml_nbytes(t)
            self.ggml_backend_tensor_set(t, w.address, 0, n)
            out.append(DeviceWeight(t, w.type_id, w.rows, w.cols, n, owner))
        return out

    def allocate(self, ctx: int, what: str) -> tuple[int, int]:
        """(buffer, its bytes): the tensors of a context in the device's memory, counted in `used`; the context is
        freed and an EdgeError names `what` when they do not fit."""
        buf = self.ggml_backend_alloc_ctx_tensors(ctx, self.backend)
        if not buf:
            self.gg.ggml_free(ctx)
            raise EdgeError(f"--gpu {self.name}: out of device memory for {what}; lower --gpu-mem")
        nbytes = self.ggml_backend_buffer_get_size(buf)
        self.used += nbytes
        return buf, nbytes

    def release(self, upload: _Upload) -> None:
        """Free an upload (its weights are gone) and the kept graphs that multiply its tensors."""
        for key in [k for k in self._graphs if any(t in upload.tensors for _, t in k[1])]:
            g = self._graphs.pop(key)
            self.used -= g.nbytes
            g.close()
        self.ggml_backend_buffer_free(upload.buf)
        self.gg.ggml_free(upload.ctx)
        self.used -= upload.nbytes

    def products(self, pairs: list[tuple[np.ndarray, DeviceWeight]]) -> list[np.ndarray]:
        """[x @ W.T for x, W in pairs], x (T, cols) float32, on the device (inputs shared by identity are sent
        once). One position's graphs are kept; a prompt's are built and freed per call."""
        return self.submit(pairs)()

    def submit(self, pairs: list[tuple[np.ndarray, DeviceWeight]]):
        """`products`, started: the device computes while the caller goes on (the CPU's part of a layer); the
        returned function waits for it and gives the outputs. One submission at a time per device."""
        slot, xs = _distinct_inputs(pairs)
        xs = [np.ascontiguousarray(x if x.ndim == 2 else x[None], dtype=np.float32) for x in xs]
        widest = max([w.rows for _, w in pairs] + [x.shape[1] for x in xs])
        step = max(1, DEVICE_TENSOR // (4 * widest))  # positions per computation
        if any(len(x) > step for x in xs):  # a prompt's logits: in parts, concatenated
            parts = []
            for at in range(0, max(len(x) for x in xs), step):
                chunk = [x[at:at + step] for x in xs]
                parts.append(self.products([(chunk[slot[id(x)]], w) for x, w in pairs]))
            return lambda: [np.concatenate(outs) for outs in zip(*parts)]
        shapes = tuple(x.shape for x in xs)
        key = (shapes, tuple((slot[id(x)], w.tensor) for x, w in pairs))
        g = self._graphs.get(key)
        if g is None:
            keep = all(s[0] == 1 for s in shapes)
            g = _DeviceGraph(self, shapes, [(slot[id(x)], w) for x, w in pairs], keep)
            if keep:
                self._graphs[key] = g
        g.start(xs)

        def result() -> list[np.ndarray]:
            try:
                return g.finish()
            finally:
                if key not in self._graphs:
                    g.close()

        return result


F16 = 1


class DeviceKV:
    """Keys and values of every layer in a device's memory, float16 as llama.cpp keeps them (per layer, per kv
    head, n_ctx rows of head_dim), and attention computed there: the same `attend` as edge.model.KVCache. Only
    the new positions' keys and values go in, only the heads' outputs come out."""

    def __init__(self, acc: "Accelerator", n_layers: int, n_kv: int, n_ctx: int, head_dim: int):
        gg = acc.gg
        self.acc, self.n_kv = acc, n_kv
        self.row, self.plane = 2 * head_dim, 2 * head_dim * n_ctx  # bytes of one position, one head
        self.meta = np.zeros((2 * n_layers + 2) * gg.ggml_tensor_overhead(), np.uint8)
        self.ctx = gg.ggml_init(_InitParams(self.meta.nbytes, self.meta.ctypes.data, True))
        self.k = [gg.ggml_new_tensor_3d(self.ctx, F16, head_dim, n_ctx, n_kv) for _ in range(n_layers)]
        self.v = [gg.ggml_new_tensor_3d(self.ctx, F16, head_dim, n_ctx, n_kv) for _ in range(n_layers)]
        self.buffer, self.nbytes = acc.allocate(self.ctx, "the KV cache (or lower --ctx)")
        self._meta = np.zeros(16 * gg.ggml_tensor_overhead() + gg.ggml_graph_overhead_custom(16, False), np.uint8)
        self.compute = Compute(acc)  # a backend of its own (Compute)

    def __del__(self):
        try:
            self.compute.close()
            self.acc.ggml_backend_buffer_free(self.buffer)
            self.acc.gg.ggml_free(self.ctx)
            self.acc.used -= self.nbytes
        except Exception:  # the interpreter is shutting down
            pass

    def attend(self, i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, first: int,
               masked: np.ndarray | None) -> np.ndarray:
        """edge.model.KVCache.attend, on the device: a long prompt's queries in parts whose scores stay within
        DEVICE_TENSOR."""
        t, n_heads, _ = q.shape
        for cache, new in ((self.k[i], k), (self.v[i], v)):
            heads = np.ascontiguousarray(new.transpose(1, 0, 2), dtype=np.float16)  # (n_kv, T, hd)
            for h in range(heads.shape[0]):
                self.acc.ggml_backend_tensor_set(cache, heads[h].ctypes.data, h * self.plane + start * self.row,
                                                 heads[h].nbytes)
        step = max(1, DEVICE_TENSOR // (4 * n_heads * (start + t - first)))
        parts = []
        for a in range(0, t, step):
            end = start + min(t, a + step)  # the part's last query sees up to here
            parts.append(self._attend(i, q[a:a + step], first, end,
                                      None if masked is None else masked[a:a + step, :end - first]))
        return np.concatenate(parts)

    def _attend(self, i: int, q: np.ndarray, first: int, end: int, masked: np.ndarray | None) -> np.ndarray:
        """Queries q (T, n_heads, head_dim) over the cached positions first..end-1."""
        acc, gg = self.acc, self.acc.gg
        t, n_heads, hd = q.shape
        n_kv = self.n_kv
        span = end - first
        ctx = gg.ggml_init(_InitParams(self._meta.nbytes, self._meta.ctypes.data, True))
        try:
            qt = gg.ggml_new_tensor_3d(ctx, F32, hd, t, n_heads)
            keys = gg.ggml_view_3d(ctx, self.k[i], hd, span, n_kv, self.row, self.plane, first * self.row)
            values = gg.ggml_view_3d(ctx, self.v[i], hd, span, n_kv, self.row, self.plane, first * self.row)
            mask = gg.ggml_new_tensor_2d(ctx, F32, span, t) if masked is not None else None
            scores = gg.ggml_soft_max_ext(ctx, gg.ggml_mul_mat(ctx, keys, qt), mask, 1.0, 0.0)  # (heads, T, S)
            out = gg.ggml_mul_mat(ctx, gg.ggml_cont(ctx, gg.ggml_transpose(ctx, values)), scores)  # (heads, T, hd)
            graph = gg.ggml_new_graph_custom(ctx, 16, False)
            for t_in in (qt, mask) if mask else (qt,):
                acc.ggml_set_input(t_in)
            acc.ggml_set_output(out)
            gg.ggml_build_forward_expand(graph, out)
            self.compute.place(graph)
            qh = np.ascontiguousarray(q.transpose(1, 0, 2), dtype=np.float32)  # (heads, T, hd)
            acc.ggml_backend_tensor_set(qt, qh.ctypes.data, 0, qh.nbytes)
            if mask is not None:
                m = np.where(masked, np.float32(-np.inf), np.float32(0))
                acc.ggml_backend_tensor_set(mask, m.ctypes.data, 0, m.nbytes)
            self.compute.run(graph)
            result = np.empty((n_heads, t, hd), np.float32)
            acc.ggml_backend_tensor_get(out, result.ctypes.data, 0, result.nbytes)
        finally:
            gg.ggml_free(ctx)
        return result.transpose(1, 0, 2).reshape(t, n_heads * hd)


class Compute:
    """One instance of an Accelerator's device backend and the scratch buffer of the graphs it runs once.
    Attention (DeviceKV) has its own: sharing one Vulkan backend between its graphs and the products' corrupted
    memory on lavapipe (state the backend keeps between graphs), two instances of the device do not."""

    def __init__(self, acc: "Accelerator"):
        gg = acc.gg
        self.acc = acc
        self.backend = gg.ggml_backend_dev_init(_device_by_name(acc.name), None)
        if not self.backend:
            raise EdgeError(f"--gpu {acc.name}: ggml could not start the device")
        if acc.kind == "CPU":
            gg.ggml_backend_cpu_set_n_threads(self.backend, gg.threads)
            gg.ggml_backend_cpu_set_threadpool(self.backend, gg._pool)
        self._galloc = acc.ggml_gallocr_new(acc.ggml_backend_get_default_buffer_type(self.backend))
        self.size = 0

    def place(self, graph: int) -> None:
        """Place a graph built for one call (inputs marked ggml_set_input, outputs ggml_set_output) in the
        buffer such graphs share, grown as needed."""
        acc = self.acc
        if not acc.ggml_gallocr_alloc_graph(self._galloc, graph):
            raise EdgeError(f"--gpu {acc.name}: out of device memory for a computation's activations; lower "
                            "--gpu-mem")
        size = acc.ggml_gallocr_get_buffer_size(self._galloc, 0)
        acc.used += size - self.size
        self.size = size

    def run(self, graph: int) -> None:
        self.acc.gg.compute_on(self.backend, graph)

    def close(self) -> None:
        """Free the scratch buffer and the backend instance."""
        self.acc.ggml_gallocr_free(self._galloc)
        self.acc.ggml_backend_free(self.backend)
        self.acc.used -= self.size
        self.size = 0


class _DeviceGraph:
    """Products on a device: the graph over input and output tensors in a device buffer of their own (kept), or
    in the accelerator's scratch buffer (one call)."""

    def __init__(self, acc: Accelerator, shapes: tuple, pairs: list[tuple[int, DeviceWeight]], keep: bool):
        gg = acc.gg
        self.acc = acc
        size = 2 * len(pairs) + len(shapes) + 8
        self.meta = np.zeros((len(shapes) + 2 * len(pairs) + 4) * gg.ggml_tensor_overhead()
                             + gg.ggml_graph_overhead_custom(size, False), np.uint8)
        self.ctx = gg.ggml_init(_InitParams(self.meta.nbytes, self.meta.ctypes.data, True))
        self.inputs = [gg.ggml_new_tensor_2d(self.ctx, F32, s[1], s[0]) for s in shapes]
        self.graph = gg.ggml_new_graph_custom(self.ctx, size, False)
        self.outputs = []
        for k, w in pairs:
            if w.cols != shapes[k][1]:
                raise ValueError(f"weight ({w.rows} x {w.cols}) does not fit input {shapes[k]}")
            y = gg.ggml_mul_mat(self.ctx, w.tensor, self.inputs[k])
            acc.ggml_set_output(y)
            gg.ggml_build_forward_expand(self.graph, y)
            self.outputs.append((y, (shapes[k][0], w.rows)))
        self.buffer, self.nbytes = None, 0
        if not keep:
            for t in self.inputs:
                acc.ggml_set_input(t)
            try:
                acc.main.place(self.graph)
            except EdgeError:
                gg.ggml_free(self.ctx)
                raise
            return
        self.buffer, self.nbytes = acc.allocate(self.ctx, "a product's activations")  # counted in acc.used

    def start(self, xs: list[np.ndarray]) -> None:
        """Copy the inputs in and start the computation (asynchronous where the device is)."""
        acc = self.acc
        for t, x in zip(self.inputs, xs):
            acc.ggml_backend_tensor_set(t, x.ctypes.data, 0, x.nbytes)
        status = acc.ggml_backend_graph_compute_async(acc.backend, self.graph)
        if status != 0:
            raise EdgeError(f"--gpu {acc.name}: the graph computation failed (status {status})")

    def finish(self) -> list[np.ndarray]:
        """Wait for the computation; copy the outputs out."""
        acc = self.acc
        acc.ggml_backend_synchronize(acc.backend)
        outs = []
        for y, shape in self.outputs:
            out = np.empty(shape, np.float32)
            acc.ggml_backend_tensor_get(y, out.ctypes.data, 0, out.nbytes)
            outs.append(out)
        return outs

    def close(self) -> None:
        if self.buffer:
            self.acc.ggml_backend_buffer_free(self.buffer)
        self.acc.gg.ggml_free(self.ctx)


def _device_by_name(name: str) -> int:
    reg = _load("ggml")
    reg.ggml_backend_dev_by_name.restype, reg.ggml_backend_dev_by_name.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
    return reg.ggml_backend_dev_by_name(name.encode())


def devices() -> list[tuple[str, str, str, int]]:
    """The compute devices ggml's backend registry holds in this build of llama-cpp-python: (name,
    description, kind, memory in bytes). The CPU's always; a GPU's where llama-cpp-python was built with its
    backend (CUDA, Vulkan, Metal)."""
    reg, base = _load("ggml"), _load("ggml-base")
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for lib, name, res, args in ((reg, "ggml_backend_dev_count", sz, []), (reg, "ggml_backend_dev_get", vp, [sz]),
                                 (base, "ggml_backend_dev_name", ctypes.c_char_p, [vp]),
                                 (base, "ggml_backend_dev_description", ctypes.c_char_p, [vp]),
                                 (base, "ggml_backend_dev_type", ctypes.c_int, [vp]),
                                 (base, "ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)])):
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
    out = []
    for i in range(reg.ggml_backend_dev_count()):
        dev = reg.ggml_backend_dev_get(i)
        free, total = sz(), sz()
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = base.ggml_backend_dev_type(dev)
        out.append((base.ggml_backend_dev_name(dev).decode(), base.ggml_backend_dev_description(dev).decode(),
                    DEVICE_KINDS.get(kind, f"kind {kind}"), total.value))
    return out


_INSTANCES: dict[int, Ggml] = {}


def ggml(threads: int) -> Ggml:
    """The process's ggml runtime for this many threads (one thread pool each; idle pools sleep)."""
    if threads not in _INSTANCES:
        _INSTANCES[threads] = Ggml(threads)
    return _INSTANCES[threads]
