"""Data sources read through `datasets` (built here with `datasets`): parquet, arrow, save_to_disk, folders, streamed
sources, column mapping, mixtures with weights, the held-out split, de-duplication, the offline hub-id error, the
config keys and ``--check``. No hub access: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set for every test."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

datasets = pytest.importorskip("datasets")

from llmtune.core.errors import ConfigError  # noqa: E402
from llmtune.data.sources import DataSpec, Source, as_spec, iter_source, mixture_counts, read_source  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def rows(n: int, prefix: str = "q", broken: int | None = None) -> list[dict[str, Any]]:
    return [{"question": f"{prefix}{i}?", "answer": None if i == broken else f"{prefix}-answer {i}"}
            for i in range(n)]


def alpaca(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [{"instruction": f"{prefix}{i}?", "output": f"{prefix}-answer {i}"} for i in range(n)]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    ds = datasets.Dataset.from_list(rows(6, broken=4))
    out = {"parquet": tmp_path / "qa.parquet", "saved": tmp_path / "saved", "folder": tmp_path / "shards"}
    ds.to_parquet(str(out["parquet"]))
    ds.save_to_disk(str(out["saved"]))
    out["arrow"] = next(out["saved"].glob("*.arrow"))
    out["folder"].mkdir()
    datasets.Dataset.from_list(rows(3)).to_parquet(str(out["folder"] / "part-0.parquet"))
    datasets.Dataset.from_list(rows(3, "r")).to_parquet(str(out["folder"] / "part-1.parquet"))
    return out


COLUMNS = {"columns": {"instruction": "question", "output": "answer"}}


@pytest.mark.parametrize("kind", ["parquet", "arrow", "saved"])
def test_each_local_kind_reads_the_same_rows_mapped_and_names_the_bad_row(kind: str, files: dict[str, Path]) -> None:
    source = Source.from_mapping({"path": str(files[kind]), **COLUMNS})
    assert source.kind == kind
    got = list(iter_source(source))
    assert [r for _, r in got][:2] == [{"instruction": "q0?", "output": "q-answer 0"},
                                       {"instruction": "q1?", "output": "q-answer 1"}]
    assert got[4][1] == {"instruction": "q4?"}           # a null cell is an absent field
    assert got[4][0] == f"{source.name}:row 4"
    from llmtune.data import as_records

    with pytest.raises(ConfigError, match=rf"^{source.name}:row 4: field 'output': missing"):
        as_records(DataSpec((source,)).records())


def test_the_sft_reader_validates_dataset_rows_with_their_row(files: dict[str, Path]) -> None:
    from llmtune.trainers.objectives.sft import load_records

    spec = DataSpec((Source.from_mapping({"path": str(files["parquet"]), **COLUMNS}),))
    with pytest.raises(ConfigError, match=r"^qa\.parquet:row 4: field 'output': missing"):
        load_records(spec, "data")


def test_a_folder_of_parquet_files_is_one_source_in_file_order(files: dict[str, Path]) -> None:
    records = read_source(Source(str(files["folder"]), columns=(("instruction", "question"),)))
    assert [r["instruction"] for r in records] == ["q0?", "q1?", "q2?", "r0?", "r1?", "r2?"]
    assert records.where(3) == "shards:row 3"


def test_a_missing_mapped_column_is_named_with_the_columns_there(files: dict[str, Path]) -> None:
    source = Source(str(files["parquet"]), columns=(("output", "response"),))
    with pytest.raises(ConfigError, match=r"qa\.parquet: no column 'response' \(from 'columns'\); it has question, answer"):
        read_source(source)


def test_a_streamed_source_reads_row_by_row_like_the_whole(files: dict[str, Path]) -> None:
    whole = list(iter_source(Source(str(files["saved"]))))
    stream = Source(str(files["saved"]), streaming=True)
    assert type(__import__("llmtune.data.sources", fromlist=["x"]).open_dataset(stream)).__name__ == "IterableDataset"
    assert list(iter_source(stream)) == whole
    spec = as_spec({"path": str(files["parquet"]), "streaming": True})
    assert spec is not None and spec.streaming and len(spec.digest()) == 16


def test_a_saved_dataset_dict_takes_the_split(tmp_path: Path) -> None:
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(alpaca(4)),
                               "test": datasets.Dataset.from_list(alpaca(2, "t"))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r["instruction"] for r in read_source(Source(str(tmp_path / "dd"), split="test"))] == ["t0?", "t1?"]
    with pytest.raises(ConfigError, match="no split 'validation'; it has train, test"):
        read_source(Source(str(tmp_path / "dd"), split="validation"))


def test_a_hub_id_offline_fails_in_one_line_saying_how_to_pass_a_local_copy() -> None:
    assert Source("tatsu-lab/alpaca").kind == "hub"
    with pytest.raises(ConfigError) as err:
        read_source(Source("tatsu-lab/alpaca"))
    message = str(err.value)
    assert "\n" not in message
    assert "'tatsu-lab/alpaca' is a hub dataset id and the hub is offline" in message
    assert "save_to_disk" in message and "give that path" in message


def test_missing_files_stay_missing_files_not_hub_ids(tmp_path: Path) -> None:
    for name in ("train.jsonl", "corpus.txt", "x.parquet"):
        assert Source(name).kind in ("local", "parquet")
    assert as_spec(str(tmp_path / "train.jsonl")) is None     # the JSONL reader's own error ("no such data file")


# ---------------------------------------------------------------- mixtures
def mixture(tmp_path: Path, weights: tuple[float, float], sizes: tuple[int, int] = (100, 300),
            seed: int = 0) -> DataSpec:
    paths = []
    for name, n in zip("ab", sizes):
        path = tmp_path / f"{name}.parquet"
        if not path.exists():
            datasets.Dataset.from_list(alpaca(n, name)).to_parquet(str(path))
        paths.append(path)
    return DataSpec(tuple(Source(str(p), weight=w) for p, w in zip(paths, weights)), seed=seed)


def test_mixture_counts_follow_the_weights_and_add_up() -> None:
    a, b = Source("a", weight=1.0), Source("b", weight=3.0)
    assert mixture_counts([100, 300], [a, b]) == [100, 300]
    assert mixture_counts([100, 300], [Source("a", weight=1.0), Source("b", weight=1.0)]) == [200, 200]
    assert mixture_counts([10, 10], [Source("a", samples=7), Source("b")]) == [7, 10]
    assert sum(mixture_counts([7, 6], [Source("a", weight=1.0), Source("b", weight=2.0)])) == 13
    with pytest.raises(ConfigError, match="every source needs a 'weight' or 'samples'"):
        mixture_counts([1, 1], [a, Source("b")])


def test_sampled_proportions_match_the_weights_all_along_the_mixture(tmp_path: Path) -> None:
    spec = mixture(tmp_path, (1.0, 1.0))              # 100 rows of a oversampled to 200, 300 of b down to 200
    records = spec.records()
    assert len(records) == 400
    origin = [r["instruction"][0] for r in records]
    assert Counter(origin) == {"a": 200, "b": 200}
    for start in range(0, 400, 100):                   # interleaved: every stretch is near 1:1, not a then b
        share = origin[start:start + 100].count("a") / 100
        assert 0.35 < share < 0.65, (start, share)
    a_rows = Counter(r["instruction"] for r in records if r["instruction"][0] == "a")
    assert set(a_rows.values()) == {2}                  # oversampling repeats whole passes
    assert records.where(origin.index("b")).startswith("b.parquet:row ")


def test_the_mixture_is_a_function_of_the_seed(tmp_path: Path) -> None:
    first = [r["instruction"] for r in mixture(tmp_path, (1.0, 2.0)).records()]
    again = [r["instruction"] for r in mixture(tmp_path, (1.0, 2.0)).records()]
    other = [r["instruction"] for r in mixture(tmp_path, (1.0, 2.0), seed=1).records()]
    assert first == again
    assert first != other


def test_held_out_rows_are_deterministic_disjoint_and_the_right_size(tmp_path: Path) -> None:
    spec = DataSpec(mixture(tmp_path, (1.0, 1.0)).sources, seed=3, val_size=0.1)
    held = [r["instruction"] for r in spec.heldout().records()]
    assert len(held) == 40 and held == [r["instruction"] for r in spec.heldout().records()]
    train = {r["instruction"] for r in spec.train().records()}
    assert not train & set(held)
    counted = DataSpec(spec.sources, seed=3, val_size=25).heldout().records()
    assert len(counted) == 25
    with pytest.raises(ConfigError, match="must leave at least one record on each side"):
        DataSpec(spec.sources, val_size=400).heldout().records()


def test_dedup_drops_exact_repeats_only(tmp_path: Path) -> None:
    data = alpaca(3) + alpaca(2) + [{"instruction": "q0?", "output": "other"}]
    datasets.Dataset.from_list(data).to_parquet(str(tmp_path / "d.parquet"))
    source = (Source(str(tmp_path / "d.parquet")),)
    assert len(DataSpec(source).records()) == 6
    kept = DataSpec(source, dedup=True).records()
    assert len(kept) == 4 and kept.where(3) == "d.parquet:row 5"


def test_each_source_keeps_its_own_template_options(tmp_path: Path) -> None:
    spec = mixture(tmp_path, (1.0, 1.0), sizes=(4, 4))
    spec = DataSpec((spec.sources[0], Source(spec.sources[1].path, weight=1.0, system_prompt="Be brief.")))
    records = spec.records()

    def build(part: Any, overrides: dict[str, str]) -> list[Any]:
        from llmtune.data import Example

        token = 2 if overrides == {"system_prompt": "Be brief."} else 1
        return [Example([token], [token], part.where(i)) for i in range(len(part))]

    built = spec.examples(records, build)
    assert [e.where for e in built] == [records.where(i) for i in range(len(records))]
    assert [e.input_ids[0] for e in built] == [2 if w.startswith("b.") else 1 for w in (e.where for e in built)]


# ---------------------------------------------------------------- config and --check
def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text("model: " + str(tmp_path / "model") + "\n" + body, encoding="utf-8")
    return path


def test_the_config_reads_sources_mixtures_and_val_size(tmp_path: Path) -> None:
    from llmtune.trainers._config import load_config

    mixture(tmp_path, (1.0, 1.0))
    cfg = load_config(write_config(tmp_path, """data:
  - path: a.parquet
    weight: 2
  - path: b.parquet
    weight: 1
    columns: {instruction: instruction}
