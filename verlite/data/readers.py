"""Read rows from .json (array or one object per line), .jsonl and .parquet files.

Every row comes back with a location string ("train.jsonl:12", "train.json item 4",
"train.parquet row 7") so later errors can point at the exact place to fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from verlite.errors import VerliteError

SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass
class Row:
    where: str  # "file:line", "file item N" or "file row N"
    data: dict[str, Any]


def expand_path(path: str) -> str:
    """`~` and $VARS expanded, as a shell would (the article writes `~/data/...`)."""
    return os.path.expandvars(os.path.expanduser(str(path)))


def resolve_files(files: Union[str, list[str], None], key: str) -> list[str]:
    if files is None:
        raise VerliteError(f"'{key}' is not set; give a .json, .jsonl or .parquet path (or a list of them)")
    paths = [files] if isinstance(files, str) else list(files)
    if not paths:
        raise VerliteError(f"'{key}' is an empty list; give at least one data file")
    out = []
    for p in paths:
        full = expand_path(p)
        if not Path(full).is_file():
            raise VerliteError(f"data file {p} does not exist ({key}); check the path")
        if not full.endswith(SUFFIXES):
            raise VerliteError(f"data file {p} ({key}) must end in .json, .jsonl or .parquet")
        out.append(full)
    return out


def read_rows(path: str) -> list[Row]:
    if path.endswith(".parquet"):
        rows = _read_parquet(path)
    else:
        rows = _read_json(path)
    if not rows:
        raise VerliteError(f"data file {path} holds no samples; add rows or remove it from the config")
    return rows


def _read_json(path: str) -> list[Row]:
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise VerliteError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped.startswith("["):  # a JSON array
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise VerliteError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix that line") from None
        rows = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise VerliteError(f"{path} item {i}: expected an object with fields, got {type(item).__name__}")
            rows.append(Row(f"{path} item {i}", item))
        return rows
    # One JSON object per line (.jsonl, or a .json written that way).
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise VerliteError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(item, dict):
            raise VerliteError(f"{path}:{lineno}: expected a JSON object per line, got {type(item).__name__}")
        rows.append(Row(f"{path}:{lineno}", item))
    return rows


def _read_parquet(path: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with a useful text
        raise VerliteError(f"{path}: cannot read parquet ({' '.join(str(e).split())[:200]})") from None
    return [Row(f"{path} row {i}", item) for i, item in enumerate(table.to_pylist())]


def columns_of(path: str) -> list[str] | None:
    """The column names of a parquet file (None for JSON), for 'missing column' errors."""
    if not path.endswith(".parquet"):
        return None
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def field_value(row: Row, key: str, dict_keys: list[str] | None, config_key: str) -> Any:
    """row[key], then one level down per name in `dict_keys` (verl's prompt_dict_keys /
    response_dict_keys: `extra_info` + ['question'] reads row['extra_info']['question'])."""
    if key not in row.data:
        keys = ", ".join(sorted(map(str, row.data))) or "none"
        raise VerliteError(f"{row.where}: missing key '{key}' (data.{config_key}); this row has: {keys}")
    value = row.data[key]
    path = key
    for sub in dict_keys or []:
        dict_key = config_key.replace("_key", "_dict_keys")
        if not isinstance(value, dict):
            raise VerliteError(f"{row.where}: '{path}' is {type(value).__name__}, not a dict holding '{sub}' "
                               f"(data.{dict_key}); check data.{config_key} and data.{dict_key}")
        if sub not in value:
            keys = ", ".join(sorted(map(str, value))) or "none"
            raise VerliteError(f"{row.where}: '{path}' has no field '{sub}' (data.{dict_key}); it has: {keys}")
        value = value[sub]
        path = f"{path}.{sub}"
    return value
