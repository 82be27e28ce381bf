"""The ``unsloth`` backend of trainer ``lora``: Unsloth's CPU fallback fine-tunes the tiny model, PEFT reloads it.

Where Unsloth is not installed these tests check that the registry and ``llmtune backends`` say why the
backend is unavailable. Under ``LLMTUNE_REQUIRE_UNSLOTH=1`` (the ``unsloth`` nox session) a missing Unsloth
is a failure, not a skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import llmtune
from llmtune.core.errors import InvalidOptionError

REQUIRE = os.environ.get("LLMTUNE_REQUIRE_UNSLOTH") == "1"
HAVE_UNSLOTH = importlib.util.find_spec("unsloth") is not None
HAVE_PEFT = importlib.util.find_spec("peft") is not None and importlib.util.find_spec("torch") is not None
needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="needs llmtune[peft] (torch, peft)")


def _need_unsloth() -> None:
    if HAVE_UNSLOTH:
        return
    if REQUIRE:
        pytest.fail("LLMTUNE_REQUIRE_UNSLOTH=1 but unsloth is not installed: pip install 'llmtune[unsloth]'")
    pytest.skip("unsloth is not installed (the nox session 'unsloth' runs these with it)")


def _row() -> Any:
    rows = [r for r in llmtune.list_backends("trainer") if (r.name, r.backend) == ("lora", "unsloth")]
    assert len(rows) == 1
    return rows[0]


# ---------------------------------------------------------------- availability (runs everywhere)
def test_unsloth_backend_row_says_why_or_is_available() -> None:
    row = _row()
    assert row.extra == "unsloth" and not row.default
    if HAVE_UNSLOTH:
        assert row.available, row.reason
        assert row.reason is None
    else:
        if REQUIRE:
            pytest.fail("LLMTUNE_REQUIRE_UNSLOTH=1 but unsloth is not installed")
        assert not row.available
        assert "unsloth" in row.reason and "pip install 'llmtune[unsloth]'" in row.reason


def test_unsloth_cli_backends_json_reports_the_reason() -> None:
    from typer.testing import CliRunner

    from llmtune.cli.main import app

    result = CliRunner().invoke(app, ["backends", "--kind", "trainer", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    unsloth = [r for r in rows if r["backend"] == "unsloth"]
    assert sorted(r["name"] for r in unsloth) == ["lora", "sft"]   # sft on the unsloth backend; lora = sft
    for row in unsloth:
        assert row["available"] is HAVE_UNSLOTH
        if not HAVE_UNSLOTH:
            assert "llmtune[unsloth]" in row["reason"]


def test_unsloth_get_trainer_without_it_names_the_extra() -> None:
    if HAVE_UNSLOTH:
        pytest.skip("unsloth is installed here; the missing-dependency error cannot happen")
    if REQUIRE:
        pytest.fail("LLMTUNE_REQUIRE_UNSLOTH=1 but unsloth is not installed")
    with pytest.raises(llmtune.MissingDependencyError, match=r"llmtune\[unsloth\]"):
        llmtune.get_trainer("lora", backend="unsloth")


@needs_peft
@pytest.mark.parametrize(("versions", "cuda", "env", "expect"), [
    ({"unsloth": "2026.10.9", "unsloth_zoo": "2026.10.9", "transformers": "5.18.0", "trl": "1.15.0"}, False, {},
     "transformers <= 5.17.0"),
    ({"unsloth": "2026.10.9", "unsloth_zoo": "2026.10.9", "transformers": "5.17.0", "trl": "1.16.0"}, False, {},
     "trl <= 1.15.0"),
    ({"unsloth": "2026.10.8", "unsloth_zoo": "2026.10.8", "transformers": "5.17.0", "trl": "1.15.0"}, False, {},
     "CPU fallback starts at 2026.10.9"),
    ({"unsloth": "2026.10.8", "unsloth_zoo": "2026.10.8", "transformers": "5.17.0", "trl": "1.15.0"}, True, {},
     None),
    ({"unsloth": "2026.10.9", "unsloth_zoo": "2026.10.9", "transformers": "5.17.0", "trl": "1.15.0"}, False,
     {"UNSLOTH_DISABLE_CPU_FALLBACK": "1"}, "UNSLOTH_DISABLE_CPU_FALLBACK=1"),
    ({"unsloth": "2026.10.9", "transformers": "5.17.0", "trl": "1.15.0"}, False, {}, "needs unsloth_zoo"),
    ({"unsloth": "2026.10.9", "unsloth_zoo": "2026.10.9", "transformers": "5.17.0.dev0", "trl": "0.24.0"}, False, {},
     None),
])
def test_unsloth_unavailable_reason_checks_pins_and_cpu_fallback(
    monkeypatch: pytest.MonkeyPatch, versions: dict[str, str], cuda: bool, env: dict[str, str], expect: str | None,
) -> None:
    import torch

    from llmtune.trainers import unsloth as mod

    monkeypatch.setattr(mod, "_installed", versions.get)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.delenv("UNSLOTH_DISABLE_CPU_FALLBACK", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reason = mod.UnslothLoraTrainer.unavailable_reason()
    if expect is None:
        assert reason is None
    else:
        assert reason is not None and expect in reason


@needs_peft
def test_unsloth_import_order_problem_names_the_early_modules() -> None:
    from llmtune.trainers.unsloth import import_order_problem

    assert import_order_problem({}) is None
    assert import_order_problem({"unsloth": 1, "transformers": 1}) is None  # already imported: nothing to lose
    msg = import_order_problem({"transformers": 1, "peft": 1, "torch": 1})
    assert msg is not None and "transformers, peft was imported before Unsloth" in msg and "on a GPU" in msg


@needs_peft
def test_unsloth_options_reject_what_unsloth_cannot_do() -> None:
    from llmtune.trainers.unsloth import UnslothLoraOptions

    assert UnslothLoraOptions().dropout == 0.0  # Unsloth's fast LoRA kernels need dropout 0
    with pytest.raises(InvalidOptionError, match="LoRA only"):
        UnslothLoraOptions(method="dora")
    with pytest.raises(InvalidOptionError, match="upcast_embeddings"):
        UnslothLoraOptions(upcast_embeddings=True)
    with pytest.raises(InvalidOptionError, match="adapters would be skipped"):
        UnslothLoraOptions(method="bottleneck")
    for option in ({"rslora": True}, {"init": "pissa"}):
        with pytest.raises(InvalidOptionError, match="rsLoRA, PiSSA"):
            UnslothLoraOptions(**option)
    with pytest.raises(InvalidOptionError, match="packed examples would attend"):
        UnslothLoraOptions(packing=True)
    assert UnslothLoraOptions(loraplus_ratio=16).loraplus_ratio == 16  # the shared loop's optimizer
    if importlib.util.find_spec("bitsandbytes") is None:
        return  # the quantizer checks need the nf4/fp4 quantizers (llmtune[bnb])
    with pytest.raises(InvalidOptionError, match="NF4"):
        UnslothLoraOptions(quantizer=llmtune.get_quantizer("fp4"))
    with pytest.raises(InvalidOptionError, match="double_quant"):
        UnslothLoraOptions(quantizer=llmtune.get_quantizer("nf4", double_quant=False))
    UnslothLoraOptions(quantizer=llmtune.get_quantizer("nf4"))


# ---------------------------------------------------------------- fine-tuning through the CPU fallback
if HAVE_UNSLOTH:  # import Unsloth before anything else here imports transformers, as a user script would
    from llmtune.trainers.unsloth import import_unsloth

    import_unsloth()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama (random init) and its tokenizer, saved to a directory; the kopitiam instructions."""
    _need_unsloth()
    from llmtune.data import bundled_instructions
    from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0, num_hidden_layers=2)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    records = bundled_instructions()
    return {"dir": path, "model": model, "tokenizer": tok, "train": records[:16], "eval": records[-4:]}


