"""Data sources beyond one local JSONL file: hub ids, parquet/arrow files or folders, ``save_to_disk`` folders
(read through Hugging Face ``datasets``, ``pip install 'llmtune[datasets]'``), column mapping, mixtures of
several sources, a deterministic held-out split and de-duplication.

    spec = DataSpec((Source("alpaca.parquet", columns={"output": "answer"}),
                     Source("tatsu-lab/alpaca", split="train", weight=1.0)), seed=0, val_size=0.05)
    records = spec.train().records()        # a `Records` list: errors name "alpaca.parquet:row 1234"
    heldout = spec.heldout().records()      # the rows carved out by ``val_size`` (the same on every call)
    for where, row in iter_source(spec.sources[0]):   # streamed, row by row: memory stays flat
        ...

Everything after the reader is the JSONL path's: format detection, templates, masking. A row's null cells are
dropped (an absent field, as in JSON Lines). Rows are counted from 0, as ``dataset[i]``. Imports no torch;
``datasets`` is imported only when a source needs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError, InvalidOptionError, MissingDependencyError
from llmtune.data.records import SUFFIXES as RECORD_SUFFIXES
from llmtune.data.records import Records, read_records

#: local file types read through ``datasets`` (a folder of them is one source)
DATASET_SUFFIXES = (".parquet", ".arrow")
#: the keys of one source in a config's ``data:`` list
SOURCE_KEYS = ("path", "split", "subset", "name", "revision", "data_files", "streaming", "columns", "weight",
               "samples", "template", "system_prompt", "train_on", "text_field")
#: suffixes that make a missing path a missing file, not a hub id
FILE_SUFFIXES = (*RECORD_SUFFIXES, *DATASET_SUFFIXES, ".txt", ".text", ".md")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclasses.dataclass(frozen=True)
class Source:
    """One data source: a local file or folder, or a hub dataset id, and how to read it.

    ``columns`` maps llmtune's field names to the source's (``{"output": "answer"}``: the ``answer`` column is
    read as ``output``). ``weight`` / ``samples`` place it in a mixture; ``template``, ``system_prompt`` and
    ``train_on`` override the trainer's options for its records; ``text_field`` is the text column for
    pretraining."""

    path: str
    split: str = "train"
    subset: str | None = None
    revision: str | None = None
    data_files: Any = None
    streaming: bool = False
    columns: tuple[tuple[str, str], ...] = ()
    weight: float | None = None
    samples: int | None = None
    template: str | None = None
    system_prompt: str | None = None
    train_on: str | None = None
    text_field: str | None = None

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> Source:
        """A source from a config mapping; a bad key or value is an `InvalidOptionError` naming the field."""
        for key in spec:
            if key not in SOURCE_KEYS:
                raise InvalidOptionError(f"unknown data source key {key!r}; valid keys: {', '.join(SOURCE_KEYS)}",
                                         field=str(key))
        if not isinstance(spec.get("path"), str) or not spec["path"]:
            raise InvalidOptionError("a data source needs 'path': a file, a folder or a hub dataset id", field="path")
        if "subset" in spec and "name" in spec:
            raise InvalidOptionError("give 'subset' or 'name' (the same thing), not both", field="name")
        values = {k: v for k, v in spec.items() if k != "name"}
        if "name" in spec:
            values["subset"] = spec["name"]
        for key in ("split", "subset", "revision", "template", "system_prompt", "train_on", "text_field"):
            if values.get(key) is not None and not isinstance(values[key], str):
                raise InvalidOptionError(f"{key!r} must be a string, not {values[key]!r}", field=key)
        if not isinstance(values.get("streaming", False), bool):
            raise InvalidOptionError(f"'streaming' must be true or false, not {values['streaming']!r}",
                                     field="streaming")
        columns = values.get("columns") or {}
        if not isinstance(columns, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in columns.items()):
            raise InvalidOptionError("'columns' must map field names to column names, e.g. "
                                     "{instruction: question, output: answer}", field="columns")
        values["columns"] = tuple(columns.items())
        weight, samples = values.get("weight"), values.get("samples")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0):
            raise InvalidOptionError(f"'weight' must be a number > 0, not {weight!r}", field="weight")
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise InvalidOptionError(f"'samples' must be an integer >= 1, not {samples!r}", field="samples")
        if weight is not None and samples is not None:
            raise InvalidOptionError("give 'weight' or 'samples', not both", field="samples")
        files = values.get("data_files")
        if files is not None and not isinstance(files, (str, list, dict)):
            raise InvalidOptionError("'data_files' must be a path, a list of paths or {split: paths}",
                                     field="data_files")
        if isinstance(files, list):
            values["data_files"] = tuple(files)
        return cls(**values)

    @property
    def name(self) -> str:
        """How errors and reports name the source: a local file by its name, a hub id as is."""
        local = Path(self.path)
        return local.name if self.kind != "hub" else self.path

    @property
    def kind(self) -> str:
        """``parquet``, ``arrow``, ``saved`` (a save_to_disk folder), ``folder`` (of parquet/arrow files), ``hub``
        (a dataset id), or ``local``: any other path, read by llmtune's own readers (.jsonl/.json/.csv, text)."""
        path = Path(self.path).expanduser()
        if path.is_dir():
            names = {p.name for p in path.iterdir()}
            if {"dataset_info.json", "state.json"} <= names or "dataset_dict.json" in names:
                return "saved"
            return "folder" if any(next(path.rglob(f"*{x}"), None) for x in DATASET_SUFFIXES) else "local"
        suffix = path.suffix.lower()
        if suffix in DATASET_SUFFIXES:
            return suffix[1:]
        if path.exists():
            return "local"
        if self.data_files is not None or (_HUB_ID.fullmatch(self.path) and suffix not in FILE_SUFFIXES):
            return "hub"
        return "local"

    def to_dict(self) -> dict[str, Any]:
        """The non-default settings, for run.json and reports."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = dict(value) if f.name == "columns" else list(value) if isinstance(value, tuple) else value
        return out


def as_source(item: Source | Mapping[str, Any] | str | os.PathLike[str]) -> Source:
    """A `Source` from a source, a config mapping, or a path / hub id."""
    if isinstance(item, Source):
        return item
    if isinstance(item, Mapping):
        return Source.from_mapping(item)
    return Source(str(item))


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARS)


def _datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise MissingDependencyError(f"{what}: reading parquet, arrow, saved datasets and hub ids needs "
                                     "datasets: pip install 'llmtune[datasets]'") from exc
    return datasets


def _folder_files(path: Path) -> tuple[str, list[str]]:
    """The builder and the files of a folder of parquet or arrow files."""
    for suffix in DATASET_SUFFIXES:
        files = sorted(str(p) for p in path.rglob(f"*{suffix}") if p.is_file())
        if files:
            return suffix[1:], files
    raise ConfigError(f"{path}: folder has no .parquet or .arrow files and is not a save_to_disk folder "
                      "(no dataset_info.json / dataset_dict.json)")


def open_dataset(source: Source, what: str = "data") -> Any:
    """The source as a ``datasets`` iterable: a `Dataset`, or an `IterableDataset` read as it goes (local files are
    always streamed: rows come straight from the files, no cache copy is made)."""
    kind = source.kind
    path = Path(source.path).expanduser()
    if kind == "hub" and _offline():
        raise ConfigError(f"{what}: {source.path!r} is a hub dataset id and the hub is offline (HF_HUB_OFFLINE / "
                          "HF_DATASETS_OFFLINE is set); download it where the hub is reachable "
                          "(datasets.load_dataset(...).save_to_disk(DIR), or its parquet files) and give that path")
    ds = _datasets(what)
    try:
        if kind == "saved":
            loaded = ds.load_from_disk(str(path))
            if isinstance(loaded, ds.DatasetDict):
                if source.split not in loaded:
                    raise ConfigError(f"{what}: {source.path}: no split {source.split!r}; it has "
                                      f"{', '.join(loaded)}")
                loaded = loaded[source.split]
            return loaded.to_iterable_dataset() if source.streaming else loaded
        if kind in ("parquet", "arrow", "folder"):
            builder, files = (kind, [str(path)]) if kind != "folder" else _folder_files(path)
            return ds.load_dataset(builder, data_files=files, split="train", streaming=True)
        files = list(source.data_files) if isinstance(source.data_files, tuple) else source.data_files
        return ds.load_dataset(source.path, source.subset, split=source.split, revision=source.revision,
                               data_files=files, streaming=source.streaming)
    except ConfigError:
        raise
    except Exception as exc:  # datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ...)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{what}: cannot read {source.path!r} with datasets ({type(exc).__name__}: {message})"
                          ) from None


def _column_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    return list(names) if names else None


def _mapped(row: Mapping[str, Any], columns: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The row as a record: null cells dropped, mapped columns renamed to llmtune's field names."""
    record = {k: v for k, v in row.items() if v is not None}
    for field, column in columns:
        if column in record:
            record[field] = record.pop(column)
    return record


