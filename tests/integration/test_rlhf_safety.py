"""RLHF models are what they claim, and preference / prompt data are read the way training reads them (issue 24).

Each case runs through the CLI as a user meets it (``llmtune train CONFIG.yaml [--check]``, ``llmtune export``),
in-process (`llmtune.cli.main.main`), on a tiny Llama saved to disk: a reward trainer keeps a saved reward model a
sequence classifier and refuses a causal LM unless ``add_score_head: true``; rloo / grpo refuse a ``reward_model``
whose score head is missing; a reward adapter exports as ``LlamaForSequenceClassification`` with its trained head;
answers never lose their end token to ``max_length``; a ranking never pairs two equal answers; a tokenizer template
that drops ``tool_calls`` is refused; ``--check`` parses preference and prompt data and counts a ranking's rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from llmtune.cli.main import main  # noqa: E402

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
FAST = "  batch_size: 2\n  max_steps: 2\n  progress: false\n  eval_examples: 0\n"
RECORDS = [{"prompt": "What is Kopi O?", "responses": ["Black coffee.", "Tea.", "Coffee with milk."],
            "ranking": [0, 2, 1]},
           {"prompt": "What is Teh C?", "chosen": "Tea with evaporated milk.", "rejected": "Coffee."}] * 2
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A causal LM (base/), a saved reward model (rm/), the same without its head's weights (headless/), data."""
    from safetensors.torch import load_file, save_file

    from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer
    from llmtune.trainers.rlhf.reward import RewardModel, reward_model_from_causal_lm

    root = tmp_path_factory.mktemp("rlhf-safety")
    tok = train_tiny_tokenizer()
    build_tiny_model(tok, seed=0, **SMALL).save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    RewardModel(reward_model_from_causal_lm(build_tiny_model(tok, seed=1, **SMALL), tok), tok).save(root / "rm")
    headless = root / "headless"
    headless.mkdir()
    for f in (root / "rm").iterdir():
        (headless / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(root / "rm" / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("score.")}, str(headless / "model.safetensors"),
              metadata={"format": "pt"})
    _jsonl(root / "prefs.jsonl", RECORDS)
    _jsonl(root / "prompts.jsonl", [{"prompt": "What is Kopi O?"}, {"prompt": "What is Teh C?"}])
    return root


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of the CLI run in-process."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def _config(work: Path, name: str, body: str) -> str:
    path = work / f"{name}.yaml"
    path.write_text(body)
    return str(path)


def _architecture(directory: Path) -> str:
    return str(json.loads((directory / "config.json").read_text())["architectures"][0])


def test_reward_trainer_keeps_a_saved_reward_model_a_sequence_classifier(work: Path, capsys: Any) -> None:
    """Main loaded it as LlamaForCausalLM (head dropped), trained Bradley-Terry on vocabulary logits, rc 0."""
    from safetensors.torch import load_file

    cfg = _config(work, "rm-on-rm", f"model: rm\ndata: prefs.jsonl\noutput_dir: runs/rm-on-rm\n"
                                    f"trainer:\n  name: reward\n{FAST}")
    code, _, err = run_cli(["train", cfg, "--overwrite"], capsys)
    assert code == 0, err
    model_dir = work / "runs" / "rm-on-rm" / "model"
    assert _architecture(model_dir) == "LlamaForSequenceClassification"
    trained = load_file(str(model_dir / "model.safetensors"))
    start = load_file(str(work / "rm" / "model.safetensors"))
    assert trained["score.weight"].shape == (1, SMALL["hidden_size"])
    assert not torch.equal(trained["score.weight"], start["score.weight"])  # the saved head is the one trained


