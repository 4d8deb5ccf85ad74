"""Shared fixtures: the two real models (from their PyPI packages), float32 copies, a tiny random GGUF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.models import default_model_path, gemma3_270m_path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return gemma3_270m_path()


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def real_model(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def smol_store(tmp_path_factory, smollm2):
    from weights_tools.convert import convert

    return convert(smollm2, tmp_path_factory.mktemp("stores") / "smol.edge", quiet=True)


@pytest.fixture(scope="session")
def gemma_store(tmp_path_factory, gemma3):
    from weights_tools.convert import convert

    return convert(gemma3, tmp_path_factory.mktemp("stores") / "gemma.edge", quiet=True)


@pytest.fixture(scope="session")
def smol_calibrated(tmp_path_factory, smollm2):
    """SmolLM2 as a store calibrated for --ram (its own copy: calibration writes into the store)."""
    from weights_tools.calibrate import calibrate
    from weights_tools.convert import convert

    store = convert(smollm2, tmp_path_factory.mktemp("stores") / "SmolLM2-135M-Instruct.Q4_1.edge", quiet=True)
    calibrate(store, threads=2)
    return store


@pytest.fixture(scope="session")
def f32_copy(tmp_path_factory):
    """The same weights dequantized to float32 GGUF, one per source model (cached for the session)."""
    from weights_tools.dequant_gguf import write_dequantized

    made: dict[Path, Path] = {}

    def make(src: Path) -> Path:
        if src not in made:
            made[src] = write_dequantized(src, tmp_path_factory.mktemp("f32") / (src.stem + ".F32.gguf"))
        return made[src]

    return make


def write_tiny_gguf(path: Path, arch: str = "llama", qtype: str = "Q8_0", n_layers: int = 2, dim: int = 64,
                    hidden: int = 128, n_heads: int = 4, n_kv: int = 2, vocab: int = 96, seed: int = 0,
                    extra_tensors: dict | None = None, tokenizer_from: Path | None = None,
                    rope_base: float = 10000.0, untied_output: bool = False) -> Path:
    """A random-weight model written with gguf.GGUFWriter: enough for the forward pass, not the tokenizer.

    extra_tensors: name -> (raw array, ggml type), replacing a model tensor of that name or added.
    """
    import gguf

    from weights_tools.gguf_meta import finish

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(rope_base)
    if tokenizer_from is not None:  # a real vocabulary and template, so llama.cpp can run the random weights
        from edge.gguf_file import GGUFFile
        from weights_tools.gguf_meta import copy_fields

        fields = GGUFFile(tokenizer_from).fields()
        copy_fields(fields, w, keep=lambda key: key.startswith("tokenizer."))
        vocab = len(fields["tokenizer.ggml.tokens"].data)
    qt = gguf.GGMLQuantizationType[qtype]

    overrides = dict(extra_tensors or {})

    def add(name, shape, quant=True):
        if name in overrides:
            array, raw_type = overrides.pop(name)
            w.add_tensor(name, array, raw_dtype=raw_type)
            return
        x = rng.standard_normal(shape).astype(np.float32) * (0.08 if quant else 0.1)  # about 1/sqrt(dim): a tame random model
        if not quant:
            x = 1.0 + x
        if quant and qt != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quantize(x, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, x)

    head_dim = dim // n_heads
    add("token_embd.weight", (vocab, dim))
    add("output_norm.weight", (dim,), quant=False)
    if untied_output:
        add("output.weight", (vocab, dim))
    for i in range(n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (dim,), quant=False)
        add(p + "ffn_norm.weight", (dim,), quant=False)
        add(p + "attn_q.weight", (n_heads * head_dim, dim))
        add(p + "attn_k.weight", (n_kv * head_dim, dim))
        add(p + "attn_v.weight", (n_kv * head_dim, dim))
        add(p + "attn_output.weight", (dim, n_heads * head_dim))
        add(p + "ffn_gate.weight", (hidden, dim))
        add(p + "ffn_up.weight", (hidden, dim))
        add(p + "ffn_down.weight", (dim, hidden))
    for name, (array, raw_type) in overrides.items():
        w.add_tensor(name, array, raw_dtype=raw_type)
    finish(w)
    return path


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")
