"""Raw text for pretraining, streamed: files read a chunk at a time, tokenized, packed into fixed-length blocks.

    stream = BlockStream(text_sources(["corpus.txt"]), tokenizer, block_size=512)
    for block in stream:            # lists of exactly 512 token ids; memory stays flat on a multi-GB file
        ...

A source is a ``.txt`` file (one document), a ``.jsonl`` file (one document per line's ``text_field``), a
directory (its ``.txt``/``.jsonl`` files, sorted), an in-memory list of strings, or a dataset source read through
``datasets`` (a parquet/arrow file or folder, a ``save_to_disk`` folder, a hub id: `llmtune.data.sources`), whose
``text_field`` column is read row by row, streamed. Documents are joined with
the tokenizer's eos token. A ``.txt`` file is read ``chunk_bytes`` characters at a time and cut after the
last newline of each chunk (or before its last space), so no token is split. Imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class TextSource:
    """One document source: a file path, an in-memory list of texts, or a dataset source (`Source`)."""

    path: Path | None = None
    texts: tuple[str, ...] = ()
    dataset: Any = None

    def describe(self) -> str:
        if self.dataset is not None:
            return str(self.dataset.name)
        return str(self.path) if self.path is not None else f"{len(self.texts)} texts"


def text_sources(data: Any, what: str = "data") -> list[TextSource]:
    """Turn paths, directories or lists of strings into `TextSource`s (checking that they exist)."""
    from llmtune.data.sources import DataSpec, as_spec

    spec = data if isinstance(data, DataSpec) else None
    if (spec is None and isinstance(data, (str, os.PathLike))) or (isinstance(data, Sequence) and data
                                                               and not all(isinstance(t, str) for t in data)):
        spec = as_spec(data)
    if spec is not None:
        if spec.val_size is not None or spec.dedup or any(s.weight or s.samples for s in spec.sources):
            raise ConfigError(f"{what}: pretraining reads its sources in order; weight, samples, val_size and "
                              "dedup apply to record data (sft, dpo, ...)")
        return [TextSource(dataset=s) for s in spec.sources]
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    if not isinstance(data, Sequence) or not data:
        raise ConfigError(f"{what} must be a text file, a directory, or a non-empty list of texts or paths")
    if all(isinstance(t, str) for t in data) and not all(_looks_like_path(t) for t in data):
        return [TextSource(texts=tuple(data))]  # a list of strings is texts, unless every one names a file
    sources: list[TextSource] = []
    for item in data:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES and p.is_file())
            if not files:
                raise ConfigError(f"{what}: directory {path} has no .txt or .jsonl files")
            sources.extend(TextSource(path=p) for p in files)
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
                raise ConfigError(f"{what}: {path} is not a .txt or .jsonl file")
            sources.append(TextSource(path=path))
        else:
            raise ConfigError(f"{what}: {path} does not exist")
    return sources


def _looks_like_path(text: str) -> bool:
    if "\n" in text or len(text) > 1024:
        return False
    try:
        return Path(text).expanduser().exists()
    except OSError:  # e.g. a name too long for the filesystem: a text, not a path
        return False


def _txt_pieces(path: Path, chunk_bytes: int) -> Iterator[str]:
    """The text of a file in pieces of about ``chunk_bytes`` characters, each ending at a newline or space."""
    carry = ""
    try:
        with open(path, encoding="utf-8") as fh:
            while True:
                chunk = fh.read(chunk_bytes)
                if not chunk:
                    break
                text = carry + chunk
                newline = text.rfind("\n")
                # after a newline, or before a space (a space starts the next word's token)
                cut = newline + 1 if newline >= 0 else text.rfind(" ")
                if cut <= 0:  # no break in the whole piece: keep reading
                    carry = text
                    continue
                carry = text[cut:]
                yield text[:cut]
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start} of a chunk)") from None
    if carry:
        yield carry


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ConfigError(f"{path}:{n}: no string field {field!r}")
            yield text


def _dataset_texts(source: Any, field: str) -> Iterator[str]:
    from llmtune.data.sources import iter_source

    for where, record in iter_source(source):
        text = record.get(field)
        if not isinstance(text, str):
            raise ConfigError(f"{where}: no string field {field!r} (name the text column with text_field)")
        yield text


class BlockStream:
    """An iterable over fixed-length token blocks of the sources (restartable: each ``iter`` starts over)."""

    def __init__(self, sources: Sequence[TextSource], tokenizer: Any, *, block_size: int,
                 chunk_bytes: int = 1 << 16, text_field: str = "text") -> None:
        if block_size < 2:
            raise ConfigError(f"block_size={block_size} must be >= 2")
        self.sources = list(sources)
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.chunk_bytes = chunk_bytes
        self.text_field = text_field

    def _documents(self) -> Iterator[Iterator[str]]:
        """Each document as an iterator of text pieces."""
        for src in self.sources:
            if src.dataset is not None:
                for text in _dataset_texts(src.dataset, src.dataset.text_field or self.text_field):
                    yield iter((text,))
            elif src.path is None:
                for text in src.texts:
                    yield iter((text,))
            elif src.path.suffix in JSONL_SUFFIXES:
                for text in _jsonl_texts(src.path, self.text_field):
                    yield iter((text,))
            else:
                yield _txt_pieces(src.path, self.chunk_bytes)

    def token_pieces(self) -> Iterator[list[int]]:
        """Token ids piece by piece, with eos after every document (bos before it, if the tokenizer has one)."""
        tok = self.tokenizer
        bos, eos = tok.bos_token_id, tok.eos_token_id
        fast = getattr(tok, "backend_tokenizer", None)  # the Rust tokenizer: no max-length warning, faster
        for doc in self._documents():
            if bos is not None:
                yield [int(bos)]
            for piece in doc:
                if fast is not None:
                    yield fast.encode(piece, add_special_tokens=False).ids
                else:
                    yield list(tok(piece, add_special_tokens=False)["input_ids"])
            if eos is not None:
                yield [int(eos)]

    def __iter__(self) -> Iterator[list[int]]:
        buf: list[int] = []
        start = 0
        n = self.block_size
        for ids in self.token_pieces():
            buf.extend(ids)
            while len(buf) - start >= n:
                yield buf[start:start + n]
                start += n
            if start > 4 * n or start > len(buf) // 2:
                del buf[:start]
                start = 0

    def count(self) -> int:
        """How many blocks one pass gives (a full pass, streamed)."""
        return sum(1 for _ in self)

    def fingerprint(self) -> str:
        """A cheap identity of the data: names, sizes, the first and last 64 KiB of files, the block size."""
        h = hashlib.sha256(f"{self.block_size}|{len(self.tokenizer)}|{self.text_field}".encode())
        for src in self.sources:
            if src.dataset is not None:
                from llmtune.data.sources import DataSpec

                h.update(DataSpec((src.dataset,)).digest().encode())
                continue
            if src.path is None:
                for text in src.texts:
                    h.update(text.encode())
                continue
            size = src.path.stat().st_size
            h.update(f"{src.path.name}|{size}".encode())
            with open(src.path, "rb") as fh:
                h.update(fh.read(1 << 16))
                fh.seek(max(0, size - (1 << 16)))
                h.update(fh.read(1 << 16))
        return h.hexdigest()[:16]
