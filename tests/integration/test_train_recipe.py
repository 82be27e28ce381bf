"""The shared recipe on a tiny Llama on CPU: full fine-tuning, pretraining, the support matrix, pre-tokenized data,
the NaN/divergence guard, Ctrl-C twice, thread choice, and a trainer backend from a plugin."""

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
from llmtune.core.errors import InvalidOptionError  # noqa: E402
from llmtune.trainers.base import trainer_class  # noqa: E402
from llmtune.trainers.callbacks import Callback  # noqa: E402
from llmtune.trainers.peft import PeftBackend  # noqa: E402

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
FAST = {"rank": 4, "alpha": 8, "lr": 2e-2, "batch_size": 4, "warmup": 0, "max_new_tokens": 6, "eval_examples": 0,
        "progress": False, "max_length": 96}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def train_set() -> list[dict[str, Any]]:
    from llmtune.data import split_instructions

    return split_instructions()[0][:48]


def tiny(tok: Any, seed: int = 0) -> Any:
    from llmtune.models.tiny import build_tiny_model

    return build_tiny_model(tok, seed=seed, **SMALL)


def losses(result: Any) -> list[float]:
    return [h["loss"] for h in result.history]


# ---------------------------------------------------------------- full fine-tuning
class _GrabOptimizer(Callback):
    """Keeps the run's (inner) optimizer for inspection after training."""

    optimizer: Any = None

    def on_train_end(self, state: Any, result: Any) -> None:
        self.optimizer = getattr(state.optimizer, "optimizer", state.optimizer)


@pytest.mark.parametrize(("optimizer", "precision"), [("adamw", "fp32"), ("adamw", "bf16"), ("sgd_momentum", "fp32"),
                                                      ("adamw_8bit", "fp32")])
