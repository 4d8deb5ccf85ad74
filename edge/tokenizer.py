"""Tokenizer and chat template from the GGUF: token ids exactly as llama.cpp makes them, jinja2 for the template.

The vocabularies of the models edge runs (byte-level BPE such as SmolLM2's, SentencePiece-style such as Gemma's
and Llama's) are tokenized here by llama.cpp's algorithms, from the GGUF's arrays kept packed in numpy: Gemma 3's
vocabulary costs ~8MB instead of the ~40MB of llama.cpp's vocabulary objects plus the ~10MB of importing
llama-cpp-python, and under `--ram` every MB of that is a MB of weights. Other vocabularies (WordPiece,
Unigram, BPE pre-tokenizers not in `_SPLITS`) go to llama.cpp's own tokenizer. Multi-turn chats are formatted
with the template stored in the GGUF metadata; a file without one gets its architecture's known template
(gemma) or ChatML.
"""

from __future__ import annotations

import codecs
import contextlib
import heapq
import os
import re
import unicodedata
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from edge.errors import EdgeError
from edge.gguf_file import Strings, read_tokenizer

GEMMA_TEMPLATE = (  # Gemma 3's: a system message is folded into the first user turn
    "{{ bos_token }}{% set ns = namespace(prefix='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.prefix = message['content'] | trim + '\n\n' %}{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + ns.prefix + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% set ns.prefix = '' %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Chat templates rendered without jinja2, as llama.cpp renders the templates it knows: importing jinja2 costs a
# budgeted process 7MB. Each is checked against jinja2 on the template itself (tests/test_tokenizer.py); any
# other template, or a message beyond plain system/user/assistant text (tools), goes to jinja2. By the
# template's crc32 (zlib's: hashlib would load OpenSSL, 4MB): the ChatML system prompt it adds when the chat
# has none.
CHATML_DEFAULT_SYSTEM = {
    0xBCCC7195: "You are a helpful AI assistant named SmolLM, trained by Hugging Face",  # SmolLM2
    0xB7D0442B: "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",  # Qwen2.5
}


def native_template(source: str) -> Callable[[list[dict], bool, str], str] | None:
    """A renderer (messages, add_generation_prompt, bos_token) -> text for a known template, else None."""
    if source == GEMMA_TEMPLATE:
        return _render_gemma
    if source == CHATML_TEMPLATE:
        return lambda messages, generation, bos: _render_chatml(messages, generation, None)
    key = zlib.crc32(source.encode())
    if key in CHATML_DEFAULT_SYSTEM:
        return lambda messages, generation, bos: _render_chatml(messages, generation, CHATML_DEFAULT_SYSTEM[key])
    return None


def _render_chatml(messages: list[dict], generation: bool, default_system: str | None) -> str:
    out = [f"<|im_start|>system\n{default_system}<|im_end|>\n"] if (
        default_system is not None and messages[0]["role"] != "system") else []
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(out) + ("<|im_start|>assistant\n" if generation else "")


def _render_gemma(messages: list[dict], generation: bool, bos: str) -> str:
    out, prefix = [bos], ""
    for m in messages:
        if m["role"] == "system":  # folded into the next turn
            prefix = m["content"].strip() + "\n\n"
            continue
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append(f"<start_of_turn>{role}\n{prefix}{m['content'].strip()}<end_of_turn>\n")
        prefix = ""
    return "".join(out) + ("<start_of_turn>model\n" if generation else "")


def plain_messages(messages: list[dict]) -> bool:
    """Text turns of system, user and assistant only (what the native renderers render)."""
    return bool(messages) and all(set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
                                  and isinstance(m["content"], str) for m in messages)


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs its loader on fd 2, and llama-cpp-python's log callback on sys.stderr: silence both."""
    import io
    import sys

    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr.flush()


# llama.cpp's token attributes (llama.h) and the GGUF token types they come from
UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 2, 4, 8, 16, 32
_ATTR_OF_TYPE = np.array([0, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE], np.uint8)
# token texts llama.cpp takes as end of generation (and forces to control tokens), when the metadata names none
_EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>")
_SPECIAL_NAMES = {  # metadata key -> texts llama.cpp looks for when the key is absent (it forces them to control)
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
            "_<EOT>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_KINDS = ("eot", "eom", "fim_pad", "fim_rep", "fim_sep")

# BPE pre-tokenizers done here: llama.cpp's name -> whether digits are split off one by one before the GPT-2
# pattern (starcoder family) or not (GPT-2 family); "qwen2": Qwen2's own pattern (_QWEN2)
_SPLITS = {**dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), True),
           **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"), False),
           "qwen2": "qwen2"}
