"""Preference groups: ranking expansion, ties, per-prompt batching; the RLHF losses on hand-made numbers."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.trainers.rlhf.losses import bradley_terry_loss, grpo_advantages, preference_loss, rloo_advantages
from llmtune.trainers.rlhf.pairs import (
    collate_groups,
    encode_group,
    expected_pairs,
    group_texts,
    preference_groups,
    ranking_pairs,
)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7])
def test_k_distinct_ranks_give_k_choose_2_pairs(k: int) -> None:
    pairs = ranking_pairs(list(range(k))[::-1])
    assert len(pairs) == k * (k - 1) // 2
    assert len(set(pairs)) == len(pairs)


def test_ties_give_no_pair_between_tied_answers() -> None:
    ranking = [1, 0, 1, 2]  # answers 0 and 2 tied
    pairs = ranking_pairs(ranking)
    assert pairs == [(1, 0), (1, 2), (1, 3), (0, 3), (2, 3)]
    assert (0, 2) not in pairs and (2, 0) not in pairs
    assert len(pairs) == 6 - 1


@given(st.lists(st.integers(0, 4), min_size=2, max_size=8))
def test_pairs_are_exactly_the_strictly_ordered_ones(ranking: list[int]) -> None:
    pairs = ranking_pairs(ranking)
    want = {(a, b) for a, b in itertools.permutations(range(len(ranking)), 2) if ranking[a] < ranking[b]}
    assert set(pairs) == want and len(pairs) == len(want) == expected_pairs(ranking)


def test_batch_encodes_each_answer_once(tok: object) -> None:
    g1 = encode_group("<p1>", ["a<|eot_id|>", "bb<|eot_id|>", "ccc<|eot_id|>", "d<|eot_id|>"], [0, 1, 2, 3], tok)
    g2 = encode_group("<p2>", ["x<|eot_id|>", "y<|eot_id|>"], [1, 0], tok)
    batch = collate_groups([g1, g2], tok.pad_token_id)  # type: ignore[attr-defined]
    assert batch["input_ids"].shape[0] == 4 + 2  # 6 rows for 6 + 1 = 7 pairs
    assert batch["chosen"].numel() == 7
    assert batch["chosen"].tolist()[-1] == 5 and batch["rejected"].tolist()[-1] == 4  # y beats x, rows offset by 4
    # the completion mask covers exactly the answer tokens of each row
    for row, ans in enumerate(g1.response_ids + g2.response_ids):
        assert int(batch["completion_mask"][row].sum()) == len(ans)


def test_group_texts_render_prompt_once_through_the_template(tok: object) -> None:
    record = SimpleNamespace(prompt=[{"role": "user", "content": "Kopi O?"}], where="prefs.jsonl:3",
                             responses=[{"role": "assistant", "content": "Black coffee."},
                                        {"role": "assistant", "content": "Tea."}], ranking=[0, 1])
    prompt, texts, ranking = group_texts(record, "llama3", tok)  # type: ignore[arg-type]
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert texts == ["Black coffee.<|eot_id|>", "Tea.<|eot_id|>"] and ranking == [0, 1]
    pair = {"prompt": "Kopi O?", "chosen": "Black coffee.", "rejected": "Tea."}
    (g,) = preference_groups([pair], tok, template="chatml")  # type: ignore[arg-type]
    assert g.pairs == [(0, 1)]
    assert tok.decode(g.response_ids[0]) == "Black coffee.<|im_end|>"  # type: ignore[attr-defined]


def test_margins_and_errors(tok: object) -> None:
    g = encode_group("p", ["a", "b", "c"], [0, 1, 3], tok, margin_per_rank=0.5)  # type: ignore[arg-type]
    assert g.margins == [0.5, 1.5, 1.0]
    with pytest.raises(ConfigError, match="rec:7: ranking"):
        encode_group("p", ["a", "b"], [0], tok, where="rec:7")  # type: ignore[arg-type]


def test_bradley_terry_matches_formula() -> None:
    c, r, m = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([0.5, 0.0])
    want = -(math.log(1 / (1 + math.exp(-0.5))) + math.log(1 / (1 + math.exp(2.0)))) / 2
    assert bradley_terry_loss(c, r, m).item() == pytest.approx(want, abs=1e-6)


def test_dpo_of_identical_policy_and_reference_is_ln2() -> None:
    x = torch.tensor([-3.0, -7.5])
    out = preference_loss(x, x + 1, x, x + 1, loss_type="dpo", beta=0.3)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    smooth = preference_loss(x + 1, x, x, x, loss_type="dpo", beta=1.0, label_smoothing=0.2).loss.item()
    want = -(0.8 * math.log(1 / (1 + math.exp(-1))) + 0.2 * math.log(1 / (1 + math.exp(1))))
    assert smooth == pytest.approx(want, abs=1e-6)


def test_reference_free_losses_and_option_errors() -> None:
    lc, lr, n = torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([2.0])
    simpo = preference_loss(lc, lr, chosen_tokens=n, rejected_tokens=n, loss_type="simpo", beta=2.0, simpo_gamma=1.0)
    assert simpo.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-(2.0 * 2.0 - 1.0)))), abs=1e-6)
    orpo = preference_loss(lc, lr, chosen_tokens=n, rejected_tokens=n, loss_type="orpo", beta=0.1)
    odds = (-1 - math.log1p(-math.exp(-1))) - (-3 - math.log1p(-math.exp(-3)))
    assert orpo.loss.item() == pytest.approx(1.0 - 0.1 * math.log(1 / (1 + math.exp(-odds))), abs=1e-5)
    with pytest.raises(InvalidOptionError, match="loss_type"):
        preference_loss(lc, lr, loss_type="kto")
    with pytest.raises(InvalidOptionError, match="reference"):
        preference_loss(lc, lr, loss_type="ipo", chosen_tokens=n, rejected_tokens=n)


def test_advantages() -> None:
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    loo = rloo_advantages(r)
    assert loo[0].tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0])
    assert loo.sum().item() == pytest.approx(0.0, abs=1e-6)
    g = grpo_advantages(r)
    assert g.mean().item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(InvalidOptionError):
        rloo_advantages(torch.ones(3, 1))


def test_answers_are_never_truncated_nor_paired_with_their_own_tokens(tok):
    """An answer that does not fit max_length after the prompt would lose its end token (and long answers become
    token-identical): an error naming the record and the answer; two answers with the same tokens and different
    ranks would make a pair of equal answers: an error; tied copies make no pair and are kept."""
    prompt = "<|start_header_id|>user<|end_header_id|>\n\nKopi?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    long = "Coffee " * 30
    with pytest.raises(ConfigError, match=r"prefs.jsonl:3: chosen: prompt \(\d+ tokens\) \+ answer \(\d+ tokens\) "
                                          r"exceed max_length=24.*raise max_length to \d+"):
        encode_group(prompt, [long + "sugar.<|eot_id|>", "Tea.<|eot_id|>"], [0, 1], tok, max_length=24,
                     where="prefs.jsonl:3", names=("chosen", "rejected"))
    with pytest.raises(ConfigError, match=r"record: responses\[2\] is the same tokens as responses\[0\]"):
        encode_group(prompt, ["Tea.<|eot_id|>", "Kopi.<|eot_id|>", "Tea.<|eot_id|>"], [0, 1, 2], tok)
    tied = encode_group(prompt, ["Tea.<|eot_id|>", "Kopi.<|eot_id|>", "Tea.<|eot_id|>"], [0, 1, 0], tok)
    assert tied.pairs == [(0, 1), (2, 1)] and all(a != b for a, b in tied.pairs)
    fits = encode_group(prompt, ["Tea.<|eot_id|>", "Kopi.<|eot_id|>"], [0, 1], tok, max_length=len(
        tok(prompt + "Kopi.<|eot_id|>", add_special_tokens=False)["input_ids"]))
    assert all(ans[-1] == tok.convert_tokens_to_ids("<|eot_id|>") for ans in fits.response_ids)
