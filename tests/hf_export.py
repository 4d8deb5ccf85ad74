"""Write a GGUF llama model as a Hugging Face directory (the inverse of llama.cpp's converter), for tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from edge import quants
from edge.gguf_file import GGUFFile

INVERSE = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permute (rotate-halves -> adjacent pairs)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def export(src: Path, out: Path) -> Path:
    g = GGUFFile(src)
    cfg = g.config
    out.mkdir(parents=True)
    tensors = {}
    for name in g.tensor_names():
        t = g.tensor(name)
        w = quants.dequantize(t.raw, t.type_id, t.cols).reshape(t.shape)
        parts = name.split(".")
        if name in INVERSE:
            hf = INVERSE[name]
        else:
            hf = f"model.layers.{parts[1]}.{LAYER[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = unpermute(w, cfg.n_heads)
            elif parts[2] == "attn_k":
                w = unpermute(w, cfg.n_kv_heads)
        tensors[hf] = w
    write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": cfg.n_layers,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
        "max_position_embeddings": cfg.context_length, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": not g.has("output.weight")}))
    fields = g.fields()
    tokens, merges = fields["tokenizer.ggml.tokens"].value, fields["tokenizer.ggml.merges"].value
    (out / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
        "decoder": {"type": "ByteLevel"},
        "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(tokens) if t.startswith("<|")],
    }))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": g.chat_template, "bos_token": tokens[g.metadata["tokenizer.ggml.bos_token_id"]],
        "eos_token": tokens[g.metadata["tokenizer.ggml.eos_token_id"]], "add_bos_token": False}))
    return out