def test_reward_trainer_refuses_a_causal_lm_unless_add_score_head(work: Path, capsys: Any) -> None:
    cfg = _config(work, "rm-on-lm", f"model: base\ndata: prefs.jsonl\noutput_dir: runs/rm-on-lm\n"
                                    f"trainer:\n  name: reward\n{FAST}")
    code, _, err = run_cli(["train", cfg, "--overwrite"], capsys)
    assert code != 0 and "LlamaForCausalLM has no score head" in err and "add_score_head: true" in err, err
    assert not (work / "runs" / "rm-on-lm" / "model").exists()
    code, out, _ = run_cli(["train", cfg, "--check", "--json"], capsys)
    head = {c["name"]: c for c in json.loads(out)["checks"]}["score_head"]
    assert code == 1 and not head["ok"] and "add_score_head: true" in head["detail"], head
    cfg = _config(work, "rm-on-lm", f"model: base\ndata: prefs.jsonl\noutput_dir: runs/rm-on-lm\n"
                                    f"trainer:\n  name: reward\n  add_score_head: true\n{FAST}")
    code, _, err = run_cli(["train", cfg, "--overwrite"], capsys)
    assert code == 0, err
    assert _architecture(work / "runs" / "rm-on-lm" / "model") == "LlamaForSequenceClassification"


def test_reward_trainer_refuses_a_causal_lm_module_through_the_api(work: Path, tok: Any) -> None:
    import llmtune
    from llmtune.core.errors import ConfigError
    from llmtune.models.tiny import build_tiny_model

    trainer = llmtune.get_trainer("reward", max_steps=1, batch_size=2, progress=False)
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM, not a 1-label sequence classifier.*add_score_head"):
        trainer.train(build_tiny_model(tok, seed=0, **SMALL), RECORDS, tokenizer=tok, output_dir=work / "api-rm")
    fresh = llmtune.get_trainer("reward", max_steps=1, batch_size=2, progress=False, add_score_head=True)
    result = fresh.train(build_tiny_model(tok, seed=0, **SMALL), RECORDS, tokenizer=tok, output_dir=work / "api-rm",
                         overwrite=True)
    assert _architecture(Path(result.model_dir)) == "LlamaForSequenceClassification"


@pytest.mark.parametrize("reward_model,why", [("base", "LlamaForCausalLM has no score head"),
                                              ("headless", "no trained score head (score.weight not in its weights")])
def test_online_rl_refuses_a_reward_model_without_a_trained_head(work: Path, capsys: Any, reward_model: str,
                                                                   why: str) -> None:
    """Main trained against a randomly initialised head (transformers' one-line note the only sign), rc 0."""
    body = (f"model: base\ndata: prompts.jsonl\noutput_dir: runs/rloo-{reward_model}\ntrainer:\n  name: grpo\n"
            f"  reward_model: {work / reward_model}\n  samples: 2\n  max_new_tokens: 4\n{FAST}")
    cfg = _config(work, f"rloo-{reward_model}", body)
    code, _, err = run_cli(["train", cfg, "--overwrite"], capsys)
    assert code != 0 and why in err and "trainer: {name: reward}" in err, err
    assert not (work / "runs" / f"rloo-{reward_model}" / "adapter").exists()
    code, out, _ = run_cli(["train", cfg, "--check", "--json"], capsys)
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert code == 1 and not checks["reward_model"]["ok"], checks


def test_online_rl_trains_from_a_file_of_prompt_records(work: Path, capsys: Any) -> None:
    """The documented data of rloo / grpo ({"prompt": ...} lines) were refused by main's SFT reader."""
    body = (f"model: base\ndata: prompts.jsonl\noutput_dir: runs/rloo-ok\ntrainer:\n  name: rloo\n"
            f"  reward_model: {work / 'rm'}\n  samples: 2\n  max_new_tokens: 4\n{FAST}")
    code, _, err = run_cli(["train", _config(work, "rloo-ok", body), "--overwrite"], capsys)
    assert code == 0, err
    steps = [json.loads(x) for x in (work / "runs" / "rloo-ok" / "log.jsonl").read_text().splitlines()]
    assert sum("reward" in s for s in steps) == 2


