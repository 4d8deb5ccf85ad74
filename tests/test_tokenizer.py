"""Our tokenizer against llama.cpp's on the same GGUF: every token's piece and end-of-generation flag, and the
ids of fixed and fuzzed text, with and without BOS and special-token parsing."""

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import EdgeError
from edge.tokenizer import Tokenizer, LlamaVocab, Vocab

_PAIRS: dict[Path, tuple] = {}

TEXTS = [
    "Once upon a time, in a small village by the sea,",
    "  leading  and trailing  ",
    "\t\ttabs\n\nnew lines\r\n",
    "digits 12345 and 3.14159, \u00bd and \u2153 \u216b",
    "\u00dcn\u00efc\u00f6d\u00e9 fa\u00e7ade \u2014 \u201cquotes\u201d "
    "\u65e5\u672c\u8a9e \u4e2d\u6587 \ud55c\uad6d\uc5b4",
    "emoji \U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<bos><eos>",
    "don't won't I'm you're they've he'll she'd IT'S",
    "\u00a0nbsp\u2003em\u3000ideographic",
    "x\x1cy\x1fz\x00w",
    "a" * 300,
    "    def f(x):\n        return x ** 2  # comment\n",
    "<0x41> <unk> <mask> </s> [multimodal]",
    "",
    " ",
    "\n",
    "\u2581\u2581 already escaped",
]


@pytest.fixture(scope="module", autouse=True)
def _free_llama_cpp_vocabularies():
    yield
    _PAIRS.clear()  # while llama_cpp can still free them (at interpreter exit it cannot)


def pair(path: Path) -> tuple[Tokenizer, LlamaVocab]:
    if path not in _PAIRS:
        _PAIRS[path] = Tokenizer(path, "llama", None), LlamaVocab(path)
    return _PAIRS[path]


@pytest.mark.parametrize("model", ["smollm2", "gemma3", "qwen25"])
def test_every_token_reads_as_llama_cpp_reads_it(request, model):
    ours, ref = pair(request.getfixturevalue(model))
    v = ours._vocab
    assert isinstance(v, Vocab)  # both models' vocabularies are ours, not llama.cpp's
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.add_bos) == (ref.n_tokens, ref.bos, ref.eos, ref.add_bos)
    assert [t for t in range(v.n_tokens) if v.piece(t) != ref.piece(t)] == []
    assert [t for t in range(v.n_tokens) if ours.is_end(t) != ref.is_eog(t)] == []
    assert ours.is_end(ours.eos_id) and ours.decode(ours.encode("Hello world", add_bos=False)) == "Hello world"


@pytest.mark.parametrize("model", ["smollm2", "gemma3", "qwen25"])
def test_text_tokenizes_as_llama_cpp_does(request, model):
    from edge.evaluate import eval_text

    ours, ref = pair(request.getfixturevalue(model))
    chat = ours.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}])
    for text in TEXTS + [chat, eval_text()[:20000]]:
        for add, special in ((True, True), (False, False), (True, False)):
            assert ours.encode(text, add_bos=add, special=special) == ref.encode(text, add, special), repr(text[:60])


_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
             "</s>", "<unk>", "<mask>", "\n", " ", "  ", "'s", "'ll", "123", "\u2581"]


@pytest.mark.parametrize("model", ["smollm2", "gemma3", "qwen25"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs", "Cn")), max_size=24),
                                st.sampled_from(_SPECIALS)), max_size=8),
       add=st.booleans(), special=st.booleans())
def test_fuzzed_text_tokenizes_as_llama_cpp_does(request, model, parts, add, special):
    """Any text (characters of every Unicode category this Python knows, mixed with special tokens, spaces,
    contractions and digits): the same ids as llama.cpp."""
    ours, ref = pair(request.getfixturevalue(model))
    text = "".join(parts)
    assert ours.encode(text, add_bos=add, special=special) == ref.encode(text, add, special)


def test_a_budgeted_run_imports_neither_llama_cpp_nor_gguf(smollm2, gemma3, qwen25):
    """The tokenizer is part of the baseline a budget pays for: reading it loads no llama.cpp vocabulary (51MB
    for Qwen2.5's) and no gguf package."""
    code = ("import sys; from edge.tokenizer import Tokenizer\n"
            f"for p in {[str(smollm2), str(gemma3), str(qwen25)]!r}:\n"
            "    t = Tokenizer(p, 'llama', None); assert t.encode('Hello world')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'gguf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def vocab_gguf(tmp_path_factory, smollm2) -> bytes:
    from tests.conftest import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("vocab") / "v.gguf", tokenizer_from=smollm2).read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_damaged_vocabulary(tmp_path, vocab_gguf, data):
    """Bytes flipped anywhere in a GGUF's vocabulary (tokens, merges, types, the header), or the file cut: the
    tokenizer reads it and encodes, or says in an EdgeError what is wrong; nothing else escapes."""
    buf = bytearray(vocab_gguf)
    for _ in range(data.draw(st.integers(1, 8))):
        region = data.draw(st.sampled_from([4096, len(buf)]))
        buf[data.draw(st.integers(0, region - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(bytes(buf))
    try:
        tok = Tokenizer(p, "llama", None)
        ids = tok.encode("Hello world, <|im_start|>user 123\n")
        tok.decode(ids)
    except EdgeError as exc:
        assert str(p) in str(exc)


_TURN = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                               "content": st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
                               | st.sampled_from(["", " ", "\n hi \n", "<|im_end|>", "<end_of_turn>", "\t2+2?  "])})


@pytest.fixture(scope="module")
def templates(smollm2, qwen25):
    """Every template rendered without jinja2: the default ChatML and Gemma ones, SmolLM2's and Qwen2.5's."""
    from edge.gguf_file import GGUFFile
    from edge.tokenizer import CHATML_TEMPLATE, GEMMA_TEMPLATE

    made = [Tokenizer(smollm2, "llama", t) for t in (CHATML_TEMPLATE, GEMMA_TEMPLATE)]
    made += [Tokenizer(p, "llama", GGUFFile(p).chat_template) for p in (smollm2, qwen25)]
    assert all(t.known_template for t in made)
    return made


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(_TURN, min_size=1, max_size=6), generation=st.booleans())
def test_known_templates_render_without_jinja_as_jinja_does(templates, messages, generation):
    """The native renderers (which spare a budgeted process jinja2's 7MB) write what jinja2 writes from the
    template itself, for any mix of system, user and assistant turns; tools and other roles go to jinja2."""
    for tok in templates:
        assert tok.render_chat(messages, generation) == tok.render_chat(messages, generation, native=False)
    tool = [*messages, {"role": "tool", "content": "42"}]
    assert templates[0].render_chat(tool) == templates[0].render_chat(tool, native=False)
