"""The demo's second act: a bundled "human" ranks the SFT model's answers; reward model; RLOO; win-rate vs SFT.

The "human" is a deterministic rule (`human_ranking`), so every run ranks the same answers the same way:

1. **correct order first**: an answer with exactly the words of the drink's correct English description
   (case, punctuation and word order ignored) beats every answer without (`GRADE` = 1.0: right or wrong;
   a finer grade ranks wrong answers by word-level F1 against the description, in steps of `GRADE`);
2. **then brevity**: between answers equally correct, the shorter (fewer characters) is better;
3. answers equal on both are tied (no preference between them).

`run_rlhf_act` samples K answers per training prompt from the SFT model, ranks them with the rule, trains a
reward model (objective ``reward``) on the rankings, then improves the policy with RLOO against that reward
model, and measures on held-out drinks: mean reward-model reward and the rule's win-rate of the new policy's
greedy answers against the SFT model's.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def correctness(answer: str, reference: str) -> float:
    """Word-level F1 of ``answer`` against ``reference`` (bag of words, case and punctuation ignored)."""
    a, r = _words(answer), _words(reference)
    if not a or not r:
        return 0.0
    common = sum(min(a.count(w), r.count(w)) for w in set(a))
    if common == 0:
        return 0.0
    p, q = common / len(a), common / len(r)
    return 2 * p * q / (p + q)


#: how finely the "human" grades correctness: 1.0 = only right or wrong (exact words), 0.01 = word-F1 to 2 places
GRADE = 1.0


def human_key(answer: str, reference: str, grade: float | None = None) -> tuple[float, int]:
    """The rule's sort key (smaller = better): (-correctness graded to ``grade``, length in characters)."""
    step = GRADE if grade is None else grade
    graded = math.floor(correctness(answer, reference) / step + 1e-9) * step
    return (-graded, len(answer.strip()))


def human_ranking(answers: Sequence[str], reference: str) -> list[int]:
    """Ranks (0 = best, ties share a rank) the bundled "human" gives ``answers`` for a drink described ``reference``."""
    keys = [human_key(a, reference) for a in answers]
    distinct = sorted(set(keys))
    return [distinct.index(k) for k in keys]


def win_rate(new: Sequence[str], old: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of prompts where the rule prefers ``new`` over ``old`` (a tie counts one half)."""
    score = 0.0
    for a, b, ref in zip(new, old, references):
        ka, kb = human_key(a, ref), human_key(b, ref)
        score += 1.0 if ka < kb else 0.5 if ka == kb else 0.0
    return score / len(references)


def all_pairs_win_rate(new: Sequence[str], old: Sequence[str], reference: str) -> float:
    """Fraction of (new answer, old answer) pairs of one prompt where the rule prefers the new (ties: one half)."""
    return win_rate([a for a in new for _ in old], [b for _ in new for b in old], [reference] * (len(new) * len(old)))


def _decode(tokenizer: Any, ids: Sequence[int], stops: set[int]) -> str:
    kept = [t for t in ids if t not in stops]
    return str(tokenizer.decode(kept, skip_special_tokens=True)).strip()


def ranked_groups(model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], *, k: int, template: str,
                  max_new_tokens: int, temperature: float, seed: int, add_reference: bool = False) -> list[Any]:
    """Sample ``k`` answers per record from ``model``, rank them with the rule, return the groups with pairs.

    ``add_reference``: the record's own answer joins the sampled ones (the "human" also writes the right
    answer, as the labellers of InstructGPT wrote demonstrations); it then ranks first unless a sample ties it.
    """
    from llmtune.data.templates import render_segments, stop_token_ids
    from llmtune.trainers.rlhf.pairs import Group, ranking_pairs

    stops = set(stop_token_ids(template, tokenizer))
    prompts = prompt_ids(records, tokenizer, template)
    outs, texts = _answers(model, tokenizer, prompts, template, max_new_tokens, k=k, temperature=temperature,
                           seed=seed)
    groups = []
    for i, rec in enumerate(records):
        answers, shown = outs[i * k:(i + 1) * k], texts[i * k:(i + 1) * k]
        if add_reference:
            ids = list(tokenizer(render_segments(rec, template, tokenizer)[-1].text, add_special_tokens=False)["input_ids"])
            answers, shown = [*answers, ids], [*shown, _decode(tokenizer, ids, stops)]
        pairs = ranking_pairs(human_ranking(shown, rec["output"]))
        if pairs:
            groups.append(Group(prompts[i], answers, pairs, where=f"record {i}"))
    return groups


def prompt_ids(records: Sequence[dict[str, Any]], tokenizer: Any, template: str) -> list[list[int]]:
    """Each record's prompt, rendered with ``template`` up to the answer, as token ids."""
    from llmtune.data.templates import render_prompt

    return [list(tokenizer(render_prompt(r, template, tokenizer)[0], add_special_tokens=False)["input_ids"])
            for r in records]


