"""The ORT backend (MatMulNBits, int8 activations) against the float32 reference, every supported format."""

import gguf
import numpy as np
import pytest

from edge.gguf_file import Tensor
from edge.kernels import NumpyBackend, OrtBackend


def tensor_of(name: str, rows: int = 96, cols: int = 512, seed: int = 0) -> Tensor:
    qt = gguf.GGMLQuantizationType[name]
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    if name in ("Q4_K", "Q6_K"):  # gguf cannot quantize K-quants: build them from random bytes
        from edge import quants

        fmt = quants.FORMATS[int(qt)]
        raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // 256 * fmt.block_bytes), np.uint8)
        blocks = raw.reshape(-1, fmt.block_bytes)
        for off in ([0, 2] if name == "Q4_K" else [208]):
            blocks[:, off + 1] = (blocks[:, off + 1] & 0x03) | 0x10  # small finite fp16 scales
    else:
        raw = gguf.quantize(w, qt).view(np.uint8).reshape(rows, -1)
    return Tensor("w", int(qt), (rows, cols), raw)


@pytest.mark.parametrize("name", ["F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("t_len", [1, 7])
def test_ort_matches_float_reference(name, t_len):
    t = tensor_of(name)
    x = np.random.default_rng(1).standard_normal((t_len, t.cols)).astype(np.float32)
    (ref,) = NumpyBackend().linear_group([t])(x)
    (ours,) = OrtBackend(threads=1).linear_group([t])(x)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 0.02, rel  # int8 rounding of the activations, as in llama.cpp


def test_group_outputs_in_order():
    a, b = tensor_of("Q4_1", rows=64, seed=1), tensor_of("Q8_0", rows=32, seed=2)
    x = np.random.default_rng(3).standard_normal((2, 512)).astype(np.float32)
    outs = OrtBackend(threads=1).linear_group([a, b])(x)
    refs = NumpyBackend().linear_group([a, b])(x)
    assert [o.shape for o in outs] == [(2, 64), (2, 32)]
    for o, r in zip(outs, refs):
        assert np.linalg.norm(o - r) / np.linalg.norm(r) < 0.02
