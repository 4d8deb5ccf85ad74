"""The forward pass: llama-family and gemma3 decoder layers over a KV cache allocated once.

A block reads as two residual lines (attention on the normed input, then the gated FFN on the normed
result). Weights come from a `WeightSource` (a GGUF file today) through `kernels.linear_group`, which keeps
them quantized in RAM. Sampling lives in `edge.sampling`; this module only turns token ids into logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge import kernels, quants
from edge.config import ModelConfig
from edge.errors import EdgeError
from edge.gguf_file import Tensor


PREFILL_CHUNK = 32  # under a budget, prompts run this many positions at a time (activations scale with it)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: (..., n) normed over its last axis and scaled by weight (n,)."""
    ms = np.add.reduce(x * x, axis=-1, keepdims=True) / np.float32(x.shape[-1])  # np.mean's own sum, without
    return x * (1.0 / np.sqrt(ms + eps)) * weight                                # its ~40us of Python per call


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


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


class KVCache:
    """Keys and values of every layer, float16 as llama.cpp keeps them: (n_layers, n_kv_heads, n_ctx, head_dim)."""

    def __init__(self, cfg: ModelConfig, n_ctx: int):
        shape = (cfg.n_layers, cfg.n_kv_heads, n_ctx, cfg.head_dim)
        self.k = np.zeros(shape, np.float16)
        self.v = np.zeros(shape, np.float16)
        self.n_ctx = n_ctx

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_for(cfg: ModelConfig, n_ctx: int) -> int:
        return 2 * cfg.n_layers * cfg.n_kv_heads * n_ctx * cfg.head_dim * 2


@dataclass
class Layer:
    attn_norm: np.ndarray
    qkv: kernels.LinearGroup
    attn_output: kernels.LinearGroup
    ffn_norm: np.ndarray
    gate_up: kernels.LinearGroup | None  # None under a budget: the FFN streams (edge.sparse)
    down: kernels.LinearGroup | None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    attn_post_norm: np.ndarray | None = None
    ffn_post_norm: np.ndarray | None = None
    router: np.ndarray | None = None     # mixture of experts: (n_experts, dim), float32
    experts: list | None = None          # per expert: (gate_up, down) linear groups
    shared: tuple | None = None          # qwen2moe: (gate vector (dim,), gate_up, down) of the shared expert
    qkv_bias: np.ndarray | None = None   # qwen2, qwen2moe: q, k and v biases, concatenated


def _norm(src, name: str, size: int) -> np.ndarray:
    t = src.tensor(name, (size,))
    return quants.dequantize(t.raw, t.type_id).reshape(-1).astype(np.float32)


