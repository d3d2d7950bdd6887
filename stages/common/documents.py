"""Reading and annotating documents shards (Parquet with at least id, url, text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_documents(path: Path, error: type[Exception]) -> Any:
    """A documents shard as a pyarrow Table with a string column ``text``, or ``error`` naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise error(f"cannot read input shard {path}: {exc}") from exc
    if "text" not in table.column_names:
        raise error(f"input shard {path} has no 'text' column (columns: {table.column_names})")
    text_type = table.schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise error(f"input shard {path}: column 'text' is {text_type}, not a string")
    return table


def with_column(table: Any, name: str, values: Any) -> Any:
    """``table`` with column ``name`` set to ``values``, replacing a column of that name if present."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def text_bytes(table: Any) -> int:
    """UTF-8 bytes of the ``text`` column."""
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return 0
    return int(pc.sum(pc.binary_length(table.column("text"))).as_py() or 0)
