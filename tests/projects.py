"""A tiny training project on disk (a base model and its tokenizer in base/, 16 instruction records in
data/train.jsonl), shared by the CLI tests that train, damage and resume runs in real processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}


def make_project(root: Path, tok: Any) -> Path:
    """Write base/ (a seeded tiny Llama of `SMALL` size and ``tok``) and data/train.jsonl under ``root``."""
    import torch

    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model

    torch.set_num_threads(1)
    build_tiny_model(tok, seed=0, **SMALL).save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    (root / "data").mkdir()
    train, _ = split_instructions()
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train[:16]))
    return root
