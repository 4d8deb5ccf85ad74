"""--gpu through ggml's backend registry (edge.ggml.Accelerator, edge.offload), on the device every build has:
the CPU's. Weights uploaded into its buffers and products computed there take the path a CUDA, Vulkan or Metal
device takes. In a GPU build (`make gpu`) the last test also compares each GPU with the CPU (Mesa's software
Vulkan driver shows itself with GGML_VK_VISIBLE_DEVICES=0)."""

from __future__ import annotations

import numpy as np
import pytest

from edge.engine import Engine
from edge.errors import EdgeError
from edge.evaluate import eval_text, token_nll, windows
from edge.ggml import devices
from edge.sizes import parse_size
from edge.strategies import Options

GPU_DEVICES = [name for name, _, kind, _ in devices() if kind != "CPU"]  # in a GPU build (`make gpu`)
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning"


def test_device_products_equal_the_cpu_runtimes(smollm2, monkeypatch):
    """Real weights uploaded to the registry's CPU device give the CPU runtime's products bit for bit, for one
    position (kept graphs), many, and many computed in parts (outputs over DEVICE_TENSOR); what the device
    holds is counted."""
    from edge import ggml as G
    from edge.ggml import Accelerator, Weight, ggml
    from edge.gguf_file import GGUFFile

    src = GGUFFile(smollm2)
    ws = [src.tensor(f"blk.0.{n}.weight") for n in ("attn_q", "ffn_down")]
    weights = [Weight(np.ascontiguousarray(t.raw), t.type_id, t.rows, t.cols) for t in ws]
    acc = Accelerator("CPU", 2)
    on_device = acc.upload(weights)
    assert acc.used >= sum(w.rows * w.row_stride for w in weights)
    gg, rng = ggml(2), np.random.default_rng(0)
    for t in (1, 1, 7):
        for w, d in zip(weights, on_device):
            x = rng.standard_normal((t, w.cols)).astype(np.float32)
            np.testing.assert_array_equal(acc.products([(x, d)])[0], gg.matmul(x, [w], keep=False)[0])
    assert len(acc._graphs) == 2  # one kept graph per one-position product, a prompt's freed
    monkeypatch.setattr(G, "DEVICE_TENSOR", 4 * 3 * weights[0].rows)  # outputs of 3 positions at most: in parts
    x = rng.standard_normal((8, weights[0].cols)).astype(np.float32)
    np.testing.assert_array_equal(acc.products([(x, on_device[0])])[0], gg.matmul(x, [weights[0]], keep=False)[0])
    del on_device, d  # the upload's buffer and the graphs kept over its tensors go with its last weight
    assert acc.used == acc.main.size and not acc._graphs  # what is left: the scratch of a prompt's products
    with pytest.raises(EdgeError, match="no such device"):
        Accelerator("NoSuchGPU0", 2)


def greedy(engine: Engine, n: int = 16) -> list[int]:
    return [ev.token for ev in engine.generate(engine.tokenizer.encode(PROMPT), max_tokens=n,
                                               stop_at_end=False)]


def test_resident_weights_on_the_device_give_the_same_tokens(real_model):
    """No budget: the attention, every FFN and the head on the device (all of it), or the attention alone
    (--gpu-mem): the same greedy tokens as the CPU path, on both real models."""
    cpu = greedy(Engine(real_model, n_ctx=128, threads=2))
    whole = Engine(real_model, n_ctx=128, threads=2, options=Options(gpu="CPU"))
    assert whole.gpu.ffn_layers == whole.config.n_layers and whole.gpu.attention > 0 and whole.gpu.head > 0
    assert greedy(whole) == cpu
    part = Engine(real_model, n_ctx=128, threads=2, options=Options(gpu="CPU", gpu_mem=whole.gpu.attention + 1))
    assert part.gpu.ffn_layers == 0 and part.gpu.attention == whole.gpu.attention and part.gpu.head == 0
    assert greedy(part) == cpu