val_size: 0.05
trainer: {name: sft, seed: 7}
"""))
    assert isinstance(cfg.data, DataSpec) and cfg.data.part == "train" and cfg.eval_data.part == "val"
    assert cfg.data.seed == 7 and [s.path for s in cfg.data.sources] == [str(tmp_path / "a.parquet"),
                                                                        str(tmp_path / "b.parquet")]
    hub = load_config(write_config(tmp_path, "data: {path: tatsu-lab/alpaca, split: 'train[:10%]', name: default}\n"))
    assert hub.data.sources[0].path == "tatsu-lab/alpaca" and hub.data.sources[0].subset == "default"
    assert load_config(write_config(tmp_path, "data: a.parquet\n")).data == str(tmp_path / "a.parquet")


@pytest.mark.parametrize(("body", "message"), [
    ("data:\n  - path: a.parquet\n    wieght: 2\n", r"train\.yaml:4: data: unknown data source key 'wieght'"),
    ("data:\n  - path: a.parquet\n    weight: -1\n", r"train\.yaml:4: data: 'weight' must be a number > 0"),
    ("data: a.parquet\nval_size: 1.5\n", r"train\.yaml:3: 'val_size' must be a fraction"),
    ("data: a.parquet\neval_data: b.parquet\nval_size: 3\n", r"give 'eval_data' or 'val_size'"),
    ("data: [1, 2]\n", r"train\.yaml:2: 'data' must be a path, a hub id, a source mapping"),
])
def test_bad_data_keys_name_the_line(body: str, message: str, tmp_path: Path) -> None:
    from llmtune.trainers._config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, body))


def test_check_reports_each_source_and_names_a_missing_column(tmp_path: Path) -> None:
    from llmtune.trainers._config import load_config
    from llmtune.trainers.check import check_config

    mixture(tmp_path, (1.0, 1.0))
    datasets.Dataset.from_list(rows(5)).to_parquet(str(tmp_path / "qa.parquet"))
    cfg = load_config(write_config(tmp_path, """data:
  - {path: a.parquet, weight: 1}
  - {path: b.parquet, weight: 1, streaming: true}
