"""Loading records from JSONL, JSON and CSV files without `datasets`; every malformed line is a named error.

`load_records` returns a `Records` list: plain dicts, plus where each came from (``records.where(i)`` gives
``"file.jsonl:12"``), so later errors (truncation, templates) can still name the file and line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError
from llmtune.data.formats import detect_format

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
#: CSV cells that hold JSON (chat turns, ShareGPT turns, tool schemas)
JSON_CELLS = ("messages", "conversations", "tools")


class Records(list):  # type: ignore[type-arg]
    """A list of record dicts that remembers its source and the line each record started on (or, for records
    read through `llmtune.data.sources`, each record's own place: ``"alpaca.parquet:row 1234"``)."""

    def __init__(self, items: Iterable[dict[str, Any]] = (), *, source: str = "records",
                 lines: list[int] | None = None, wheres: list[str] | None = None) -> None:
        super().__init__(items)
        self.source = source
        self.lines = lines
        self.wheres = wheres
        #: the index of the source each record came from, for records of a mixture (`llmtune.data.sources`)
        self.origins: list[int] | None = None

    def where(self, index: int) -> str:
        """``"source:line"`` for records read from a file, ``"source[index]"`` otherwise."""
        if self.wheres is not None and 0 <= index < len(self.wheres):
            return self.wheres[index]
        if self.lines is not None and 0 <= index < len(self.lines):
            return f"{self.source}:{self.lines[index]}"
        return f"{self.source}[{index}]"


def _parse_jsonl(text: str, source: str) -> tuple[list[Any], list[int]]:
    """One JSON value per non-blank line."""
    items: list[Any] = []
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}:{number}: invalid JSON at column {err.colno}: {err.msg}") from None
        lines.append(number)
    return items, lines


def _parse_json_array(text: str, source: str) -> tuple[list[Any], list[int]]:
    """A JSON array of objects, decoded element by element so each keeps its line number."""
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        raise ConfigError(f"{source}:{line_of(i)}: expected a JSON array of records ('[') or JSON Lines")
    items: list[Any] = []
    lines: list[int] = []
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        return items, lines
    while True:
        try:
            item, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}:{err.lineno}: invalid JSON at column {err.colno}: {err.msg}") from None
        items.append(item)
        lines.append(line_of(i))
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            break
        raise ConfigError(f"{source}:{line_of(i)}: expected ',' or ']' after record {len(items)}")
    if skip(i + 1) != len(text):
        raise ConfigError(f"{source}:{line_of(skip(i + 1))}: unexpected text after the closing ']'")
    return items, lines


def _parse_csv(text: str, source: str, delimiter: str) -> tuple[list[Any], list[int]]:
    """Rows as dicts keyed by the header; ``messages`` / ``conversations`` / ``tools`` cells hold JSON."""
    extra_key = "\0extra"
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter, restkey=extra_key)
    if not reader.fieldnames:
        raise ConfigError(f"{source}:1: empty file: expected a header row")
    items: list[Any] = []
    lines: list[int] = []
    for row in reader:
        line = reader.line_num  # the row's (last) line; rows are one line unless a quoted cell holds newlines
        if extra_key in row:
            cells = len(reader.fieldnames) + len(row[extra_key])
            raise ConfigError(f"{source}:{line}: {cells} cells but the header has {len(reader.fieldnames)} columns")
        missing = [k for k, v in row.items() if v is None]
        if missing:
            raise ConfigError(f"{source}:{line}: field {missing[0]!r}: missing (the row has fewer cells than the header)")
        record: dict[str, Any] = dict(row)
        for key in JSON_CELLS:
            if key in record and not (key == "tools" and record[key] == ""):
                try:
                    record[key] = json.loads(record[key])
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{source}:{line}: field {key!r}: invalid JSON: {err.msg}") from None
            elif key == "tools" and record.get(key) == "":
                del record[key]
        items.append(record)
        lines.append(line)
    return items, lines


def read_records(path: str | Path) -> Records:
    """Records from a .jsonl/.ndjson, .json (array, or JSON Lines) or .csv/.tsv file, not yet validated.

    Raises `ConfigError` naming the file and line for anything that is not well-formed JSON / CSV.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise ConfigError(f"{source}: is a directory, not a data file")
    if not path.is_file():
        raise ConfigError(f"{source}: no such data file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{source}: unknown data file type {suffix or '(none)'!r}; expected one of "
                          f"{', '.join(SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except PermissionError:
        raise ConfigError(f"{source}: permission denied (cannot read the data file)") from None
    if suffix in (".jsonl", ".ndjson"):
        items, lines = _parse_jsonl(text, source)
    elif suffix == ".json":
        stripped = text.lstrip()
        # Many ".json" datasets are really JSON Lines: one object per line.
        if stripped.startswith("{"):
            items, lines = _parse_jsonl(text, source)
        else:
            items, lines = _parse_json_array(text, source)
    else:
        items, lines = _parse_csv(text, source, "\t" if suffix == ".tsv" else ",")
    if not items:
        raise ConfigError(f"{source}: no records")
    return Records(items, source=source, lines=lines)


def load_records(path: str | Path) -> Records:
    """Training records from a .jsonl/.ndjson, .json (array, or JSON Lines) or .csv/.tsv file, each validated.

    Raises `ConfigError` naming the file, the line and the field for anything malformed; no record is dropped.
    """
    records = read_records(path)
    for i, record in enumerate(records):
        detect_format(record, records.where(i))
    return records


def as_records(data: str | Path | Iterable[dict[str, Any]], source: str | None = None) -> Records:
    """Records from a path or from in-memory dicts (validated; errors name `source[index]`)."""
    if isinstance(data, (str, Path)):
        return load_records(data)
    if isinstance(data, Records):
        records = data
    else:
        records = Records(list(data), source=source or "records")
    if not records:
        raise ConfigError(f"{records.source}: no records")
    for i, record in enumerate(records):
        detect_format(record, records.where(i))
    return records