def _check_columns(source: Source, names: Sequence[str], what: str) -> None:
    missing = [column for _field, column in source.columns if column not in names]
    if missing:
        raise ConfigError(f"{what}: {source.name}: no column {missing[0]!r} (from 'columns'); it has "
                          f"{', '.join(names)}")


def _rows(dataset: Any, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
    """A dataset's rows as dicts, converted from Arrow a batch at a time (some 15x faster than row by row)."""
    for batch in dataset.with_format("arrow").iter(batch_size=batch_size):
        yield from batch.to_pylist()


def iter_source(source: Source, what: str = "data") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every row of the source, in order, streamed for dataset sources."""
    if source.kind == "local":
        records = read_records(source.path)
        if records and source.columns:
            _check_columns(source, sorted({k for r in records for k in r}), what)
        for i, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise ConfigError(f"{records.where(i)}: a record must be a JSON object, not {type(record).__name__}")
            yield records.where(i), _mapped(record, source.columns)
        return
    dataset = open_dataset(source, what)
    names = _column_names(dataset)
    if names is not None and source.columns:
        _check_columns(source, names, what)
    name = source.name   # (a property that looks at the file system: once, not per row)
    for i, row in enumerate(_rows(dataset)):
        if i == 0 and names is None and source.columns:
            _check_columns(source, list(row), what)
        yield f"{name}:row {i}", _mapped(row, source.columns)


def read_source(source: Source, what: str = "data") -> Records:
    """All rows of one source as `Records` (each remembers ``file:line`` or ``name:row i``)."""
    wheres, items = [], []
    for where, record in iter_source(source, what):
        wheres.append(where)
        items.append(record)
    if not items:
        raise ConfigError(f"{what}: {source.name}: no records")
    return Records(items, source=source.name, wheres=wheres)


def record_key(record: Mapping[str, Any]) -> str:
    """The identity of a record for de-duplication (exact repeats: the same fields and values)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _rng(seed: int, *salt: int) -> Any:
    import numpy as np

    return np.random.default_rng([seed, *salt])


def heldout_count(val_size: float | int, total: int) -> int:
    """How many of ``total`` records ``val_size`` (a fraction in (0, 1), or a count) holds out."""
    count = round(val_size * total) if isinstance(val_size, float) else int(val_size)
    if not 1 <= count < total:
        raise ConfigError(f"val_size={val_size} holds out {count} of {total} records; it must leave at least one "
                          "record on each side")
    return count


def mixture_counts(sizes: Sequence[int], sources: Sequence[Source]) -> list[int]:
    """How many records each source gives one epoch of the mixture.

    ``samples: k``: exactly k. ``weight``: the weighted sources share as many records as they hold together,
    in proportion to their weights (largest remainder: the counts add up exactly). Neither: all its records.
    """
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if weighted and any(s.weight is None and s.samples is None for s in sources):
        raise ConfigError("data: when a source has a 'weight', every source needs a 'weight' or 'samples'")
    counts = [s.samples if s.samples is not None else n for s, n in zip(sources, sizes)]
    if weighted:
        total = sum(sizes[i] for i in weighted)
        wsum = sum(float(sources[i].weight or 0) for i in weighted)
        exact = [total * float(sources[i].weight or 0) / wsum for i in weighted]
        floors = [int(x) for x in exact]
        order = sorted(range(len(weighted)), key=lambda j: floors[j] - exact[j])
        for j in order[:total - sum(floors)]:
            floors[j] += 1
        for i, c in zip(weighted, floors):
            counts[i] = c
    return counts


def draw(n: int, k: int, rng: Any) -> list[int]:
    """``k`` indices into ``n`` items: whole seeded permutations, repeated when ``k > n`` (oversampling)."""
    picks: list[int] = []
    while len(picks) < k:
        picks.extend(rng.permutation(n)[:k - len(picks)].tolist())
    return picks


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The training data as a config gives it: one or more sources, mixed by ``seed``, with an optional
    held-out part (``val_size``) and de-duplication. ``part`` says which side of the split this spec reads."""

    sources: tuple[Source, ...]
    seed: int = 0
    val_size: float | int | None = None
    dedup: bool = False
    part: str = "all"               #: "all", "train" (without the held-out rows) or "val" (only them)

    def train(self) -> DataSpec:
        return dataclasses.replace(self, part="train")

    def heldout(self) -> DataSpec:
        return dataclasses.replace(self, part="val")

    @property
    def streaming(self) -> bool:
        return any(s.streaming for s in self.sources)

    def to_dict(self) -> dict[str, Any]:
        """What run.json records: the sources, the seed that mixes them, the split and de-duplication."""
        return {"sources": [s.to_dict() for s in self.sources], "seed": self.seed, "val_size": self.val_size,
                "dedup": self.dedup, "part": self.part}

    def digest(self) -> str:
        """A cheap identity of the sources without reading them: the settings, and each local file's name, size
        and first and last 64 KiB (a hub id by its id, subset, split and revision)."""
        h = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode())
        for src in self.sources:
            path = Path(src.path).expanduser()
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for f in (f for f in files if f.is_file()):
                size = f.stat().st_size
                h.update(f"{f.name}|{size}".encode())
                with open(f, "rb") as fh:
                    h.update(fh.read(1 << 16))
                    fh.seek(max(0, size - (1 << 16)))
                    h.update(fh.read(1 << 16))
        return h.hexdigest()[:16]

    def pools(self, what: str = "data") -> list[Records]:
        """Each source's records, de-duplicated when asked, with the held-out rows removed (``part="train"``) or
        kept alone (``part="val"``)."""
        pools = [read_source(s, what) for s in self.sources]
        if self.dedup:
            pools = [_dedup(p) for p in pools]
        if self.val_size is None or self.part == "all":
            return pools
        total = sum(len(p) for p in pools)
        held = set(_rng(self.seed, 1).permutation(total)[:heldout_count(self.val_size, total)].tolist())
        out, offset = [], 0
        for p in pools:
            keep = [j for j in range(len(p)) if ((offset + j) in held) == (self.part == "val")]
            out.append(Records([p[j] for j in keep], source=p.source, wheres=[p.where(j) for j in keep]))
            offset += len(p)
        return out

    def plan(self, sizes: Sequence[int]) -> list[tuple[int, int]]:
        """The mixture's ``(source, index)`` order: each source's count drawn by the seed, then interleaved by it."""
        if len(self.sources) == 1 or self.part == "val":
            return [(s, j) for s, n in enumerate(sizes) for j in range(n)]
        counts = mixture_counts(sizes, self.sources)
        for s, (n, c) in enumerate(zip(sizes, counts)):
            if c and not n:
                raise ConfigError(f"data: source {self.sources[s].name} has no records left to draw from")
        picks = [(s, j) for s, (n, c) in enumerate(zip(sizes, counts)) for j in draw(n, c, _rng(self.seed, 2, s))]
        order = _rng(self.seed, 3).permutation(len(picks)).tolist()
        return [picks[i] for i in order]

    def records(self, what: str = "data") -> Records:
        """The records this spec reads, mixed (a list of records that each remember their source and row)."""
        pools = self.pools(what)
        plan = self.plan([len(p) for p in pools])
        name = pools[0].source if len(pools) == 1 else "+".join(p.source for p in pools)
        records = Records([pools[s][j] for s, j in plan], source=name, wheres=[pools[s].where(j) for s, j in plan])
        if not records:
            raise ConfigError(f"{what}: no records")
        records.origins = [s for s, _ in plan]
        return records

    def overrides(self, index: int) -> dict[str, str]:
        """Source ``index``'s own template options (``template``, ``system_prompt``, ``train_on``)."""
        src = self.sources[index]
        return {k: v for k, v in (("template", src.template), ("system_prompt", src.system_prompt),
                                  ("train_on", src.train_on)) if v is not None}

    def examples(self, records: Records, build: Callable[[Records, dict[str, str]], list[Any]]) -> list[Any]:
        """Examples of `records` (from `records`), each source's built with its own template options by
        ``build(records, overrides)``, in the records' order (an example ``build`` leaves out stays out)."""
        origins = records.origins or [0] * len(records)
        groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
        for i, s in enumerate(origins):
            groups.setdefault(tuple(sorted(self.overrides(s).items())), []).append(i)
        if len(groups) == 1:
            return build(records, dict(next(iter(groups))))
        built: dict[tuple[tuple[str, str], ...], list[Any]] = {}
        for key, idx in groups.items():
            part = Records([records[i] for i in idx], source=records.source, wheres=[records.where(i) for i in idx])
            built[key] = build(part, dict(key))
        out: list[Any] = []
        cursor = dict.fromkeys(groups, 0)
        for i, s in enumerate(origins):
            key = tuple(sorted(self.overrides(s).items()))
            got = built[key]
            if cursor[key] < len(got) and got[cursor[key]].where == records.where(i):
                out.append(got[cursor[key]])
                cursor[key] += 1
        return out


class ExampleStream:
    """Examples of a streamed `DataSpec`, built ``chunk`` records at a time (memory stays flat), restartable: each
    ``iter`` starts over. One source, or sources without weights: their rows in order, once. A weighted mixture
    (``weight``/``samples``): endless, each next record's source drawn by the seed with probability proportional
    to its weight (``samples`` counts as a weight), a source starting over when it runs out."""

    empty = "data: the streamed sources give no examples"

    def __init__(self, spec: DataSpec, build: Callable[[Records, dict[str, str]], list[Any]], *, chunk: int = 256,
                 what: str = "data") -> None:
        if spec.val_size is not None or spec.dedup:
            raise ConfigError(f"{what}: val_size and dedup need the whole data; they do not work with streaming: true "
                              "(carve the held-out set into its own file, or stream without them)")
        self.spec, self.build, self.chunk, self.what = spec, build, chunk, what

    @property
    def endless(self) -> bool:
        return len(self.spec.sources) > 1 and any(s.weight or s.samples for s in self.spec.sources)

    def rows(self) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """``(source index, where, record)`` in stream order."""
        sources = self.spec.sources
        if not self.endless:
            for k, src in enumerate(sources):
                for where, record in iter_source(src, self.what):
                    yield k, where, record
            return
        weights = [float(s.weight if s.weight is not None else s.samples or 0) for s in sources]
        probs = [w / sum(weights) for w in weights]
        rng = _rng(self.spec.seed, 4)
        its: list[Iterator[tuple[str, dict[str, Any]]] | None] = [None] * len(sources)
        while True:
            for k in rng.choice(len(sources), size=1024, p=probs).tolist():
                row = next(its[k], None) if its[k] is not None else None  # type: ignore[arg-type]
                if row is None:
                    its[k] = iter_source(sources[k], self.what)
                    row = next(its[k], None)  # type: ignore[arg-type]
                    if row is None:
                        raise ConfigError(f"{self.what}: {sources[k].name}: no records")
                yield k, row[0], row[1]

    def _examples(self, chunk: list[tuple[int, str, dict[str, Any]]]) -> list[Any]:
        from llmtune.data.formats import detect_format

        records = Records([r for _, _, r in chunk], source=self.what, wheres=[w for _, w, _ in chunk])
        records.origins = [k for k, _, _ in chunk]
        for i, record in enumerate(records):
            detect_format(record, records.where(i))
        return self.spec.examples(records, self.build)

    def __iter__(self) -> Iterator[Any]:
        chunk: list[tuple[int, str, dict[str, Any]]] = []
        for row in self.rows():
            chunk.append(row)
            if len(chunk) == self.chunk:
                yield from self._examples(chunk)
                chunk = []
        if chunk:
            yield from self._examples(chunk)

    def count(self) -> int:
        """How many examples one pass gives (a full pass, streamed)."""
        if self.endless:
            raise ConfigError(f"{self.what}: a weighted mixture of streamed sources has no end; set the trainer's "
                              "max_steps")
        return sum(1 for _ in self)

    def fingerprint(self) -> str:
        return self.spec.digest()


def _dedup(records: Records) -> Records:
    seen: set[str] = set()
    keep = []
    for i, r in enumerate(records):
        key = record_key(r)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return Records([records[i] for i in keep], source=records.source, wheres=[records.where(i) for i in keep])


def as_spec(data: Any, seed: int = 0) -> DataSpec | None:
    """A `DataSpec` for data given as a spec, a `Source`, a source mapping, a list of them, or a dataset path (a
    parquet/arrow file or folder, a saved dataset or a hub id); None for what the JSONL path reads as before
    (a .jsonl/.json/.csv file, a list of records)."""
    if isinstance(data, DataSpec):
        return data
    if isinstance(data, (Source, Mapping)):
        return DataSpec((as_source(data),), seed=seed)
    if isinstance(data, (str, os.PathLike)):
        source = Source(str(data))
        return DataSpec((source,), seed=seed) if source.kind != "local" else None
    if isinstance(data, Sequence) and data and all(isinstance(d, (Source, Mapping)) and
                                                   (isinstance(d, Source) or "path" in d) for d in data):
        return DataSpec(tuple(as_source(d) for d in data), seed=seed)
    return None
