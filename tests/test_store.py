"""The flash store: convert, run with the same tokens as the GGUF, and refuse every damaged store clearly."""

import errno
import json
import shutil

import numpy as np
import pytest

from edge.engine import Engine
from edge.errors import EdgeError
from edge.store import Store
from weights_tools import convert as convert_mod
from weights_tools.convert import convert


def greedy(model, n=24):
    e = Engine(model, n_ctx=256, threads=2)
    prompt = e.tokenizer.encode("The capital of France is")
    return [ev.token for ev in e.generate(prompt, n, stop_at_end=False) if ev.token >= 0], e


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_store_generates_the_gguf_tokens(request, name):
    gguf_path = request.getfixturevalue(name)
    store = request.getfixturevalue("smol_store" if name == "smollm2" else "gemma_store")
    n = 24 if name == "smollm2" else 8  # Gemma's 262144-row head makes each token slow; bytes differ at once
    from_gguf, _ = greedy(gguf_path, n)
    from_store, engine = greedy(store, n)
    assert from_store == from_gguf
    assert engine.file.engine.stats.reads > 0  # the weights came through the I/O engine


def test_bundles_hold_the_source_bytes(smol_store, smollm2):
    from edge.gguf_file import GGUFFile

    src, st = GGUFFile(smollm2), Store(smol_store)
    for name in ("blk.3.ffn_gate.weight", "blk.3.ffn_up.weight", "blk.3.ffn_down.weight", "token_embd.weight"):
        assert np.array_equal(st.tensor(name).raw, src.tensor(name).raw), name
    assert all(lay["cluster"] % 32 == 0 for lay in st.ffn_layouts)


def damaged_copy(store, tmp_path):
    dst = tmp_path / "copy.edge"
    shutil.copytree(store, dst)
    return dst


def test_flipped_byte_names_array_and_chunk(smol_store, tmp_path):
    dst = damaged_copy(smol_store, tmp_path)
    shard = dst / "ffn" / "blk.2" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(EdgeError, match=r"chunk 0 of array 'ffn/blk.2' fails its checksum"):
        Store(dst).tensor("blk.2.ffn_up.weight")


def test_truncated_shard(smol_store, tmp_path):
    dst = damaged_copy(smol_store, tmp_path)
    shard = dst / "t" / "token_embd.weight" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(EdgeError, match="token_embd.weight.*(damaged|past the end)"):
        Store(dst).tensor("token_embd.weight")


def test_missing_zarr_json(smol_store, tmp_path):
    dst = damaged_copy(smol_store, tmp_path)
    (dst / "zarr.json").unlink()
    with pytest.raises(EdgeError, match="no zarr.json"):
        Store(dst)


def test_zarr_json_not_json(smol_store, tmp_path):
    dst = damaged_copy(smol_store, tmp_path)
    (dst / "zarr.json").write_text('{"attributes": {"edge": ')
    with pytest.raises(EdgeError, match=r"zarr.json: damaged \(not valid JSON"):
        Store(dst)


