"""Offline tools: everything that reads or writes model files (GGUF rewrites now; convert and stack later)."""