def _reload_with_plain_peft(base_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    """Load base + adapter with PEFT alone, in a fresh interpreter that never imports Unsloth."""
    code = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}, dtype=torch.float32)
        ids = torch.arange(3, 35).unsqueeze(0)
        with torch.no_grad():
            before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r})
        with torch.no_grad():
            after = model(input_ids=ids).logits
        lora_b = [p.abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n]
        print(json.dumps({{"unsloth_imported": "unsloth" in sys.modules, "n_lora_b": len(lora_b),
                          "lora_b_nonzero": sum(1 for v in lora_b if v > 0),
                          "max_logit_change": (after - before).abs().max().item()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_unsloth_lora_finetunes_tiny_model_and_peft_reloads_adapter(tiny: dict[str, Any], tmp_path: Path) -> None:
    trainer = llmtune.get_trainer("lora", backend="unsloth", rank=8, alpha=16, lr=3e-3, batch_size=4,
                                  max_steps=4, max_length=96, warmup=0, gradient_checkpointing=True,
                                  eval_examples=4, max_new_tokens=8, progress=False)
    result = trainer.train(model=str(tiny["dir"]), data=tiny["train"], eval_data=tiny["eval"],
                           output_dir=tmp_path / "run")
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 4 and all(v == v and v > 0 for v in losses)
    assert losses[-1] < losses[0], losses  # it learns (lr 3e-3 on 16 repeated examples)
    assert set(result.eval) == {"before", "after"} and "rougeL" in " ".join(result.eval["after"])
    assert result.adapter_dir is not None
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    reloaded = _reload_with_plain_peft(tiny["dir"], result.adapter_dir)
    assert reloaded["unsloth_imported"] is False
    assert reloaded["n_lora_b"] == 2 * 7 and reloaded["lora_b_nonzero"] == reloaded["n_lora_b"]
    assert reloaded["max_logit_change"] > 1e-4


def test_unsloth_qlora_from_module_uses_4bit_and_cleans_up(tiny: dict[str, Any], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from llmtune.trainers.unsloth import UnslothBackend

    before = set(Path(tempfile.gettempdir()).glob("llmtune-unsloth-*"))
    seen: dict[str, Any] = {}
    trainer = llmtune.get_trainer("lora", backend="unsloth", rank=4, alpha=8, lr=3e-3, batch_size=4, max_steps=3,
                                  max_length=96, warmup=0, quantizer=llmtune.get_quantizer("nf4"), progress=False)
    original = UnslothBackend.apply_method

    def spy(self: UnslothBackend, model: Any, method: Any, ctx: Any) -> Any:
        # what Unsloth loaded, just before LoRA is added to it
        seen["linear4bit"] = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
        return original(self, model, method, ctx)

    monkeypatch.setattr(UnslothBackend, "apply_method", spy)
    result = trainer.train(model=tiny["model"], tokenizer=tiny["tokenizer"], data=tiny["train"],
                           output_dir=tmp_path / "run")
    assert seen["linear4bit"] == 2 * 7  # every projection of both layers is NF4; lm_head stays 16/32-bit
    assert len(result.history) == 3 and all(h["loss"] > 0 for h in result.history)
    assert result.adapter_dir is not None and (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert set(Path(tempfile.gettempdir()).glob("llmtune-unsloth-*")) == before  # the temp model dir is gone
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny["dir"]))  # a QLoRA adapter fits the 16/32-bit base
    model = PeftModel.from_pretrained(base, str(result.adapter_dir))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 7 and all(float(p.abs().sum()) > 0 for p in lora_b)


def test_unsloth_bad_model_inputs_are_clear_errors(tiny: dict[str, Any], tmp_path: Path) -> None:
    trainer = llmtune.get_trainer("lora", backend="unsloth", max_steps=1, progress=False)
    with pytest.raises(llmtune.ConfigError, match="tokenizer"):
        trainer.train(model=tiny["model"], data=tiny["train"], output_dir=tmp_path / "a")
    with pytest.raises(llmtune.ConfigError, match=r"no config\.json"):
        trainer.train(model=str(tmp_path), data=tiny["train"], output_dir=tmp_path / "b")