def test_other_format_version(smol_store, tmp_path):
    dst = damaged_copy(smol_store, tmp_path)
    meta = json.loads((dst / "zarr.json").read_text())
    meta["attributes"]["edge"]["format_version"] = 99
    (dst / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(EdgeError, match="format version 99.*convert the model again"):
        Store(dst)


def test_interrupted_convert_leaves_nothing_and_reruns(smollm2, tmp_path, monkeypatch):
    out = tmp_path / "m.edge"
    real = convert_mod.write_array
    calls = {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(convert_mod, "write_array", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(smollm2, out, quiet=True)
    assert not out.exists() and not (tmp_path / "m.edge.partial").exists()
    (tmp_path / "m.edge.partial").mkdir()  # a partial dir left by a killed process is cleared on re-run
    monkeypatch.setattr(convert_mod, "write_array", real)
    assert Store(convert(smollm2, out, quiet=True)).config.n_layers == 30


def test_disk_full(smollm2, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert_mod, "write_array", full)
    with pytest.raises(EdgeError, match="disk full"):
        convert(smollm2, tmp_path / "full.edge", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_convert_cli_and_existing_output(smollm2, tmp_path, capsys):
    from edge.cli import main

    out = tmp_path / "c.edge"
    assert main(["convert", str(smollm2), "-o", str(out), "--quiet"]) == 0
    assert main(["convert", str(smollm2), "-o", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(smollm2), "-o", str(tmp_path / "x.edge"), "--cluster", "48"]) == 2
    assert "--cluster 48" in capsys.readouterr().err


def test_info_shows_parts(smol_store, smollm2, capsys):
    from edge.cli import main

    assert main(["info", str(smol_store)]) == 0
    out = capsys.readouterr().out
    assert "edge store" in out and "ffn bundles (stream)" in out and "embeddings (row lookup)" in out
    assert main(["info", str(smollm2)]) == 0
    assert "Q4_1" in capsys.readouterr().out


def test_requantized_store_keeps_quality(smollm2, tmp_path, capsys):
    """--quant q8_0 re-rounds every matrix: perplexity within 3% of the source file's."""
    from edge.cli import main

    out = convert(smollm2, tmp_path / "q8.edge", quiet=True, quant="q8_0")
    assert {v["type"] for v in Store(out).tensor_infos.values() if len(v["shape"]) == 2} == {8}
    assert main(["eval", str(out), "--chunks", "2", "--ctx", "128", "--json"]) == 0
    ppl_store = json.loads(capsys.readouterr().out)["ppl"]
    assert main(["eval", str(smollm2), "--chunks", "2", "--ctx", "128", "--json", "--verify-reads", "always"]) == 0
    ppl_src = json.loads(capsys.readouterr().out)["ppl"]
    assert abs(ppl_store / ppl_src - 1) < 0.03


TEXTS = ["The capital of France is Paris.", "In 2024, 12345 people paid $3.50 each!",
         "def f(x):\n    return x**2  # héllo 日本", "<|im_start|>user\nHi<|im_end|>"]


def test_hugging_face_directory(smollm2, f32_copy, tmp_path):
    """SmolLM2 exported as a HF directory (F32 safetensors, rotate-halves q/k, tokenizer.json), converted:
    the same logits as the float32 GGUF, and the same token ids as the GGUF's tokenizer (pre-tokenizer named)."""
    from hf_export import export

    from edge.gguf_file import GGUFFile
    from edge.model import Transformer
    from edge.tokenizer import Tokenizer

    store = Store(convert(export(smollm2, tmp_path / "hf"), tmp_path / "hf.edge", quiet=True,
                          tokenizer_pre="smollm"))
    assert store.config.rope_neox
    ref_file = GGUFFile(f32_copy(smollm2))
    tok_ref = Tokenizer(smollm2, "llama", None)
    tok_store = Tokenizer(store.tokenizer_path, "llama", None)
    for text in TEXTS:
        assert tok_store.encode(text) == tok_ref.encode(text), text
    ids = np.asarray(tok_ref.encode(TEXTS[0] + " " + TEXTS[2]))
    ref = Transformer(ref_file, 64, backend="numpy").forward(ids, 0, all_logits=True)
    ours = Transformer(store, 64, backend="numpy").forward(ids, 0, all_logits=True)
    # the same function; only float32 summation order differs (q.k over rotate-halves vs adjacent pairs)
    assert np.abs(ours - ref).max() < 0.05 and np.abs(ours - ref).mean() < 2e-3
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


def test_hugging_face_directory_errors(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(EdgeError, match="config.json"):
        convert(tmp_path / "hf", tmp_path / "x.edge", quiet=True)
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(EdgeError, match="model_type 'mamba' is not supported"):
        convert(tmp_path / "hf", tmp_path / "x.edge", quiet=True)
    assert not (tmp_path / "x.edge").exists()


def test_sigint_during_convert(gemma3, tmp_path):
    """A real Ctrl+C (SIGINT) to `edge convert`: exit 130, no store, no partial directory; a re-run works."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "g.edge"
    cmd = [sys.executable, "-m", "edge", "convert", str(gemma3), "-o", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "g.edge.partial"
    deadline = time.time() + 60
    while not partial.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not out.exists() and not partial.exists()


def test_progress_line_counts_what_it_does():
    """Convert counts tensors and MB/s; other work (calibration) its own steps, no MB/s; both the time left."""
    from weights_tools.convert import Progress

    p = Progress(400, 4, quiet=True)
    p.t0 -= 30
    p.step(100, "blk.0.attn_q.weight")
    assert "1/4 tensors" in p.line("x") and "MB/s" in p.line("x") and "1m30s left" in p.line("x")
    q = Progress(1, 1, quiet=True)
    q.t0 -= 20
    q.advance_to(10, 40, "calibrate")
    assert "10/40 steps" in q.line("calibrate") and "MB/s" not in q.line("calibrate") and "1m00s left" in q.line("")


_JUNK = [None, -1, 0, 1, 2.5, 1e300, "x", "", [], {}, [1, 2], {"a": 1}, True]


def _json_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _json_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node[:3]):
            yield from _json_paths(value, (*prefix, i))


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory):
    from tests.conftest import write_tiny_gguf

    d = tmp_path_factory.mktemp("fuzz-store")
    return convert(write_tiny_gguf(d / "tiny.gguf"), d / "tiny.edge", quiet=True)


def test_damaged_store_metadata_opens_or_says_what_is_wrong(fuzz_store):
    """A store's zarr.json with any one value replaced by junk of every kind, or removed (every value, every
    junk: exhaustive, not sampled): it opens and plans (the value did not matter) or an EdgeError of one line
    says what is wrong; nothing else escapes."""
    from edge import strategies
    from edge.strategies import Options

    meta_path = fuzz_store / "zarr.json"
    original = meta_path.read_text()
    paths = [p for p in _json_paths(json.loads(original)) if p]
    assert len(paths) > 100
    try:
        for path in paths:
            for junk in [*_JUNK, "DELETE"]:
                meta = json.loads(original)
                node = meta
                for key in path[:-1]:
                    node = node[key]
                if junk == "DELETE":
                    del node[path[-1]]
                else:
                    node[path[-1]] = junk
                meta_path.write_text(json.dumps(meta))
                try:
                    store = Store(fuzz_store)
                    store.tensor("token_embd.weight")
                    strategies.resolve(store, "auto").plan(store, 1 << 40, 0, 64, Options())
                except EdgeError as exc:
                    assert "\n" not in str(exc)
                except Exception as exc:
                    raise AssertionError(f"{path} = {junk!r}: {type(exc).__name__}: {exc}") from exc
    finally:
        meta_path.write_text(original)
