"""The `edge` command as a user runs it: run/eval output, and one clear line for every bad input."""

import json

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_tiny_gguf
from edge.cli import main
from edge.errors import EdgeError
from edge.gguf_file import GGUFFile


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_run_json_default_model(capsys):
    code, out, _ = run_cli(capsys, "run", "-p", "The capital of France is", "--raw", "-n", "8", "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("tokens", "text", "prompt_tokens", "tok_s", "prefill_tok_s", "peak_rss_bytes", "flash_read_bytes"):
        assert key in data
    assert len(data["tokens"]) == 8 and data["prompt_tokens"] == 5
    assert "Paris" in data["text"]
    assert data["peak_rss_bytes"] > 50_000_000 and data["tok_s"] > 0


def test_run_profile_says_where_time_went(capsys):
    code, _, err = run_cli(capsys, "run", "-p", "The capital of France is", "-n", "4", "--profile")
    line = next(ln for ln in err.splitlines() if ln.startswith("per token:"))
    for part in ("ffn compute", "attention", "head", "other"):
        assert f"{part} " in line and "ms" in line


def test_run_applies_the_chat_template_by_default(capsys, smollm2):
    """As ollama and mlx_lm do: the model's own template unless --raw (plain completion)."""
    from edge.tokenizer import Tokenizer

    f = GGUFFile(smollm2)
    tok = Tokenizer(smollm2, f.config.arch, f.chat_template)
    question = "What is the capital of France?"
    chat = json.loads(run_cli(capsys, "run", question, "-n", "1", "--json")[1])
    raw = json.loads(run_cli(capsys, "run", question, "--raw", "-n", "1", "--json")[1])
    assert chat["prompt_tokens"] == len(tok.encode_chat([{"role": "user", "content": question}]))
    assert raw["prompt_tokens"] == len(tok.encode(question)) < chat["prompt_tokens"]


def test_run_takes_the_prompt_as_users_give_it(capsys, monkeypatch, smollm2):
    """An argument (after the model, before or after flags), -p, stdin (-p -), llama.cpp's -m/-c/-t/-s; two
    prompts or none: one line that says what to do."""
    import io

    def prompt_tokens(*argv):
        code, out, err = run_cli(capsys, "run", *argv, "--raw", "-n", "1", "--json")
        assert code == 0, err
        return json.loads(out)["prompt_tokens"]

    want = prompt_tokens("-p", "Hello there")
    assert prompt_tokens(str(smollm2), "Hello there") == want
    assert prompt_tokens(str(smollm2), "-c", "128", "Hello there") == want  # after a flag
    assert prompt_tokens("-m", str(smollm2), "-t", "1", "-s", "3", "Hello there") == want
    assert prompt_tokens("Hello there") == want  # one argument with a space: a prompt for the default model
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there"))
    assert prompt_tokens("-p", "-") == want
    assert_one_line_error(*run_cli(capsys, "run", "a b", "-p", "c d")[::2], "two prompts", "give one")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert_one_line_error(*run_cli(capsys, "run", "-p", "-")[::2], "no prompt", "-p")


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("edge 0.")


def test_run_streams_text_and_chat(capsys):
    code, out, err = run_cli(capsys, "run", "-p", "What is the capital of France?", "-n", "24")
    assert code == 0 and len(out.strip()) > 10
    assert "tok/s" in err and "peak RSS" in err


def test_chat_template_matches_llama_cpp_python(smollm2):
    """Our rendering of the GGUF's template equals llama-cpp-python's own Jinja2 formatter."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from edge.tokenizer import Tokenizer

    f = GGUFFile(smollm2)
    tok = Tokenizer(smollm2, f.config.arch, f.chat_template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    theirs = Jinja2ChatFormatter(f.chat_template, eos_token="<|im_end|>", bos_token="<|im_start|>")(
        messages=messages).prompt
    assert tok.render_chat(messages) == theirs


def test_seeded_sampling_is_reproducible(capsys):
    args = ("run", "-p", "Tell me a story", "-n", "12", "--temp", "0.9", "-s", "5", "--json")
    first = json.loads(run_cli(capsys, *args)[1])["tokens"]
    second = json.loads(run_cli(capsys, *args)[1])["tokens"]
    assert first == second


def test_eval_matches_llama_cpp_perplexity(capsys, real_model):
    from edge.evaluate import eval_text, perplexity, token_nll, windows
    from edge.peer import LlamaCpp
    from edge.tokenizer import Tokenizer

    code, out, _ = run_cli(capsys, "eval", str(real_model), "--ctx", "256", "--chunks", "2", "--json")
    assert code == 0
    ours = json.loads(out)
    f = GGUFFile(real_model)
    tok = Tokenizer(real_model, f.config.arch, f.chat_template)
    wins = windows(tok.encode(eval_text(), add_bos=False), 256, 2, tok.bos_id if tok.add_bos else None)
    peer = LlamaCpp(real_model, n_ctx=256, threads=2)
    ref = perplexity(lambda w: token_nll(peer.logits(w), w), wins)
    print(ours["ppl"], ref.ppl)
    assert ours["tokens_scored"] == ref.tokens_scored
    assert abs(ours["ppl"] / ref.ppl - 1) < 0.01


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", str(tmp_path / "nope.gguf"), "-p", "hi")
    assert_one_line_error(code, err, "nope.gguf", "no such file")


def test_not_a_gguf(capsys, tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, I am text\n")
    code, _, err = run_cli(capsys, "run", str(p), "-p", "hi")
    assert_one_line_error(code, err, "notes.gguf", "not a GGUF")


def test_truncated_gguf(capsys, tmp_path, smollm2):
    p = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(smollm2.stat().st_size * 6 // 10))
    code, _, err = run_cli(capsys, "run", str(p), "-p", "hi")
    assert_one_line_error(code, err, "cut.gguf", "truncated")


def test_unsupported_architecture(capsys, tmp_path):
    p = write_tiny_gguf(tmp_path / "mamba.gguf", arch="mamba")
    code, _, err = run_cli(capsys, "run", str(p), "-p", "hi")
    assert_one_line_error(code, err, "architecture 'mamba' is not supported")


def test_unsupported_quant_type(capsys, tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (128, 64 // 256 * 84 or 84), np.uint8)
    q2k = gguf.GGMLQuantizationType.Q2_K
    p = write_tiny_gguf(tmp_path / "q2k.gguf", dim=256, hidden=128, n_heads=4, n_kv=2,
                        extra_tensors={"blk.0.ffn_up.weight": (raw, q2k)})
    code, _, err = run_cli(capsys, "run", str(p), "-p", "hi")
    assert_one_line_error(code, err, "Q2_K", "not supported", "blk.0.ffn_up.weight")


def test_prompt_longer_than_context(capsys):
    code, _, err = run_cli(capsys, "run", "-p", "word " * 200, "--ctx", "64")
    assert_one_line_error(code, err, "context holds 64", "--ctx")


def test_eval_text_file_missing(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--text", str(tmp_path / "none.txt"))
    assert_one_line_error(code, err, "--text")


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "examples:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def header_bytes(tmp_path_factory):
    p = write_tiny_gguf(tmp_path_factory.mktemp("fuzz") / "t.gguf")
    return p.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_gguf_header(tmp_path, header_bytes, data):
    """Flip, cut or overwrite bytes in the header region: a model that runs, or an EdgeError, nothing else."""
    buf = bytearray(header_bytes)
    n_edit = data.draw(st.integers(1, 8))
    for _ in range(n_edit):
        pos = data.draw(st.integers(0, min(len(buf), 4096) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(bytes(buf))
    from edge.model import Transformer

    try:
        g = GGUFFile(p)
        assert len(g.fields()) >= len(g.metadata)  # what the tools copy: arrays as well
        with np.errstate(all="ignore"):
            Transformer(g, 16, backend="numpy").forward(np.array([1, 2]), 0)
    except EdgeError:
        pass


def test_fields_are_the_gguf_readers(smollm2):
    """GGUFFile.fields() (what convert, moefy and dequant copy) holds every field the `gguf` package's reader
    finds, with the same types and values."""
    ours = GGUFFile(smollm2).fields()
    theirs = {k: f for k, f in gguf.GGUFReader(smollm2).fields.items() if not k.startswith("GGUF.")}
    assert list(ours) == list(theirs)
    for key, f in theirs.items():
        assert [ours[key].vtype] + ([ours[key].sub_type] if ours[key].sub_type is not None else []) == f.types, key
        assert ours[key].value == f.contents(), key


@pytest.mark.parametrize("argv, words", [
    (["--threads", "0"], ["--threads", "below 1"]),
    (["-t", "two"], ["--threads", "not a whole number"]),
    (["--temp", "-1"], ["--temp", "at least 0"]),
    (["--top-p", "7"], ["--top-p", "at most 1"]),
    (["--top-p", "0"], ["--top-p", "above 0"]),
    (["--top-k", "-3"], ["--top-k", "below 0"]),
    (["--repeat-penalty", "0"], ["--repeat-penalty", "above 0"]),
    (["--ctx", "0"], ["--ctx", "below 16"]),
    (["-n", "-1"], ["--max-tokens", "below 0"]),
    (["--sparsity", "2"], ["--sparsity", "invalid choice"]),
    (["--sparsity", "0.3"], ["--sparsity", "0.25"]),
    (["--sparsity", "0.25"], ["--sparsity 0.25 needs --ram"]),
    (["--window", "0"], ["--window", "below 1"]),
    (["--strategy", "fast"], ["--strategy", "invalid choice"]),
])
def test_bad_flags_are_refused_in_one_line(capsys, argv, words):
    try:
        code = main(["run", "-p", "hi", "-n", "1", *argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert_one_line_error(code, capsys.readouterr().err, *words)


def test_zero_tokens_stop_at_length(capsys):
    code, out, _ = run_cli(capsys, "run", "-p", "hi", "-n", "0", "--json")
    assert code == 0 and json.loads(out)["stopped"] == "length" and json.loads(out)["tokens"] == []


def test_quant_names_in_any_case(tmp_path):
    """As `edge info` prints them (Q8_0) or in lower case, for convert and make-model alike."""
    import subprocess
    import sys

    from edge.cli import build_parser

    assert build_parser().parse_args(["convert", "m.gguf", "--quant", "Q8_0"]).quant == "q8_0"
    assert build_parser().parse_args(["convert", "m.gguf", "--quant", "q4_0"]).quant == "q4_0"
    out = tmp_path / "tiny.gguf"
    proc = subprocess.run([sys.executable, "-m", "weights_tools", "make-model", "--layers", "1", "--dim", "64",
                           "--ffn", "128", "--quant", "q8_0", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    f = GGUFFile(out)
    types = {f.tensor(n).type_id for n in f.tensor_names() if n.endswith("ffn_up.weight")}
    assert types == {gguf.GGMLQuantizationType.Q8_0}


def test_ctx_above_the_trained_context_is_clamped_with_a_warning(capsys):
    code, out, err = run_cli(capsys, "run", "-p", "hi", "-n", "1", "--ctx", "100000", "--json")
    assert code == 0 and "warning: --ctx 100000 is above the model's trained context of 8192 tokens" in err


def test_output_into_a_closed_pipe_is_quiet():
    import subprocess
    import sys

    # `true` reads nothing and is gone before Python starts: every write meets a closed pipe
    proc = subprocess.run(f"{sys.executable} -m edge devices | true", shell=True, capture_output=True, text=True)
    assert proc.stderr == "", proc.stderr


_FLAGS = ["-m", "--model", "-c", "--ctx", "-t", "--threads", "-n", "--max-tokens", "--temp", "--top-k", "--top-p",
          "--repeat-penalty", "-s", "--seed", "--ram", "--sparsity", "--window", "--prefetch", "--strategy",
          "--backend", "--verify-reads", "--device", "--emulate", "-p", "--raw", "--json", "--profile", "--evict",
          "--predict", "--system", "--ignore-eos", "--bogus", "-x"]
_VALUES = ["0", "1", "-1", "7", "0.5", "2.5", "1e9", "nan", "inf", "", " ", "abc", "150MB", "1GB", "-1GB", "0.25",
           "auto", "ggml", "naive", "sparse", "first", "lru", "rpi5-8gb", "x" * 300, "\n", "--", "-"]


@settings(max_examples=400, deadline=None)
@given(command=st.sampled_from(["run", "eval", "info", "bench"]),
       words=st.lists(st.sampled_from(_FLAGS) | st.sampled_from(_VALUES), max_size=8))
def test_fuzzed_flags_parse_or_say_which_in_one_line(command, words):
    """Any mix of flags and values: parsed (then the budget flags read or refused by an EdgeError of one line),
    or exit 2 with one line naming what is wrong; never a traceback."""
    import contextlib
    import io

    from edge.cli import parse
    from edge.flags import budget_options

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parse([command, *words])
    except SystemExit as exc:
        lines = err.getvalue().strip().splitlines()
        assert exc.code == 2 and len(lines) == 1 and lines[0].startswith("edge") and ": error: " in lines[0], lines
        return
    if command not in ("run", "eval"):  # info and bench read --ram in their handlers, as run does here
        return
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            budget_options(args)
    except EdgeError as exc:
        assert "\n" not in str(exc) and str(exc).split()[0].startswith("-"), str(exc)  # names the flag
