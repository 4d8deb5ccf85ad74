"""Copy GGUF metadata fields from a reader to a gguf.GGUFWriter (for rewritten or metadata-only files)."""

from __future__ import annotations

from typing import Callable

SET_BY_WRITER = ("general.architecture",)


def copy_fields(fields: dict, writer, keep: Callable[[str], bool] = lambda key: True) -> None:
    """Every field the writer does not set itself (GGUF.* header entries, the architecture), if keep(key)."""
    import gguf

    for key, field in fields.items():
        if key.startswith("GGUF.") or key in SET_BY_WRITER or not field.types or not keep(key):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def finish(writer) -> None:
    """Write everything added to a gguf.GGUFWriter and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