def _answers(model: Any, tokenizer: Any, prompts: list[list[int]], template: str, max_new_tokens: int, *,
             k: int = 1, temperature: float = 1.0, seed: int = 0) -> tuple[list[list[int]], list[str]]:
    """``k`` sampled answers per prompt (prompt-major), or the greedy answer when ``k`` is 0: ids and texts."""
    import torch

    from llmtune.data.templates import stop_token_ids
    from llmtune.trainers.rlhf.online import sample

    stops = stop_token_ids(template, tokenizer)
    torch.manual_seed(seed)
    outs = []
    for start in range(0, len(prompts), 32):
        outs += sample(model, prompts[start:start + 32], k=max(k, 1), pad_id=tokenizer.pad_token_id, stop_ids=stops,
                       max_new_tokens=max_new_tokens, temperature=temperature, do_sample=k > 0)
    return outs, [_decode(tokenizer, o, set(stops)) for o in outs]


def compare_policies(policy: Any, reward: Any, tokenizer: Any, prompts: list[list[int]], refs: list[str], *,
                     template: str, max_new_tokens: int, k: int, temperature: float, seed: int,
                     prefix: str) -> dict[str, float]:
    """The policy with its adapter (``rl``) against itself with the adapter off (``sft``) on held-out prompts.

    ``k`` > 0: ``k`` sampled answers per prompt at ``temperature`` (the policy as RL trains it); the win-rate
    compares every RL answer with every SFT answer of the same prompt. ``k`` = 0: one greedy answer each.
    """
    from llmtune.trainers.rlhf.dpo import adapter_off

    def answers() -> tuple[list[list[int]], list[str]]:  # the same seed for both: common random numbers
        return _answers(policy, tokenizer, prompts, template, max_new_tokens, k=k, temperature=temperature, seed=seed)

    with adapter_off(policy):
        sft_ids, sft_text = answers()
    rl_ids, rl_text = answers()
    n = max(k, 1)
    rows = [p for p in prompts for _ in range(n)]
    sft_r = reward.score_ids([p + a for p, a in zip(rows, sft_ids)])
    rl_r = reward.score_ids([p + a for p, a in zip(rows, rl_ids)])
    wins = [all_pairs_win_rate(rl_text[i * n:(i + 1) * n], sft_text[i * n:(i + 1) * n], refs[i])
            for i in range(len(prompts))]
    per = [refs[i // n] for i in range(len(rows))]
    out = {"reward_sft": sum(sft_r) / len(sft_r), "reward_rl": sum(rl_r) / len(rl_r),
           "win_rate_vs_sft": sum(wins) / len(wins),
           "reward_model_win_rate_vs_sft": sum(1.0 if a > b else 0.5 if a == b else 0.0
                                               for a, b in zip(rl_r, sft_r)) / len(rl_r),
           "correctness_sft": sum(correctness(a, r) for a, r in zip(sft_text, per)) / len(per),
           "correctness_rl": sum(correctness(a, r) for a, r in zip(rl_text, per)) / len(per),
           "exact_match_sft": sum(a == r for a, r in zip(sft_text, per)) / len(per),
           "exact_match_rl": sum(a == r for a, r in zip(rl_text, per)) / len(per)}
    examples = [{"reference": r, "sft": a, "rl": b} for r, a, b in list(zip(per, sft_text, rl_text))[:5 * n:n]]
    return {f"{prefix}{key}": v for key, v in out.items()} | {f"{prefix}samples": examples}  # type: ignore[dict-item]


DEFAULTS: dict[str, Any] = {
    "samples": 4, "rank_samples": 8, "temperature": 0.7, "eval_samples": 8, "rm_method": "lora", "rank_reference": True,
    "rm_steps": 200, "rm_lr": 2e-3, "rm_batch": 8, "rl_steps": 60, "rl_lr": 3e-4, "rl_prompts_per_step": 8,
    "kl_coef": 2.0, "rank": 16, "alpha": 32,
    "max_new_tokens": 24,
}


def _split(records: Sequence[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Reward-model train / validation prompts: by drink (a stable hash), 20% validation."""
    from llmtune.data.kopitiam import is_heldout, order_of

    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    for r in records:
        (val if is_heldout(order_of(r), 0.2, seed + 1) else train).append(r)
    return train, val


def run_rlhf_act(sft_model: Any, tokenizer: Any, train: Sequence[dict[str, Any]], heldout: Sequence[dict[str, Any]],
                 out: Any, *, seed: int = 0, settings: dict[str, Any] | None = None, template: str = "llama3",
                 echo: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Rankings -> reward model -> RLOO on the SFT model; returns the act's summary (numbers only)."""
    import copy
    from pathlib import Path

    from llmtune.data.templates import stop_token_ids
    from llmtune.trainers.rlhf.dpo import add_policy_adapter
    from llmtune.trainers.rlhf.online import OnlineOptions, train_online
    from llmtune.trainers.rlhf.reward import RewardOptions, reward_model_from_causal_lm, train_reward

    cfg = {**DEFAULTS, **(settings or {})}
    out = Path(out)
    t0 = time.perf_counter()
    rm_train, rm_val = _split(train, seed)
    gen = {"k": cfg["rank_samples"] or cfg["samples"], "template": template, "max_new_tokens": cfg["max_new_tokens"],
           "temperature": cfg["temperature"]}
    groups = ranked_groups(sft_model, tokenizer, rm_train, seed=seed, add_reference=cfg["rank_reference"], **gen)
    val_groups = ranked_groups(sft_model, tokenizer, rm_val, seed=seed + 1, **gen)
    held_groups = ranked_groups(sft_model, tokenizer, heldout, seed=seed + 2, **gen)
    n_pairs = sum(len(g.pairs) for g in groups)
    echo(f"      the rule ranked {gen['k']} sampled answers for {len(rm_train)} prompts: {len(groups)} "
         f"rankings with a preference, {n_pairs} pairs")
    rm = reward_model_from_causal_lm(sft_model, tokenizer, seed=seed)
    rm_opts = RewardOptions(method=cfg["rm_method"], rank=cfg["rank"], alpha=cfg["alpha"], lr=cfg["rm_lr"], steps=cfg["rm_steps"],
                            batch_size=cfg["rm_batch"], eval_every=max(1, cfg["rm_steps"] // 3), seed=seed)
    reward = train_reward(rm, tokenizer, groups, eval_groups=val_groups, options=rm_opts,
                          log_path=out / "reward" / "log.jsonl")
    val_acc = reward.eval_accuracy
    held_acc = reward.model.pairwise_accuracy(held_groups)
    reward.model.save(out / "reward" / "model")
    echo(f"      reward model: pairwise accuracy {val_acc:.3f} on validation prompts, {held_acc:.3f} on held-out "
         f"drinks ({sum(len(g.pairs) for g in held_groups)} pairs)")

    policy = add_policy_adapter(copy.deepcopy(sft_model), rank=cfg["rank"], alpha=cfg["alpha"])
    stops = stop_token_ids(template, tokenizer)
    prompts = prompt_ids(train, tokenizer, template)
    rl_opts = OnlineOptions(samples=cfg["samples"], kl_coef=cfg["kl_coef"], temperature=cfg["temperature"],
                            max_new_tokens=cfg["max_new_tokens"], lr=cfg["rl_lr"], steps=cfg["rl_steps"],
                            prompts_per_step=cfg["rl_prompts_per_step"], seed=seed)
    online = train_online(policy, tokenizer, prompts, reward_fn=reward.model.score_ids, stop_ids=stops,
                          options=rl_opts, log_path=out / "rloo" / "log.jsonl")
    policy.save_pretrained(str(out / "rloo" / "adapter"))

    held_prompts = prompt_ids(heldout, tokenizer, template)
    refs = [r["output"] for r in heldout]
    common = {"template": template, "max_new_tokens": cfg["max_new_tokens"], "temperature": cfg["temperature"]}
    sampled = compare_policies(policy, reward.model, tokenizer, held_prompts, refs, k=cfg["eval_samples"],
                               seed=seed + 3, prefix="heldout_", **common)
    greedy = compare_policies(policy, reward.model, tokenizer, held_prompts, refs, k=0, seed=seed, prefix="greedy_",
                              **common)
    summary = {
        "rm_pairs": n_pairs, "rm_rankings": len(groups), "rm_val_pairwise_accuracy": val_acc,
        "rm_heldout_pairwise_accuracy": held_acc, "rm_loss_first": reward.history[0]["loss"],
        "rm_loss_last": [r for r in reward.history if "loss" in r][-1]["loss"],
        **sampled, **greedy, "win_rate_vs_sft": sampled["heldout_win_rate_vs_sft"],
        "rl_reward_first": online.history[0]["reward"], "rl_reward_last": online.history[-1]["reward"],
        "rl_kl_last": online.history[-1]["kl"], "rlhf_seconds": time.perf_counter() - t0, "rlhf_settings": cfg,
    }
    return summary
