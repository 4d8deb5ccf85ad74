"""The forward pass: llama-family, qwen2 and gemma3 decoder layers over a KV cache allocated once.

A block reads as two residual lines (attention on the normed input, then the FFN on the normed result).
Weights come from a `WeightSource` (edge.source: a GGUF file, a store) through the model's `Parts`
(edge.parts): resident by default, or what a strategy built for a RAM budget (edge.strategies). Sampling lives
in `edge.sampling`; this module only turns token ids into logits.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass

import numpy as np

from edge import kernels
from edge.config import ModelConfig
from edge.errors import EdgeError
from edge.memory import release_free_memory
from edge.parts import ACTIVATIONS, Parts, Trace, load_vector, resident_parts


PROFILED = ("embedding", "attention", "ffn", "head")  # the parts Transformer.seconds times
PREFILL_CHUNK = 32  # under a budget, prompts run this many positions at a time (activations scale with it)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: (..., n) normed over its last axis and scaled by weight (n,)."""
    ms = np.add.reduce(x * x, axis=-1, keepdims=True) / np.float32(x.shape[-1])  # np.mean's own sum, without
    return x * (1.0 / np.sqrt(ms + eps)) * weight                                # its ~40us of Python per call


class Rope:
    """Rotary embedding: the angles of positions start..start+T-1 computed per call (float64, as tables would
    hold them: a table for a long context is megabytes the budget would pay for)."""

    def __init__(self, cfg: ModelConfig, base: float, n_ctx: int):
        half = cfg.rope_dims // 2
        self.inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / cfg.rope_dims)
        self.neox = cfg.rope_neox
        self.dims = cfg.rope_dims
        self._at: tuple = (-1, 0, None, None)  # the positions of the last call and their cos, sin (every layer's)

    def __call__(self, x: np.ndarray, start: int) -> np.ndarray:
        """x: (T, n_heads, head_dim) at positions start..start+T-1; rotated in place and returned."""
        t = x.shape[0]
        if self._at[:2] != (start, t):
            angles = np.arange(start, start + t, dtype=np.float64)[:, None] * self.inv[None, :]
            self._at = (start, t, np.cos(angles).astype(np.float32)[:, None, :],
                        np.sin(angles).astype(np.float32)[:, None, :])
        cos, sin = self._at[2], self._at[3]
        d = self.dims
        if self.neox:  # pairs (i, i + d/2)
            a, b = x[..., : d // 2], x[..., d // 2: d]
        else:  # adjacent pairs (2i, 2i+1)
            a, b = x[..., 0:d:2], x[..., 1:d:2]
        ra, rb = a * cos - b * sin, a * sin + b * cos
        a[...], b[...] = ra, rb
        return x


def lazy_zeros(shape: tuple, dtype) -> np.ndarray:
    """A zeroed array whose pages are taken when first written (an anonymous map, no huge pages)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), dtype, count=int(np.prod(shape))).reshape(shape)


class KVCache:
    """Keys and values of every layer, float16 as llama.cpp keeps them: (n_layers, n_kv_heads, n_ctx, head_dim).

    The memory is taken as positions are written, so it grows with the conversation: each array is an anonymous
    map of 4KiB pages (numpy's own large allocations ask for 2MiB huge pages, and writing one position of each
    head's row would take the whole cache at the first token)."""

    def __init__(self, cfg: ModelConfig, n_ctx: int):
        shape = (cfg.n_layers, cfg.n_kv_heads, n_ctx, cfg.head_dim)
        self.k = lazy_zeros(shape, np.float16)
        self.v = lazy_zeros(shape, np.float16)
        self.n_ctx = n_ctx

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def attend(self, i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, first: int,
               masked: np.ndarray | None) -> np.ndarray:
        """Layer i's attention: keys and values k, v (T, n_kv, head_dim) written at positions start.., then the
        queries q (T, n_heads, head_dim, scaled and rotated) over positions first..start+T-1, `masked` (T, S)
        hiding what a query may not see (None: nothing). The heads' outputs, (T, n_heads * head_dim)."""
        t, n_heads, hd = q.shape
        n_kv, end = k.shape[1], start + t
        self.k[i, :, start:end] = k.transpose(1, 0, 2)
        self.v[i, :, start:end] = v.transpose(1, 0, 2)
        keys = self.k[i, :, first:end].astype(np.float32)    # (n_kv, S, head_dim)
        values = self.v[i, :, first:end].astype(np.float32)  # (n_kv, S, head_dim)
        qg = q.reshape(t, n_kv, n_heads // n_kv, hd).transpose(1, 2, 0, 3)  # (n_kv, group, T, hd)
        scores = qg @ keys[:, None].transpose(0, 1, 3, 2)  # (n_kv, group, T, S)
        if masked is not None:
            scores = np.where(masked, np.float32(-np.inf), scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores @ values[:, None]  # (n_kv, group, T, hd)
        return out.transpose(2, 0, 1, 3).reshape(t, n_heads * hd)

    @staticmethod
    def bytes_for(cfg: ModelConfig, n_ctx: int) -> int:
        return 2 * cfg.n_layers * cfg.n_kv_heads * n_ctx * cfg.head_dim * 2


@dataclass
class Layer:
    """One block's attention weights and norms (its FFN is the parts' `ffn`)."""

    attn_norm: np.ndarray
    qkv: kernels.LinearGroup
    attn_output: kernels.LinearGroup
    ffn_norm: np.ndarray
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    attn_post_norm: np.ndarray | None = None
    ffn_post_norm: np.ndarray | None = None
    qkv_bias: np.ndarray | None = None   # qwen2, qwen2moe: q, k and v biases, concatenated


class Transformer:
    """Token ids -> logits for a decoder-only model: attention over the KV cache, and its `Parts` (embedding,
    linears, FFN, head; edge.parts) for the rest."""

    def __init__(self, src, n_ctx: int, backend="auto", threads: int | None = None, parts: Parts | None = None,
                 chunk: int | None = None):
        """backend: a name (kernels.BACKENDS) or a backend from `kernels.make_backend` (the one `parts` were built
        with). parts: what a strategy built for a budget (edge.strategies); default every weight resident.
        chunk: prompt positions per step (a budget's margin holds one chunk's activations); None: all at once."""
        cfg: ModelConfig = src.config
        self.cfg = cfg
        self.n_ctx = n_ctx
        self.src = src
        self.act = ACTIVATIONS[cfg.activation]
        self.backend = kernels.make_backend(backend, threads) if isinstance(backend, str) else backend
        self.parts = parts or resident_parts(src, self.backend, self.act)
        self.chunk = chunk
        self.layers = [self._load_layer(src, i) for i in range(cfg.n_layers)]
        self.output_norm = load_vector(src, "output_norm.weight", cfg.dim)
        self.kv = self.parts.kv(n_ctx) if self.parts.kv else KVCache(cfg, n_ctx)
        self.rope_global = Rope(cfg, cfg.rope_base, n_ctx)
        self.rope_local = Rope(cfg, cfg.rope_base_local, n_ctx) if cfg.sliding_window else self.rope_global
        self._trace: Trace | None = None
        self.last_hidden: np.ndarray | None = None
        self.seconds = dict.fromkeys(PROFILED, 0.0)  # wall time in each part so far (`edge run --profile`)
        release_free_memory()

    @property
    def trace(self) -> Trace | None:
        """Calibration's hook: trace(layer, point, x) with the input of every dense linear group: "attn_in"
        (q, k, v), "attn_out" (the attention output projection), "ffn_in" (gate, up), "ffn_h" (down); the
        activated gate act(gate) of a dense FFN, "ffn_gate" (modifying "ffn_h" in place changes what down sees);
        and the experts a mixture routes each token to, "experts" ((T, k) ids)."""
        return self._trace

    @trace.setter
    def trace(self, fn: Trace | None) -> None:
        self._trace = fn
        self.parts.ffn.trace = fn

    def _load_layer(self, src, i: int) -> Layer:
        cfg = self.cfg
        p = f"blk.{i}."
        dim, kv = cfg.dim, cfg.kv_dim
        linears = self.parts.linears
        layer = Layer(attn_norm=load_vector(src, p + "attn_norm.weight", dim), qkv=linears.group(i, "attn_in"),
                      attn_output=linears.group(i, "attn_out"), ffn_norm=load_vector(src, p + "ffn_norm.weight", dim))
        if cfg.qk_norm:
            full = cfg.qk_norm_full  # olmoe: over all heads at once
            layer.q_norm = load_vector(src, p + "attn_q_norm.weight", cfg.q_dim if full else cfg.head_dim)
            layer.k_norm = load_vector(src, p + "attn_k_norm.weight", cfg.kv_dim if full else cfg.head_dim)
        if cfg.attn_bias:
            layer.qkv_bias = np.concatenate([load_vector(src, p + "attn_q.bias", cfg.q_dim),
                                             load_vector(src, p + "attn_k.bias", kv),
                                             load_vector(src, p + "attn_v.bias", kv)])
        if cfg.post_norms:
            layer.attn_post_norm = load_vector(src, p + "post_attention_norm.weight", dim)
            layer.ffn_post_norm = load_vector(src, p + "post_ffw_norm.weight", dim)
        return layer

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """(T,) ids -> (T, dim): the embedding's rows (read from flash under a budget)."""
        return self.parts.embed(tokens)

    def forward(self, tokens: np.ndarray, start: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions start..start+T-1 (the cache holds 0..start-1).

        Returns logits (T, vocab) with all_logits, else (vocab,) for the last token.
        """
        x = self._hidden(tokens, start)
        if not all_logits:
            x = x[-1:]
        x = rms_norm(x, self.output_norm, self.cfg.norm_eps)
        t = time.perf_counter()
        (logits,) = self.parts.head(x)
        self.seconds["head"] += time.perf_counter() - t
        return logits if all_logits else logits[0]

    def nll(self, tokens) -> np.ndarray:
        """-log p(token[t+1] | tokens[:t+1]) for a window evaluated from position 0 (perplexity). Under a
        budget the head streams from flash with a running log-sum-exp: no (T, vocab) logits in RAM."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.parts.ffn.per_position:
            # each position with its own predicted clusters, as generation sees them (a batch of positions
            # would use the union of their predictions and hide the cost of skipping)
            h = np.concatenate([self._hidden(tokens[i:i + 1], i) for i in range(len(tokens))])
        else:
            h = self._hidden(tokens, 0)
        x = rms_norm(h, self.output_norm, self.cfg.norm_eps)
        return self.parts.head.nll(x[:-1], tokens[1:])

    def _hidden(self, tokens, start: int) -> np.ndarray:
        """The last block's output (before the final norm) for tokens at positions start.."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if start + len(tokens) > self.n_ctx:
            raise EdgeError(f"context full: {start + len(tokens)} tokens exceed the context of {self.n_ctx}; "
                            "raise --ctx or start a new chat")
        chunk = self.chunk
        if chunk is not None and len(tokens) > chunk:  # activations must fit the budget's margin
            x = np.concatenate([self._hidden(tokens[i:i + chunk], start + i) for i in range(0, len(tokens), chunk)])
            self.last_hidden = x
            return x
        t = time.perf_counter()
        x = self.embed(tokens)
        self.seconds["embedding"] += time.perf_counter() - t
        for i in range(len(self.layers)):
            x = self.block(i, x, start)
        self.last_hidden = x  # before the final norm (calibration reads it)
        return x

    def block(self, i: int, x: np.ndarray, start: int) -> np.ndarray:
        """Block i on x (T, dim) at positions start..: attention, then the FFN, each a residual line."""
        return self._block(i, x, lambda q, k, v: self._attend(i, q, k, v, start))

    def block_batch(self, i: int, xs: list[np.ndarray], starts: list[int], caches: list[KVCache]) -> list[np.ndarray]:
        """Block i on several independent sequences, xs[k] at positions starts[k].. with its own KV cache
        caches[k] (left as self.kv after): their products run as one, so a layer's weights are read once for
        all of them; attention is each sequence's own (calibration's chat answers)."""
        sizes = np.cumsum([len(x) for x in xs])[:-1]

        def attend(q, k, v):
            outs = []
            for parts, start, kv in zip(zip(*(np.split(a, sizes) for a in (q, k, v))), starts, caches):
                self.kv = kv
                outs.append(self._attend(i, *parts, start))
            return np.concatenate(outs)

        return np.split(self._block(i, np.concatenate(xs), attend), sizes)

    def _block(self, i: int, x: np.ndarray, attend) -> np.ndarray:
        """Block i on x (T, dim): attention (its projections here, attend(q, k, v) the rest), then the FFN."""
        cfg, layer, seconds = self.cfg, self.layers[i], self.seconds
        t0 = time.perf_counter()
        a = rms_norm(x, layer.attn_norm, cfg.norm_eps)
        if self.trace is not None:
            self.trace(i, "attn_in", a)
        q, k, v = layer.qkv(a)
        if layer.qkv_bias is not None:
            b = layer.qkv_bias
            q, k, v = q + b[:cfg.q_dim], k + b[cfg.q_dim:cfg.q_dim + cfg.kv_dim], v + b[cfg.q_dim + cfg.kv_dim:]
        out = attend(q, k, v)
        if self.trace is not None:
            self.trace(i, "attn_out", out)
        (h,) = layer.attn_output(out)
        if layer.attn_post_norm is not None:
            h = rms_norm(h, layer.attn_post_norm, cfg.norm_eps)
        x = x + h
        t1 = time.perf_counter()
        h = self.parts.ffn(i, rms_norm(x, layer.ffn_norm, cfg.norm_eps), x)
        t2 = time.perf_counter()
        seconds["attention"] += t1 - t0
        seconds["ffn"] += t2 - t1
        if layer.ffn_post_norm is not None:
            h = rms_norm(h, layer.ffn_post_norm, cfg.norm_eps)
        return x + h

    def _attend(self, i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
        """Attention of projected q, k, v (T rows each) at positions start.. over the KV cache (written here):
        the per-head outputs (T, q_dim), before the output projection."""
        cfg, layer = self.cfg, self.layers[i]
        t = q.shape[0]
        end = start + t
        if cfg.qk_norm_full:
            q, k = rms_norm(q, layer.q_norm, cfg.norm_eps), rms_norm(k, layer.k_norm, cfg.norm_eps)
        q = q.reshape(t, cfg.n_heads, cfg.head_dim)
        k = k.reshape(t, cfg.n_kv_heads, cfg.head_dim)
        if layer.q_norm is not None and not cfg.qk_norm_full:
            q = rms_norm(q, layer.q_norm, cfg.norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.norm_eps)
        local = cfg.local_layers[i]
        rope = self.rope_local if local else self.rope_global
        q = rope(np.ascontiguousarray(q), start) * np.float32(cfg.attn_scale)
        k = rope(np.ascontiguousarray(k), start)
        first = max(0, start - cfg.sliding_window + 1) if local else 0  # keys no query of this batch can see
        masked = None
        if t > 1:  # one position sees every key from `first` on (the sliding window starts there)
            qpos = np.arange(start, end)[:, None]
            kpos = np.arange(first, end)[None, :]
            masked = kpos > qpos
            if local:
                masked |= (qpos - kpos) >= cfg.sliding_window
        return self.kv.attend(i, q, k, v.reshape(t, cfg.n_kv_heads, cfg.head_dim), start, first, masked)
