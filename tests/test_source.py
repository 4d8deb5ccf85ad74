"""One contract test suite for every weight source (edge.source.WeightSource): a GGUF file, a flash store and a
Hugging Face directory of the same model keep the same contract, and give the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge import quants
from edge.errors import EdgeError
from edge.gguf_file import GGUFFile
from edge.source import WeightSource
from edge.store import Store

KINDS = ("GGUF", "edge store", "Hugging Face")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, smollm2) -> dict[str, WeightSource]:
    """A small random llama (float32, SmolLM2's vocabulary) as each kind of source."""
    from conftest import write_tiny_gguf
    from hf_export import export

    from weights_tools.convert import convert
    from weights_tools.hf import HFSource

    d = tmp_path_factory.mktemp("sources")
    gguf = write_tiny_gguf(d / "tiny.gguf", qtype="F32", n_layers=2, dim=64, hidden=128, tokenizer_from=smollm2)
    store = convert(gguf, d / "tiny.edge", quiet=True, cluster=32)
    return {"GGUF": GGUFFile(gguf), "edge store": Store(store), "Hugging Face": HFSource(export(gguf, d / "hf"))}


def values(t) -> np.ndarray:
    return quants.dequantize(t.raw, t.type_id, t.cols).reshape(t.shape)


@pytest.mark.parametrize("kind", KINDS)
def test_names_what_it_is(sources, kind):
    src = sources[kind]
    assert src.kind == kind and src.path.exists() and isinstance(src.path, Path)
    assert src.tokenizer_path.exists()
    assert src.chat_template == src.metadata.get("tokenizer.chat_template")


@pytest.mark.parametrize("kind", KINDS)
def test_holds_every_tensor_a_llama_needs_at_its_config_shape(sources, kind):
    src = sources[kind]
    cfg = src.config
    shapes = {"token_embd.weight": (cfg.vocab_size, cfg.dim), "output_norm.weight": (cfg.dim,)}
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (cfg.dim,), p + "ffn_norm.weight": (cfg.dim,),
                   p + "attn_q.weight": (cfg.q_dim, cfg.dim), p + "attn_k.weight": (cfg.kv_dim, cfg.dim),
                   p + "attn_v.weight": (cfg.kv_dim, cfg.dim), p + "attn_output.weight": (cfg.dim, cfg.q_dim),
                   p + "ffn_gate.weight": (cfg.hidden_dim, cfg.dim), p + "ffn_up.weight": (cfg.hidden_dim, cfg.dim),
                   p + "ffn_down.weight": (cfg.dim, cfg.hidden_dim)}
    for name, shape in shapes.items():
        assert src.has(name), name
        t = src.tensor(name, shape)
        assert t.name == name and tuple(d for d in t.shape if d != 1) == shape
        assert t.raw.nbytes == t.nbytes
    assert set(src.tensor_names()) <= set(shapes) | {"output.weight"}
    assert not src.has("blk.0.nothing.weight")


@pytest.mark.parametrize("kind", KINDS)
def test_errors_name_the_source(sources, kind):
    src = sources[kind]
    with pytest.raises(EdgeError, match=f"{src.path}.*'blk.0.nothing.weight'.*missing"):
        src.tensor("blk.0.nothing.weight")
    with pytest.raises(EdgeError, match=f"{src.path}.*shape"):
        src.tensor("blk.0.ffn_up.weight", (3, 5))
    with pytest.raises(EdgeError, match=f"{src.path}.*not a mixture of experts"):
        src.expert_tensors(0)


def test_every_kind_gives_the_same_weights(sources):
    """The store holds the GGUF's bytes (its FFN reassembled from bundles); the Hugging Face directory the same
    values, q and k in their rotate-halves order (its config says so instead)."""
    gguf, store, hf = (sources[k] for k in KINDS)
    assert gguf.config == store.config
    assert hf.config.rope_neox and not gguf.config.rope_neox
    for name in gguf.tensor_names():
        a, b = gguf.tensor(name), store.tensor(name)
        assert a.type_id == b.type_id and np.array_equal(a.raw, b.raw), name
        if ".attn_q." not in name and ".attn_k." not in name:
            np.testing.assert_array_equal(values(hf.tensor(name)), values(a), err_msg=name)
