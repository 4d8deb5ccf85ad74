"""Compute backends behind one seam: `backend.linear_group(tensors)` -> a callable x -> (y1, y2, ...).

A group is the linears that share one input (q/k/v; gate/up), run as one call. Backends:
- `ort`: onnxruntime's MatMulNBits with the quantized weight as a constant initializer (prepacked by
  MLAS); weights stay 4 or 8 bits in RAM. Every supported GGML format maps onto its affine form exactly
  up to float rounding: 4-bit codes for Q4_*, 8-bit codes for Q5_*, Q6_K and Q8_0 (same values).
- `ggml`: llama.cpp's own CPU kernels on the stored bytes (edge.ggml): RAM holds exactly the file's bytes;
  what the budgeted runtime uses (its neuron cache is a buffer ggml reads in place).
- `numpy`: dequantized float32 matrices (4-8x the RAM); the reference the other backends are tested against.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import numpy as np

from edge import quants
from edge.gguf_file import Tensor
from edge.ggml import Weight, ggml

LinearGroup = Callable[[np.ndarray], tuple]


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


BLAS_SET_THREADS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")


@functools.cache
def single_thread_blas() -> bool:
    """Run numpy's own BLAS (OpenBLAS in its wheels) on one thread from now on; False where it is not found.

    Backends with their own thread pool (ggml, onnxruntime) call this: the runtime's numpy products are small
    (the low-rank head, predictors, attention over the cache), and OpenBLAS's idle workers spin for a while
    after each one, taking a core from ggml's. Measured on Qwen2.5-Coder-1.5B, 2 threads, every FFN cluster
    cached (`--ram 1300MB`): 171 -> 77 ms per token; at `--ram 800MB` 4.4 -> 7.1 tok/s."""
    import ctypes
    from pathlib import Path

    root = Path(np.__file__).parent
    for lib_path in sorted([*root.parent.glob("numpy.libs/*openblas*"), *root.glob(".dylibs/*openblas*")]):
        try:
            lib = ctypes.CDLL(str(lib_path))
        except OSError:
            continue
        for name in BLAS_SET_THREADS:
            f = getattr(lib, name, None)
            if f is not None:
                f.argtypes, f.restype = [ctypes.c_int], None
                f(1)
                return True
    return False


class NumpyBackend:
    name = "numpy"

    def __init__(self, threads: int | None = None):
        self.resident_bytes = 0

    def linear_group(self, tensors: Sequence[Tensor]) -> LinearGroup:
        w = np.concatenate([quants.dequantize(t.raw, t.type_id, t.cols) for t in tensors], axis=0)
        self.resident_bytes += w.nbytes
        wt = np.ascontiguousarray(w.T)  # (in, out): x @ wt is one sgemm/sgemv
        splits = np.cumsum([t.rows for t in tensors])[:-1]

        def run(x: np.ndarray) -> tuple:
            return tuple(np.split(x @ wt, splits, axis=-1))

        return run


def _nbits_inputs(t: Tensor) -> dict:
    """A GGML tensor as MatMulNBits inputs: packed codes, scales, uint8 zero points (K, N, bits, block_size).

    Formats with a min (Q4_1, Q4_K, Q5_1: value = scale * code + offset) get the integer zero point nearest
    to -offset / scale, and what is left of the offset, `residual`, as an (in // group, out) matrix applied
    to the group sums of x. The residual is at most scale / 2, so the int8 rounding of x inside MLAS
    scales with the weights' size, as in llama.cpp, not with the codes' (which are all positive)."""
    fmt = quants.FORMATS[t.type_id]
    n, k = t.rows, t.cols
    u = quants.unpack(t.raw, t.type_id)
    bits = 4 if fmt.bits == 4 else 8
    groups = k // u.group
    codes = u.codes.reshape(n, groups, u.group)
    scale = u.scale.reshape(n, groups).astype(np.float32)
    residual = None
    if u.offset is None:
        zero = np.full((n, groups), u.zero, np.uint8)
    else:
        offset = u.offset.reshape(n, groups)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale == 0, 0, np.rint(-offset / scale))
        zero = np.clip(zp, 0, (1 << bits) - 1).astype(np.uint8)
        residual = np.ascontiguousarray((offset + scale * zero.astype(np.float32)).T)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << np.uint8(4))
        zero = np.concatenate([zero, np.zeros((n, groups % 2), np.uint8)], axis=1)
        zero = zero[:, 0::2] | (zero[:, 1::2] << np.uint8(4))
    return dict(B=np.ascontiguousarray(codes), scales=scale.reshape(-1),
                zero_points=np.ascontiguousarray(zero).reshape(-1), offsets=residual,
                K=k, N=n, bits=bits, block_size=u.group)


_POOL_THREADS: int | None = None


def _global_thread_pool(threads: int) -> int:
    """ORT's process-wide thread pool, sized by the first backend of the process (ORT cannot resize it later);
    returns its size."""
    global _POOL_THREADS
    if _POOL_THREADS is None:
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(threads, 1)
        _POOL_THREADS = threads
    return _POOL_THREADS


class OrtBackend:
    name = "ort"

    def __init__(self, threads: int | None = None):
        import onnxruntime as ort

        single_thread_blas()
        self._ort = ort
        self.threads = _global_thread_pool(threads or default_threads())
        self.resident_bytes = 0
        # 4: activations quantized to int8 per block inside MLAS, as llama.cpp does (Q8 dot products); the
        # float path (0) is 4-60x slower here for 8-bit codes
        self.accuracy_level = 4

    def _session(self, tensors: Sequence[Tensor]):
        from onnx import TensorProto, helper, numpy_helper

        nodes, inits, outputs, group_sums = [], [], [], {}

        def const(name: str, value: np.ndarray) -> str:
            inits.append(numpy_helper.from_array(value, name))
            self.resident_bytes += value.nbytes
            return name

        for j, t in enumerate(tensors):
            y = f"y{j}"
            if t.type_id in (quants.F32, quants.F16, quants.BF16):
                w = quants.dequantize(t.raw, t.type_id, t.cols)
                nodes.append(helper.make_node("MatMul", ["x", const(f"w{j}", np.ascontiguousarray(w.T))], [y]))
            else:
                a = _nbits_inputs(t)
                if a["offsets"] is not None:
                    y = f"codes_y{j}"
                nodes.append(helper.make_node(
                    "MatMulNBits", ["x", const(f"B{j}", a["B"]), const(f"scales{j}", a["scales"]),
                                    const(f"zero_points{j}", a["zero_points"])], [y],
                    domain="com.microsoft", K=a["K"], N=a["N"], bits=a["bits"], block_size=a["block_size"],
                    accuracy_level=self.accuracy_level))
                if a["offsets"] is not None:
                    g = a["block_size"]
                    if g not in group_sums:  # (T, K // g): sums of x over each group, shared by the group
                        shape = const(f"group_shape{g}", np.array([0, -1, g], np.int64))
                        axes = const(f"group_axes{g}", np.array([-1], np.int64))
                        nodes.append(helper.make_node("Reshape", ["x", shape], [f"xg{g}"]))
                        nodes.append(helper.make_node("ReduceSum", [f"xg{g}", axes], [f"xsum{g}"], keepdims=0))
                        group_sums[g] = f"xsum{g}"
                    nodes.append(helper.make_node("MatMul", [group_sums[g], const(f"offsets{j}", a["offsets"])],
                                                  [f"offset_y{j}"]))
                    nodes.append(helper.make_node("Add", [y, f"offset_y{j}"], [f"y{j}"]))
            outputs.append(helper.make_tensor_value_info(f"y{j}", TensorProto.FLOAT, ["T", t.rows]))
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", tensors[0].cols])
        graph = helper.make_graph(nodes, "linear_group", [x], outputs, initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8
        opts = self._ort.SessionOptions()
        opts.use_per_session_threads = False  # one process-wide pool: a session per linear group is cheap
        opts.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = False
        sess = self._ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        sess._model_bytes = None  # ORT keeps the serialized model only to re-create the session on provider fallback
        return sess

    def linear_group(self, tensors: Sequence[Tensor]) -> LinearGroup:
        sess = self._session(tensors)
        run = sess.run

        def call(x: np.ndarray) -> tuple:
            return tuple(run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)}))

        return call


class GgmlBackend:
    """llama.cpp's CPU kernels (edge.ggml) on the weights as stored: no copy in another form, so RAM holds
    exactly the file's bytes per weight; activations quantized to Q8 as llama.cpp does."""

    name = "ggml"

    def __init__(self, threads: int | None = None):
        single_thread_blas()
        self.ggml = ggml(threads or default_threads())
        self.threads = self.ggml.threads
        self.resident_bytes = 0

    def linear_group(self, tensors: Sequence[Tensor]) -> LinearGroup:
        weights = [Weight.of(t) for t in tensors]
        self.resident_bytes += sum(w.buf.nbytes for w in weights)
        mm = self.ggml.matmul

        def run(x: np.ndarray) -> tuple:
            return tuple(mm(x, weights))

        return run


BACKENDS = {"ort": OrtBackend, "numpy": NumpyBackend, "ggml": GgmlBackend}


def make_backend(name: str = "auto", threads: int | None = None):
    """A backend by name (BACKENDS). auto: ggml, memory first, as an app for small memory should choose: with no
    --ram, 2 threads, 64 tokens, this machine (2026-12-06): SmolLM2 Q4_1 ggml 84 tok/s at a peak RSS of 162MB
    against onnxruntime's 94 tok/s at 372MB (MatMulNBits prepacks a second copy of every weight); Gemma 3 Q4_K_M
    ggml 47 at 321MB against 54 at 770MB; Qwen2.5-1.5B Q4_K_M 11.7 at 1.1GB against 10.1 at 3.1GB."""
    if name == "auto":
        name = "ggml"
    return BACKENDS[name](threads)