def test_full_finetuning_changes_every_parameter_and_the_loss_falls(optimizer: str, precision: str, tok: Any,
                                                                    train_set: Any, tmp_path: Path) -> None:
    if optimizer == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    model = tiny(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = 0.2 if optimizer == "sgd_momentum" else 5e-3
    trainer = llmtune.get_trainer("sft", **{**FAST, "lr": lr}, method="full", optimizer=optimizer,
                                  precision=precision)
    grab = _GrabOptimizer()
    result = trainer.train(model, train_set, tokenizer=tok, output_dir=tmp_path, max_steps=8, callbacks=[grab])
    curve = losses(result)
    assert curve[-1] < curve[0] - 0.05, curve
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert unchanged == [], unchanged
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # bf16 trains fp32 master weights
    assert result.adapter_dir is None and result.model_dir == tmp_path / "model"
    assert result.extra["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    states = grab.optimizer.state[model.model.embed_tokens.weight]
    if optimizer == "adamw_8bit":  # bitsandbytes keeps 8-bit states for tensors of >= 4096 elements
        assert type(grab.optimizer).__name__ == "AdamW8bit" and states["state1"].dtype == torch.uint8
    elif optimizer == "adamw":
        assert states["exp_avg"].dtype == torch.float32
    # the saved model reloads with plain transformers and gives the trained model's outputs
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(result.model_dir))
    ids = torch.tensor([tok("What is Kopi O Kosong?", add_special_tokens=False)["input_ids"]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        if record["step"] == self.step:
            raise KeyboardInterrupt


def test_full_finetuning_resumes_exactly(tok: Any, train_set: Any, tmp_path: Path) -> None:
    opts = {**FAST, "lr": 5e-3, "method": "full", "warmup": 2, "max_steps": 6}
    full = llmtune.get_trainer("sft", **opts).train(tiny(tok), train_set, tokenizer=tok, output_dir=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        llmtune.get_trainer("sft", **opts).train(tiny(tok), train_set, tokenizer=tok, output_dir=tmp_path / "b",
                                                 callbacks=[_StopAt(3)])
    assert (tmp_path / "b" / "checkpoints" / "step-000003" / "model" / "model.safetensors").is_file()
    resumed = llmtune.get_trainer("sft", **opts).train(tiny(tok), train_set, tokenizer=tok,
                                                       output_dir=tmp_path / "b", resume="auto")
    assert losses(resumed) == losses(full)
    a = (tmp_path / "a" / "model" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- pretraining
def test_pretrain_from_scratch_lowers_validation_perplexity(tok: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from llmtune.data import bundled_corpus
    from llmtune.models.tiny import tiny_llama_config

    texts = bundled_corpus()
    config = tiny_llama_config(len(tok), **SMALL)
    trainer = llmtune.get_trainer("pretrain", batch_size=8, max_length=32, max_steps=30, lr=1e-2, warmup=3,
                                  eval_every=15, eval_examples=0, progress=False)
    result = trainer.train(config, texts[:-8], eval_data=texts[-8:], tokenizer=tok, output_dir=tmp_path)
    before, after = result.eval["before"]["perplexity"], result.eval["after"]["perplexity"]
    assert before > 0.8 * len(tok)            # random init: about uniform over the vocabulary
    assert after < before / 3, (before, after)
    assert "perplexity" in result.history[14]["eval"]
    assert result.eval["after"]["loss"] == pytest.approx(math.log(after))
    reloaded = AutoModelForCausalLM.from_pretrained(str(result.model_dir))
    assert sum(p.numel() for p in reloaded.parameters()) == result.extra["trainable_parameters"]


def test_pretrain_streams_a_text_file_and_resumes_exactly(tok: Any, tmp_path: Path) -> None:
    from llmtune.data import bundled_corpus
    from llmtune.models.tiny import tiny_llama_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(bundled_corpus()) + "\n")
    config = tiny_llama_config(len(tok), **SMALL)
    opts = {"batch_size": 4, "max_length": 32, "max_steps": 5, "lr": 1e-2, "warmup": 2, "chunk_bytes": 256,
            "dropout": 0.0, "progress": False}
    full = llmtune.get_trainer("pretrain", **opts).train(config, corpus, tokenizer=tok, output_dir=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        llmtune.get_trainer("pretrain", **opts).train(config, corpus, tokenizer=tok, output_dir=tmp_path / "b",
                                                      callbacks=[_StopAt(2)])
    resumed = llmtune.get_trainer("pretrain", **opts).train(config, corpus, tokenizer=tok,
                                                            output_dir=tmp_path / "b", resume="auto")
    assert losses(resumed) == losses(full)
    assert all(h["tokens"] == 4 * 32 for h in full.history)   # full blocks, no padding


def test_block_stream_is_the_same_whatever_the_chunk_size(tok: Any, tmp_path: Path) -> None:
    from llmtune.data import BlockStream, bundled_corpus, text_sources

    path = tmp_path / "c.txt"
    path.write_text("\n".join(bundled_corpus()) + "\n")
    small = list(BlockStream(text_sources(path), tok, block_size=16, chunk_bytes=100))
    whole = list(BlockStream(text_sources(path), tok, block_size=16, chunk_bytes=1 << 22))
    assert small == whole and len(whole) > 100 and all(len(b) == 16 for b in whole)
    ids = tok("\n".join(bundled_corpus()) + "\n", add_special_tokens=False)["input_ids"]
    assert whole[0] == [tok.bos_token_id, *ids[:15]]


# ---------------------------------------------------------------- support matrix, pre-tokenized data
def test_unsupported_combinations_name_the_supported_ones() -> None:
    with pytest.raises(InvalidOptionError, match="Supported: sft/peft: lora, dora, prompt_tuning, full"):
        llmtune.get_trainer("sft", method="full", quantizer=llmtune.get_quantizer("nf4"))
    with pytest.raises(InvalidOptionError, match="pretrain/peft: lora, dora, full"):
        llmtune.get_trainer("pretrain", method="prompt_tuning")
    assert llmtune.get_trainer("lora").options.method == "lora"        # existing callers: SFT with LoRA
    assert llmtune.get_trainer("pretrain").options.method == "full"


def test_pre_tokenized_examples_are_a_public_data_path(tok: Any, tmp_path: Path) -> None:
    from llmtune.data import Example

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(10, len(tok), (8, 24), generator=g).tolist()
    as_dicts = [{"input_ids": r} for r in rows]
    as_examples = [Example(r, [-100] * 4 + r[4:]) for r in rows]
    a = llmtune.get_trainer("sft", **FAST).train(tiny(tok), as_dicts, tokenizer=tok, output_dir=tmp_path / "a")
    b = llmtune.get_trainer("sft", **FAST).train(tiny(tok), as_examples, tokenizer=tok, output_dir=tmp_path / "b")
    assert len(a.history) == len(b.history) == 2
    assert a.history[0]["tokens"] == 4 * 24 and a.history[0]["loss"] != b.history[0]["loss"]


# ---------------------------------------------------------------- the guard
class _ScaledBackend(PeftBackend):
    """The peft backend with a loss multiplied by ``factor`` from optimizer step ``at`` on (counted in calls)."""

    at = 5
    factor = 1e4
    calls = 0

    def loss(self, model: Any, batch: Any, ctx: Any) -> Any:
        loss = super().loss(model, batch, ctx)
        if torch.is_grad_enabled():
            type(self).calls += 1
            if self.calls >= self.at:
                return loss * self.factor
        return loss


def test_divergence_stops_and_the_last_good_checkpoint_was_followed_by_a_good_step(
        tok: Any, train_set: Any, tmp_path: Path) -> None:
    _ScaledBackend.calls = 0
    trainer = trainer_class("sft", _ScaledBackend)(**FAST, save_every=1, keep_checkpoints=1)
    result = trainer.train(tiny(tok), train_set, tokenizer=tok, output_dir=tmp_path, max_steps=8)
    assert result.stopped_early is not None and result.stopped_early.startswith("divergence"), result.stopped_early
    assert len(result.history) == 4
    # step 5 diverged: the checkpoint of step 4 (the weights step 5 ran on) is not good, and is gone
    assert result.adapter_dir == tmp_path / "checkpoints" / "step-000003" / "adapter"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003"]
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "stopped" and last["last_good_checkpoint"].endswith("step-000003")


class _NaNFrom(PeftBackend):
    """The peft backend with a NaN loss from training call ``at`` on (the issue's run: step 3 was NaN)."""

    at = 3
    calls = 0

    def loss(self, model: Any, batch: Any, ctx: Any) -> Any:
        loss = super().loss(model, batch, ctx)
        if torch.is_grad_enabled():
            type(self).calls += 1
            if self.calls >= self.at:
                return loss * float("nan")
        return loss


def test_nan_after_a_checkpoint_names_the_one_before_and_its_generations_are_not_empty(
        tok: Any, train_set: Any, tmp_path: Path) -> None:
    from llmtune.trainers._inference import generate_text, load_for_inference

    base = tmp_path / "base"
    tiny(tok).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    _NaNFrom.calls = 0
    trainer = trainer_class("sft", _NaNFrom)(**FAST, save_every=1, dropout=0.0)
    result = trainer.train(str(base), train_set, output_dir=tmp_path / "run", max_steps=8)
    assert result.stopped_early is not None and "non-finite loss" in result.stopped_early
    # step 2 was finite and checkpointed, step 3 (run on step 2's weights) was NaN: step 1 is the last good one
    assert result.adapter_dir == tmp_path / "run" / "checkpoints" / "step-000001" / "adapter"
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000001"]
    model, tokenizer = load_for_inference(None, result.adapter_dir)
    (answer,) = generate_text(model, tokenizer, ["What is Kopi O?"], template="llama3", max_new_tokens=5)
    assert answer != ""


# ---------------------------------------------------------------- Ctrl-C twice, threads
class _TwoSigints(PeftBackend):
    """Sends two SIGINTs (Ctrl-C twice) during the forward of a given micro-batch: a partial step."""

    at_call = 5
    calls = 0

    def loss(self, model: Any, batch: Any, ctx: Any) -> Any:
        loss = super().loss(model, batch, ctx)
        type(self).calls += 1
        if self.calls == self.at_call:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return loss


class _SigintsInOptimizerStep(Callback):
    """Wraps the optimizer's step: at step ``at`` it sends two SIGINTs right after the real update."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_start(self, state: Any) -> None:
        inner = state.optimizer.optimizer
        real = inner.step
        count = [state.step]

        def step(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            count[0] += 1
            if count[0] == self.at:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return out

        inner.step = step


@pytest.mark.parametrize("where", ["mid-step", "inside-optimizer-step"])
def test_ctrl_c_twice_resumes_exactly(where: str, tok: Any, train_set: Any, tmp_path: Path) -> None:
    opts = {**FAST, "dropout": 0.1, "grad_accum": 2, "batch_size": 2, "max_steps": 5}  # dropout draws from the RNG
    full = llmtune.get_trainer("sft", **opts).train(tiny(tok), train_set, tokenizer=tok, output_dir=tmp_path / "a")
    out = tmp_path / "b"
    if where == "mid-step":
        _TwoSigints.calls = 0
        cut = trainer_class("sft", _TwoSigints)(**opts)   # call 5 = first micro-batch of step 3
        with pytest.raises(KeyboardInterrupt, match="after step 2"):
            cut.train(tiny(tok), train_set, tokenizer=tok, output_dir=out)
    else:
        with pytest.raises(KeyboardInterrupt, match="after step 3"):
            llmtune.get_trainer("sft", **opts).train(tiny(tok), train_set, tokenizer=tok, output_dir=out,
                                                     callbacks=[_SigintsInOptimizerStep(3)])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = llmtune.get_trainer("sft", **opts).train(tiny(tok), train_set, tokenizer=tok, output_dir=out,
                                                       resume="auto")
    assert losses(resumed) == losses(full)


def test_num_threads_is_an_option_recorded_in_the_log(tok: Any, train_set: Any, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    result = llmtune.get_trainer("sft", **FAST, num_threads=1).train(
        tiny(tok), train_set, tokenizer=tok, output_dir=tmp_path, max_steps=2)
    assert torch.get_num_threads() == 2        # restored after the run
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["num_threads"] for r in log] == [1, 1] and result.extra["num_threads"] == 1
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_threads"] == 1 and config["num_threads_reason"] == "num_threads option"
    from llmtune.trainers._threads import choose_threads

    n, why = choose_threads("auto", cuda=False)
    assert 1 <= n <= 2 and why.startswith("auto:")


# ---------------------------------------------------------------- a backend from a plugin
def test_a_plugin_backend_trains_through_the_shared_loop(tok: Any, train_set: Any, tmp_path: Path) -> None:
    rows = {(r.name, r.backend): r for r in llmtune.list_backends("trainer")}
    if ("sft", "plain") not in rows:
        if os.environ.get("LLMTUNE_FULL_ENV"):
            pytest.fail("tests/plugins/trainer_plugin is not installed")
        pytest.skip("tests/plugins/trainer_plugin is not installed (pip install tests/plugins/trainer_plugin)")
    assert rows[("sft", "plain")].source.startswith("plugin llmtune-trainer-plugin")
    trainer = llmtune.get_trainer("sft", backend="plain", **{**FAST, "lr": 5e-3}, method="full", save_every=2)
    result = trainer.train(tiny(tok), train_set, tokenizer=tok, output_dir=tmp_path, max_steps=6)
    curve = losses(result)
    assert curve[-1] < curve[0], curve
    assert (tmp_path / "checkpoints" / "step-000006" / "model" / "model.safetensors").is_file()
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 6
    # the plain backend's loss (transformers' own) equals the peft backend's chunked loss on the same run
    peft_run = llmtune.get_trainer("sft", **{**FAST, "lr": 5e-3}, method="full").train(
        tiny(tok), train_set, tokenizer=tok, output_dir=tmp_path / "peft", max_steps=6)
    assert losses(peft_run) == pytest.approx(curve, rel=1e-4)
    with pytest.raises(InvalidOptionError, match="sft/plain: full"):
        llmtune.get_trainer("sft", backend="plain", method="lora")


def test_early_stopping_on_validation_loss(tok: Any, tmp_path: Path) -> None:
    from llmtune.data import split_instructions

    train, held = split_instructions()
    # a learning rate far too high: validation loss rises after the first evaluations, so the run ends early
    opts = {**FAST, "lr": 0.3, "eval_every": 1, "eval_examples": 4, "max_new_tokens": 1, "divergence_factor": 0}
    result = llmtune.get_trainer("sft", **opts, early_stopping_patience=2).train(
        tiny(tok), train[:48], eval_data=held[:4], tokenizer=tok, output_dir=tmp_path, max_steps=12)
    evals = [result.eval["before"]["loss"]] + [h["eval"]["loss"] for h in result.history if "eval" in h]
    assert result.extra["early_stopped"] is not None and len(result.history) < 12
    assert min(evals[-2:]) >= min(evals[:-2])             # the last two did not improve on the best before them
    assert result.adapter_dir == tmp_path / "adapter" and result.stopped_early is None


def test_cli_pretrains_from_a_config_only_directory(tok: Any, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmtune.cli.main import app
    from llmtune.data import bundled_corpus
    from llmtune.models.tiny import tiny_llama_config

    tok.save_pretrained(str(tmp_path / "scratch"))
    tiny_llama_config(len(tok), **SMALL).save_pretrained(str(tmp_path / "scratch"))   # no weights: random init
    texts = bundled_corpus()
    (tmp_path / "train.txt").write_text("\n".join(texts[:-8]))
    (tmp_path / "held.txt").write_text("\n".join(texts[-8:]))
    (tmp_path / "pre.yaml").write_text(
        "model: scratch\ndata: train.txt\neval_data: held.txt\noutput_dir: runs/pre\nloggers: [tensorboard]\n"
        "trainer:\n  name: pretrain\n  max_length: 32\n  batch_size: 8\n  max_steps: 6\n  lr: 1.0e-2\n"
        "  progress: false\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "pre.yaml")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "perplexity" in result.output and "model:" in result.output
    out = tmp_path / "runs" / "pre"
    assert (out / "model" / "model.safetensors").is_file() and list((out / "tensorboard").iterdir())
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: scratch\ndata: train.txt\nloggers: [comet]\n")
    failed = CliRunner().invoke(app, ["train", str(bad)])
    assert "loggers" in str(failed.exception) and f"{bad}:3" in str(failed.exception)
