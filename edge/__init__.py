"""edge: run language models larger than the RAM you give them, weights kept on flash."""

__version__ = "0.1.0"
