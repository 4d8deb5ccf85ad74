"""Write a GGUF whose every tensor is float32 (dequantized), metadata unchanged.

Used to check the forward pass against llama.cpp without quantization noise on either side, and as the
starting point for re-quantizing the same weights with llama.cpp's own quantizer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edge import quants
from edge.gguf_file import GGUFFile
from weights_tools.gguf_meta import copy_fields, finish


def write_dequantized(src: str | Path, dst: str | Path) -> Path:
    import gguf

    model = GGUFFile(src)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(tmp, arch=model.config.arch)
    copy_fields(model.fields(), writer, keep=lambda key: key != "general.file_type")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name in model.tensor_names():
        t = model.tensor(name)
        w = quants.dequantize(t.raw, t.type_id, t.cols).reshape(t.shape)
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    finish(writer)
    tmp.replace(dst)
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Dequantize every tensor of a GGUF to float32.")
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)
    write_dequantized(args.src, args.dst)


if __name__ == "__main__":
    main()
