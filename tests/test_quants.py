"""Our dequantizers equal gguf.dequantize bit for bit: on real tensors of both models and on random blocks."""

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import quants
from edge.gguf_file import GGUFFile

ALL_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"]


def reference(raw: np.ndarray, type_id: int) -> np.ndarray:
    return gguf.dequantize(raw, gguf.GGMLQuantizationType(type_id))


def assert_bit_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_real_tensors_of_every_type(smollm2, gemma3):
    seen = set()
    for path in (smollm2, gemma3):
        f = GGUFFile(path)
        for name in f.tensor_names():
            t = f.tensor(name)
            if (path, t.type_id) in seen:
                continue
            seen.add((path, t.type_id))
            rows = t.raw[: min(t.rows, 64)]
            assert_bit_equal(quants.dequantize(rows, t.type_id), reference(rows, t.type_id))
    names = {quants.type_name(tid) for _, tid in seen}
    assert {"Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K", "F32"} <= names


@pytest.mark.parametrize("name", ALL_TYPES)
def test_random_blocks(name):
    """Blocks of random bytes with finite fp16 scales; quantize()-made blocks where gguf can quantize."""
    fmt = quants.FORMATS[int(gguf.GGMLQuantizationType[name])]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(16, 8 * fmt.block_bytes), dtype=np.uint8)
    if fmt.block_size > 1:  # keep the fp16 scale fields finite: clear the top exponent bit of every byte pair
        blocks = raw.reshape(-1, fmt.block_bytes)
        for off in _scale_offsets(name):
            blocks[:, off + 1] &= 0x3F
    else:
        raw = _finite(raw, name)
    assert_bit_equal(quants.dequantize(raw, fmt.type_id), reference(raw, fmt.type_id))


def _scale_offsets(name):
    return {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
            "Q6_K": [208]}[name]


def _finite(raw, name):
    if name == "F32":
        return rng_floats(raw.size // 4).view(np.uint8).reshape(raw.shape)
    if name == "F16":
        return rng_floats(raw.size // 2).astype(np.float16).view(np.uint8).reshape(raw.shape)
    return raw  # BF16: every bit pattern is a valid input to the shift


def rng_floats(n):
    return np.random.default_rng(3).standard_normal(n).astype(np.float32)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16"])
def test_quantized_by_gguf(name):
    qt = gguf.GGMLQuantizationType[name]
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    raw = gguf.quantize(x, qt).view(np.uint8)
    assert_bit_equal(quants.dequantize(raw, int(qt)).reshape(8, 256), reference(raw, int(qt)).reshape(8, 256))


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"]), data=st.data())
def test_fuzz_blocks(name, data):
    """Any bytes at all, NaN and inf scales included: the same values (NaNs where the reference has NaNs)."""
    fmt = quants.FORMATS[int(gguf.GGMLQuantizationType[name])]
    n_blocks = data.draw(st.integers(1, 4))
    raw = np.frombuffer(data.draw(st.binary(min_size=n_blocks * fmt.block_bytes,
                                            max_size=n_blocks * fmt.block_bytes)), np.uint8).reshape(1, -1)
    with np.errstate(all="ignore"):
        ours, ref = quants.dequantize(raw, fmt.type_id), reference(raw, fmt.type_id)
    np.testing.assert_array_equal(ours.reshape(ref.shape), ref)


def test_unpacked_codes_fit_their_bits():
    for name in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"]:
        fmt = quants.FORMATS[int(gguf.GGMLQuantizationType[name])]
        raw = np.random.default_rng(0).integers(0, 256, size=(4, fmt.block_bytes), dtype=np.uint8)
        u = quants.unpack(raw, fmt.type_id)
        assert u.codes.max() < (1 << fmt.bits)
        assert u.scale.shape == (4, fmt.block_size // fmt.group)
