"""The weight-source contract: what the runtime and the tools read a model through.

Three kinds keep it: a GGUF file (edge.gguf_file.GGUFFile), a flash store (edge.store.Store) and a Hugging Face
directory (weights_tools.hf.HFSource, for conversion). One contract test suite runs against all three
(tests/test_source.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from edge.config import ModelConfig
from edge.gguf_file import Tensor


class WeightSource(Protocol):
    path: Path
    config: ModelConfig
    metadata: dict            # "general.name", "tokenizer.chat_template", ... (GGUF keys)
    chat_template: str | None
    tokenizer_path: Path      # what edge.tokenizer.Tokenizer opens for this model
    kind: str                 # how the user would name it: "GGUF", "edge store", "Hugging Face"

    def has(self, name: str) -> bool:
        """Whether the model holds tensor `name` (GGUF names)."""

    def tensor_names(self) -> list[str]:
        """The tensors it stores by name (a store's FFN bundles are read as their GGUF tensors, not listed)."""

    def tensor(self, name: str, expected: tuple[int, ...] | None = None) -> Tensor:
        """Tensor `name` (rows of raw bytes in its type); with `expected`, an EdgeError unless it has that logical
        shape; an EdgeError naming the source when it is missing."""

    def expert_tensors(self, layer: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        """A mixture's experts of one layer: (gate, up, down) each; an EdgeError for a dense model."""