trainer: {name: sft}
"""))
    data = next(c for c in check_config(cfg).checks if c.name == "data")
    assert data.ok and data.detail == ("a.parquet: 100 records (100 instruction); "
                                       "b.parquet: first 100 records (100 instruction)"), data.detail
    cfg = load_config(write_config(tmp_path, "data: {path: a.parquet, weight: 1}\n"
                                             "eval_data: {path: qa.parquet, columns: {output: response}}\n"))
    checks = {c.name: c for c in check_config(cfg).checks}
    assert checks["data"].ok and checks["data"].detail == "a.parquet: 100 records (100 instruction)"
    assert not checks["eval_data"].ok
    assert checks["eval_data"].detail == "eval_data: qa.parquet: no column 'response' (from 'columns'); it has question, answer"


def test_a_streamed_weighted_mixture_draws_sources_in_proportion_and_has_no_end(tmp_path: Path) -> None:
    from itertools import islice

    from llmtune.data.sources import ExampleStream

    base = mixture(tmp_path, (1.0, 3.0), sizes=(50, 70))
    spec = DataSpec(tuple(Source(s.path, weight=s.weight, streaming=True) for s in base.sources), seed=2)
    stream = ExampleStream(spec, lambda records, overrides: list(records))
    picked = [k for k, _, _ in islice(stream.rows(), 2000)]
    assert 0.22 < picked.count(0) / 2000 < 0.28                     # weight 1 of 4, within tolerance
    assert picked == [k for k, _, _ in islice(stream.rows(), 2000)]  # a function of the seed
    with pytest.raises(ConfigError, match="has no end; set the trainer's max_steps"):
        stream.count()
    with pytest.raises(ConfigError, match="do not work with streaming: true"):
        ExampleStream(DataSpec(spec.sources, val_size=0.1), lambda r, o: list(r))


def test_check_names_the_offline_hub_id_in_one_line(tmp_path: Path) -> None:
    from llmtune.trainers._config import load_config
    from llmtune.trainers.check import check_config

    cfg = load_config(write_config(tmp_path, "data: tatsu-lab/alpaca\n"))
    assert cfg.data == "tatsu-lab/alpaca"
    data = next(c for c in check_config(cfg).checks if c.name == "data")
    assert not data.ok and data.detail.startswith("data: 'tatsu-lab/alpaca' is a hub dataset id and the hub is offline")


def test_preference_records_from_parquet_name_the_row(tmp_path: Path) -> None:
    from llmtune.data import load_preference_records

    pairs = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    pairs[2]["rejected"] = None
    datasets.Dataset.from_list(pairs).to_parquet(str(tmp_path / "prefs.parquet"))
    spec = DataSpec((Source(str(tmp_path / "prefs.parquet")),))
    with pytest.raises(ConfigError, match=r"^prefs\.parquet:row 2: "):
        load_preference_records(spec)
    datasets.Dataset.from_list(pairs[:2]).to_parquet(str(tmp_path / "ok.parquet"))
    got = load_preference_records(str(tmp_path / "ok.parquet"))
    assert [p.where for p in got] == ["ok.parquet:row 0", "ok.parquet:row 1"]
