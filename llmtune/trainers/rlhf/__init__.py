"""RLHF as the lecture draws it: ranked answers -> a reward model -> a better policy; and DPO.

* `pairs`: preference data as per-prompt groups (a ranking of K answers -> its ordered pairs, each answer
  encoded once), through the chat templates;
* `losses`: Bradley-Terry, DPO / IPO / SimPO / ORPO, leave-one-out and group-relative advantages (pure torch);
* `reward`: a scalar head on a causal LM, trained on the groups, saved for ``AutoModelForSequenceClassification``;
* `dpo`: DPO-family training with the reference = the same base with the adapter off (or precomputed log-probs);
* `online`: RLOO / GRPO: sample K answers per prompt, score them with the reward model, KL to the reference;
* `trl_backend`: the same reward and DPO runs through TRL's ``RewardTrainer`` / ``DPOTrainer``.

Everything torch is imported by the submodules, never here.
"""
