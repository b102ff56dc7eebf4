"""Parquet column types checked before any Arrow -> Python conversion.

A Parquet file can declare an Arrow extension type for a column; Ray Data registers one
(``ray.data.arrow_pickled_object``) whose cells unpickle on conversion, so converting a
column of a file someone else wrote could run their code. Every Parquet read here (prepare's
``parquet:`` source, the prepared shards Ray Data trains on, evaluation) first checks the
schema in the file's footer: ``image`` plain binary / large_binary, ``label`` a plain integer,
and no extension type, registered or not (an unregistered one still names itself in the
field's metadata).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.types as pat

EXTENSION_KEY = b"ARROW:extension:name"


class SchemaError(ValueError):
    """A Parquet column has a type we refuse; the message names the file, column and type."""


def _describe(field: pa.Field) -> str:
    if isinstance(field.type, pa.ExtensionType):
        return f"extension type {field.type.extension_name!r}"
    if field.metadata and EXTENSION_KEY in field.metadata:
        return f"extension type {field.metadata[EXTENSION_KEY].decode(errors='replace')!r}"
    return str(field.type)


def _is_plain(field: pa.Field) -> bool:
    return not isinstance(field.type, pa.ExtensionType) and not (field.metadata and EXTENSION_KEY in field.metadata)


def check_image_schema(schema: pa.Schema, where: str, *, require_label: bool = False) -> bool:
    """Raise SchemaError unless ``image`` is binary/large_binary and ``label`` (if present, or
    required) an integer type, neither an extension type. Returns whether there is a label."""
    names = schema.names
    if "image" not in names:
        raise SchemaError(f"{where}: no 'image' column (columns: {names})")
    image = schema.field("image")
    if not (_is_plain(image) and (pat.is_binary(image.type) or pat.is_large_binary(image.type))):
        raise SchemaError(f"{where}: column 'image' has type {_describe(image)}; expected binary or large_binary "
                          "(encoded image bytes)")
    if "label" not in names:
        if require_label:
            raise SchemaError(f"{where}: no 'label' column (columns: {names})")
        return False
    label = schema.field("label")
    if not (_is_plain(label) and pat.is_integer(label.type)):
        raise SchemaError(f"{where}: column 'label' has type {_describe(label)}; expected an integer type")
    return True


def check_split_column(schema: pa.Schema, where: str) -> bool:
    """Raise SchemaError unless an optional ``split`` column (the source's own train/test split) is a plain
    string column (dictionary-encoded allowed, as pandas writes a categorical). Returns whether there is one."""
    if "split" not in schema.names:
        return False
    split = schema.field("split")
    kind = split.type.value_type if pat.is_dictionary(split.type) else split.type
    if not (_is_plain(split) and (pat.is_string(kind) or pat.is_large_string(kind))):
        raise SchemaError(f"{where}: column 'split' has type {_describe(split)}; expected strings ('train' or 'test')")
    return True
