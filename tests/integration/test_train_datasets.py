"""Training from `datasets` sources on a tiny Llama on CPU: a weighted mixture of two parquet files resumed exactly in
its middle (and recorded in run.json), a streamed saved dataset resumed exactly, a held-out set carved by val_size,
and pretraining on a parquet text column, streamed. The sources are built here with `datasets`; no hub access."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

import llmtune  # noqa: E402
from llmtune.data.sources import DataSpec, Source  # noqa: E402
from llmtune.trainers.callbacks import Callback  # noqa: E402

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
FAST = {"rank": 4, "alpha": 8, "lr": 2e-2, "batch_size": 4, "warmup": 0, "max_new_tokens": 4, "eval_examples": 0,
        "progress": False, "max_length": 64, "max_steps": 6, "seed": 5}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        if record["step"] == self.step:
            raise KeyboardInterrupt


class _Seen(Callback):
    """The `where` of every example each step trains on."""

    def __init__(self) -> None:
        self.wheres: list[list[str]] = []

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        step = record["step"] - 1
        self.wheres.append([e.where for e in state.data.step_examples(step, state.global_batch)])


def tiny(tok: Any) -> Any:
    from llmtune.models.tiny import build_tiny_model

    return build_tiny_model(tok, seed=0, **SMALL)


def losses(result: Any) -> list[float]:
    return [h["loss"] for h in result.history]


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Source, Source]:
    from llmtune.data import split_instructions

    records = split_instructions()[0]
    a = [{"question": r["instruction"], "answer": r["output"]} for r in records[:12]]
    datasets.Dataset.from_list(a).to_parquet(str(tmp_path / "menu.parquet"))
    datasets.Dataset.from_list(records[12:48]).to_parquet(str(tmp_path / "orders.parquet"))
    return (Source(str(tmp_path / "menu.parquet"), weight=1.0, columns=(("instruction", "question"),
                                                                       ("output", "answer"))),
            Source(str(tmp_path / "orders.parquet"), weight=1.0))


def run(tok: Any, data: Any, out: Path, resume: Any = False, callbacks: Any = (), **extra: Any) -> Any:
    return llmtune.get_trainer("sft", **{**FAST, **extra}).train(tiny(tok), data, tokenizer=tok, output_dir=out,
                                                                 resume=resume, callbacks=list(callbacks))


def test_a_weighted_mixture_resumes_exactly_in_its_middle_and_is_recorded(tok: Any, sources: Any,
                                                                          tmp_path: Path) -> None:
    spec = DataSpec(sources, seed=5)
    seen = _Seen()
    full = run(tok, spec, tmp_path / "a", callbacks=[seen])
    batches = [w for step in seen.wheres for w in step]
    assert any(w.startswith("menu.parquet:row ") for w in batches)     # both sources, interleaved
    assert any(w.startswith("orders.parquet:row ") for w in batches)
    with pytest.raises(KeyboardInterrupt):
        run(tok, spec, tmp_path / "b", callbacks=[_StopAt(3)])
    resumed = run(tok, spec, tmp_path / "b", resume="auto")
    assert losses(resumed) == losses(full)
    recorded = json.loads((tmp_path / "b" / "run.json").read_text())["config"]["data_sources"]
    assert recorded["seed"] == 5
    assert [s["weight"] for s in recorded["sources"]] == [1.0, 1.0]
    assert recorded["sources"][0]["columns"] == {"instruction": "question", "output": "answer"}


def test_a_streamed_source_trains_in_stream_order_and_resumes_exactly(tok: Any, sources: Any, tmp_path: Path) -> None:
    datasets.Dataset.from_parquet(sources[1].path).save_to_disk(str(tmp_path / "saved"))
    spec = DataSpec((Source(str(tmp_path / "saved"), streaming=True),))
    seen = _Seen()
    full = run(tok, spec, tmp_path / "a", callbacks=[seen])
    assert seen.wheres[0] == [f"saved:row {i}" for i in range(4)]         # read in order, not shuffled in memory
    assert seen.wheres[-1] == [f"saved:row {i}" for i in range(20, 24)]
    with pytest.raises(KeyboardInterrupt):
        run(tok, spec, tmp_path / "b", callbacks=[_StopAt(2)])
    assert losses(run(tok, spec, tmp_path / "b", resume="auto")) == losses(full)


def test_val_size_carves_the_eval_set_from_the_mixture(tok: Any, sources: Any, tmp_path: Path) -> None:
    spec = DataSpec(sources, seed=5, val_size=6)
    result = llmtune.get_trainer("sft", **{**FAST, "max_steps": 2}).train(
        tiny(tok), spec.train(), eval_data=spec.heldout(), tokenizer=tok, output_dir=tmp_path / "a")
    assert "rougeL" in result.eval["after"], result.eval["after"]     # the held-out answers were scored
    held = spec.heldout().records()
    assert len(held) == 6 and held.wheres == spec.heldout().records().wheres
    assert not set(held.wheres) & set(spec.train().records().wheres)


def test_pretraining_streams_a_parquet_text_column(tok: Any, tmp_path: Path) -> None:
    from llmtune.data import BlockStream, bundled_corpus, text_sources
    from llmtune.models.tiny import tiny_llama_config

    texts = bundled_corpus()
    datasets.Dataset.from_list([{"body": t} for t in texts]).to_parquet(str(tmp_path / "corpus.parquet"))
    (tmp_path / "corpus.txt").write_text("\n".join(texts))
    source = DataSpec((Source(str(tmp_path / "corpus.parquet"), streaming=True, text_field="body"),))
    from_parquet = list(BlockStream(text_sources(source), tok, block_size=16))
    from_list = list(BlockStream(text_sources(texts), tok, block_size=16))
    assert from_parquet == from_list and len(from_list) > 50
    opts = {"batch_size": 4, "max_length": 32, "max_steps": 3, "lr": 1e-2, "warmup": 0, "progress": False}
    config = tiny_llama_config(len(tok), **SMALL)
    result = llmtune.get_trainer("pretrain", **opts).train(config, source, tokenizer=tok, output_dir=tmp_path / "p")
    assert len(result.history) == 3 and all(h["tokens"] == 4 * 32 for h in result.history)
