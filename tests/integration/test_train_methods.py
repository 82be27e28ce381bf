"""The trainer with the new methods on a tiny Llama on CPU: bottleneck, IA3, prefix tuning, rsLoRA, LoRA+, packing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import llmtune  # noqa: E402
from llmtune.core.errors import InvalidOptionError  # noqa: E402
from llmtune.trainers.methods import bottleneck as bn  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
FAST = {"lr": 2e-2, "batch_size": 4, "warmup": 0, "max_new_tokens": 4, "eval_examples": 2, "progress": False,
        "max_length": 96, "dropout": 0.0}


@pytest.fixture(scope="module")
def split() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from llmtune.data import split_instructions

    train, held = split_instructions()
    return train[:32], held[:2]


def tiny(tok: Any) -> Any:
    from llmtune.models.tiny import build_tiny_model

    return build_tiny_model(tok, seed=0, **SMALL)


def logits_of(model: Any, tok: Any) -> Any:
    ids = torch.tensor([tok("What is Kopi O Kosong?", add_special_tokens=False)["input_ids"]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def curve(result: Any) -> list[float]:
    return [h["loss"] for h in result.history]


def lowers(losses: list[float], margin: float = 0.05) -> bool:
    return all(math.isfinite(x) for x in losses) and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - margin


def test_bottleneck_trains_saves_and_reloads(tok: Any, split: Any, tmp_path: Path) -> None:
    train, held = split
    model = tiny(tok)
    result = llmtune.get_trainer("lora", **FAST, method="bottleneck", bottleneck_size=8,
                                 bottleneck_sites=["attn", "mlp"]).train(
        model, train, eval_data=held, tokenizer=tok, output_dir=tmp_path, max_steps=8)
    assert lowers(curve(result)), curve(result)
    opts = bn.BottleneckOptions(size=8, sites=("attn", "mlp"))
    assert result.extra["trainable_parameters"] == bn.parameter_count(opts, 32, 2) == 2 * 2 * (2 * 32 * 8 + 8 + 32)
    assert (result.adapter_dir / bn.WEIGHTS_FILE).is_file() and (result.adapter_dir / bn.CONFIG_FILE).is_file()
    reloaded = bn.load_bottleneck(tiny(tok), result.adapter_dir)
    assert torch.equal(logits_of(reloaded, tok), logits_of(model, tok))
    assert set(result.eval) == {"before", "after"}


def test_bottleneck_with_gradient_checkpointing_gives_the_same_curve(tok: Any, split: Any, tmp_path: Path) -> None:
    train, _ = split
    opts = {**FAST, "method": "bottleneck", "bottleneck_size": 4, "bottleneck_sites": ["attn", "mlp"]}
    plain = llmtune.get_trainer("lora", **opts).train(tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "a",
                                                      max_steps=4)
    ckpt = llmtune.get_trainer("lora", **opts, gradient_checkpointing=True).train(
        tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "b", max_steps=4)
    assert curve(ckpt) == pytest.approx(curve(plain), abs=1e-5)


def test_bottleneck_resume_reproduces_the_curve(tok: Any, split: Any, tmp_path: Path) -> None:
    train, _ = split
    opts = {**FAST, "method": "bottleneck", "bottleneck_size": 4, "bottleneck_placement": "parallel"}
    full = llmtune.get_trainer("lora", **opts).train(tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "a",
                                                     max_steps=6, save_every=3)
    resumed = llmtune.get_trainer("lora", **opts).train(tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "a",
                                                        max_steps=6, resume=tmp_path / "a" / "checkpoints" / "step-000003")
    assert curve(resumed)[3:] == pytest.approx(curve(full)[3:], abs=1e-5)


@pytest.mark.parametrize("method", ["ia3", "prefix_tuning"])
def test_ia3_and_prefix_tuning_train_and_reload(method: str, tok: Any, split: Any, tmp_path: Path) -> None:
    from peft import PeftModel

    train, _ = split
    model = tiny(tok)
    lr = {"ia3": 0.3, "prefix_tuning": 0.1}[method]  # 192 / 256 parameters on a random base: big steps
    result = llmtune.get_trainer("lora", **FAST, method=method, num_virtual_tokens=4).train(
        model, train, tokenizer=tok, output_dir=tmp_path, max_steps=8, lr=lr)
    assert lowers(curve(result), margin=0.02), curve(result)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == {"ia3": "IA3", "prefix_tuning": "PREFIX_TUNING"}[method]
    reloaded = PeftModel.from_pretrained(tiny(tok), str(result.adapter_dir))
    if method == "ia3":  # IA3 rescales the base's own layers in place; prefixes live in the PEFT wrapper only
        assert torch.allclose(logits_of(reloaded, tok), logits_of(model, tok), atol=1e-5)
    assert loss_on(reloaded, tok, train) < loss_on(tiny(tok), tok, train) - 0.02


def loss_on(model: Any, tok: Any, records: list[dict[str, Any]]) -> float:
    from llmtune.data import build_examples, collate
    from llmtune.trainers._loss import model_loss

    batch = collate(build_examples(records, tok, max_length=96), tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        total, count = model_loss(model, batch)
    return float(total) / int(count)


def test_rslora_and_loraplus_through_the_trainer(tok: Any, split: Any, tmp_path: Path) -> None:
    from peft.tuners.lora import LoraLayer

    train, _ = split
    model = tiny(tok)
    trainer = llmtune.get_trainer("lora", **FAST, rank=4, alpha=8, rslora=True, loraplus_ratio=16)
    result = trainer.train(model, train, tokenizer=tok, output_dir=tmp_path, max_steps=6)
    assert lowers(curve(result)), curve(result)
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["use_rslora"] is True
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.scaling["default"] == pytest.approx(8 / 2) for m in layers)  # alpha / sqrt(4)


def test_packing_through_the_trainer_gives_the_unpacked_loss(tok: Any, split: Any, tmp_path: Path) -> None:
    """Step 1's loss (before any update) over all 32 examples: one padded batch vs all the packs of them."""
    from llmtune.data import build_examples, pack_examples

    train, _ = split
    n_packs = len(pack_examples(build_examples(train, tok, max_length=96), 256))
    assert 1 < n_packs < len(train)
    opts = {**FAST, "method": "bottleneck", "bottleneck_size": 4}
    plain = llmtune.get_trainer("lora", **{**opts, "batch_size": len(train)}).train(
        tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "p", max_steps=1)
    packed = llmtune.get_trainer("lora", **{**opts, "batch_size": n_packs}, packing=True).train(
        tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "k", max_steps=1, max_length=256)
    assert curve(packed)[0] == pytest.approx(curve(plain)[0], abs=1e-5)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "ia3", "rslora": True}, "applies to method 'lora'"),
    ({"init": "svd"}, "init"),
    ({"loraplus_ratio": 0.5}, "loraplus_ratio"),
    ({"method": "bottleneck", "bottleneck_placement": "sideways"}, "placement"),
    ({"method": "prefix_tuning", "packing": True}, "packing"),
    ({"train_on": "final"}, "train_on"),
])
def test_bad_method_options(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        llmtune.get_trainer("lora", **kwargs)


def test_quantized_base_rules() -> None:
    pytest.importorskip("bitsandbytes")
    nf4 = llmtune.get_quantizer("nf4")
    with pytest.raises(InvalidOptionError, match="loftq"):
        llmtune.get_trainer("lora", init="pissa", quantizer=nf4)
    with pytest.raises(InvalidOptionError, match="leave quantizer unset"):
        llmtune.get_trainer("lora", init="loftq", quantizer=nf4)
    llmtune.get_trainer("lora", method="bottleneck", quantizer=nf4)  # QLoRA-style bottleneck is fine


def test_inference_loads_a_bottleneck_adapter_and_refuses_to_merge_it(tok: Any, split: Any, tmp_path: Path) -> None:
    from llmtune.core.errors import MergeNotSupportedError
    from llmtune.trainers._inference import adapter_base, load_for_inference, merge_adapter

    train, _ = split
    base_dir = tmp_path / "base"
    tiny(tok).save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    result = llmtune.get_trainer("lora", **FAST, method="bottleneck", bottleneck_size=4).train(
        str(base_dir), train, output_dir=tmp_path / "run", max_steps=3)
    assert adapter_base(result.adapter_dir) == str(base_dir)
    model, tokenizer = load_for_inference(adapter=result.adapter_dir)
    reloaded = bn.load_bottleneck(tiny(tok), result.adapter_dir)
    assert torch.allclose(logits_of(model, tokenizer), logits_of(reloaded, tok), atol=1e-6)
    assert not torch.allclose(logits_of(model, tokenizer), logits_of(tiny(tok), tok), atol=1e-4)
    with pytest.raises(MergeNotSupportedError, match="cannot be merged"):
        merge_adapter(result.adapter_dir, tmp_path / "merged")


def test_ia3_adapter_merges(tok: Any, split: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from llmtune.trainers._inference import load_for_inference, merge_adapter

    train, _ = split
    base_dir = tmp_path / "base"
    tiny(tok).save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    result = llmtune.get_trainer("lora", **FAST, method="ia3").train(str(base_dir), train, output_dir=tmp_path / "r",
                                                                      max_steps=3, lr=0.3)
    peft_model, tokenizer = load_for_inference(adapter=result.adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(str(merge_adapter(result.adapter_dir, tmp_path / "merged")))
    assert torch.allclose(logits_of(merged, tokenizer), logits_of(peft_model, tokenizer), atol=1e-5)


def test_loraplus_groups_reach_the_recipes_optimizer(tok: Any, split: Any, tmp_path: Path) -> None:
    """The loop builds its optimizer (any of its names) from PEFT's LoRA+ groups: B at lr * ratio, A at lr."""
    from peft.optimizers import create_loraplus_optimizer

    from llmtune.trainers.callbacks import Callback

    seen: dict[str, Any] = {}

    class Groups(Callback):
        def on_train_start(self, state: Any) -> None:
            names = {id(p): n for n, p in state.model.named_parameters()}
            seen["ours"] = [(g["lr"], sorted(names[id(p)] for p in g["params"])) for g in state.optimizer.param_groups]
            ref = create_loraplus_optimizer(state.model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
            seen["peft"] = [(g["lr"], sorted(names[id(p)] for p in g["params"])) for g in ref.param_groups
                            if g["params"]]

    train, _ = split
    for optimizer in ("adamw", "sgd"):
        llmtune.get_trainer("lora", **FAST, rank=4, loraplus_ratio=16, optimizer=optimizer,
                            scheduler="constant").train(tiny(tok), train, tokenizer=tok, lr=1e-3, max_steps=1,
                                                        output_dir=tmp_path / optimizer, callbacks=[Groups()])
        assert seen["ours"] == seen["peft"]
        lrs = sorted({lr for lr, _ in seen["ours"]})
        assert lrs == pytest.approx([1e-3, 16e-3])
        b_names = [n for lr, names in seen["ours"] if lr == pytest.approx(16e-3) for n in names]
        assert b_names and all("lora_B" in n for n in b_names)


def test_support_matrix_lists_the_new_methods_and_refusals() -> None:
    from llmtune.trainers.matrix import check_supported, support_of
    from llmtune.trainers.options import TrainOptions
    from llmtune.trainers.peft import PeftPretrainTrainer, PeftSftTrainer
    from llmtune.trainers.unsloth import UnslothSftTrainer

    sft = support_of(PeftSftTrainer)
    assert {"ia3", "prefix_tuning", "bottleneck"} <= set(sft.methods) and "bottleneck" in sft.quantized
    assert "prompt_tuning" not in sft.packing and "prefix_tuning" not in sft.packing and "bottleneck" in sft.packing
    assert support_of(PeftPretrainTrainer).methods == ("lora", "dora", "full")
    uns = support_of(UnslothSftTrainer)
    assert uns.methods == ("lora",) and uns.packing == ()
    assert "adapters would be skipped" in dict(uns.refused)["bottleneck"]
    trainer = object.__new__(UnslothSftTrainer)  # no Unsloth import: only the matrix is asked (the options
    with pytest.raises(InvalidOptionError, match="does not pack"):  # class refuses these first, test_unsloth.py)
        check_supported(trainer, TrainOptions(packing=True))
    with pytest.raises(InvalidOptionError, match="adapters would be skipped"):
        check_supported(trainer, TrainOptions(method="bottleneck"))
    with pytest.raises(InvalidOptionError, match="packing"):
        llmtune.get_trainer("sft", method="prompt_tuning", packing=True)
    for name in ("pretrain", "dpo", "reward"):  # packing would be silently ignored there: refused instead
        assert support_of(type(llmtune.get_trainer(name))).packing == ()
        with pytest.raises(InvalidOptionError, match=f"objective '{name}' does not pack"):
            llmtune.get_trainer(name, packing=True)


def test_export_refuses_a_bottleneck_run(tok: Any, split: Any, tmp_path: Path) -> None:
    from llmtune.core.errors import MergeNotSupportedError
    from llmtune.export import resolve_source

    train, _ = split
    result = llmtune.get_trainer("lora", **FAST, method="bottleneck", bottleneck_size=4).train(
        tiny(tok), train, tokenizer=tok, output_dir=tmp_path / "run", max_steps=1)
    for path in (tmp_path / "run", result.adapter_dir):
        with pytest.raises(MergeNotSupportedError, match="bottleneck adapter cannot be exported"):
            resolve_source(path)