def test_budgeted_sparse_ffn_with_clusters_on_the_device(smol_store):
    """Under --ram the device takes the attention and each layer's first clusters (the plan says how many, and
    that the CPU device's memory is RAM); the rest is cached or streamed as before. The FFN's sums then split
    differently, as a smaller cache's do: the same top-1 token at every position, logits within a tolerance.
    Shrunk to near its minimum, the clusters beyond the device's stream and generation goes on."""
    ram = parse_size("4GB")  # the baseline here is pytest's
    cpu = Engine(smol_store, n_ctx=256, threads=2, ram=ram)
    toks = np.array(cpu.tokenizer.encode(PROMPT), np.int64)
    want = cpu.model.forward(toks, 0, all_logits=True)
    del cpu
    gpu = Engine(smol_store, n_ctx=256, threads=2, ram=ram, options=Options(gpu="CPU", gpu_mem=parse_size("30MB")))
    g, d = gpu.plan.gpu, gpu.plan.detail
    assert g.unified and g.attention > 0 and 0 < g.per_layer == d.gpu_clusters
    assert d.slots + g.per_layer == d.n_clusters and not d.attention
    assert "unified memory" in gpu.plan.lines()[-1]
    got = gpu.model.forward(toks, 0, all_logits=True)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    ffn = gpu.model.parts.ffn
    plan = gpu.resize(gpu.plan.minimum + 8 * d.slot_bytes)
    assert plan.gpu == g and plan.detail.slots + g.per_layer < d.n_clusters  # some clusters stream now
    assert all(c.slots == plan.detail.slots for c in ffn.caches)
    ffn.reset()
    assert len(greedy(gpu, 8)) == 8
    st = ffn.stats(8)
    assert st["read_bytes"] > 0 and st["neurons_per_token"] == gpu.config.hidden_dim * gpu.config.n_layers


def test_gpu_flags_refuse_what_they_cannot_do(smol_store):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "edge", "run", "--gpu-mem", "1GB", "-p", "Hi"], capture_output=True,
                         text=True)
    assert run.returncode != 0 and run.stderr.strip().endswith("--gpu-mem needs --gpu: the device whose memory it is")
    with pytest.raises(EdgeError, match="--gpu Vulkan7: no such device"):
        Engine(smol_store, n_ctx=64, threads=2, ram=parse_size("200MB"), options=Options(gpu="Vulkan7"))
    with pytest.raises(EdgeError, match="--gpu-mem 100.0TB is above the .* of --gpu CPU"):
        Engine(smol_store, n_ctx=64, threads=2, options=Options(gpu="CPU", gpu_mem=parse_size("100TB")))
    with pytest.raises(EdgeError, match="--strategy sparse or experts"):
        Engine(smol_store, n_ctx=64, threads=2, ram=parse_size("200MB"),
               options=Options(strategy="naive", gpu="CPU"))


def test_hottest_clusters_go_to_the_device_with_predictors(smol_calibrated):
    """With --sparsity the device takes each layer's clusters that calibration found the predictor to choose
    most often (`hot`, a permutation of the layer's clusters), computes them at every token, and the predictor
    chooses among the others only."""
    opts = Options(sparsity=0.5, gpu="CPU", gpu_mem=parse_size("30MB"))
    engine = Engine(smol_calibrated, n_ctx=256, threads=2, ram=parse_size("4GB"), options=opts)
    ffn, layers = engine.model.parts.ffn, engine.file.sparse["layers"]
    g = engine.plan.gpu.per_layer
    assert g > 0 and all(sorted(layer["hot"]) == list(range(len(layer["hot"]))) for layer in layers)
    for ids, layer in zip(ffn.gpu_ids, layers):
        assert ids.tolist() == layer["hot"][:g]
    ffn.reset()
    n = 8
    assert len(greedy(engine, n)) == n
    st = ffn.counters
    per_layer = [lay.n_clusters - g for lay in ffn.layouts]
    assert 0 < st.needed < sum(per_layer) * (n + len(engine.tokenizer.encode(PROMPT)))
    assert all((ffn.caches[i].cluster_of[:ffn.caches[i].used] >= 0).all() and
               not ffn.on_gpu[i][ffn.caches[i].cluster_of[:ffn.caches[i].used]].any() for i in range(len(layers)))


@pytest.mark.skipif(not GPU_DEVICES, reason="this llama-cpp-python has no GPU backend (`make gpu` builds one)")
@pytest.mark.parametrize("device", GPU_DEVICES or ["none"])
def test_a_gpu_agrees_with_the_cpu_up_to_near_ties(real_model, device):
    """A GPU's kernels round differently (no Q8 activations): over two windows of real text, teacher-forced,
    the perplexity within 1% of the CPU's and the top-1 token the same except where the CPU's top two were
    close. The head's logits of a window (Gemma's: 268MB) are computed in parts."""
    logits = {}
    for name in ("", device):
        engine = Engine(real_model, n_ctx=256, threads=2, options=Options(gpu=name))
        tok = engine.tokenizer
        wins = windows(tok.encode(eval_text(), add_bos=False), 256, 2, tok.bos_id if tok.add_bos else None)
        logits[name] = [engine.model.forward(np.array(w, np.int64), 0, all_logits=True) for w in wins]
    cpu, gpu = (np.concatenate(logits[k]) for k in ("", device))
    ppl_cpu, ppl_gpu = (float(np.exp(np.concatenate([token_nll(v, w) for v, w in zip(logits[k], wins)]).mean()))
                        for k in ("", device))
    assert abs(ppl_gpu / ppl_cpu - 1) < 0.01
    differ = cpu.argmax(-1) != gpu.argmax(-1)
    assert differ.mean() < 0.1
    top2 = np.sort(cpu[differ], axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] < 1.0).all()