def expert_tensors(src, layer: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Gate, up and down of each of a layer's experts: a store's records (each in its chosen bitwidth), or
    sliced out of a GGUF's stacked 3-D tensors."""
    if hasattr(src, "expert_tensors"):
        return src.expert_tensors(layer)
    cfg = src.config
    n, dim, hidden = cfg.n_experts, cfg.dim, cfg.expert_hidden
    p = f"blk.{layer}.ffn_"
    stacks = [src.tensor(p + f"{k}_exps.weight", shape) for k, shape in
              (("gate", (n, hidden, dim)), ("up", (n, hidden, dim)), ("down", (n, dim, hidden)))]

    def one(t: Tensor, e: int) -> Tensor:
        rows, cols = t.shape[1], t.shape[2]
        return Tensor(f"{t.name}[{e}]", t.type_id, (rows, cols), t.raw[e * rows:(e + 1) * rows])

    return [tuple(one(t, e) for t in stacks) for e in range(n)]


def release_free_memory() -> None:
    """Give the temporaries of loading back to the OS (glibc keeps freed heap pages otherwise)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class Transformer:
    """Token ids -> logits for a decoder-only model; holds the resident weights and the KV cache."""

    def __init__(self, src, n_ctx: int, backend: str = "auto", threads: int | None = None, plan=None):
        """plan: an `edge.budget.Plan` to run under a RAM budget (a calibrated store): llama.cpp's kernels on
        the stored bytes, the FFN streamed into a neuron cache, embedding and exact head rows read from flash."""
        cfg: ModelConfig = src.config
        self.cfg = cfg
        self.n_ctx = n_ctx
        self.src = src
        self.plan = plan
        paged = plan is not None and plan.strategy == "experts"
        if plan is not None and cfg.n_experts and not paged:
            raise EdgeError(f"{src.path}: a mixture-of-experts model runs under --ram with --strategy experts "
                            f"(not {plan.strategy})")
        self.act = ACTIVATIONS[cfg.activation]
        first = [src.tensor(f"blk.0.attn_{n}.weight").type_id for n in ("q", "k", "v", "output")]
        self.backend = kernels.make_backend("ggml" if plan else backend, threads, first)
        self.stack = None  # BitStack: the linears as loaded blocks (edge.bitstack), the rest resident as stored
        self.stack_ffn = None  # bitstack-stream: the stacked FFN by clusters of neurons, partly from flash
        if plan is not None and plan.strategy in ("bitstack", "bitstack-stream"):
            from edge.bitstack import Stack, StackedFFN

            self.stack = Stack(src, self.backend.ggml, plan.prefix, ffn=not plan.streams)
            if plan.streams:
                self.stack_ffn = StackedFFN(src, self.backend.ggml, self.act, self.stack.info.depths(plan.prefix),
                                            plan.ffn_slots)
        self.experts = None  # under a budget, a mixture of experts pages its experts (edge.experts)
        if paged:
            from edge.experts import ExpertPager

            self.experts = ExpertPager(src, self.backend.ggml, self.act, plan.slots, plan.policy, plan.prefetch,
                                       plan.predictor, read_threads=src.engine.threads)
        self.layers = [self._load_layer(src, i) for i in range(cfg.n_layers)]
        if self.experts is not None:
            self.experts.routers = [layer.router for layer in self.layers]
            self.experts.norms = [layer.ffn_norm for layer in self.layers]
        self.output_norm = _norm(src, "output_norm.weight", cfg.dim)
        self.sparse_ffn = None
        if plan is not None and not paged and (self.stack is None or src.sparse is not None):  # head from flash
            from edge.sparse import ApproxHead, RowCache, SparseFFN

            if self.stack is None:
                self.sparse_ffn = SparseFFN(src, self.backend.ggml, self.act, plan.slots, plan.sparsity,
                                            plan.window, plan.strategy, read_threads=src.engine.threads,
                                            read_ahead=plan.read_ahead)
            self.token_embd = None
            info = src.attrs["tensors"]["token_embd.weight"]
            self.embd_type = info["type"]
            self.output = ApproxHead(src, self.backend.ggml)
            tied = self.output.name == "token_embd.weight"
            self.embd_rows = self.output.row_cache if tied else RowCache(src, "token_embd.weight")
        else:
            self.token_embd = src.tensor("token_embd.weight", (cfg.vocab_size, cfg.dim))
            head = (
                src.tensor("output.weight", (cfg.vocab_size, cfg.dim)) if src.has("output.weight") else self.token_embd
            )
            self.output = self.backend.linear_group([head])
        self.kv = KVCache(cfg, n_ctx)
        self.rope_global = Rope(cfg, cfg.rope_base, n_ctx)
        self.rope_local = Rope(cfg, cfg.rope_base_local, n_ctx) if cfg.sliding_window else self.rope_global
        # calibration: trace(layer, point, x) with the input of every dense linear group: "attn_in" (q, k, v),
        # "attn_out" (the attention output projection), "ffn_in" (gate, up), "ffn_h" (down); and the experts a
        # mixture routes each token to, "experts" ((T, k) ids)
        self.trace = None
        release_free_memory()

    def _load_layer(self, src, i: int) -> Layer:
        cfg = self.cfg
        p = f"blk.{i}."
        lin = self.backend.linear_group
        dim, hidden, kv = cfg.dim, cfg.hidden_dim, cfg.kv_dim
        stack = self.stack
        dense = not self.plan and not cfg.n_experts
        stacked_ffn = stack is not None and self.stack_ffn is None
        layer = Layer(
            attn_norm=_norm(src, p + "attn_norm.weight", dim),
            qkv=stack.group(i, "attn_in") if stack else lin([
                src.tensor(p + "attn_q.weight", (cfg.q_dim, dim)), src.tensor(p + "attn_k.weight", (kv, dim)),
                src.tensor(p + "attn_v.weight", (kv, dim))]),
            attn_output=stack.group(i, "attn_out") if stack else lin([src.tensor(p + "attn_output.weight",
                                                                                 (dim, cfg.q_dim))]),
            ffn_norm=_norm(src, p + "ffn_norm.weight", dim),
            gate_up=stack.group(i, "ffn_in") if stacked_ffn else lin([
                src.tensor(p + "ffn_gate.weight", (hidden, dim)),
                src.tensor(p + "ffn_up.weight", (hidden, dim))]) if dense else None,
            down=stack.group(i, "ffn_h") if stacked_ffn else lin([src.tensor(p + "ffn_down.weight", (dim, hidden))])
            if dense else None,
        )
        if cfg.n_experts:
            layer.router, layer.experts = self._load_experts(src, p, resident=self.experts is None)
        if cfg.shared_expert_hidden:
            layer.shared = self._load_shared_expert(src, p)
        if cfg.qk_norm:
            full = cfg.qk_norm_full  # olmoe: over all heads at once
            layer.q_norm = _norm(src, p + "attn_q_norm.weight", cfg.q_dim if full else cfg.head_dim)
            layer.k_norm = _norm(src, p + "attn_k_norm.weight", cfg.kv_dim if full else cfg.head_dim)
        if cfg.attn_bias:
            layer.qkv_bias = np.concatenate(
                [
                    _norm(src, p + "attn_q.bias", cfg.q_dim),
                    _norm(src, p + "attn_k.bias", kv),
                    _norm(src, p + "attn_v.bias", kv),
                ]
            )
        if cfg.post_norms:
            layer.attn_post_norm = _norm(src, p + "post_attention_norm.weight", dim)
            layer.ffn_post_norm = _norm(src, p + "post_ffw_norm.weight", dim)
        return layer

    def _load_experts(self, src, p: str, resident: bool = True) -> tuple[np.ndarray, list | None]:
        """The router (float32) and each expert's matrices (not resident: the router alone; the experts page
        in through edge.experts)."""
        n, dim = self.cfg.n_experts, self.cfg.dim
        r = src.tensor(p + "ffn_gate_inp.weight", (n, dim))
        router = quants.dequantize(r.raw, r.type_id, r.cols).reshape(n, dim).astype(np.float32)
        if not resident:
            return router, None
        lin = self.backend.linear_group
        return router, [(lin([g, u]), lin([d])) for g, u, d in expert_tensors(src, int(p.split(".")[1]))]

    def _load_shared_expert(self, src, p: str) -> tuple:
        cfg = self.cfg
        dim, hidden, lin = cfg.dim, cfg.shared_expert_hidden, self.backend.linear_group
        return (
            _norm(src, p + "ffn_gate_inp_shexp.weight", dim),
            lin(
                [
                    src.tensor(p + "ffn_gate_shexp.weight", (hidden, dim)),
                    src.tensor(p + "ffn_up_shexp.weight", (hidden, dim)),
                ]
            ),
            lin([src.tensor(p + "ffn_down_shexp.weight", (dim, hidden))]),
        )

    @property
    def paged(self) -> list:
        """The parts paged from flash under the budget: the neuron cache (edge.sparse) or the expert cache."""
        return [p for p in (self.sparse_ffn, self.experts) if p is not None]

    @property
    def resident_bytes(self) -> int:
        return self.backend.resident_bytes + self.kv.nbytes

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """(T,) ids -> (T, dim): the rows of the embedding table, dequantized on lookup (read from flash under
        a budget)."""
        rows = self.cfg.vocab_size
        if np.any(tokens < 0) or np.any(tokens >= rows):
            raise EdgeError(f"token id out of range [0, {rows})")
        if self.token_embd is None:
            ids, back = np.unique(tokens, return_inverse=True)
            x = quants.dequantize(self.embd_rows.get(ids)[back], self.embd_type, self.cfg.dim)
        else:
            t = self.token_embd
            x = quants.dequantize(t.raw[tokens], t.type_id, t.cols)
        return x * np.float32(self.cfg.embed_scale) if self.cfg.embed_scale != 1.0 else x

    def forward(self, tokens: np.ndarray, start: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions start..start+T-1 (the cache holds 0..start-1).

        Returns logits (T, vocab) with all_logits, else (vocab,) for the last token.
        """
        x = self._hidden(tokens, start)
        if not all_logits:
            x = x[-1:]
        x = rms_norm(x, self.output_norm, self.cfg.norm_eps)
        (logits,) = self.output(x)
        return logits if all_logits else logits[0]

    def nll(self, tokens) -> np.ndarray:
        """-log p(token[t+1] | tokens[:t+1]) for a window evaluated from position 0 (perplexity). Under a
        budget the head streams from flash with a running log-sum-exp: no (T, vocab) logits in RAM."""
        from edge.evaluate import token_nll

        tokens = np.asarray(tokens, dtype=np.int64)
        if self.sparse_ffn is not None and self.sparse_ffn.predicting:
            # each position with its own predicted clusters, as generation sees them (a batch of positions
            # would use the union of their predictions and hide the cost of skipping)
            h = np.concatenate([self._hidden(tokens[i:i + 1], i) for i in range(len(tokens))])
        else:
            h = self._hidden(tokens, 0)
        x = rms_norm(h, self.output_norm, self.cfg.norm_eps)
        if self.token_embd is None:  # the head streams (edge.sparse.ApproxHead)
            return self.output.nll(x[:-1], tokens[1:])
        (logits,) = self.output(x)
        return token_nll(logits, tokens)

    def _hidden(self, tokens, start: int) -> np.ndarray:
        """The last block's output (before the final norm) for tokens at positions start.."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if start + len(tokens) > self.n_ctx:
            raise EdgeError(f"context full: {start + len(tokens)} tokens exceed the context of {self.n_ctx}; "
                            "raise --ctx or start a new chat")
        chunk = getattr(self.plan, "chunk", PREFILL_CHUNK)
        if self.plan is not None and len(tokens) > chunk:  # activations must fit the budget's margin
            x = np.concatenate([self._hidden(tokens[i:i + chunk], start + i) for i in range(0, len(tokens), chunk)])
            self.last_hidden = x
            return x
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = self._block(i, layer, x, start)
        self.last_hidden = x  # before the final norm (calibration reads it)
        return x

    def _block(self, i: int, layer: Layer, x: np.ndarray, start: int) -> np.ndarray:
        cfg = self.cfg
        h = self._attention(i, layer, rms_norm(x, layer.attn_norm, cfg.norm_eps), start)
        if layer.attn_post_norm is not None:
            h = rms_norm(h, layer.attn_post_norm, cfg.norm_eps)
        x = x + h
        h = self._ffn(i, layer, rms_norm(x, layer.ffn_norm, cfg.norm_eps), x)
        if layer.ffn_post_norm is not None:
            h = rms_norm(h, layer.ffn_post_norm, cfg.norm_eps)
        return x + h

    def _ffn(self, i: int, layer: Layer, x: np.ndarray, resid: np.ndarray) -> np.ndarray:
        """x: the normed FFN input; resid: the residual stream it was normed from (expert prediction reads it)."""
        if self.sparse_ffn is not None:
            return self.sparse_ffn(i, x)
        if self.stack_ffn is not None:
            return self.stack_ffn(i, x)
        if layer.router is not None:
            return self._moe(i, layer, x, resid)
        gate, up = layer.gate_up(x)
        act = self.act(gate) * up
        if self.trace is not None:
            self.trace(i, "ffn_in", x)
            self.trace(i, "ffn_h", act)
        (h,) = layer.down(act)
        return h

    def _moe(self, i: int, layer: Layer, x: np.ndarray, resid: np.ndarray) -> np.ndarray:
        """Mixture of experts as llama.cpp computes it: softmax over the router's logits, the top k experts
        per token, their weights renormalized (Mixtral, Qwen3-MoE; not Qwen2-MoE, OLMoE), the weighted sum of
        their FFNs, plus Qwen2-MoE's sigmoid-gated shared expert."""
        cfg = self.cfg
        logits = x @ layer.router.T  # (T, n_experts)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :cfg.n_experts_used]  # (T, k)
        weights = np.take_along_axis(probs, top, axis=-1)
        if cfg.expert_weights_norm:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        if self.trace is not None:
            self.trace(i, "experts", top)
        if self.experts is not None:  # paged from flash
            out = self.experts(i, x, top, weights, resid)
        else:
            out = self._resident_experts(layer, x, top, weights)
        if layer.shared is not None:  # qwen2moe: every token also through the shared expert, gated by a sigmoid
            gate_vec, gate_up, down = layer.shared
            gate, up = gate_up(x)
            (h,) = down(self.act(gate) * up)
            out += h / (1.0 + np.exp(-(x @ gate_vec)))[:, None]
        return out

    def _resident_experts(self, layer: Layer, x: np.ndarray, top: np.ndarray, weights: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), self.cfg.dim), np.float32)
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)  # the tokens routed to expert e
            gate_up, down = layer.experts[e]
            gate, up = gate_up(x[rows])
            (h,) = down(self.act(gate) * up)
            out[rows] += weights[rows, slot][:, None] * h
        return out

    def _attention(self, i: int, layer: Layer, x: np.ndarray, start: int) -> np.ndarray:
        cfg = self.cfg
        t = x.shape[0]
        end = start + t
        if self.trace is not None:
            self.trace(i, "attn_in", x)
        q, k, v = layer.qkv(x)
        if layer.qkv_bias is not None:
            b = layer.qkv_bias
            q, k, v = q + b[:cfg.q_dim], k + b[cfg.q_dim:cfg.q_dim + cfg.kv_dim], v + b[cfg.q_dim + cfg.kv_dim:]
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
        self.kv.k[i, :, start:end] = k.transpose(1, 0, 2)
        self.kv.v[i, :, start:end] = v.reshape(t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 0, 2)
        first = max(0, start - cfg.sliding_window + 1) if local else 0  # keys no query of this batch can see
        keys = self.kv.k[i, :, first:end].astype(np.float32)    # (n_kv, S, head_dim)
        values = self.kv.v[i, :, first:end].astype(np.float32)  # (n_kv, S, head_dim)
        group = cfg.n_heads // cfg.n_kv_heads
        qg = q.reshape(t, cfg.n_kv_heads, group, cfg.head_dim).transpose(1, 2, 0, 3)  # (n_kv, group, T, hd)
        scores = qg @ keys[:, None].transpose(0, 1, 3, 2)  # (n_kv, group, T, S)
        if t > 1:  # one position sees every key from `first` on (the sliding window starts there)
            qpos = np.arange(start, end)[:, None]
            kpos = np.arange(first, end)[None, :]
            masked = kpos > qpos
            if local:
                masked |= (qpos - kpos) >= cfg.sliding_window
            scores = np.where(masked, np.float32(-np.inf), scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores @ values[:, None]  # (n_kv, group, T, hd)
        out = out.transpose(2, 0, 1, 3).reshape(t, cfg.q_dim)
        if self.trace is not None:
            self.trace(i, "attn_out", out)
        (h,) = layer.attn_output(out)
        return h