# Unicode White_Space, llama.cpp's \s (Python's str.isspace adds U+001C..U+001F)
_WHITESPACE = frozenset(map(chr, (9, 10, 11, 12, 13, 32, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028,
                                  0x2029, 0x202F, 0x205F, 0x3000)))
# The GPT-2 pattern over text whose non-ASCII characters were replaced by an ASCII one of the same class
# (letter a, number 0, whitespace tab, other !): 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
_S = "\\t\\n\\x0b\\x0c\\r "
_GPT2 = re.compile(f"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_S}A-Za-z0-9]+|[{_S}]+(?![^{_S}])")
_DIGIT = re.compile("[0-9]")
# Qwen2's, likewise: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|
# \s+(?!\S)|\s+
_QWEN2 = re.compile(f"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\nA-Za-z0-9]?[A-Za-z]+|[0-9]| ?[^{_S}A-Za-z0-9]+[\\r\\n]*"
                    f"|[{_S}]*[\\r\\n]+|[{_S}]+(?![^{_S}])|[{_S}]+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters (byte-level BPE vocabularies are written in it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


_B2U = _bytes_to_unicode()
_U2B = {c: b for b, c in _B2U.items()}


def _collapse(text: str) -> str:
    """`text` with every non-ASCII character replaced by an ASCII one of its class, so that the ASCII pattern
    splits it as \\p{L} / \\p{N} / \\s would (one character for one: offsets stay)."""
    if text.isascii():
        return text
    out = []
    for c in text:
        if c < "\x80":
            out.append(c)
        elif c in _WHITESPACE:
            out.append("\t")
        else:
            cat = unicodedata.category(c)[0]
            out.append("a" if cat == "L" else "0" if cat == "N" else "!")
    return "".join(out)


def _pieces(pattern: re.Pattern, text: str, collapsed: str) -> list[str]:
    """Matches and the text between them, in order (llama.cpp keeps both)."""
    out, at = [], 0
    for m in pattern.finditer(collapsed):
        if m.start() > at:
            out.append(text[at:m.start()])
        out.append(text[m.start():m.end()])
        at = m.end()
    if at < len(text):
        out.append(text[at:])
    return out


def _hex_prefix(digits: bytes) -> int:
    """The byte of a <0xXX> token as llama.cpp's strtol reads it: the leading hex digits, 0 if none."""
    n = 0
    for c in digits:
        if chr(c) not in "0123456789abcdefABCDEF":
            break
        n = 16 * n + int(chr(c), 16)
    return n & 0xFF


class _Lookup:
    """Token text -> id without a dict of Python strings: sorted 64-bit hashes of every text (the last of
    equal texts wins, as in llama.cpp's map)."""

    def __init__(self, texts: Strings):
        self.texts = texts
        hashes = np.fromiter((hash(texts[i]) for i in range(len(texts))), np.int64, len(texts))
        self.order = np.argsort(hashes, kind="stable").astype(np.int32)
        self.hashes = hashes[self.order]
        self.memo: dict | None = None  # answers kept during one encode (texts repeat: "th", "e", " the")

    def ids(self, items: list[bytes]) -> np.ndarray:
        """Many lookups at once: ids, -1 where a text is not a token."""
        h = np.fromiter((hash(b) for b in items), np.int64, len(items))
        at = np.maximum(np.searchsorted(self.hashes, h, "right") - 1, 0)
        out = np.where(self.hashes[at] == h, self.order[at], -1) if len(self.hashes) else np.full(len(h), -1)
        for k in np.flatnonzero(out >= 0):
            if self.texts[int(out[k])] != items[k]:  # a hash shared by two texts: the slow path
                found = self.get(items[k])
                out[k] = -1 if found is None else found
        return out

    def get(self, text: bytes) -> int | None:
        memo = self.memo
        if memo is not None and text in memo:
            return memo[text]
        h = hash(text)
        i = int(self.hashes.searchsorted(h, "right")) - 1
        found = None
        while i >= 0 and self.hashes[i] == h:
            t = int(self.order[i])
            if self.texts[t] == text:
                found = t
                break
            i -= 1
        if memo is not None:
            memo[text] = found
        return found


class Vocab:
    """llama.cpp's SPM and BPE tokenizers over a GGUF's packed vocabulary (llama-vocab.cpp: the special-token
    partition, the SentencePiece bigram merges by score with byte fallback, the byte-level BPE merges by rank
    after the pre-tokenizer's split, token pieces)."""

    def __init__(self, meta: dict, split_digits: bool | str | None):
        """split_digits: None for SentencePiece; for BPE whether digits split off one by one before the GPT-2
        pattern, or "qwen2" for Qwen2's pattern."""
        self.spm = split_digits is None
        self.pattern = _QWEN2 if split_digits == "qwen2" else _GPT2
        self.split_digits = split_digits is True
        texts: Strings = meta["tokenizer.ggml.tokens"]
        n = self.n_tokens = len(texts)
        if np.any(texts.offsets[1:] == texts.offsets[:-1]):  # llama.cpp names empty tokens [EMPTY_i]
            names = [texts[i] or f"[EMPTY_{i}]".encode() for i in range(n)]
            texts = Strings(np.frombuffer(b"".join(names), np.uint8),
                            np.concatenate([[0], np.cumsum([len(t) for t in names])]).astype(np.int64))
        self.texts = texts
        self.lookup = _Lookup(texts)
        types, scores = meta.get("tokenizer.ggml.token_type"), meta.get("tokenizer.ggml.scores")
        for what, arr in (("token types", types), ("scores", scores)):
            if arr is not None and (not isinstance(arr, np.ndarray) or arr.shape != (n,)):
                raise ValueError(f"{what} do not match the {n} tokens")
        self.attrs = (_ATTR_OF_TYPE[np.clip(types, 0, 6).astype(np.intp) * (types <= 6)] if types is not None
                      else np.full(n, NORMAL, np.uint8))
        self.scores = None  # (SPM) llama.cpp scores 0 where the file has none
        if self.spm:
            self.scores = scores.astype(np.float32) if scores is not None else np.zeros(n, np.float32)

        def special(key: str, default: int | None) -> int | None:
            v = meta.get(f"tokenizer.ggml.{key}_token_id")
            return int(v) if v is not None and 0 <= int(v) < n else default

        self.bos = special("bos", 1 if self.spm else 11)
        self.eos = special("eos", 2 if self.spm else 11)
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", self.spm))
        self.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", self.spm))
        eog = {self.eos} if self.eos is not None else set()
        for kind, names in _SPECIAL_NAMES.items():
            legacy = {"fim_pre": "prefix", "fim_suf": "suffix", "fim_mid": "middle"}.get(kind)
            tid = special(kind, None) if legacy is None else special(kind, special(legacy, None))
            if tid is None:
                for name in names:
                    if (found := self.lookup.get(name.encode())) is not None:
                        tid = found
                        self.attrs[tid] = CONTROL
                        break
            if tid is not None and kind in _EOG_KINDS:
                eog.add(tid)
        named = {name: tid for name in _EOG_NAMES if (tid := self.lookup.get(name.encode())) is not None}
        if "<|tool_response>" in named:  # Gemma 4: its </s> is text
            named.pop("</s>", None)
        for tid in named.values():
            eog.add(tid)
            self.attrs[tid] = CONTROL
        self.eog = frozenset(eog)
        specials = np.flatnonzero(self.attrs & (CONTROL | USER_DEFINED | UNKNOWN))
        lengths = texts.offsets[specials + 1] - texts.offsets[specials]
        self.specials = [(int(t), texts[int(t)].decode("utf-8", "replace"))
                         for t in specials[np.argsort(-lengths, kind="stable")]]
        self.ranks = None
        if not self.spm:
            self._load_merges(meta["tokenizer.ggml.merges"])

    def _load_merges(self, merges: Strings) -> None:
        """Merge ranks keyed by the two sides' token ids (sorted int64 keys), the rare side that is not a token
        in a small dict by text."""
        lefts, rights = [], []
        for rank in range(len(merges)):
            m = merges[rank]
            cut = m.find(b" ", 1)
            lefts.append(m[:cut] if cut >= 0 else b"")
            rights.append(m[cut + 1:] if cut >= 0 else b"")
        a, b = self.lookup.ids(lefts), self.lookup.ids(rights)
        both = (a >= 0) & (b >= 0)
        self.odd_ranks = {}
        for rank in np.flatnonzero(~both)[::-1]:  # the first rank of a pair wins
            self.odd_ranks[(lefts[rank], rights[rank])] = int(rank)
        keys = a[both].astype(np.int64) * self.n_tokens + b[both]
        ranks = np.flatnonzero(both).astype(np.int32)
        order = np.lexsort((ranks, keys))  # equal pairs: the first rank wins, as llama.cpp's emplace
        keys, ranks = keys[order], ranks[order]
        first = np.ones(len(keys), bool)
        first[1:] = keys[1:] != keys[:-1]
        self.keys, self.ranks = keys[first], ranks[first]

    def rank(self, left: str, right: str) -> int:
        lb, rb = left.encode(), right.encode()
        a, b = self.lookup.get(lb), self.lookup.get(rb)
        if a is None or b is None:
            return self.odd_ranks.get((lb, rb), -1)
        key = a * self.n_tokens + b
        i = int(self.keys.searchsorted(key))
        return int(self.ranks[i]) if i < len(self.keys) and self.keys[i] == key else -1

    def text(self, tid: int) -> str:
        return self.texts[tid].decode("utf-8", "replace")

    # --- encoding

    def encode(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        self.lookup.memo = {}
        try:
            return self._encode(text, add_special, parse_special)
        finally:
            self.lookup.memo = None

    def _encode(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        fragments: list[str | int] = [text] if text else []
        chars = set(text)
        for tid, s in self.specials:
            if s[:1] not in chars or not parse_special and self.attrs[tid] & (CONTROL | UNKNOWN):
                continue
            out = []
            for f in fragments:
                if isinstance(f, int) or s not in f:
                    out.append(f)
                    continue
                for k, part in enumerate(f.split(s)):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            fragments = out
        ids = [self.bos] if add_special and self.add_bos and self.bos is not None else []
        prev_special = True
        for f in fragments:
            if isinstance(f, int):
                ids.append(f)
                prev_special = True
            elif self.spm:
                self._spm(((" " if self.add_space_prefix and prev_special else "") + f).replace(" ", "\u2581"), ids)
                prev_special = False
            else:
                for word in self._split(f):
                    self._bpe("".join(_B2U[b] for b in word.encode()), ids)
        if add_special and self.add_eos and self.eos is not None:
            ids.append(self.eos)
        return ids

    def _split(self, text: str) -> list[str]:
        collapsed = _collapse(text)
        if not self.split_digits:
            return _pieces(self.pattern, text, collapsed)
        out = []
        at = 0
        for piece in _pieces(_DIGIT, text, collapsed):
            out += _pieces(_GPT2, piece, collapsed[at:at + len(piece)])
            at += len(piece)
        return out

    def _merge(self, word: str, pair) -> list[str]:
        """Merge adjacent symbols (characters at first) best pair first: pair(left, right) gives a priority
        (smaller first, ties to the left) or None; a popped pair whose symbols changed since is dropped."""
        n = len(word)
        size = [1] * n  # symbol i starts at character i (merges only grow a symbol rightwards)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            a, b = word[left:left + size[left]], word[right:right + size[right]]
            key = pair(a, b)
            if key is not None:
                heapq.heappush(heap, (key, left, right, size[left] + size[right]))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, total = heapq.heappop(heap)
            if not size[left] or not size[right] or size[left] + size[right] != total:
                continue
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        return [word[i:i + size[i]] for i in range(n) if size[i]]

    def _spm(self, text: str, ids: list[int]) -> None:
        def pair(a: str, b: str):
            tid = self.lookup.get((a + b).encode())
            return None if tid is None else -float(self.scores[tid])

        self._emit(self._merge(text, pair) if text else [], ids)

    def _bpe(self, word: str, ids: list[int]) -> None:
        def pair(a: str, b: str):
            r = self.rank(a, b)
            return None if r < 0 else r

        self._emit(self._merge(word, pair) if word else [], ids)

    def _emit(self, symbols: list[str], ids: list[int]) -> None:
        """Each merged symbol's token; a symbol that is none (a merged symbol always is one) as its bytes: SPM's
        <0xXX> tokens, else (and for BPE) the one-byte token."""
        for sym in symbols:
            tid = self.lookup.get(sym.encode())
            if tid is not None:
                ids.append(tid)
                continue
            for byte in sym.encode():
                tid = self.lookup.get(b"<0x%02X>" % byte) if self.spm else None
                if tid is None:
                    tid = self.lookup.get(bytes([byte]))
                if tid is not None:
                    ids.append(tid)

    # --- decoding

    def is_eog(self, tid: int) -> bool:
        return tid in self.eog

    def piece(self, tid: int) -> bytes:
        """llama.cpp's token_to_piece without special tokens: control and unknown tokens are empty."""
        attr = int(self.attrs[tid])
        if attr & (CONTROL | UNKNOWN):
            return b""
        raw = self.texts[tid]
        if attr & USER_DEFINED:
            return raw
        if self.spm:
            if attr & NORMAL:
                return raw.replace("\u2581".encode(), b" ")
            return bytes([_hex_prefix(raw[3:5])]) if attr & BYTE else b""
        if not attr & NORMAL:
            return b""
        out = bytearray()
        for c in raw.decode("utf-8", "replace"):
            if c in _U2B:
                out.append(_U2B[c])
            else:
                out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + raw + b"]"
        return bytes(out)


class LlamaVocab:
    """llama.cpp's own tokenizer (vocabulary only), for the vocabularies `Vocab` does not do."""

    def __init__(self, path: Path):
        import ctypes

        import llama_cpp
        from llama_cpp import Llama

        try:
            with quiet_stderr():
                self._llama = Llama(str(path), vocab_only=True, verbose=False)
        except ValueError as exc:
            raise EdgeError(f"{path}: llama.cpp cannot read its tokenizer ({exc}); download or convert the model "
                            "again") from None
        self._model = self._llama._model
        self._ctypes, self._lib = ctypes, llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self._model.model)
        self.n_tokens = self._model.n_vocab()
        self.bos = self._model.token_bos()
        self.eos = self._model.token_eos()
        self.add_bos = bool(self._model.add_bos_token())

    def encode(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def piece(self, tid: int) -> bytes:
        size = 64
        while True:
            buf = self._ctypes.create_string_buffer(size)
            n = self._lib.llama_token_to_piece(self._vocab, tid, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def text(self, tid: int) -> str:
        return self._model.token_get_text(tid)

    def is_eog(self, tid: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, tid))


def _open_vocab(path: Path):
    meta = read_tokenizer(path)
    if not isinstance(meta.get("tokenizer.ggml.tokens"), Strings):
        raise EdgeError(f"{path}: no tokenizer vocabulary (tokenizer.ggml.tokens) in the file; it is not a complete "
                        "model, download or convert it again")
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    name = str(meta.get("general.name", "")).lower()
    split = {"llama": None}.get(model, _SPLITS.get(pre, "llama.cpp") if model == "gpt2" else "llama.cpp")
    if "phi-3" in name or "phi3" in name:  # llama.cpp strips spaces around phi-3's special tokens
        split = "llama.cpp"
    if split == "llama.cpp":
        del meta
        return LlamaVocab(path)
    try:
        return Vocab(meta, split)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        raise EdgeError(f"{path}: the tokenizer vocabulary is damaged ({type(exc).__name__}: {exc}); download or "
                        "convert the model again") from None


class Tokenizer:
    def __init__(self, path: str | Path, arch: str, template: str | None):
        self._vocab = _open_vocab(Path(path))
        self.bos_id = -1 if self._vocab.bos is None else self._vocab.bos
        self.eos_id = -1 if self._vocab.eos is None else self._vocab.eos
        self.add_bos = self._vocab.add_bos
        self.has_chat_template = template is not None  # the model's own (else a default by architecture)
        self.template_source = template or (GEMMA_TEMPLATE if arch.startswith("gemma") else CHATML_TEMPLATE)
        self._native = native_template(self.template_source)
        self._template = None

    @property
    def known_template(self) -> bool:
        """Whether the chat template renders without jinja2 (`native_template`)."""
        return self._native is not None

    @property
    def vocab_size(self) -> int:
        return self._vocab.n_tokens

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        add = self.add_bos if add_bos is None else add_bos
        return self._vocab.encode(text, add, special)

    def token_bytes(self, token: int) -> bytes:
        return self._vocab.piece(token)

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        """End of generation: EOS or an end-of-turn token such as <|im_end|> or <end_of_turn>."""
        return self._vocab.is_eog(token)

    def streamer(self) -> "TextStream":
        return TextStream(self)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, native: bool = True) -> str:
        """The chat as the model's template writes it (native: without jinja2 where the template is known)."""
        bos = self._vocab.text(self.bos_id) if self.bos_id >= 0 else ""
        if native and self._native is not None and plain_messages(messages):
            return self._native(messages, add_generation_prompt, bos)
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise EdgeError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.template_source)
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos,
            eos_token=self._vocab.text(self.eos_id) if self.eos_id >= 0 else "")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat ending with the assistant's turn opened; the template places BOS itself."""
        text = self.render_chat(messages)
        bos_text = self._vocab.text(self.bos_id) if self.bos_id >= 0 else None
        has_bos = bool(bos_text) and text.startswith(bos_text)
        return self.encode(text, add_bos=self.add_bos and not has_bos, special=True)


class TextStream:
    """Token ids in, printable text out: holds back bytes of a UTF-8 character split across tokens."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._tok.token_bytes(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
