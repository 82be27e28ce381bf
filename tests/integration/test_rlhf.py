"""Reward model and DPO on a tiny Llama: TRL's losses on the same batch, ln 2 at step 0, one copy of the base."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.trainers.callbacks import Callback
from llmtune.trainers.rlhf.pairs import collate_groups, encode_group

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _groups(tok: Any) -> list[Any]:
    p1 = "<|start_header_id|>user<|end_header_id|>\n\nKopi O?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    p2 = p1.replace("Kopi O", "Teh C Peng")
    return [encode_group(p1, ["Black coffee.<|eot_id|>", "Coffee with milk.<|eot_id|>", "Tea.<|eot_id|>"],
                         [0, 1, 2], tok),
            encode_group(p2, ["Iced tea with evaporated milk.<|eot_id|>", "Iced tea.<|eot_id|>"], [0, 1], tok)]


def _tiny(tok: Any, seed: int = 0) -> Any:
    from llmtune.models.tiny import build_tiny_model

    return build_tiny_model(tok, seed=seed)


def test_reward_loss_equals_trl_reward_trainer(tok: Any, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from llmtune.trainers.rlhf.reward import reward_loss, reward_model_from_causal_lm
    from llmtune.trainers.rlhf.trl_backend import reward_rows

    rm = reward_model_from_causal_lm(_tiny(tok), tok, seed=1)
    groups = _groups(tok)
    rows = reward_rows(groups)
    assert len(rows) == 3 + 1  # the ranking of 3 gives 3 pairs
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RewardTrainer(model=rm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.model.eval()
    trl_inputs = trainer.data_collator(rows)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(trl_inputs))
        ours, stats = reward_loss(trainer.model, collate_groups(groups, tok.pad_token_id))
    assert stats["sequences"] == 5 and stats["pairs"] == 4  # 5 answers scored once, TRL scores 8 rows
    assert abs(ours.item() - trl_loss.item()) < 1e-6
    margin_rows = [{**r, "margin": 0.25 * i} for i, r in enumerate(rows)]
    with torch.no_grad():
        trl_m = trainer.compute_loss(trainer.model, dict(trainer.data_collator(margin_rows)))
        batch = collate_groups(groups, tok.pad_token_id)
        batch["margin"] = torch.tensor([0.25 * i for i in range(4)])
        ours_m, _ = reward_loss(trainer.model, batch, use_margin=True)
    assert abs(ours_m.item() - trl_m.item()) < 1e-6


def _policy(tok: Any, nonzero: bool) -> Any:
    from llmtune.trainers.rlhf.dpo import add_policy_adapter

    policy = add_policy_adapter(_tiny(tok), rank=4, alpha=8)
    if nonzero:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return policy


@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_dpo_loss_equals_trl_dpo_trainer(tok: Any, tmp_path: Path, loss_type: str) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from llmtune.trainers.rlhf.dpo import DpoOptions, dpo_loss
    from llmtune.trainers.rlhf.trl_backend import TRL_DPO_LOSSES, dpo_rows

    groups = _groups(tok)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1, beta=0.2,
                     loss_type=[TRL_DPO_LOSSES[loss_type]])
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's reference: the same model with the adapter disabled
        trainer = DPOTrainer(model=_tiny(tok), args=args, train_dataset=Dataset.from_list(dpo_rows(groups, tok)),
                             processing_class=tok, peft_config=lora)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move the policy away from the reference
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    trainer.model.eval()
    examples = [{"prompt_ids": g.prompt_ids, "chosen_ids": g.response_ids[a], "rejected_ids": g.response_ids[b]}
                for g in groups for a, b in g.pairs]
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(trainer.data_collator(examples)))
        out, stats = dpo_loss(trainer.model, collate_groups(groups, tok.pad_token_id),
                              DpoOptions(loss_type=loss_type, beta=0.2))
    assert trl_loss.item() != pytest.approx(math.log(2), abs=1e-3)  # the adapter is not a no-op here
    assert abs(out.loss.item() - trl_loss.item()) < 1e-5
    assert stats["pairs"] == 4


def test_dpo_step0_is_ln2_and_one_copy_of_the_base(tok: Any, tmp_path: Path) -> None:
    from llmtune.trainers.rlhf.dpo import DpoOptions, train_dpo

    base = _tiny(tok)
    n_base = sum(p.numel() for p in base.parameters())
    policy = _policy(tok, nonzero=False)
    n_adapter = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    lin = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    assert n_adapter == sum(4 * (m.in_features + m.out_features) for m in lin)
    assert sum(p.numel() for p in policy.parameters()) == n_base + n_adapter  # no reference copy anywhere
    result = train_dpo(policy, tok, _groups(tok), options=DpoOptions(steps=3, batch_size=2, lr=1e-2),
                       log_path=tmp_path / "log.jsonl")
    first = result.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["reward_margin"] == 0.0 and first["rewards_chosen"] == 0.0
    assert result.history[-1]["loss"] < math.log(2)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(k in lines[0] for k in ("logps_chosen", "logps_rejected", "reward_margin",
                                                           "accuracy"))


def test_precomputed_reference_equals_adapter_off(tok: Any) -> None:
    from llmtune.trainers.rlhf.dpo import DpoOptions, dpo_loss, reference_logps

    policy = _policy(tok, nonzero=True)
    groups = _groups(tok)
    refs = reference_logps(policy, groups, tok.pad_token_id)
    batch = collate_groups(groups, tok.pad_token_id)
    with torch.no_grad():
        live, _ = dpo_loss(policy.eval(), batch, DpoOptions())
        pre, _ = dpo_loss(policy, batch, DpoOptions(reference="precomputed"),
                          torch.tensor([x for r in refs for x in r]))
    assert abs(live.loss.item() - pre.loss.item()) < 1e-6


def test_reward_model_saves_for_auto_model_for_sequence_classification(tok: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from llmtune.trainers.rlhf.reward import RewardOptions, reward_model_from_causal_lm, train_reward

    rm = reward_model_from_causal_lm(_tiny(tok), tok)
    groups = _groups(tok)
    result = train_reward(rm, tok, groups, eval_groups=groups, options=RewardOptions(steps=4, batch_size=2,
                                                                                    eval_every=2, lr=5e-3))
    assert any("eval_pairwise_accuracy" in r for r in result.history)
    prompt = tok.decode(groups[0].prompt_ids)
    want = result.model.score(prompt, "Black coffee.<|eot_id|>")
    result.model.save(tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    ids = tok(prompt + "Black coffee.<|eot_id|>", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        got = loaded(**ids).logits.item()
    assert got == pytest.approx(want, abs=1e-4)


def test_rloo_step_samples_k_scores_and_logs_kl(tok: Any, tmp_path: Path) -> None:
    from llmtune.trainers.rlhf.online import OnlineOptions, train_online

    policy = _policy(tok, nonzero=False)
    prompts = [g.prompt_ids for g in _groups(tok)]
    seen: list[int] = []

    def reward_fn(rows: list[list[int]]) -> list[float]:
        seen.append(len(rows))
        return [-float(len(r)) for r in rows]  # prefers short answers

    result = train_online(policy, tok, prompts, reward_fn=reward_fn, stop_ids=[tok.convert_tokens_to_ids("<|eot_id|>")],
                          options=OnlineOptions(samples=3, steps=2, prompts_per_step=2, max_new_tokens=6),
                          log_path=tmp_path / "log.jsonl")
    assert seen == [6, 6]  # K=3 answers for each of 2 prompts, per step
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # B=0: policy == reference at step 0
    assert {"reward", "kl", "advantage_std"} <= set(result.history[-1])


def test_dpo_trainer_on_the_recipe(tok: Any, tmp_path: Path) -> None:
    import llmtune

    records = [{"prompt": "What is Kopi O?", "responses": ["Black coffee.", "Tea.", "Coffee with milk."],
                "ranking": [0, 2, 1]},
               {"prompt": "What is Teh C?", "chosen": "Tea with evaporated milk.", "rejected": "Coffee."}] * 2
    trainer = llmtune.get_trainer("dpo", method="lora", rank=4, alpha=8, max_steps=3, batch_size=2, lr=1e-2,
                                  warmup=0, progress=False, beta=0.1)
    result = trainer.train(_tiny(tok), records, tokenizer=tok, output_dir=tmp_path / "run")
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # mean over the pairs at step 0
    assert result.history[-1]["loss"] < math.log(2)
    import json

    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "logps_chosen" in x]
    assert len(steps) == 3  # one per step, with the preference statistics
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6) and steps[0]["accuracy"] == 0.0
    assert steps[-1]["reward_margin"] > 0 and {"logps_rejected", "rewards_chosen", "rewards_rejected"} <= set(steps[-1])
    from llmtune.core.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match=r"reference='adapter_off': method 'full' has no adapter"):
        llmtune.get_trainer("dpo", method="full")
    with pytest.raises(InvalidOptionError, match=r"does not support method='prompt_tuning'"):
        llmtune.get_trainer("dpo", method="prompt_tuning")


def test_reward_trainer_on_the_recipe(tok: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    import llmtune
    from llmtune.trainers.rlhf.reward import reward_model_from_causal_lm

    records = [{"prompt": "What is Kopi O?", "responses": ["Black coffee.", "Tea.", "Coffee with milk."],
                "ranking": [0, 2, 1]},
               {"prompt": "What is Teh C?", "chosen": "Tea with evaporated milk.", "rejected": "Coffee."}] * 2
    trainer = llmtune.get_trainer("reward", max_steps=4, batch_size=2, lr=1e-3, warmup=0, progress=False)
    result = trainer.train(reward_model_from_causal_lm(_tiny(tok), tok), records, tokenizer=tok,
                           output_dir=tmp_path / "run")
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "run" / "model"))
    assert loaded.config.num_labels == 1 and type(loaded).__name__ == "LlamaForSequenceClassification"


_RECORDS = [{"prompt": "What is Kopi O?", "responses": ["Black coffee.", "Tea.", "Coffee with milk."],
             "ranking": [0, 2, 1]},
            {"prompt": "What is Teh C?", "chosen": "Tea with evaporated milk.", "rejected": "Coffee."}] * 2


def test_reward_trainer_with_lora_trains_the_score_head(tok: Any, tmp_path: Path) -> None:
    import llmtune
    from llmtune.trainers.rlhf.reward import reward_model_from_causal_lm

    rm = reward_model_from_causal_lm(_tiny(tok), tok)
    head = rm.score.weight.detach().clone()
    trainer = llmtune.get_trainer("reward", method="lora", rank=4, alpha=8, max_steps=4, batch_size=2, lr=1e-2,
                                  warmup=0, progress=False)
    result = trainer.train(rm, _RECORDS, tokenizer=tok, output_dir=tmp_path / "run")
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert {"accuracy", "margin"} <= set(result.history[-1])
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_" in k for k in saved)
    heads = [v for k, v in saved.items() if "score" in k]  # the head is saved beside the adapter
    assert len(heads) == 1 and heads[0].shape == head.shape and not torch.equal(heads[0], head)


def test_rloo_trainer_on_the_recipe(tok: Any, tmp_path: Path) -> None:
    import json

    import llmtune
    from llmtune.core.errors import ConfigError, InvalidOptionError
    from llmtune.trainers.rlhf.reward import RewardModel, reward_model_from_causal_lm

    RewardModel(reward_model_from_causal_lm(_tiny(tok, seed=1), tok), tok).save(tmp_path / "rm")
    prompts = [{"prompt": "What is Kopi O?"}, {"instruction": "What is Teh C?", "output": "Tea with milk."}] * 2
    trainer = llmtune.get_trainer("rloo", method="lora", rank=4, alpha=8, max_steps=2, batch_size=2,
                                  reward_model=str(tmp_path / "rm"), samples=3, max_new_tokens=6, warmup=0,
                                  progress=False)
    trainer.train(_tiny(tok), prompts, tokenizer=tok, output_dir=tmp_path / "run")
    steps = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [x for x in steps if "kl" in x]
    assert len(steps) == 2 and steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # B=0: policy == reference
    assert {"reward", "advantage_std", "completion_tokens"} <= set(steps[0])
    with pytest.raises(InvalidOptionError, match=r"does not support method='full'"):
        llmtune.get_trainer("grpo", method="full")
    with pytest.raises(ConfigError, match=r"reward_model=DIR"):
        llmtune.get_trainer("grpo", method="lora", max_steps=1, batch_size=2, progress=False).train(
            _tiny(tok), prompts, tokenizer=tok, output_dir=tmp_path / "run2")


def test_malformed_ranking_names_file_line_field_through_the_rlhf_paths(tok: Any, tmp_path: Path) -> None:
    import json

    import llmtune
    from llmtune.core.errors import ConfigError
    from llmtune.trainers.rlhf.pairs import load_preference_groups, preference_groups

    good = {"prompt": "What is Kopi O?", "responses": ["Black coffee.", "Tea."], "ranking": [0, 1]}
    bad = {"prompt": "What is Teh C?", "responses": ["Tea with milk.", "Coffee."], "ranking": [0]}
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    trainer = llmtune.get_trainer("dpo", method="lora", max_steps=1, batch_size=1, progress=False)
    with pytest.raises(ConfigError, match=r"prefs\.jsonl:2: field 'ranking'"):
        trainer.train(_tiny(tok), str(path), tokenizer=tok, output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"prefs\.jsonl:2: field 'ranking'"):
        load_preference_groups(str(path), tok)
    with pytest.raises(ConfigError, match=r"data\S*1\S*: field 'ranking'"):  # a list of dicts: record 1
        trainer.train(_tiny(tok), [good, bad], tokenizer=tok, output_dir=tmp_path / "run2")
    missing = {"prompt": "What is Teh C?", "responses": ["Tea with milk.", "Coffee."]}
    with pytest.raises(ConfigError, match=r"record 0: field 'ranking': missing"):
        preference_groups([missing], tok)


class _Parameters(Callback):
    """Elements of every `torch.nn.Parameter` alive at the end of each step (a copy of the model would add its own)."""

    def __init__(self) -> None:
        self.alive: list[int] = []

    @staticmethod
    def count() -> int:
        import gc

        gc.collect()
        return sum(o.numel() for o in gc.get_objects() if isinstance(o, torch.nn.Parameter))

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        self.alive.append(self.count())


class _StopAt(Callback):
    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        if record["step"] == 2:
            raise KeyboardInterrupt


def test_dpo_on_the_recipe_precomputed_reference_equals_adapter_off(tok: Any, tmp_path: Path) -> None:
    import llmtune

    opts = {"method": "lora", "rank": 4, "alpha": 8, "max_steps": 3, "batch_size": 2, "lr": 1e-2, "warmup": 0,
            "progress": False}
    live = llmtune.get_trainer("dpo", **opts).train(_tiny(tok), _RECORDS, eval_data=_RECORDS[:2], tokenizer=tok,
                                                    output_dir=tmp_path / "live")
    pre = llmtune.get_trainer("dpo", reference="precomputed", **opts).train(
        _tiny(tok), _RECORDS, eval_data=_RECORDS[:2], tokenizer=tok, output_dir=tmp_path / "pre")
    a, b = [r["loss"] for r in live.history], [r["loss"] for r in pre.history]
    assert a[0] == pytest.approx(math.log(2), abs=1e-6) and b[0] == pytest.approx(math.log(2), abs=1e-6)
    assert a == pytest.approx(b, abs=1e-6) and a[-1] < a[0]
    # the "before" evaluation scores the base itself (policy == reference: ln 2), also with adapter_off
    assert live.eval["before"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert live.eval["after"]["loss"] == pytest.approx(pre.eval["after"]["loss"], abs=1e-6)


def test_dpo_full_finetuning_with_precomputed_reference_holds_one_model(tok: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import llmtune

    opts = {"method": "full", "reference": "precomputed", "max_steps": 3, "batch_size": 2, "lr": 1e-3, "warmup": 0,
            "progress": False, "precision": "fp32"}
    model = _tiny(tok)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = _Parameters()
    before = seen.count()  # the model to train (and whatever else this process holds)
    result = llmtune.get_trainer("dpo", **opts).train(model, _RECORDS, tokenizer=tok, output_dir=tmp_path / "run",
                                                      callbacks=[seen])
    losses = [r["loss"] for r in result.history]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]
    assert seen.alive == [before] * 3  # no reference copy: the trained model's parameters are the only ones alive
    trained = AutoModelForCausalLM.from_pretrained(str(result.model_dir))
    changed = [k for k, v in trained.state_dict().items() if k in start and not torch.equal(v, start[k])]
    assert len(changed) >= len(start) // 2  # full fine-tuning moved the weights


def test_dpo_full_finetuning_resumes_exactly(tok: Any, tmp_path: Path) -> None:
    import llmtune

    opts = {"method": "full", "reference": "precomputed", "max_steps": 4, "batch_size": 2, "lr": 1e-3, "warmup": 0,
            "progress": False, "precision": "fp32"}
    whole = llmtune.get_trainer("dpo", **opts).train(_tiny(tok), _RECORDS, tokenizer=tok, output_dir=tmp_path / "a")
    model = _tiny(tok)
    with pytest.raises(KeyboardInterrupt):
        llmtune.get_trainer("dpo", **opts).train(model, _RECORDS, tokenizer=tok, output_dir=tmp_path / "b",
                                                 callbacks=[_StopAt()])
    assert (tmp_path / "b" / "reference_logps.json").is_file()
    import shutil

    from llmtune.core.errors import DamagedFileError

    shutil.copytree(tmp_path / "b", tmp_path / "c")
    (tmp_path / "c" / "reference_logps.json").write_text('{"fingerprint": ')  # truncated
    with pytest.raises(DamagedFileError, match=r"reference_logps.json: not the reference log-probs"):
        llmtune.get_trainer("dpo", **opts).train(_tiny(tok), _RECORDS, tokenizer=tok, output_dir=tmp_path / "c",
                                                 resume="auto")
    # resumed with the same in-memory model, which trained in place for 2 steps: the reference is still the
    # starting model's (read back from the run), so the curve and the weights are the uninterrupted run's
    resumed = llmtune.get_trainer("dpo", **opts).train(model, _RECORDS, tokenizer=tok,
                                                       output_dir=tmp_path / "b", resume="auto")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    a = (tmp_path / "a" / "model" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model" / "model.safetensors").read_bytes()


def test_grpo_trains_end_to_end_from_the_same_samples_as_rloo(tok: Any, tmp_path: Path) -> None:
    """Same seed, same start: step 1 samples the same answers (equal mean reward, KL 0); the advantages differ."""
    import json

    import llmtune
    from llmtune.trainers.rlhf.reward import RewardModel, reward_model_from_causal_lm

    RewardModel(reward_model_from_causal_lm(_tiny(tok, seed=1), tok), tok).save(tmp_path / "rm")
    prompts = [{"prompt": "What is Kopi O?"}, {"instruction": "What is Teh C?", "output": "Tea with milk."}] * 2
    opts = {"method": "lora", "rank": 4, "alpha": 8, "max_steps": 2, "batch_size": 2, "samples": 4,
            "reward_model": str(tmp_path / "rm"), "max_new_tokens": 6, "warmup": 0, "lr": 1e-2, "progress": False}
    rows = {}
    for name in ("rloo", "grpo"):
        result = llmtune.get_trainer(name, **opts).train(_tiny(tok), prompts, tokenizer=tok, output_dir=tmp_path / name)
        assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()
        lines = [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        rows[name] = [x for x in lines if "kl" in x]
    assert len(rows["grpo"]) == 2 and rows["grpo"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows["grpo"][0]["reward"] == rows["rloo"][0]["reward"]  # the same K answers were scored
    assert rows["grpo"][0]["advantage_std"] != pytest.approx(rows["rloo"][0]["advantage_std"], rel=1e-3)
