"""A Hugging Face style model directory (config.json, *.safetensors, tokenizer.json) as a convert source.

Tensors are renamed to their GGUF names and served as F32/F16/BF16 rows, like a GGUFFile's. HF llama
checkpoints keep q/k in the rotate-halves order, so the config says rope_neox instead of permuting weights.
The tokenizer (GPT-2 style byte-level BPE) is written as a metadata-only GGUF for llama.cpp's tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from edge import quants
from edge.config import config_from_metadata
from edge.errors import EdgeError
from edge.gguf_file import Tensor

DTYPES = {"F32": (np.float32, quants.F32), "F16": (np.float16, quants.F16), "BF16": (np.uint16, quants.BF16)}
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str | None:
    if hf in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf]
    parts = hf.split(".")  # model.layers.{i}.{module}.{proj}.weight
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        name = LAYER_NAMES.get(".".join(parts[3:-1]))
        if name:
            return f"blk.{parts[2]}.{name}.weight"
    return None


def _read_safetensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (dtype, shape, raw bytes view) from one .safetensors file, memory-mapped."""
    try:
        raw = np.memmap(path, np.uint8, "r")
        n = int(np.frombuffer(raw[:8].tobytes(), "<u8")[0])
        header = json.loads(raw[8:8 + n].tobytes())
    except (ValueError, OSError) as exc:
        raise EdgeError(f"{path}: not a readable safetensors file ({exc})") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if base + end > raw.size:
            raise EdgeError(f"{path}: tensor '{name}' runs past the end of the file; the file is truncated")
        out[name] = (info["dtype"], tuple(info["shape"]), raw[base + start:base + end])
    return out


class HFSource:
    """A Hugging Face llama directory as a weight source (edge.source.WeightSource), plus write_tokenizer(dst)."""

    def __init__(self, path: str | Path, tokenizer_pre: str = "default"):
        self.path = Path(path)
        self.tokenizer_pre = tokenizer_pre
        try:
            hf = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            raise EdgeError(f"{self.path}: no readable config.json; give a GGUF file or a Hugging Face model "
                            "directory") from None
        arch = hf.get("model_type")
        if arch != "llama":
            raise EdgeError(f"{self.path}: Hugging Face model_type '{arch}' is not supported yet (llama); "
                            "convert it to GGUF with llama.cpp first")
        self._tensors = {}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise EdgeError(f"{self.path}: no .safetensors files")
        for f in files:
            for name, value in _read_safetensors(f).items():
                g = gguf_name(name)
                if g is not None:
                    self._tensors[g] = value
        if hf.get("tie_word_embeddings", False):
            self._tensors.pop("output.weight", None)
        meta = {"general.architecture": "llama", "llama.block_count": hf["num_hidden_layers"],
                "llama.embedding_length": hf["hidden_size"], "llama.feed_forward_length": hf["intermediate_size"],
                "llama.attention.head_count": hf["num_attention_heads"],
                "llama.attention.head_count_kv": hf.get("num_key_value_heads", hf["num_attention_heads"]),
                "llama.attention.layer_norm_rms_epsilon": hf.get("rms_norm_eps", 1e-6),
                "llama.rope.freq_base": hf.get("rope_theta", 10000.0),
                "llama.context_length": hf.get("max_position_embeddings", 2048)}
        if "head_dim" in hf:
            meta["llama.attention.key_length"] = hf["head_dim"]
        cfg = config_from_metadata(meta, str(self.path), int(hf["vocab_size"]))
        self.config = dataclasses.replace(cfg, rope_neox=True)
        tok_cfg = self._json("tokenizer_config.json")
        self.chat_template = tok_cfg.get("chat_template")
        self.metadata = {"general.name": self.path.name, "tokenizer.chat_template": self.chat_template}

    def _json(self, name: str) -> dict:
        p = self.path / name
        return json.loads(p.read_text()) if p.exists() else {}

    kind = "Hugging Face"

    @property
    def tokenizer_path(self) -> Path:
        return self.path

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def expert_tensors(self, layer: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        raise EdgeError(f"{self.path}: not a mixture of experts; it has no experts")

    def tensor(self, name: str, expected: tuple[int, ...] | None = None) -> Tensor:
        if name not in self._tensors:
            raise EdgeError(f"{self.path}: tensor '{name}' is missing from the safetensors files")
        dtype, shape, raw = self._tensors[name]
        if expected is not None and tuple(d for d in shape if d != 1) != tuple(d for d in expected if d != 1):
            raise EdgeError(f"{self.path}: tensor '{name}' has shape {tuple(shape)}, expected {expected}")
        if dtype not in DTYPES:
            raise EdgeError(f"{self.path}: tensor '{name}' has dtype {dtype}; F32, F16 and BF16 are supported")
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return Tensor(name, DTYPES[dtype][1], tuple(shape), np.asarray(raw).reshape(rows, -1))

    def source_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors")) + [self.path / "config.json"]

    def write_tokenizer(self, dst: Path) -> None:
        """tokenizer.json (byte-level BPE) + tokenizer_config.json as a metadata-only GGUF."""
        import gguf

        from weights_tools.gguf_meta import finish

        try:
            vocab = gguf.vocab.BpeVocab(self.path)
        except (FileNotFoundError, ValueError) as exc:
            raise EdgeError(f"{self.path}: tokenizer not supported ({exc}); only byte-level BPE tokenizer.json "
                            "is read so far") from None
        w = gguf.GGUFWriter(dst, arch="llama")
        tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens()))
        for added in self._json("tokenizer.json").get("added_tokens", []):  # special tokens are CONTROL
            if added.get("special") and added["id"] < len(types):
                types[added["id"]] = gguf.TokenType.CONTROL
        w.add_tokenizer_model("gpt2")
        # llama.cpp's converter recognises the pre-tokenizer by hashing HF's own tokenization, which needs the
        # `transformers` library; here the user names it (e.g. smollm, llama-bpe), else llama.cpp's default
        w.add_tokenizer_pre(self.tokenizer_pre)
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types([int(t) for t in types])
        special = gguf.SpecialVocab(self.path, load_merges=True, n_vocab=len(tokens))
        special.add_to_gguf(w, quiet=True)
        for key, value in (("block_count", self.config.n_layers), ("embedding_length", self.config.dim),
                           ("feed_forward_length", self.config.hidden_dim),
                           ("attention.head_count", self.config.n_heads),
                           ("attention.head_count_kv", self.config.n_kv_heads),
                           ("context_length", self.config.context_length)):
            w.add_uint32(f"llama.{key}", int(value))
        w.add_float32("llama.attention.layer_norm_rms_epsilon", float(self.config.norm_eps))
        finish(w)
