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


LLAMA_FTYPES = {"Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q4_0": 2, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17,
                "Q8_0": 7}


def quantize_with_llama_cpp(src: str | Path, dst: str | Path, ftype: str, token_embedding_type: int | None = None,
                            threads: int = 2) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize) on a GGUF: ftype as llama-quantize names it (Q2_K,
    Q3_K_S, Q4_0, Q4_K_M, ...); token_embedding_type: a ggml type id to keep the embedding at (for size
    comparisons of the other matrices). Rows whose width is not a multiple of 256 cannot hold K-quants, and
    llama.cpp substitutes another type for them (IQ4_NL for Q2_K/Q3_K, Q5_0 for Q4_K): read the result's types."""
    import ctypes

    import llama_cpp

    from edge.errors import EdgeError

    dst = Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ftype]
    params.nthread = threads
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type
    tmp = dst.with_name(dst.name + ".partial")
    from edge.tokenizer import quiet_stderr

    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise EdgeError(f"{src}: llama.cpp's quantizer failed ({ftype}, status {rc})")
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
