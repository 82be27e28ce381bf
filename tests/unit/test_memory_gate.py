"""The pre-run memory gate: every trainer/quantizer option mapped or declared irrelevant; configs estimated."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmtune.memory import GPUS, PRESETS, ModelSpec, estimate_training
from llmtune.memory.recipes import RECIPE_FACTS
from llmtune.trainers._memory_gate import IRRELEVANT, MAPPED, estimate_for_config, model_spec, training_arguments


def _options_classes():
    from llmtune.quantizers.bnb import FourBitOptions, Int8Options
    from llmtune.trainers.peft import PeftLoraOptions

    return {"PeftLoraOptions": PeftLoraOptions, "FourBitOptions": FourBitOptions, "Int8Options": Int8Options}


@pytest.mark.parametrize("name", ["PeftLoraOptions", "FourBitOptions", "Int8Options"])
def test_every_option_is_mapped_or_declared_irrelevant(name):
    """A new trainer or quantizer option fails here until the gate maps it or says why it does not matter;
    a name in the tables that is no longer an option fails too."""
    fields = {f.name for f in dataclasses.fields(_options_classes()[name])}
    mapped, irrelevant = set(MAPPED.get(name, {})), set(IRRELEVANT.get(name, {}))
    assert not mapped & irrelevant, f"{name}: both mapped and irrelevant: {sorted(mapped & irrelevant)}"
    assert fields - mapped - irrelevant == set(), f"{name}: options neither mapped nor declared irrelevant"
    assert (mapped | irrelevant) - fields == set(), f"{name}: stale names in the gate's tables"


def test_unsloth_options_add_nothing_unmapped():
    from llmtune.trainers.peft import PeftLoraOptions
    from llmtune.trainers.unsloth import UnslothLoraOptions

    assert {f.name for f in dataclasses.fields(UnslothLoraOptions)} == {f.name for f in dataclasses.fields(PeftLoraOptions)}


def _write(tmp_path, model: str, trainer: str, quantizer: str = "") -> object:
    from llmtune.trainers._config import load_config

    (tmp_path / model).mkdir()
    (tmp_path / model / "config.json").write_text(json.dumps(PRESETS[model].config))
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "c.yaml").write_text(f"model: ./{model}\ndata: train.jsonl\ntrainer:\n{trainer}{quantizer}")
    return load_config(tmp_path / "c.yaml")


def test_demo_shaped_config_equals_direct_estimate(tmp_path):
    """A LoRA config: the gate's estimate is estimate_training with the options' values, and fits everywhere."""
    cfg = _write(tmp_path, "llama-3.2-1b", "  rank: 8\n  batch_size: 4\n  max_length: 512\n  dropout: 0.0\n"
                                          "  gradient_checkpointing: true\n  loss_chunk_tokens: 256\n")
    est, rows = estimate_for_config(cfg)
    direct = estimate_training(ModelSpec.from_preset("llama-3.2-1b"), "lora", batch_size=4, seq_len=512, lora_rank=8,
                               gradient_checkpointing=True, recipe="llmtune", loss_chunk_tokens=256)
    assert est.peak_tensor_bytes == direct.peak_tensor_bytes
    assert [r["gpu"] for r in rows] == list(GPUS) and all(r["fits"] for r in rows)


def test_70b_qlora_config_verdict_per_gpu(tmp_path):
    """Llama-3.1-70B QLoRA (nf4) at batch 1 x 2048: fits an 80 GB GPU, not a 40 GB one; non-default skip_modules noted."""
    cfg = _write(tmp_path, "llama-3.1-70b", "  batch_size: 1\n  max_length: 2048\n  gradient_checkpointing: true\n",
                 "quantizer:\n  name: nf4\n  skip_modules: [lm_head, '*.mlp.down_proj']\n")
    est, rows = estimate_for_config(cfg)
    verdict = {r["gpu"]: r["fits"] for r in rows}
    assert verdict["A100-80GB"] and verdict["H100-80GB"] and not verdict["A100-40GB"] and not verdict["L4"]
    assert "weights_nf4" in est.breakdown and any("skip_modules" in n for n in rows[0]["notes"])
    one = estimate_for_config(cfg, "H100")[1]
    assert len(one) == 1 and one[0]["gpu"] == "H100"


def test_options_become_recipe_facts():
    from llmtune.trainers.peft import PeftLoraOptions

    kw, _ = training_arguments(PeftLoraOptions(upcast_embeddings=True, loss_chunk_tokens=0), "peft")
    assert kw["recipe"].kbit_upcast_fp32 and kw["recipe"].loss == "full_fp32"
    kw, _ = training_arguments(PeftLoraOptions(dropout=0.0), "unsloth")
    assert kw["recipe"] == RECIPE_FACTS["unsloth"]


def test_model_spec_from_hub_id_and_error():
    assert model_spec("meta-llama/Llama-3.1-8B").num_params == PRESETS["llama-3.1-8b"].published_params
    from llmtune.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"no local config\.json"):
        model_spec("someone/unknown-model")


def test_bottleneck_options_reach_the_estimator():
    pytest.importorskip("bitsandbytes")
    import llmtune
    from llmtune.trainers.peft import PeftLoraOptions

    opts = PeftLoraOptions(method="bottleneck", bottleneck_size=32, bottleneck_sites=("attn", "mlp"),
                           bottleneck_placement="parallel", quantizer=llmtune.get_quantizer("nf4"))
    kw, notes = training_arguments(opts, "peft")
    assert kw["method"] == "bottleneck" and "weight_format" not in kw
    assert kw["bottleneck_sites"] == ("attention", "mlp") and kw["bottleneck_size"] == 32
    assert any("bottleneck on a quantized base" in n for n in notes)
    spec = ModelSpec.from_preset("llama-3.2-1b")
    from llmtune.memory.mechanisms import adapter_params

    assert estimate_training(spec, **kw).peak_tensor_bytes > 0
    # the memory model's count is the formula the trainer's bottleneck adapters have (tests/integration/test_bottleneck)
    assert adapter_params(spec, "bottleneck", num_virtual_tokens=kw["num_virtual_tokens"], bottleneck_size=32,
                          sites=kw["bottleneck_sites"]) == spec.num_layers * 2 * (2 * spec.hidden_size * 32 + 32
                                                                                  + spec.hidden_size)


def test_pretrain_options_add_only_irrelevant_fields():
    from llmtune.trainers._memory_gate import IRRELEVANT
    from llmtune.trainers.options import PretrainOptions, TrainOptions

    extra = {f.name for f in dataclasses.fields(PretrainOptions)} - {f.name for f in dataclasses.fields(TrainOptions)}
    assert extra == set(IRRELEVANT["PretrainOptions"])


@pytest.mark.parametrize("name", ["DpoTrainOptions", "RewardTrainOptions", "OnlineTrainOptions"])
def test_preference_and_online_options_are_mapped_or_declared_irrelevant(name):
    """The fields objectives dpo / reward / rloo+grpo add to `TrainOptions`: each mapped or declared irrelevant."""
    from llmtune.trainers._memory_gate import IRRELEVANT, MAPPED
    from llmtune.trainers.objectives.dpo import DpoTrainOptions, RewardTrainOptions
    from llmtune.trainers.objectives.online import OnlineTrainOptions
    from llmtune.trainers.options import TrainOptions

    cls = {"DpoTrainOptions": DpoTrainOptions, "RewardTrainOptions": RewardTrainOptions,
           "OnlineTrainOptions": OnlineTrainOptions}[name]
    extra = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(TrainOptions)}
    mapped, irrelevant = set(MAPPED[name]), set(IRRELEVANT[name])
    assert not mapped & irrelevant and extra == mapped | irrelevant, (name, extra, mapped, irrelevant)


def test_dpo_precomputed_reference_reaches_the_estimate():
    from llmtune.memory import ModelSpec, estimate_training

    spec = ModelSpec.from_preset("llama-3.2-1b")
    kw = {"batch_size": 2, "seq_len": 256, "gradient_checkpointing": True, "objective": "dpo"}
    full_copy = estimate_training(spec, "full", **kw)  # full fine-tuning without precomputing: a second model
    full_pre = estimate_training(spec, "full", dpo_reference="precomputed", **kw)
    assert "reference_weights" in full_copy.breakdown and "reference_weights" not in full_pre.breakdown
    assert full_copy.device_bytes - full_pre.device_bytes >= full_copy.breakdown["reference_weights"] * 0.99
    assert any("computed once before training" in n for n in full_pre.assumptions)
    lora = estimate_training(spec, "lora", **kw)
    assert "reference_weights" not in lora.breakdown


def test_every_config_key_is_declared():
    """A new top-level config key fails here until the gate says how it treats it."""
    from llmtune.trainers._config import TOP_LEVEL
    from llmtune.trainers._memory_gate import CONFIG_KEYS

    assert set(TOP_LEVEL) == set(CONFIG_KEYS)


def test_eval_tasks_are_named_as_not_modelled(tmp_path):
    """A config with eval_tasks gets a note saying task scoring is not in the estimate."""
    cfg = _write(tmp_path, "llama-3.2-1b", "  rank: 8\neval_tasks: [kopitiam-mc]\n")
    _, rows = estimate_for_config(cfg, gpu="A100-80GB")
    assert any(n.startswith("eval_tasks:") for n in rows[0]["notes"])


def test_dpo_config_is_estimated_with_its_rankings_rows_and_full_vocabulary_log_probs(tmp_path):
    """A ranking of 8 answers next to pairs, batch 2: the largest micro-batch holds 8 + 2 rows (5 per example), and
    DPO's log-probs are full-vocabulary fp32 (llmtune's DPO does not chunk them)."""
    cfg = _write(tmp_path, "llama-3.2-1b", "  name: dpo\n  batch_size: 2\n  max_length: 256\n")
    rows = [{"prompt": "Kopi?", "responses": [f"Answer {i}." for i in range(8)], "ranking": list(range(8))},
            {"prompt": "Teh?", "chosen": "Tea with milk.", "rejected": "Coffee."}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    est, out = estimate_for_config(cfg)
    kw, _ = training_arguments(cfg.trainer.options, "peft")
    direct = estimate_training(ModelSpec.from_preset("llama-3.2-1b"), **{**kw, "recipe": dataclasses.replace(
        kw["recipe"], loss="full_fp32")}, objective="dpo", responses=5)
    assert est.peak_tensor_bytes == direct.peak_tensor_bytes
    assert any("rankings of up to 8 answers" in n and "10 answers" in n and "29 pairs" in n for n in out[0]["notes"])
