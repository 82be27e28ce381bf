"""The ``lora`` trainer (backend ``peft``) on a tiny Llama on CPU: LoRA, QLoRA, DoRA, prompt tuning, resume, guards."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import llmtune  # noqa: E402
from llmtune.core.errors import ConfigError, InvalidOptionError, UnknownOptionError  # noqa: E402
from llmtune.trainers.base import trainer_class  # noqa: E402
from llmtune.trainers.callbacks import Callback  # noqa: E402
from llmtune.trainers.peft import PeftBackend  # noqa: E402

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
FAST = {"rank": 4, "alpha": 8, "lr": 2e-2, "batch_size": 4, "warmup": 0, "max_new_tokens": 6, "eval_examples": 4,
        "progress": False, "max_length": 96}


pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def split() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from llmtune.data import split_instructions

    train, held = split_instructions()
    return train[:48], held[:4]


def tiny(tok: Any, seed: int = 0) -> Any:
    from llmtune.models.tiny import build_tiny_model

    return build_tiny_model(tok, seed=seed, **SMALL)


def losses(result: Any) -> list[float]:
    return [h["loss"] for h in result.history]


def logits_of(model: Any, tok: Any) -> Any:
    ids = torch.tensor([tok("What is Kopi O Kosong?", add_special_tokens=False)["input_ids"]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_trains_evaluates_logs_and_reloads_with_plain_peft(tok: Any, split: Any, tmp_path: Path) -> None:
    from peft import PeftModel

    train, held = split
    trainer = llmtune.get_trainer("lora", **FAST, dropout=0.0)
    model = tiny(tok)
    result = trainer.train(model, train, eval_data=held, tokenizer=tok, output_dir=tmp_path, max_steps=10,
                           eval_every=5)
    curve = losses(result)
    assert set(result.history[4]["eval"]) >= {"rougeL", "bleu"}  # periodic evaluation at step 5
    assert (tmp_path / "eval-step-000005.jsonl").is_file()
    assert len(curve) == 10 and all(math.isfinite(x) for x in curve)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.1, curve
    assert set(result.eval) == {"before", "after"}
    for scores in result.eval.values():
        assert {"rougeL", "rouge1", "bleu"} <= set(scores) and scores["n"] == len(held)
        assert 0.0 <= scores["rougeL"] <= 1.0 and 0.0 <= scores["bleu"] <= 100.0
    # one JSON line per optimizer step, matching the returned history
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))
    assert [r["loss"] for r in log] == curve
    assert all(r["tokens"] > 0 and r["memory_bytes"] > 0 for r in log)
    assert result.adapter_dir == tmp_path / "adapter"
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob("**/.tmp-*")), "temporary checkpoint directories left behind"
    # the adapter reloads on a fresh copy of the base with plain PEFT and gives the same outputs
    reloaded = PeftModel.from_pretrained(tiny(tok), str(result.adapter_dir))
    trained = logits_of(model, tok)
    assert torch.allclose(logits_of(reloaded, tok), trained, atol=1e-5)
    assert not torch.allclose(logits_of(tiny(tok), tok), trained, atol=1e-3), "the adapter changed nothing"


def test_qlora_nf4_trains_without_upcasting_and_reloads(tok: Any, split: Any, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    train, _ = split
    quantizer = llmtune.get_quantizer("nf4")
    trainer = llmtune.get_trainer("lora", **FAST, dropout=0.0, quantizer=quantizer, precision="bf16")
    model = tiny(tok)
    result = trainer.train(model, train, tokenizer=tok, output_dir=tmp_path, max_steps=8)
    curve = losses(result)
    assert curve[-1] < curve[0], curve
    assert result.eval == {}
    # 4-bit base, embeddings and norms kept in bf16 (no fp32 upcast; PEFT's kbit preparation would upcast them)
    assert "4bit" in type(model.model.layers[0].self_attn.q_proj.base_layer).__name__
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trainable == {torch.float32}, trainable
    # reload: quantize a fresh base the same way, apply the adapter with plain PEFT, same outputs
    fresh = llmtune.get_quantizer("nf4").quantize(tiny(tok).to(torch.bfloat16))
    reloaded = PeftModel.from_pretrained(fresh, str(result.adapter_dir))
    assert torch.allclose(logits_of(reloaded, tok).float(), logits_of(model, tok).float(), atol=1e-3)


def test_qlora_from_a_model_directory_quantizes_at_load_time(tok: Any, split: Any, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    tiny(tok).save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    trainer = llmtune.get_trainer("lora", **FAST, quantizer=llmtune.get_quantizer("nf4"), precision="bf16")
    result = trainer.train(str(tmp_path / "base"), split[0], output_dir=tmp_path / "run", max_steps=2)
    assert len(result.history) == 2 and all(math.isfinite(h["loss"]) for h in result.history)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")


def test_upcast_embeddings_is_opt_in(tok: Any, split: Any, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    train, _ = split
    trainer = llmtune.get_trainer("lora", **FAST, quantizer=llmtune.get_quantizer("nf4"), precision="bf16",
                                  upcast_embeddings=True)
    model = tiny(tok)
    trainer.train(model, train, tokenizer=tok, output_dir=tmp_path, max_steps=1)
    assert model.model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("method", ["dora", "prompt_tuning"])
def test_dora_and_prompt_tuning_train(method: str, tok: Any, split: Any, tmp_path: Path) -> None:
    train, _ = split
    extra = {"num_virtual_tokens": 4, "lr": 3e-2} if method == "prompt_tuning" else {}
    trainer = llmtune.get_trainer("lora", **{**FAST, **extra}, method=method, dropout=0.0)
    result = trainer.train(tiny(tok), train, tokenizer=tok, output_dir=tmp_path, max_steps=6)
    curve = losses(result)
    assert curve[-1] < curve[0], curve
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PROMPT_TUNING" if method == "prompt_tuning" else "LORA")
    assert config.get("use_dora", False) == (method == "dora")


def test_packing_trains_on_fewer_longer_sequences(tok: Any, split: Any, tmp_path: Path) -> None:
    train, _ = split
    opts = {**FAST, "dropout": 0.0, "eval_examples": 0}
    plain = llmtune.get_trainer("lora", **opts).train(tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "a")
    packed = llmtune.get_trainer("lora", **opts, packing=True).train(tiny(tok), train, tokenizer=tok,
                                                                     output_dir=tmp_path / "b")
    assert 0 < len(packed.history) < len(plain.history)
    assert sum(h["tokens"] for h in packed.history) > 0.5 * sum(h["tokens"] for h in plain.history)
    assert all(math.isfinite(h["loss"]) for h in packed.history)


def test_gradient_accumulation_equals_the_big_batch(tok: Any, split: Any, tmp_path: Path) -> None:
    """Loss is the token mean over the whole global batch, so 2 x 4 accumulated == 8 at once."""
    train, _ = split
    common = {**FAST, "dropout": 0.0, "eval_examples": 0}
    big = llmtune.get_trainer("lora", **{**common, "batch_size": 8}).train(
        tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "big", max_steps=4)
    acc = llmtune.get_trainer("lora", **{**common, "batch_size": 4, "grad_accum": 2}).train(
        tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "acc", max_steps=4)
    assert losses(big) == pytest.approx(losses(acc), rel=1e-5, abs=1e-6)


def test_gradient_checkpointing_gives_the_same_curve(tok: Any, split: Any, tmp_path: Path) -> None:
    train, _ = split
    plain = llmtune.get_trainer("lora", **FAST, dropout=0.0).train(
        tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "a", max_steps=3)
    ckpt = llmtune.get_trainer("lora", **FAST, dropout=0.0, gradient_checkpointing=True).train(
        tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "b", max_steps=3)
    assert losses(plain) == pytest.approx(losses(ckpt), rel=1e-5, abs=1e-6)


class _Interrupt(Callback):
    """Raises KeyboardInterrupt (as Ctrl-C would) right after a given step."""

    at_step = 3

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        if record["step"] == self.at_step:
            raise KeyboardInterrupt


def test_interrupt_saves_and_resume_reproduces_the_uninterrupted_curve(tok: Any, split: Any, tmp_path: Path) -> None:
    train, _ = split
    # dropout > 0 so that the RNG state must be restored too; a scheduler with warmup so its state matters
    opts = {**FAST, "dropout": 0.1, "warmup": 2, "scheduler": "cosine", "eval_examples": 0, "epochs": 2}
    full = llmtune.get_trainer("lora", **opts).train(tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "full")
    assert len(full.history) == 2 * (len(train) // FAST["batch_size"])

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        llmtune.get_trainer("lora", **opts).train(tiny(tok), train, tokenizer=tok, output_dir=out,
                                                  callbacks=[_Interrupt()])
    assert (out / "checkpoints" / "step-000003" / "state.json").is_file()
    state = json.loads((out / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["step"] == 3
    resumed = llmtune.get_trainer("lora", **opts).train(tiny(tok), train, tokenizer=tok, output_dir=out,
                                                        resume="auto")
    assert losses(resumed) == losses(full)  # exact, not approximately
    log = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert log == losses(full)
    a = (full.adapter_dir / "adapter_model.safetensors").read_bytes()
    b = (resumed.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert a == b


def test_periodic_checkpoints_are_complete_and_pruned(tok: Any, split: Any, tmp_path: Path) -> None:
    train, _ = split
    result = llmtune.get_trainer("lora", **FAST, save_every=2, keep_checkpoints=2).train(
        tiny(tok), train, tokenizer=tok, output_dir=tmp_path, max_steps=7)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000006"]
    for name in names:
        files = {p.name for p in (tmp_path / "checkpoints" / name).iterdir()}
        assert {"adapter", "optimizer.safetensors", "scheduler.safetensors", "rng-0.safetensors", "state.json",
                "manifest.json"} <= files
    assert len(result.history) == 7
    # resume from an explicit checkpoint path: steps 5..7 again, identical to the first run's
    again = llmtune.get_trainer("lora", **FAST).train(
        tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "again", max_steps=7,
        resume=tmp_path / "checkpoints" / "step-000004")
    assert losses(again) == losses(result)


class _CtrlC(Callback):
    """Sends this process a real SIGINT (Ctrl-C) after step 2."""

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)


def test_real_ctrl_c_finishes_the_step_saves_and_resumes(tok: Any, split: Any, tmp_path: Path) -> None:
    train, _ = split
    opts = {**FAST, "dropout": 0.1, "eval_examples": 0}
    with pytest.raises(KeyboardInterrupt, match="after step 2"):
        llmtune.get_trainer("lora", **opts).train(tiny(tok), train, tokenizer=tok, output_dir=tmp_path, max_steps=4,
                                                  callbacks=[_CtrlC()])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]
    resumed = llmtune.get_trainer("lora", **opts).train(tiny(tok), train, tokenizer=tok, output_dir=tmp_path,
                                                        max_steps=4, resume="auto")
    full = llmtune.get_trainer("lora", **opts).train(tiny(tok), train, tokenizer=tok,
                                                     output_dir=tmp_path / "full", max_steps=4)
    assert losses(resumed) == losses(full)


class _NaNBackend(PeftBackend):
    """The peft backend with a loss that turns NaN at a given call."""

    nan_step = 4
    calls = 0

    def loss(self, model: Any, batch: Any, ctx: Any) -> Any:
        type(self).calls += 1
        loss = super().loss(model, batch, ctx)
        return loss * float("nan") if self.calls >= self.nan_step else loss


_NaNAt = trainer_class("sft", _NaNBackend)


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tok: Any, split: Any, tmp_path: Path) -> None:
    train, _ = split
    _NaNBackend.calls = 0
    result = _NaNAt(**FAST, save_every=2).train(tiny(tok), train, tokenizer=tok, output_dir=tmp_path, max_steps=8)
    assert result.stopped_early is not None and "non-finite loss" in result.stopped_early
    assert len(result.history) == 3
    assert result.adapter_dir == tmp_path / "checkpoints" / "step-000002" / "adapter"
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "stopped" and last["last_good_checkpoint"].endswith("step-000002")


def test_bad_options_and_inputs_are_clear_errors(tok: Any, split: Any, tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="rank"):
        llmtune.get_trainer("lora", rank=0)
    with pytest.raises(InvalidOptionError, match="method"):
        llmtune.get_trainer("lora", method="lorax")
    with pytest.raises(UnknownOptionError, match="Did you mean 'rank'"):
        llmtune.get_trainer("lora", rnak=8)
    with pytest.raises(InvalidOptionError, match="quantizer"):
        llmtune.get_trainer("lora", quantizer="nf4")
    with pytest.raises(InvalidOptionError, match="targets"):
        llmtune.get_trainer("lora", targets=[])
    trainer = llmtune.get_trainer("lora", **FAST)
    with pytest.raises(ConfigError, match="tokenizer"):
        trainer.train(tiny(tok), split[0], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        trainer.train(tiny(tok), split[0][:3], tokenizer=tok, output_dir=tmp_path)
    with pytest.raises(UnknownOptionError, match="max_stpes"):
        trainer.train(tiny(tok), split[0], tokenizer=tok, output_dir=tmp_path, max_stpes=3)
    with pytest.raises(ConfigError, match="resume"):
        trainer.train(tiny(tok), split[0], tokenizer=tok, output_dir=tmp_path, resume=tmp_path / "nope")