def test_kv_cache_on_the_device_attends_as_in_ram(smollm2, monkeypatch):
    """The KV cache in a device's memory (a GPU takes it with the attention; here forced onto the CPU device)
    attends as the RAM cache does up to float16 queries and probabilities (llama.cpp's own precision): the same
    outputs to 0.2% of their scale for a prompt with its causal mask (whole, and in parts past DEVICE_TENSOR), a
    decode step and a sliding window; over a
    real prompt and its decode steps the same perplexity to 2% and top-1 token at 90% of positions."""
    from types import SimpleNamespace

    from edge import ggml as G
    from edge.ggml import Accelerator, DeviceKV
    from edge.model import KVCache
    from edge.parts import device_kv

    acc, rng = Accelerator("CPU", 2), np.random.default_rng(0)
    cfg = SimpleNamespace(n_layers=2, n_kv_heads=2, head_dim=64)
    ram, dev = KVCache(cfg, 64), DeviceKV(acc, 2, 2, 64, 64)
    assert acc.used == dev.nbytes >= 2 * KVCache.bytes_for(cfg, 64) // 2
    for t, start, first in ((5, 0, 0), (1, 5, 0), (1, 6, 3)):
        q = rng.standard_normal((t, 6, 64)).astype(np.float32) * 0.3
        k, v = (rng.standard_normal((t, 2, 64)).astype(np.float32) for _ in range(2))
        masked = np.arange(t)[None, :] > np.arange(t)[:, None] if t > 1 else None
        want = ram.attend(1, q, k, v, start, first, masked)
        assert np.abs(dev.attend(1, q, k, v, start, first, masked) - want).max() < 2e-3 * np.abs(want).max()
    monkeypatch.setattr(G, "DEVICE_TENSOR", 4 * 6 * 5 * 2)  # a prompt's scores in parts of 2 queries
    masked = np.arange(5)[None, :] > np.arange(5)[:, None]
    want = ram.attend(0, q := rng.standard_normal((5, 6, 64)).astype(np.float32), k := q[:, :2], k, 0, 0, masked)
    assert np.abs(dev.attend(0, q, k, k, 0, 0, masked) - want).max() < 2e-3 * np.abs(want).max()
    monkeypatch.undo()
    engine = Engine(smollm2, n_ctx=256, threads=2)
    toks = engine.tokenizer.encode(eval_text(), add_bos=False)[:200]
    model = engine.model

    def run() -> np.ndarray:
        prompt = model.forward(np.array(toks[:180], np.int64), 0, all_logits=True)
        steps = [model.forward(np.array([x], np.int64), 180 + j)[None] for j, x in enumerate(toks[180:])]
        return np.concatenate([prompt] + steps)

    want = run()
    model.kv = device_kv(acc, engine.config)(256)
    got = run()
    nll = [token_nll(v, toks) for v in (want, got)]
    assert abs(np.exp(nll[1].mean()) / np.exp(nll[0].mean()) - 1) < 0.02
    assert (want.argmax(-1) == got.argmax(-1)).mean() >= 0.9
    del dev, model.kv  # its memory, scratch and backend instance go with it
    assert acc.used == 0


def test_most_routed_experts_on_the_device(moe_store):
    """A mixture under --ram: the device takes the attention and each layer's first (uncalibrated: no routing
    counts) experts, computes them when routed, and the expert cache pages only the others; the same top-1 at
    every position of a prompt as without the device, logits within float rounding of a different sum order."""
    _, store = moe_store
    ram, toks = parse_size("4GB"), np.arange(1, 40, dtype=np.int64)
    cpu = Engine(store, n_ctx=64, threads=2, ram=ram)
    want = cpu.model.forward(toks, 0, all_logits=True)
    del cpu
    gpu = Engine(store, n_ctx=64, threads=2, ram=ram, options=Options(gpu="CPU", gpu_mem=parse_size("1MB")))
    g, d = gpu.plan.gpu, gpu.plan.detail
    assert g.unit == "experts" and g.attention > 0 and 0 < g.per_layer == d.gpu_experts < gpu.config.n_experts
    assert d.slots <= d.n_experts - d.on_gpu and "more on the GPU" in gpu.plan.lines()[1]
    pager = gpu.model.parts.ffn.experts
    assert all(sorted(layer) == list(range(g.per_layer)) for layer in pager.on_device)
    got = gpu.model.forward(toks, 0, all_logits=True)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())
    assert not any(key[1] in pager.on_device[key[0]] for key in pager.slot_of)  # never cached in RAM
