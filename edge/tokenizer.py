"""Tokenizer and chat template from the GGUF: llama.cpp's own tokenizer (vocab only), jinja2 for the template.

Token ids therefore match the peer exactly. Multi-turn chats are formatted with the template stored in the
GGUF metadata; a file without one gets its architecture's known template (gemma) or ChatML.
"""

from __future__ import annotations

import codecs
import contextlib
import os
from pathlib import Path

from edge.errors import EdgeError

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


@contextlib.contextmanager
def _quiet_stderr():
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


class Tokenizer:
    def __init__(self, path: str | Path, arch: str, template: str | None):
        from llama_cpp import Llama

        with _quiet_stderr():
            self._llama = Llama(str(path), vocab_only=True, verbose=False)
        self._model = self._llama._model
        self.bos_id = self._model.token_bos()
        self.eos_id = self._model.token_eos()
        self.add_bos = bool(self._model.add_bos_token())
        self.template_source = template or (GEMMA_TEMPLATE if arch.startswith("gemma") else CHATML_TEMPLATE)
        self._template = None
        import llama_cpp

        self._vocab = llama_cpp.llama_model_get_vocab(self._model.model)
        self._is_eog = llama_cpp.llama_vocab_is_eog

    @property
    def vocab_size(self) -> int:
        return self._model.n_vocab()

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        add = self.add_bos if add_bos is None else add_bos
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add, special=special)

    def token_bytes(self, token: int) -> bytes:
        import ctypes

        import llama_cpp

        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        """End of generation: EOS or an end-of-turn token such as <|im_end|> or <end_of_turn>."""
        return bool(self._is_eog(self._vocab, token))

    def streamer(self) -> "TextStream":
        return TextStream(self)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise EdgeError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.template_source)
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._model.token_get_text(self.bos_id) if self.bos_id >= 0 else "",
            eos_token=self._model.token_get_text(self.eos_id) if self.eos_id >= 0 else "")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat ending with the assistant's turn opened; the template places BOS itself."""
        text = self.render_chat(messages)
        bos_text = self._model.token_get_text(self.bos_id) if self.bos_id >= 0 else None
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
