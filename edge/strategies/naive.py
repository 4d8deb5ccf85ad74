"""`--strategy naive` (LLM in a flash's baseline): no neuron cache; every cluster of every layer is read from
flash and used where it was read, each token, with the same read-ahead as `sparse`."""

from __future__ import annotations

from edge.strategies.sparse import Sparse


class Naive(Sparse):
    name = "naive"
    caches = False
