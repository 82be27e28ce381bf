"""Tasks on a tiny model: acc/acc_norm equal lm-evaluation-harness's per item (the harness runs here, on the same
module and the same local files), perplexity equals transformers' loss, quantized models and adapters work."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

import llmtune  # noqa: E402
from llmtune.tasks.builtin import bundled_path  # noqa: E402

MC_TASKS = ["mmlu", "hellaswag", "arc_easy", "boolq", "truthfulqa_mc1", "kopitiam-mc", "multiple-choice"]


@pytest.fixture(scope="module")
def model(tok: Any) -> Any:
    """A tiny Llama pretrained for a few steps on the kopitiam corpus (so choices are not all alike)."""
    from llmtune.models.tiny import build_tiny_model, pretrain

    torch.set_num_threads(1)
    m = build_tiny_model(tok, seed=0)
    pretrain(m, tok, steps=30, seed=0)
    return m


def _same_per_item(ours: Any, theirs: Any) -> None:
    assert ours.n == theirs.n > 0
    for a, b in zip(ours.per_item, theirs.per_item):
        assert a["doc_id"] == b["doc_id"]
        assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"]), a["doc_id"]
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
    assert ours.metrics["acc"] == pytest.approx(theirs.metrics["acc"])
    assert ours.metrics["acc_norm"] == pytest.approx(theirs.metrics["acc_norm"])
    assert ours.stderr["acc"] == pytest.approx(theirs.stderr["acc"], rel=1e-9, nan_ok=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", MC_TASKS)
def test_zero_shot_equals_the_harness_per_item(name: str, model: Any, tok: Any) -> None:
    ours = llmtune.get_task(name).evaluate(model, tok, batch_size=16)
    theirs = llmtune.get_task(name, backend="lm-eval").evaluate(model, tok, batch_size=16)
    _same_per_item(ours, theirs)
    # the comparison is not vacuous: the scores differ from item to item, and so do the choices' margins
    assert len({round(item["loglikelihoods"][0], 3) for item in ours.per_item}) > ours.n // 2


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options"), [
    ("arc_easy", {"num_fewshot": 2, "limit": 8}),                 # random shots from the file itself
    ("hellaswag", {"num_fewshot": 1, "limit": 6, "seed": 5}),
    ("mmlu", {"num_fewshot": 3, "limit": 6, "fewshot_data": str(bundled_path("mmlu_kopitiam_lore_dev.csv"))}),
])
def test_few_shot_equals_the_harness_per_item(name: str, options: dict[str, Any], model: Any, tok: Any) -> None:
    ours = llmtune.get_task(name, **options).evaluate(model, tok, batch_size=16)
    theirs = llmtune.get_task(name, backend="lm-eval", **options).evaluate(model, tok, batch_size=16)
    _same_per_item(ours, theirs)
    assert ours.per_item[0]["context"].count("\n\n") >= options["num_fewshot"]


@pytest.mark.slow
def test_quantized_model_equals_the_harness(model: Any, tok: Any) -> None:
    qmodel = llmtune.get_quantizer("rtn", group_size=32, quiet=True).quantize(copy.deepcopy(model))
    ours = llmtune.get_task("arc_easy").evaluate(qmodel, tok, batch_size=16)
    theirs = llmtune.get_task("arc_easy", backend="lm-eval").evaluate(qmodel, tok, batch_size=16)
    _same_per_item(ours, theirs)
    plain = llmtune.get_task("arc_easy").evaluate(model, tok, batch_size=16)
    assert ours.per_item[0]["loglikelihoods"] != plain.per_item[0]["loglikelihoods"]  # quantization did act


def test_adapter_directory_and_outputs(model: Any, tok: Any, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base"
    model.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    in_memory = llmtune.evaluate(peft_model, ["kopitiam-mc"], tokenizer=tok)["kopitiam-mc"]
    results = llmtune.evaluate(str(base_dir), ["kopitiam-mc", "boolq"], adapter=tmp_path / "adapter", batch_size=4,
                               output_dir=tmp_path / "out", task_options={"boolq": {"limit": 5}})
    loaded = results["kopitiam-mc"]
    for a, b in zip(in_memory.per_item, loaded.per_item):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
    base = llmtune.evaluate(model, ["kopitiam-mc"], tokenizer=tok)["kopitiam-mc"]
    assert base.per_item[0]["loglikelihoods"] != pytest.approx(loaded.per_item[0]["loglikelihoods"], abs=1e-4)
    rows = [json.loads(x) for x in (tmp_path / "out" / "kopitiam-mc.jsonl").read_text().splitlines()]
    assert len(rows) == loaded.n and {"acc", "acc_norm", "loglikelihoods", "gold"} <= set(rows[0])
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["boolq"]["n"] == 5 and summary["kopitiam-mc"]["metrics"]["acc"] == loaded.metrics["acc"]


def test_shared_prefix_equals_full_forwards(model: Any, tok: Any) -> None:
    from llmtune.tasks.scoring import CausalLMScorer

    task = llmtune.get_task("kopitiam-mc", limit=12)
    shared = task.evaluate(CausalLMScorer(model, tok, batch_size=3, shared_prefix=True))
    full = task.evaluate(CausalLMScorer(model, tok, batch_size=5, shared_prefix=False))
    for a, b in zip(shared.per_item, full.per_item):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
        assert a["is_greedy"] == b["is_greedy"]


def test_perplexity_is_exp_of_transformers_mean_loss(model: Any, tok: Any, tmp_path: Path) -> None:
    texts = ["Uncle Lim pours kopi into a red cup.", "The made-up customers eat kaya toast and talk.\nQuiet again."]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    r = llmtune.get_task("perplexity", data=str(path)).evaluate(model, tok)
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[tok.bos_token_id, *tok.encode(t, add_special_tokens=False)]])
            loss = model(input_ids=ids, labels=ids).loss.double().item()
            n = ids.shape[1] - 1
            if len(texts) == 1 or t == texts[0]:
                assert math.exp(-r.per_item[0]["loglikelihood"] / r.per_item[0]["tokens"]) == pytest.approx(
                    math.exp(loss), rel=1e-6)
            total += loss * n
            count += n
    assert r.metrics["token_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert r.metrics["bits_per_byte"] == pytest.approx(total / n_bytes / math.log(2), rel=1e-6)


def test_rolling_windows_on_a_long_text_equal_transformers_per_window(model: Any, tok: Any) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from llmtune.tasks.scoring import CausalLMScorer

    text = " ".join(f"Auntie Mei sells {i} cups of teh." for i in range(12))
    scorer = CausalLMScorer(model, tok, max_length=24)
    (ll, n), = scorer.loglikelihood_rolling([text])
    tokens = tok.encode(text, add_special_tokens=False)
    expected = 0.0
    with torch.no_grad():
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tokens, tok.bos_token_id, 24, 1)):
            ids = torch.tensor([ctx + cont])
            logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
            expected += sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    assert n == len(tokens) > 24
    assert ll == pytest.approx(expected, abs=1e-3)


@pytest.mark.slow
def test_gsm8k_generation_runs_on_both_backends(model: Any, tok: Any) -> None:
    opts = {"limit": 4, "num_fewshot": 1, "max_new_tokens": 24}
    ours = llmtune.get_task("gsm8k", **opts).evaluate(model, tok, batch_size=4)
    theirs = llmtune.get_task("gsm8k", backend="lm-eval", **opts).evaluate(model, tok, batch_size=4)
    assert ours.n == theirs.n == 4
    assert set(ours.metrics) == {"exact_match_strict", "exact_match_flexible"}
    assert {"exact_match_strict-match", "exact_match_flexible-extract"} <= set(theirs.metrics)
    assert [o["output"] for o in ours.per_item] == [t["output"] for t in theirs.per_item]


def test_squad_and_generation_tasks_run(model: Any, tok: Any) -> None:
    squad = llmtune.get_task("squad", limit=3, max_new_tokens=8).evaluate(model, tok)
    assert set(squad.metrics) == {"exact", "f1"} and all(0 <= x["f1"] <= 100 for x in squad.per_item)
    gen = llmtune.get_task("generation", limit=3, max_new_tokens=8).evaluate(model, tok)
    assert {"rouge1", "rougeL", "bleu", "bleu_corpus"} <= set(gen.metrics)
    with pytest.raises(llmtune.BackendUnavailableError, match="squad_v2"):
        llmtune.get_task("squad", backend="lm-eval")


def test_scoring_runs_in_eval_mode_and_restores_the_mode(model: Any, tok: Any) -> None:
    from peft import LoraConfig, get_peft_model

    dropped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.9,
                                                              init_lora_weights=False))
    dropped.train()
    a = llmtune.evaluate(dropped, "boolq", tokenizer=tok, task_options={"boolq": {"limit": 4}})["boolq"]
    b = llmtune.evaluate(dropped, "boolq", tokenizer=tok, task_options={"boolq": {"limit": 4}})["boolq"]
    assert dropped.training  # given back in training mode
    assert [x["loglikelihoods"] for x in a.per_item] == [x["loglikelihoods"] for x in b.per_item]  # no dropout
