"""Copy GGUF metadata fields (GGUFFile.fields()) to a gguf.GGUFWriter (for rewritten or metadata-only files)."""

from __future__ import annotations

from typing import Callable

SET_BY_WRITER = ("general.architecture",)


def copy_fields(fields: dict, writer, keep: Callable[[str], bool] = lambda key: True) -> None:
    """Every field the writer does not set itself (the architecture), if keep(key)."""
    import gguf

    for key, field in fields.items():
        if key in SET_BY_WRITER or not keep(key):
            continue
        sub = None if field.sub_type is None else gguf.GGUFValueType(field.sub_type)
        writer.add_key_value(key, field.value, gguf.GGUFValueType(field.vtype), sub_type=sub)


def finish(writer) -> None:
    """Write everything added to a gguf.GGUFWriter and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