def test_export_hf_of_a_reward_adapter_writes_the_classifier_with_its_head(work: Path, tok: Any, capsys: Any) -> None:
    """Main wrote a LlamaForCausalLM without the score head, rc 0 (what the vLLM check advised)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    body = (f"model: base\ndata: prefs.jsonl\noutput_dir: runs/rm-lora\ntrainer:\n  name: reward\n  method: lora\n"
            f"  rank: 4\n  lr: 0.01\n  add_score_head: true\n{FAST}")
    code, _, err = run_cli(["train", _config(work, "rm-lora", body), "--overwrite"], capsys)
    assert code == 0, err
    run = work / "runs" / "rm-lora"
    code, _, err = run_cli(["export", str(run), "--format", "hf", "--dtype", "f32", "--out", str(work / "rm-export")], capsys)
    assert code == 0, err
    exported, info = AutoModelForSequenceClassification.from_pretrained(str(work / "rm-export"),
                                                                        output_loading_info=True)
    assert type(exported).__name__ == "LlamaForSequenceClassification" and not info["missing_keys"]
    base = AutoModelForSequenceClassification.from_pretrained(str(work / "base"), num_labels=1,
                                                              pad_token_id=tok.pad_token_id)
    served = PeftModel.from_pretrained(base, str(run / "adapter")).eval()   # base + adapter, as PEFT serves it
    ids = tok(["<|start_header_id|>user<|end_header_id|>\n\nKopi O?<|eot_id|>Black coffee.<|eot_id|>"],
              add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=ids).logits, served(input_ids=ids).logits, atol=1e-5)
    code, _, err = run_cli(["export", str(run), "--out", str(work / "rm-gguf")], capsys)
    assert code != 0 and "reward model" in err and "--format hf" in err, err


def test_dpo_answers_longer_than_max_length_are_an_error_naming_the_record(work: Path, capsys: Any) -> None:
    """Main cut the answers at max_length minus the prompt: every pair token-identical, loss ln 2, rc 0."""
    long = " ".join(["milk"] * 40)
    _jsonl(work / "long.jsonl", [{"prompt": "What is Kopi C?", "chosen": f"Coffee with {long} and sugar.",
                                  "rejected": f"Coffee with {long} and salt."}] * 4)
    body = f"model: base\ndata: long.jsonl\noutput_dir: runs/dpo-long\ntrainer:\n  name: dpo\n  max_length: 32\n{FAST}"
    code, _, err = run_cli(["train", _config(work, "dpo-long", body), "--overwrite"], capsys)
    assert code != 0 and "long.jsonl:1: rejected: prompt (" in err and "exceed max_length=32" in err, err
    assert not (work / "runs" / "dpo-long" / "adapter").exists()


def test_a_duplicate_answer_in_a_ranking_is_an_error_naming_the_record(work: Path, capsys: Any) -> None:
    _jsonl(work / "dup.jsonl", [RECORDS[0], {"prompt": "What is Teh O?", "responses": ["Black tea.", "Tea.",
                                                                                      "Black tea."],
                                             "ranking": [0, 1, 2]}])
    body = f"model: base\ndata: dup.jsonl\noutput_dir: runs/dpo-dup\ntrainer:\n  name: dpo\n{FAST}"
    cfg = _config(work, "dpo-dup", body)
    code, _, err = run_cli(["train", cfg, "--overwrite"], capsys)
    assert code != 0 and "dup.jsonl:2: field 'responses[2]'" in err and "same answer as responses[0]" in err, err
    code, out, _ = run_cli(["train", cfg, "--check", "--json"], capsys)
    data = {c["name"]: c for c in json.loads(out)["checks"]}["data"]
    assert code == 1 and not data["ok"] and "responses[2]" in data["detail"]


def test_a_tokenizer_template_that_drops_tool_calls_is_refused(work: Path, capsys: Any) -> None:
    """The tiny tokenizer's chat template ignores tool_calls: main trained the call as an empty answer."""
    call = {"type": "function", "function": {"name": "order_drink", "arguments": {"drink": "kopi o"}}}
    _jsonl(work / "tools.jsonl", [{"messages": [{"role": "user", "content": "One kopi o please."},
                                                {"role": "assistant", "content": "", "tool_calls": [call]},
                                                {"role": "tool", "content": "ordered"},
                                                {"role": "assistant", "content": "Coming up."}]}] * 2)
    body = (f"model: base\ndata: tools.jsonl\noutput_dir: runs/tools\ntrainer:\n  name: sft\n  rank: 4\n"
            f"  template: tokenizer\n{FAST}")
    code, _, err = run_cli(["train", _config(work, "tools", body), "--overwrite"], capsys)
    assert code != 0 and "tools.jsonl:1: turn 1" in err and "ignores 'tool_calls'" in err, err
    assert "'order_drink'" in err and "'chatml'" in err


