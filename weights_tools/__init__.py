"""Offline tools: everything that writes model files. `edge convert` (a GGUF or Hugging Face directory to a
store, `--calibrate`), `edge stack` (BitStack), `edge expert-bits`, moefy, random-weight models, float32 copies."""
