"""Model configuration read from GGUF metadata: one frozen dataclass for every architecture."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge.errors import EdgeError

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3", "qwen3moe", "qwen2moe", "olmoe")
MOE_ARCHS = ("qwen3moe", "qwen2moe", "olmoe")  # always mixtures of experts (llama may be: Mixtral)


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_neox: bool           # rotate halves (NEOX) rather than adjacent pairs (llama's permuted q/k)
    rope_dims: int
    activation: str           # "silu" or "gelu_tanh", gating the up projection
    attn_scale: float         # multiplies q before q.k
    embed_scale: float        # multiplies the token embedding (gemma: sqrt(dim))
    qk_norm: bool             # RMS norm on each q and k head (gemma3)
    post_norms: bool          # RMS norm after attention and after the FFN (gemma3)
    rope_base_local: float    # rope base of sliding-window layers
    sliding_window: int       # 0: no sliding window
    local_layers: tuple[bool, ...]  # per layer: uses the sliding window
    n_experts: int = 0        # mixture of experts: experts per layer (0: a dense FFN)
    n_experts_used: int = 0   # experts each token goes to (top-k of the router's softmax)
    expert_hidden: int = 0    # FFN width of one expert
    expert_weights_norm: bool = True  # the top-k weights renormalized to sum to 1
    shared_expert_hidden: int = 0     # qwen2moe: a shared expert every token goes through, sigmoid-gated
    attn_bias: bool = False           # qwen2, qwen2moe: biases on q, k and v
    qk_norm_full: bool = False        # olmoe: one RMS norm over all of q (and of k), not per head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim


def _get(meta: dict, key: str, path: str, default=None):
    if key in meta:
        return meta[key]
    if default is None:
        raise EdgeError(f"{path}: GGUF metadata lacks '{key}'; the file is incomplete or not a model")
    return default


def config_from_metadata(meta: dict, path: str, vocab_size: int) -> ModelConfig:
    """Build the config from GGUF key/values (`{arch}.block_count`, ...), as llama.cpp reads them."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise EdgeError(f"{path}: architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    g = lambda key, default=None: _get(meta, f"{arch}.{key}", path, default)  # noqa: E731
    n_layers = _positive(g("block_count"), "block_count", path)
    dim = _positive(g("embedding_length"), "embedding_length", path)
    n_heads = _positive(g("attention.head_count"), "attention.head_count", path)
    n_kv_heads = _positive(g("attention.head_count_kv", n_heads), "attention.head_count_kv", path)
    head_dim = _positive(g("attention.key_length", dim // n_heads), "attention.key_length", path)
    if n_heads % n_kv_heads or n_layers > 10_000:
        raise EdgeError(f"{path}: metadata has {n_heads} heads over {n_kv_heads} key/value heads and {n_layers} "
                        "layers, which no model has; the file is corrupt")
    if arch == "gemma3":
        window = int(g("attention.sliding_window", 0))
        local = tuple(i % 6 < 5 for i in range(n_layers)) if window else (False,) * n_layers
        extra = dict(rope_neox=True, activation="gelu_tanh", attn_scale=1.0 / math.sqrt(head_dim),
                     embed_scale=math.sqrt(dim), qk_norm=True, post_norms=True,
                     rope_base=float(g("rope.freq_base", 1_000_000.0)),
                     rope_base_local=float(g("rope.freq_base_swa", 10_000.0)),
                     sliding_window=window, local_layers=local)
    elif arch in MOE_ARCHS:
        base = float(g("rope.freq_base", 1_000_000.0 if arch.startswith("qwen") else 10_000.0))
        extra = dict(rope_neox=True, activation="silu", attn_scale=1.0 / math.sqrt(head_dim),
                     embed_scale=1.0, qk_norm=arch != "qwen2moe", post_norms=False, rope_base=base,
                     rope_base_local=base, sliding_window=0, local_layers=(False,) * n_layers,
                     expert_weights_norm=arch == "qwen3moe", attn_bias=arch == "qwen2moe",
                     qk_norm_full=arch == "olmoe")
    else:  # llama; qwen2 is llama's layout with q/k/v biases and NEOX rope (its q/k are not permuted)
        qwen = arch == "qwen2"
        base = float(g("rope.freq_base", 1_000_000.0 if qwen else 10_000.0))
        extra = dict(rope_neox=qwen, activation="silu", attn_scale=1.0 / math.sqrt(head_dim),
                     embed_scale=1.0, qk_norm=False, post_norms=False, rope_base=base,
                     rope_base_local=base, sliding_window=0, local_layers=(False,) * n_layers, attn_bias=qwen)
    n_experts = int(g("expert_count", 0) or 0)  # llama: Mixtral; llama and gemma3: a moefied dense model
    if n_experts:
        used = _positive(g("expert_used_count"), "expert_used_count", path)
        if used > n_experts or n_experts > 4096:
            raise EdgeError(f"{path}: metadata routes each token to {used} of {n_experts} experts; the file is corrupt")
        extra.update(n_experts=n_experts, n_experts_used=used,
                     expert_hidden=_positive(g("expert_feed_forward_length", g("feed_forward_length", 0)),
                                             "expert_feed_forward_length", path))
        if arch == "qwen2moe":
            extra["shared_expert_hidden"] = _positive(
                g("expert_shared_feed_forward_length", g("feed_forward_length", 0)),
                "expert_shared_feed_forward_length", path)
    elif arch in MOE_ARCHS:
        raise EdgeError(f"{path}: a {arch} model without {arch}.expert_count; the file is incomplete")
    rope_dims = _positive(g("rope.dimension_count", head_dim), "rope.dimension_count", path)
    if rope_dims > head_dim or rope_dims % 2:
        raise EdgeError(
            f"{path}: rope.dimension_count {rope_dims} does not fit heads of {head_dim}; the file is corrupt"
        )
    return ModelConfig(
        arch=arch, n_layers=n_layers, dim=dim,
        hidden_dim=_positive(g("feed_forward_length", extra.get("expert_hidden")), "feed_forward_length", path),
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=vocab_size,
        context_length=_positive(g("context_length", 2048), "context_length", path),
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_dims=rope_dims, **extra)


def _positive(value, key: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) <= 0 or int(value) > 1 << 24:
        raise EdgeError(f"{path}: metadata '{key}' is {value!r}, not a plausible size; the file is corrupt")
    return int(value)
