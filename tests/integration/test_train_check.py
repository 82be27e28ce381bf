"""`llmtune train CONFIG.yaml --check [--gpu NAME]`: every check that needs no training, and the memory gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from typer.testing import CliRunner

from llmtune.cli.main import app

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
TRAINER = "trainer:\n  rank: 4\n  batch_size: 4\n  max_steps: 4\n  progress: false\n"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's setup on disk: its tiny model and tokenizer, the bundled kopitiam data split as it splits it."""
    pytest.importorskip("torch")
    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("check")
    tok = train_tiny_tokenizer()
    build_tiny_model(tok, seed=0, **SMALL).save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    train, held = split_instructions()
    for name, rows in (("train.jsonl", train), ("held.jsonl", held)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _invoke(*args: str) -> tuple[int, str]:
    """Exit code and output; an llmtune error (main() prints it as one line) is appended as its message."""
    result = CliRunner().invoke(app, ["train", *args])
    error = "" if isinstance(result.exception, (SystemExit, type(None))) else f"error: {result.exception}"
    return result.exit_code, result.output + error


def test_check_of_the_demo_config_passes_and_prints_its_estimate(demo_dir: Path) -> None:
    config = demo_dir / "train.yaml"
    config.write_text(f"model: base\ndata: train.jsonl\neval_data: held.jsonl\noutput_dir: run\n{TRAINER}")
    code, out = _invoke(str(config), "--check", "--gpu", "T4")
    assert code == 0, out
    assert "valid config" in out and "memory estimate" in out and "fit per GPU" in out
    for name in ("options", "support", "model", "tokenizer", "data", "eval_data", "memory"):
        assert name in out
    assert "FAIL" not in out and not (demo_dir / "run").exists()   # nothing written, nothing trained
    code, out = _invoke(str(config), "--check", "--json")
    report = json.loads(out)
    n_train = sum(1 for _ in (demo_dir / "train.jsonl").open())
    assert report["ok"] and len(report["gpus"]) > 3    # every known GPU without --gpu
    assert f"{n_train} records ({n_train} instruction)" in {c["name"]: c["detail"] for c in report["checks"]}["data"]
    # the estimate is that of THIS config: the memory gate's, from the same YAML
    from llmtune.trainers._config import load_config
    from llmtune.trainers._memory_gate import estimate_for_config

    est, _rows = estimate_for_config(load_config(config))
    assert report["estimate"]["device_bytes"] == est.device_bytes and report["estimate"]["breakdown"] == est.breakdown


def test_a_70b_qlora_config_does_not_fit_a_t4_but_fits_an_h100(demo_dir: Path) -> None:
    config = demo_dir / "qlora70b.yaml"
    # a hub id: no weights here; the memory preset of the same name gives its shapes
    config.write_text("model: meta-llama/Llama-3.1-70B\ndata: train.jsonl\nquantizer: nf4\n"
                      "trainer:\n  rank: 16\n  batch_size: 1\n  max_length: 1024\n  gradient_checkpointing: true\n"
                      "  template: alpaca\n")
    code, out = _invoke(str(config), "--check", "--gpu", "T4", "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and report["gpus"][0]["fits"] is False
    assert all(c["ok"] for c in report["checks"])   # every check passed: only the fit fails
    assert 35 * 2**30 < report["estimate"]["device_bytes"] < 60 * 2**30
    code, out = _invoke(str(config), "--check", "--gpu", "H100")
    assert code == 0, out
    # a directory with only config.json (no weights): estimated from it, said so
    cfg_only = demo_dir / "llama70b"
    cfg_only.mkdir()
    from llmtune.memory import PRESETS

    (cfg_only / "config.json").write_text(json.dumps(PRESETS["llama-3.1-70b"].config))
    config.write_text(config.read_text().replace("meta-llama/Llama-3.1-70B", "llama70b\ntokenizer: base"))
    code, out = _invoke(str(config), "--check", "--gpu", "T4", "--json")
    again = json.loads(out)
    assert code == 1 and again["estimate"]["device_bytes"] == report["estimate"]["device_bytes"]
    assert "config.json only" in {c["name"]: c["detail"] for c in again["checks"]}["model"]
    assert all(c["ok"] for c in again["checks"])


def test_check_names_every_failing_part_and_exits_1(demo_dir: Path) -> None:
    bad = demo_dir / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"prompt": "no known format"}\n')
    plain = demo_dir / "plain-tokenizer"   # a tokenizer without a chat template
    plain.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (plain / name).write_bytes((demo_dir / "base" / name).read_bytes())
    config = demo_dir / "broken.yaml"
    config.write_text("model: base\ntokenizer: plain-tokenizer\ndata: bad.jsonl\neval_data: missing.jsonl\n"
                      f"{TRAINER}  template: tokenizer\n")
    code, out = _invoke(str(config), "--check", "--json")
    report = json.loads(out)
    failed = {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}
    assert code == 1 and set(failed) == {"tokenizer", "data", "eval_data"}, failed
    assert "chat_template" in failed["tokenizer"]
    assert "bad.jsonl:2" in failed["data"] and "missing.jsonl" in failed["eval_data"]
    # an option error is caught when the config loads: one line, file and line number
    config.write_text("model: base\ndata: train.jsonl\ntrainer:\n  lr: .inf\n")
    code, out = _invoke(str(config), "--check")
    assert code != 0 and "broken.yaml:4" in out and "lr" in out


def test_check_of_an_fsdp_config_needs_its_process_count(demo_dir: Path) -> None:
    config = demo_dir / "fsdp.yaml"
    config.write_text(f"model: base\ndata: train.jsonl\n{TRAINER}  distributed: fsdp\n")
    code, out = _invoke(str(config), "--check", "--json")
    assert code == 1 and "--processes" in {c["name"]: c["detail"] for c in json.loads(out)["checks"]}["distributed"]
    code, out = _invoke(str(config), "--check", "--json", "--processes", "2")
    report = json.loads(out)
    assert code == 0 and report["ok"], report["checks"]
    # sharded over 2: less per device than one replica
    code, ddp = _invoke(str(config).replace("fsdp.yaml", "train.yaml"), "--check", "--json", "--processes", "2")
    assert report["estimate"]["device_bytes"] <= json.loads(ddp)["estimate"]["device_bytes"]


def test_check_of_a_dpo_config_estimates_the_preference_objective(demo_dir: Path) -> None:
    (demo_dir / "prefs.jsonl").write_text(json.dumps({"prompt": "What is Kopi O?", "chosen": "Black coffee with "
                                                      "sugar.", "rejected": "Tea."}) + "\n")
    config = demo_dir / "dpo.yaml"
    config.write_text("model: base\ndata: prefs.jsonl\ntrainer:\n  name: dpo\n  batch_size: 1\n  max_length: 64\n")
    code, out = _invoke(str(config), "--check", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"], report["checks"]
    assert "1 preference records (0 ranked, 1 pairwise), 1 pairs" in {c["name"]: c["detail"] for c in report["checks"]}["data"]
    assert any("dpo" in str(n) for n in report["estimate"]["assumptions"])   # chosen + rejected, reference pass
    # full fine-tuning with the reference precomputed: no second copy in the estimate
    config.write_text("model: base\ndata: prefs.jsonl\ntrainer:\n  name: dpo\n  method: full\n  reference: precomputed\n"
                      "  batch_size: 1\n  max_length: 64\n")
    code, out = _invoke(str(config), "--check", "--json")
    full = json.loads(out)
    assert code == 0 and full["ok"], full["checks"]
    assert any("computed once before training" in str(n) for n in full["estimate"]["assumptions"])
    assert "reference_weights" not in full["estimate"]["breakdown"]


def test_check_of_an_rloo_config_estimates_k_samples(demo_dir: Path) -> None:
    from transformers import AutoTokenizer

    from llmtune.models.tiny import build_tiny_model
    from llmtune.trainers.rlhf.reward import RewardModel, reward_model_from_causal_lm

    tok = AutoTokenizer.from_pretrained(str(demo_dir / "base"))
    RewardModel(reward_model_from_causal_lm(build_tiny_model(tok, seed=1, **SMALL), tok), tok).save(demo_dir / "rm")
    (demo_dir / "prompts.jsonl").write_text(json.dumps({"prompt": "What is Kopi O?"}) + "\n")
    config = demo_dir / "rloo.yaml"
    config.write_text("model: base\ndata: prompts.jsonl\ntrainer:\n  name: rloo\n  batch_size: 1\n  max_length: 64\n"
                      f"  reward_model: {demo_dir / 'rm'}\n  samples: 6\n")
    code, out = _invoke(str(config), "--check", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"], report["checks"]
    assert any("online_rl" in str(n) or "6 samples" in str(n) for n in report["estimate"]["assumptions"]), \
        report["estimate"]["assumptions"]


def test_check_flags_need_check(demo_dir: Path) -> None:
    code, out = _invoke(str(demo_dir / "train.yaml"), "--gpu", "T4")
    assert code != 0 and "--check" in out


def test_predicted_vs_measured_peak_is_absent_on_cpu(demo_dir: Path, one_torch_thread: None) -> None:
    pytest.importorskip("peft")
    import llmtune

    out = demo_dir / "cpu-run"
    result = llmtune.get_trainer("lora", rank=4, batch_size=4, max_steps=1, progress=False, max_length=64).train(
        str(demo_dir / "base"), str(demo_dir / "train.jsonl"), output_dir=out)
    assert "peak_memory" not in result.extra
    assert "peak_memory" not in json.loads((out / "result.json").read_text())
    assert not any('"peak_memory"' in line for line in (out / "log.jsonl").read_text().splitlines())


def test_peak_memory_report_compares_the_gate_with_max_memory_allocated(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch, driven on CPU with the allocator's two readings faked (no GPU here)."""
    torch = pytest.importorskip("torch")
    from llmtune.memory import PRESETS, ModelSpec, estimate_training
    from llmtune.trainers._memory_gate import training_arguments
    from llmtune.trainers.loop import peak_memory_report
    from llmtune.trainers.options import TrainOptions

    opts = TrainOptions(batch_size=2, max_length=256)
    assert peak_memory_report(opts, "peft", PRESETS["llama-3.2-1b"].config, 1, torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    rep = peak_memory_report(opts, "peft", PRESETS["llama-3.2-1b"].config, 1, torch.device("cuda"))
    kw, _ = training_arguments(opts, "peft")
    expected = estimate_training(ModelSpec.from_hf_config(PRESETS["llama-3.2-1b"].config), **kw)
    assert rep is not None and rep["measured_peak_bytes"] == 3 * 2**30
    assert rep["predicted_peak_bytes"] == expected.peak_tensor_bytes
    assert rep["measured_over_predicted"] == pytest.approx(3 * 2**30 / expected.peak_tensor_bytes)