def test_check_parses_preference_and_prompt_data_and_needs_a_reward_model(work: Path, capsys: Any) -> None:
    """Main's --check said ok for data it never parsed and for rloo without a reward model."""
    _jsonl(work / "bad-rank.jsonl", [{"prompt": "Kopi?", "responses": ["A.", "B."], "ranking": [0]}])
    cfg = _config(work, "dpo-bad", f"model: base\ndata: bad-rank.jsonl\ntrainer:\n  name: reward\n{FAST}")
    code, out, _ = run_cli(["train", cfg, "--check", "--json"], capsys)
    data = {c["name"]: c for c in json.loads(out)["checks"]}["data"]
    assert code == 1 and "bad-rank.jsonl:1: field 'ranking'" in data["detail"], data
    _jsonl(work / "texts.jsonl", [{"text": "kopi o is black coffee"}])
    cfg = _config(work, "rloo-bad", f"model: base\ndata: texts.jsonl\ntrainer:\n  name: rloo\n{FAST}")
    code, out, _ = run_cli(["train", cfg, "--check", "--json"], capsys)
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert code == 1 and "texts.jsonl:1: a plain text record has no prompt" in checks["data"]["detail"], checks
    assert not checks["reward_model"]["ok"] and "needs reward_model" in checks["reward_model"]["detail"]
    cfg = _config(work, "rloo-good", f"model: base\ndata: prefs.jsonl\ntrainer:\n  name: rloo\n"
                                     f"  reward_model: {work / 'rm'}\n{FAST}")
    code, out, _ = run_cli(["train", cfg, "--check", "--json"], capsys)
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert code == 0 and checks["reward_model"]["ok"] and "4 prompts" in checks["data"]["detail"], checks


def test_check_counts_the_rows_and_pairs_a_ranking_of_k_answers_becomes(work: Path, capsys: Any) -> None:
    """K=2000: main estimated the step of one pair (0.58 GiB on this model); training puts 2000 rows and
    1,999,000 pairs through it."""
    from llmtune.memory.mechanisms import PAIR_BATCH_BYTES

    _jsonl(work / "k2000.jsonl", [{"prompt": "Rank these orders.", "responses": [f"Order {i}." for i in range(2000)],
                                   "ranking": list(range(2000))}])
    estimates = {}
    for name in ("k2000", "prefs"):
        cfg = _config(work, f"dpo-{name}", f"model: base\ndata: {name}.jsonl\ntrainer:\n  name: dpo\n"
                                           f"  max_length: 64\n  batch_size: 1\n")
        code, out, _ = run_cli(["train", cfg, "--check", "--json"], capsys)
        report = json.loads(out)
        assert code == 0, report["checks"]
        estimates[name] = report
    big, small = estimates["k2000"], estimates["prefs"]
    assert "1999000 pairs; largest ranking 2000 answers" in {c["name"]: c["detail"] for c in big["checks"]}["data"]
    assert big["estimate"]["breakdown"]["pair_indices"] == PAIR_BATCH_BYTES * 1_999_000
    assert any("2000 answers through the model" in n for n in big["gpus"][0]["notes"])
    assert big["estimate"]["peak_tensor_bytes"] > 10 * small["estimate"]["peak_tensor_bytes"]
